"""Where xdplb keeps its pinned program and maps in bpffs.

    /sys/fs/bpf/xdplb/<layout version>/<netns>/<group>/{prog,<map>...}

``group`` is the attached interfaces joined by ``+`` (``eth0`` or ``eth0+eth1``): a
two-armed balancer shares one flow table between its interfaces. ``netns`` is the
network namespace's name (``host`` for the initial one) because interface names repeat
across namespaces while bpffs is shared. The layout version changes whenever a shared
struct or map changes, so a program never reopens maps of another layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from xdplb.abi.layout import layout_version
from xdplb.kernel import bpfsys
from xdplb.kernel.maps import KernelMaps

BPFFS = Path(os.environ.get("XDPLB_BPFFS", "/sys/fs/bpf"))
ROOT_NAME = "xdplb"
PROG_PIN = "prog"


CLONE_NEWNS = 0x00020000
BPF_FS_MAGIC = 0xCAFE4A11


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf when it is not (it is not mounted at boot everywhere).

    Never in the mount namespace `ip netns exec` makes (see :func:`enter_origin_mount_ns`):
    pins there would be private to one command and vanish with it."""
    if _is_bpffs(BPFFS):
        return
    if _origin_mount_ns() is not None:
        raise OSError(errno.EPERM, f"{BPFFS} is not bpffs in this mount namespace (`ip netns "
                                   "exec` mounts its own /sys, and pins made here would be "
                                   "lost with it): run `xdplb --netns NAME attach ...` instead")
    BPFFS.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount bpffs on {BPFFS}: {os.strerror(err)}")


def _is_bpffs(path: Path) -> bool:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type (a long) comes first
    if ctypes.CDLL(None, use_errno=True).statfs(str(path).encode(), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == BPF_FS_MAGIC


def enter_origin_mount_ns() -> bool:
    """Leave the mount namespace `ip netns exec` made for this process for the one it was
    run from, when that hides bpffs; returns whether it did.

    `ip netns exec NS cmd` enters NS's network namespace and, to mount NS's sysfs on /sys,
    a new mount namespace: /sys/fs/bpf is an empty directory there. Back in the mount
    namespace it came from (still in NS's network namespace) a command sees the same bpffs
    and pins as with `xdplb --netns NS`, so agents started either way find each other.
    Call it before any thread starts: setns() into a mount namespace needs a single thread.
    """
    if _is_bpffs(BPFFS) or (origin := _origin_mount_ns()) is None:
        return False
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    fd = os.open(origin, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter the mount namespace {origin}: {os.strerror(err)}")
    finally:
        os.close(fd)
    if cwd is not None:  # setns() moved us to "/"; relative paths (--config) mean the same
        with contextlib.suppress(OSError):
            os.chdir(cwd)
    return True


def _origin_mount_ns() -> str | None:
    """``/proc/PID/ns/mnt`` of the mount namespace `ip netns exec` left, when this process
    is in one it made: that of the nearest ancestor (up to PID 1) in another mount
    namespace, if the ancestor sees the same root directory (a container's do not)."""
    try:
        me, root = os.stat("/proc/self/ns/mnt").st_ino, os.stat("/")
    except OSError:
        return None
    pid = os.getppid()
    for _ in range(64):  # bounded: a ppid chain ends at 0, but /proc can change under us
        if pid <= 0:
            return None
        ns = f"/proc/{pid}/ns/mnt"
        try:
            if os.stat(ns).st_ino != me:
                return ns if os.path.samestat(os.stat(f"/proc/{pid}/root"), root) else None
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])  # field 4: ppid
        except (OSError, ValueError, IndexError):
            return None  # gone, or not ours to inspect
    return None


def netns_name() -> str:
    """Name of the calling process's network namespace: ``host``, a name from /run/netns,
    or ``ns<inode>``."""
    me = os.stat("/proc/self/ns/net").st_ino
    try:
        if os.stat("/proc/1/ns/net").st_ino == me:
            return "host"
    except OSError:
        pass
    run = Path("/run/netns")
    if run.is_dir():
        for entry in sorted(run.iterdir()):
            try:
                if entry.stat().st_ino == me:
                    return entry.name
            except OSError:
                continue
    return f"ns{me}"


@dataclass(frozen=True)
class PinGroup:
    """The pin directory of one balancer instance (one or more interfaces)."""

    path: Path

    @property
    def ifaces(self) -> list[str]:
        return self.path.name.split("+")

    @property
    def prog(self) -> Path:
        return self.path / PROG_PIN

    def map_path(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return self.path.is_dir()

    def remove(self) -> None:
        """Unpin everything (objects still in use stay alive until released)."""
        if self.path.is_dir():
            shutil.rmtree(self.path)
        _prune_empty(self.path.parent)


def ns_dir(ns: str | None = None, version: str | None = None) -> Path:
    return BPFFS / ROOT_NAME / (version or layout_version()) / (ns or netns_name())


def group_for(ifaces: list[str], ns: str | None = None) -> PinGroup:
    return PinGroup(ns_dir(ns) / "+".join(ifaces))


def groups(ns: str | None = None, any_version: bool = False) -> list[PinGroup]:
    """Pin groups of this namespace (of every layout version when ``any_version``)."""
    root = BPFFS / ROOT_NAME
    versions = (
        [p.name for p in root.iterdir() if p.is_dir()] if any_version and root.is_dir()
        else [layout_version()]
    )
    out = []
    for v in sorted(versions):
        d = ns_dir(ns, v)
        if d.is_dir():
            out += [PinGroup(p) for p in sorted(d.iterdir()) if p.is_dir()]
    return out


def groups_with(iface: str, ns: str | None = None, any_version: bool = True) -> list[PinGroup]:
    return [g for g in groups(ns, any_version) if iface in g.ifaces]


def _prune_empty(path: Path) -> None:
    """Remove empty parents up to (not including) the xdplb root."""
    root = BPFFS / ROOT_NAME
    while path != root and root in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent
    with contextlib.suppress(OSError):
        root.rmdir()


def prog_id(group: PinGroup) -> int | None:
    """Id of the program pinned in a group, or None."""
    if not group.prog.exists():
        return None
    fd = bpfsys.obj_get(group.prog)
    try:
        return bpfsys.prog_info(fd).id
    finally:
        bpfsys.close(fd)


def open_maps(group: PinGroup) -> KernelMaps:
    """Maps of a pin group, for readers in another process."""
    return KernelMaps.open_pinned(Path(group.path))
