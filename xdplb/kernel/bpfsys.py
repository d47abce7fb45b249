"""Direct bpf(2) access through ctypes: maps, pins, program info, test runs.

Nothing here compiles with BCC, so the agent, the CLI (reading pinned maps of another process),
the tests and a userspace data path can all share it. Layouts follow
include/uapi/linux/bpf.h; only the fields this module uses are declared, and the kernel treats
the missing tail of `union bpf_attr` as zero.

File descriptors are returned as `Fd`, an `int` subclass with `close()` and context-manager
support, so they can be handed straight to pyroute2 or `os` functions. Map operations check key
and value sizes against the map (cached on an `Fd`, one BPF_OBJ_GET_INFO_BY_FD call for a bare
int) because the kernel copies as many bytes as the map says, whatever the Python buffer holds.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

# --- constants ------------------------------------------------------------------------------

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

# enum bpf_map_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_DEVMAP = 14
BPF_MAP_TYPE_CPUMAP = 16
BPF_MAP_TYPE_XSKMAP = 17
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_DEVMAP_HASH = 25
BPF_MAP_TYPE_RINGBUF = 27

PERCPU_MAP_TYPES = frozenset(
    {
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
    }
)

# enum bpf_prog_type
BPF_PROG_TYPE_XDP = 6

# map update flags (elem flags)
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4

# map create flags
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_NO_COMMON_LRU = 1 << 1
BPF_F_NUMA_NODE = 1 << 2
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_ZERO_SEED = 1 << 6
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8
BPF_F_MMAPABLE = 1 << 10
BPF_F_INNER_MAP = 1 << 12  # an inner map type whose max_entries may differ per map

# prog load / test run flags
BPF_F_XDP_HAS_FRAGS = 1 << 5
BPF_F_TEST_RUN_ON_CPU = 1 << 0
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1

# XDP verdicts (enum xdp_action)
XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# Kernel-internal "not supported" that leaks to userspace from batch ops on map types without
# them; strerror() does not know it.
ENOTSUPP = 524

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280}

# --- errors and fds -------------------------------------------------------------------------


class BpfError(OSError):
    """A failed bpf(2) call: `errno` as usual, `op` names the operation, `log` any verifier log."""

    def __init__(self, err: int, op: str, detail: str = "", log: str = "") -> None:
        reason = "not supported (ENOTSUPP)" if err == ENOTSUPP else os.strerror(err)
        msg = f"{op}: {reason}"
        if detail:
            msg += f" ({detail})"
        if log:
            # The end of a verifier log holds the rejected instruction and the reason.
            tail = log.rstrip().splitlines()[-20:]
            msg += "\nverifier log (tail):\n" + "\n".join(tail)
        super().__init__(err, msg)
        self.op = op
        self.log = log


class Fd(int):
    """An owned bpf object file descriptor.

    It is an int, so it passes wherever an fd does. It is not closed on garbage collection,
    because copies of the number may be in use elsewhere: close it, or use `with`.
    """

    def __new__(cls, fd: int) -> Fd:
        self = super().__new__(cls, fd)
        self._closed = False
        self._map_info: MapInfo | None = None
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return int(self)

    def close(self) -> None:
        """Close once; later calls do nothing."""
        if not self._closed:
            self._closed = True
            os.close(int(self))

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Fd({int(self)}{', closed' if self._closed else ''})"


def close(fd: int) -> None:
    """Close an fd from this module (an `Fd` or a bare int)."""
    if isinstance(fd, Fd):
        fd.close()
    else:
        os.close(fd)


# --- bpf_attr layouts -------------------------------------------------------------------------

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64  # 8-byte aligned in ctypes on 64-bit hosts, like __aligned_u64


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("inner_map_fd", _u32),
        ("numa_node", _u32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("map_ifindex", _u32),
        ("btf_fd", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("map_extra", _u64),
    ]


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", _u32),
        ("key", _u64),
        ("value", _u64),  # also next_key
        ("flags", _u64),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", _u64),
        ("out_batch", _u64),
        ("keys", _u64),
        ("values", _u64),
        ("count", _u32),
        ("map_fd", _u32),
        ("elem_flags", _u64),
        ("flags", _u64),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", _u32),
        ("insn_cnt", _u32),
        ("insns", _u64),
        ("license", _u64),
        ("log_level", _u32),
        ("log_size", _u32),
        ("log_buf", _u64),
        ("kern_version", _u32),
        ("prog_flags", _u32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("prog_ifindex", _u32),
        ("expected_attach_type", _u32),
        ("prog_btf_fd", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("func_info_cnt", _u32),
        ("line_info_rec_size", _u32),
        ("line_info", _u64),
        ("line_info_cnt", _u32),
        ("attach_btf_id", _u32),
        ("attach_prog_fd", _u32),
        ("core_relo_cnt", _u32),
        ("fd_array", _u64),
        ("core_relos", _u64),
        ("core_relo_rec_size", _u32),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32)]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", _u32),
        ("retval", _u32),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("data_in", _u64),
        ("data_out", _u64),
        ("repeat", _u32),
        ("duration", _u32),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("ctx_in", _u64),
        ("ctx_out", _u64),
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
    ]


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", _u32), ("next_id", _u32), ("open_flags", _u32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class _BpfAttr(ctypes.Union):
    _fields_ = [
        ("map_create", _MapCreateAttr),
        ("elem", _ElemAttr),
        ("batch", _BatchAttr),
        ("prog_load", _ProgLoadAttr),
        ("obj", _ObjAttr),
        ("test", _TestRunAttr),
        ("id", _IdAttr),
        ("info", _InfoAttr),
    ]


class _BpfMapInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("btf_id", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("_pad", _u32),
        ("map_extra", _u64),
    ]


class _BpfProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("gpl_compatible", _u32, 1),
        ("_pad0", _u32, 31),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32),
        ("jited_ksyms", _u64),
        ("jited_func_lens", _u64),
        ("btf_id", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("nr_func_info", _u32),
        ("nr_line_info", _u32),
        ("line_info", _u64),
        ("jited_line_info", _u64),
        ("nr_jited_line_info", _u32),
        ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32),
        ("nr_prog_tags", _u32),
        ("prog_tags", _u64),
        ("run_time_ns", _u64),
        ("run_cnt", _u64),
        ("recursion_misses", _u64),
        ("verified_insns", _u32),
        ("attach_btf_obj_id", _u32),
        ("attach_btf_id", _u32),
        ("_pad1", _u32),
    ]


# Offsets checked against the UAPI header; a wrong layout would corrupt memory, not just fail.
assert ctypes.sizeof(_MapCreateAttr) == 72
assert _ProgLoadAttr.core_relo_rec_size.offset == 136 and ctypes.sizeof(_BpfAttr) == 144
assert ctypes.sizeof(_TestRunAttr) == 80
assert ctypes.sizeof(_BpfMapInfo) == 88
assert ctypes.sizeof(_BpfProgInfo) == 232 and _BpfProgInfo.run_cnt.offset == 200

# --- the syscall ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


@functools.cache
def _nr() -> int:
    try:
        return _SYSCALL_NR[platform.machine()]
    except KeyError:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown for {platform.machine()}") from None


def _bpf(cmd: int, attr: _BpfAttr) -> tuple[int, int]:
    """Run bpf(cmd, attr); return (result, errno) with errno 0 on success."""
    ret = _syscall(_nr(), cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        return ret, ctypes.get_errno()
    return ret, 0


def _bpf_ok(cmd: int, attr: _BpfAttr, op: str, detail: str = "") -> int:
    ret, err = _bpf(cmd, attr)
    if err:
        raise BpfError(err, op, detail)
    return ret


def _addr(buf: ctypes.Array | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def _in_buf(data: bytes) -> ctypes.Array:
    # A private copy: the kernel only reads it, but the pointer must stay valid for the call.
    return ctypes.create_string_buffer(bytes(data), len(data))


def _obj_name(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= BPF_OBJ_NAME_LEN:
        raise ValueError(f"bpf object name {name!r} longer than {BPF_OBJ_NAME_LEN - 1} bytes")
    if not all(c.isalnum() or c in "_." for c in name) or not name.isascii():
        raise ValueError(f"bpf object name {name!r}: only ASCII letters, digits, '_' and '.'")
    return raw


# --- per-CPU helpers ------------------------------------------------------------------------


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs: the kernel sizes per-CPU map values by this, not online CPUs."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def percpu_stride(value_size: int) -> int:
    """Bytes one CPU's value occupies in a per-CPU value buffer (rounded up to 8)."""
    return (value_size + 7) & ~7


def percpu_values(blob: bytes, value_size: int) -> list[bytes]:
    """Split a per-CPU value buffer into one `value_size` value per possible CPU."""
    stride = percpu_stride(value_size)
    if len(blob) % stride:
        raise ValueError(f"per-CPU buffer of {len(blob)} bytes is not a multiple of {stride}")
    return [blob[i : i + value_size] for i in range(0, len(blob), stride)]


def percpu_blob(values: Sequence[bytes], value_size: int) -> bytes:
    """Build a per-CPU value buffer from one value per possible CPU."""
    if len(values) != possible_cpus():
        raise ValueError(f"need {possible_cpus()} per-CPU values, got {len(values)}")
    pad = percpu_stride(value_size) - value_size
    out = bytearray()
    for v in values:
        if len(v) != value_size:
            raise ValueError(f"per-CPU value of {len(v)} bytes, map value_size is {value_size}")
        out += v + bytes(pad)
    return bytes(out)


# --- info -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapInfo:
    """What BPF_OBJ_GET_INFO_BY_FD says about a map."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str
    ifindex: int = 0
    btf_id: int = 0

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES

    @property
    def value_buf_size(self) -> int:
        """Bytes the kernel copies per value from/to userspace (all CPUs for per-CPU maps)."""
        if self.percpu:
            return percpu_stride(self.value_size) * possible_cpus()
        return self.value_size


@dataclass(frozen=True)
class ProgInfo:
    """What BPF_OBJ_GET_INFO_BY_FD says about a program."""

    type: int
    id: int
    tag: str  # hex, as bpftool prints it
    name: str
    load_time: int  # ns since boot
    map_ids: list[int] = field(default_factory=list)
    created_by_uid: int = 0
    run_time_ns: int = 0  # only counted while kernel.bpf_stats_enabled=1
    run_cnt: int = 0


def _get_info(fd: int, info: ctypes.Structure, op: str, kind: str) -> None:
    # GET_INFO_BY_FD fills whatever struct the fd's object type has: a prog fd passed as a map
    # would "succeed" with garbage. /proc names the object type ("anon_inode:bpf-map").
    try:
        target = os.readlink(f"/proc/self/fd/{int(fd)}")
    except OSError:
        target = None  # no /proc, or a bad fd that the syscall below reports
    if target is not None and target != f"anon_inode:{kind}":
        raise BpfError(errno.EINVAL, op, f"fd {int(fd)} is {target}, not {kind}")
    attr = _BpfAttr()
    attr.info.bpf_fd = int(fd)
    attr.info.info_len = ctypes.sizeof(info)
    attr.info.info = ctypes.addressof(info)
    _bpf_ok(BPF_OBJ_GET_INFO_BY_FD, attr, op, f"fd {int(fd)}")


def map_info(fd: int) -> MapInfo:
    """Type, id, sizes, flags and name of a map."""
    raw = _BpfMapInfo()
    _get_info(fd, raw, "map_info", "bpf-map")
    return MapInfo(
        type=raw.type,
        id=raw.id,
        key_size=raw.key_size,
        value_size=raw.value_size,
        max_entries=raw.max_entries,
        map_flags=raw.map_flags,
        name=raw.name.decode(errors="replace"),
        ifindex=raw.ifindex,
        btf_id=raw.btf_id,
    )


def map_memlock(fd: int) -> int:
    """Bytes of kernel memory the map holds, as the kernel accounts it (fdinfo memlock)."""
    with open(f"/proc/self/fdinfo/{int(fd)}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    raise BpfError(errno.EINVAL, "map_memlock", f"fd {int(fd)} is not a map")


def prog_info(fd: int) -> ProgInfo:
    """Type, id, tag, name, load time and map ids of a program."""
    raw = _BpfProgInfo()
    _get_info(fd, raw, "prog_info", "bpf-prog")
    ids: list[int] = []
    if raw.nr_map_ids:
        # A fresh struct: the kernel reads the length fields it filled in the first call
        # (jited_prog_len, ...) as buffer sizes, and would write to their NULL pointers.
        arr = (_u32 * raw.nr_map_ids)()
        again = _BpfProgInfo(nr_map_ids=raw.nr_map_ids, map_ids=ctypes.addressof(arr))
        _get_info(fd, again, "prog_info", "bpf-prog")
        ids = list(arr[: min(raw.nr_map_ids, again.nr_map_ids)])
    return ProgInfo(
        type=raw.type,
        id=raw.id,
        tag=bytes(raw.tag).hex(),
        name=raw.name.decode(errors="replace"),
        load_time=raw.load_time,
        map_ids=ids,
        created_by_uid=raw.created_by_uid,
        run_time_ns=raw.run_time_ns,
        run_cnt=raw.run_cnt,
    )


def _layout(fd: int) -> MapInfo:
    """Map info, cached on an `Fd` (a map's type and sizes never change)."""
    if isinstance(fd, Fd):
        if fd._map_info is None:
            fd._map_info = map_info(fd)
        return fd._map_info
    return map_info(fd)


def _check_key(info: MapInfo, key: bytes, op: str) -> None:
    if len(key) != info.key_size:
        raise ValueError(f"{op}: key of {len(key)} bytes, map key_size is {info.key_size}")


def _check_value_size(info: MapInfo, value_size: int, op: str) -> None:
    if value_size != info.value_size:
        raise ValueError(f"{op}: value_size {value_size}, map value_size is {info.value_size}")


# --- objects --------------------------------------------------------------------------------


def map_create(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    name: str = "",
) -> Fd:
    """Create a map (BPF_MAP_CREATE)."""
    attr = _BpfAttr()
    a = attr.map_create
    a.map_type = map_type
    a.key_size = key_size
    a.value_size = value_size
    a.max_entries = max_entries
    a.map_flags = flags
    a.map_name = _obj_name(name)
    fd = _bpf_ok(
        BPF_MAP_CREATE,
        attr,
        "map_create",
        f"type {map_type} key {key_size} value {value_size} max {max_entries} flags {flags:#x}",
    )
    return Fd(fd)


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    """Pin a map or program at `path` (on bpffs)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _BpfAttr()
    attr.obj.pathname = ctypes.addressof(p)
    attr.obj.bpf_fd = int(fd)
    _bpf_ok(BPF_OBJ_PIN, attr, "obj_pin", os.fsdecode(path))


def obj_get(path: str | os.PathLike[str], flags: int = 0) -> Fd:
    """Open a pinned map or program; `flags` may be BPF_F_RDONLY or BPF_F_WRONLY."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _BpfAttr()
    attr.obj.pathname = ctypes.addressof(p)
    attr.obj.file_flags = flags
    return Fd(_bpf_ok(BPF_OBJ_GET, attr, "obj_get", os.fsdecode(path)))


def _get_fd_by_id(cmd: int, obj_id: int, op: str, open_flags: int = 0) -> Fd:
    attr = _BpfAttr()
    attr.id.id = obj_id
    attr.id.open_flags = open_flags
    return Fd(_bpf_ok(cmd, attr, op, f"id {obj_id}"))


def prog_get_fd_by_id(prog_id: int) -> Fd:
    """Open a loaded program by id."""
    return _get_fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id, "prog_get_fd_by_id")


def map_get_fd_by_id(map_id: int, flags: int = 0) -> Fd:
    """Open a map by id; `flags` may be BPF_F_RDONLY or BPF_F_WRONLY."""
    return _get_fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id, "map_get_fd_by_id", flags)


def _ids(cmd: int, op: str) -> Iterator[int]:
    cur = 0
    while True:
        attr = _BpfAttr()
        attr.id.id = cur
        _, err = _bpf(cmd, attr)
        if err == errno.ENOENT:
            return
        if err:
            raise BpfError(err, op)
        cur = attr.id.next_id
        yield cur


def prog_ids() -> Iterator[int]:
    """Ids of all loaded programs."""
    return _ids(BPF_PROG_GET_NEXT_ID, "prog_get_next_id")


def map_ids() -> Iterator[int]:
    """Ids of all maps."""
    return _ids(BPF_MAP_GET_NEXT_ID, "map_get_next_id")


# --- single-element map ops -----------------------------------------------------------------


def map_lookup(fd: int, key: bytes, value_size: int, percpu: bool | None = None) -> bytes | None:
    """Value for `key`, or None if absent.

    For per-CPU maps the result is the whole per-CPU buffer (split it with `percpu_values`).
    `percpu=None` asks the map; True/False must agree with it.
    """
    info = _layout(fd)
    _check_key(info, key, "map_lookup")
    _check_value_size(info, value_size, "map_lookup")
    if percpu is not None and percpu != info.percpu:
        raise ValueError(f"map_lookup: percpu={percpu} but map type {info.type} disagrees")
    k = _in_buf(key)
    out = ctypes.create_string_buffer(info.value_buf_size)
    attr = _BpfAttr()
    attr.elem.map_fd = int(fd)
    attr.elem.key = ctypes.addressof(k)
    attr.elem.value = ctypes.addressof(out)
    _, err = _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    if err == errno.ENOENT:
        return None
    if err:
        raise BpfError(err, "map_lookup", f"fd {int(fd)}")
    return out.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Insert or update `key` (flags: BPF_ANY, BPF_NOEXIST, BPF_EXIST).

    For per-CPU maps `value` is the whole per-CPU buffer (see `percpu_blob`).
    """
    info = _layout(fd)
    _check_key(info, key, "map_update")
    if len(value) != info.value_buf_size:
        hint = " (per-CPU map: use percpu_blob)" if info.percpu else ""
        raise ValueError(
            f"map_update: value of {len(value)} bytes, map needs {info.value_buf_size}{hint}"
        )
    k, v = _in_buf(key), _in_buf(value)
    attr = _BpfAttr()
    attr.elem.map_fd = int(fd)
    attr.elem.key = ctypes.addressof(k)
    attr.elem.value = ctypes.addressof(v)
    attr.elem.flags = flags
    _bpf_ok(BPF_MAP_UPDATE_ELEM, attr, "map_update", f"fd {int(fd)}")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete `key`; False if it was not there."""
    info = _layout(fd)
    _check_key(info, key, "map_delete")
    k = _in_buf(key)
    attr = _BpfAttr()
    attr.elem.map_fd = int(fd)
    attr.elem.key = ctypes.addressof(k)
    _, err = _bpf(BPF_MAP_DELETE_ELEM, attr)
    if err == errno.ENOENT:
        return False
    if err:
        raise BpfError(err, "map_delete", f"fd {int(fd)}")
    return True


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after `key` (the first one for None); None at the end."""
    info = _layout(fd)
    if key_size != info.key_size:
        raise ValueError(f"map_get_next_key: key_size {key_size}, map has {info.key_size}")
    if key is not None:
        _check_key(info, key, "map_get_next_key")
    k = _in_buf(key) if key is not None else None
    out = ctypes.create_string_buffer(key_size)
    attr = _BpfAttr()
    attr.elem.map_fd = int(fd)
    attr.elem.key = _addr(k)
    attr.elem.value = ctypes.addressof(out)
    _, err = _bpf(BPF_MAP_GET_NEXT_KEY, attr)
    if err == errno.ENOENT:
        return None
    if err:
        raise BpfError(err, "map_get_next_key", f"fd {int(fd)}")
    return out.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """All keys, by get_next_key. Deleting the current key of a hash map restarts the walk."""
    key = map_get_next_key(fd, None, key_size)
    while key is not None:
        yield key
        key = map_get_next_key(fd, key, key_size)


# --- batch ops ------------------------------------------------------------------------------

_NO_BATCH = (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP)


def map_lookup_batch(
    fd: int, key_size: int, value_size: int, batch: int = 4096
) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """Dump a map in chunks of up to `batch` entries: yields (keys, values).

    Uses BPF_MAP_LOOKUP_BATCH, or get_next_key + lookup for map types without it. Per-CPU
    values are whole per-CPU buffers. A chunk is larger than `batch` only when one hash bucket
    holds more entries than that. A map changing meanwhile may be seen partly.
    """
    vsize = _layout(fd).value_buf_size
    for keys, vals, got in map_lookup_batch_raw(fd, key_size, value_size, batch):
        yield [keys[i * key_size:(i + 1) * key_size] for i in range(got)], \
            [vals[i * vsize:(i + 1) * vsize] for i in range(got)]


def map_lookup_batch_raw(
    fd: int, key_size: int, value_size: int, batch: int = 4096
) -> Iterator[tuple[bytes, bytes, int]]:
    """map_lookup_batch's chunks as packed bytes: (keys, values, count), no object per entry
    (for numpy readers)."""
    info = _layout(fd)
    if key_size != info.key_size:
        raise ValueError(f"map_lookup_batch: key_size {key_size}, map has {info.key_size}")
    _check_value_size(info, value_size, "map_lookup_batch")
    if batch < 1:
        raise ValueError("map_lookup_batch: batch must be >= 1")
    vsize = info.value_buf_size
    # Hash maps resume from a u32 bucket index, arrays and others from a key: room for both.
    tok_size = max(key_size, 4)
    tokens = [ctypes.create_string_buffer(tok_size), ctypes.create_string_buffer(tok_size)]
    in_tok: ctypes.Array | None = None
    n = cap = batch
    keys = ctypes.create_string_buffer(key_size * cap)
    vals = ctypes.create_string_buffer(vsize * cap)
    first = True
    while True:
        out_tok = tokens[1] if in_tok is tokens[0] else tokens[0]
        attr = _BpfAttr()
        b = attr.batch
        b.in_batch = _addr(in_tok)
        b.out_batch = ctypes.addressof(out_tok)
        b.keys = ctypes.addressof(keys)
        b.values = ctypes.addressof(vals)
        b.count = n
        b.map_fd = int(fd)
        _, err = _bpf(BPF_MAP_LOOKUP_BATCH, attr)
        if err == errno.ENOSPC and b.count == 0:
            # The next hash bucket holds more entries than `n`: the kernel returns none of
            # them, so retry the same position with a larger count (shrinking cannot help).
            limit = max(info.max_entries, 1)
            if n >= limit:
                raise BpfError(err, "map_lookup_batch", f"fd {int(fd)}, batch {n}")
            n = min(n * 2, limit)
            if n > cap:
                cap = n
                keys = ctypes.create_string_buffer(key_size * cap)
                vals = ctypes.create_string_buffer(vsize * cap)
            continue
        if err in _NO_BATCH and first:
            for ks, vs in _lookup_batch_fallback(fd, key_size, value_size, batch):
                yield b"".join(ks), b"".join(vs), len(ks)
            return
        if err and err != errno.ENOENT:
            raise BpfError(err, "map_lookup_batch", f"fd {int(fd)}")
        first = False
        got = b.count
        if got:
            yield (ctypes.string_at(keys, key_size * got), ctypes.string_at(vals, vsize * got),
                   got)
        # ENOENT marks the end, and may come with the last entries.
        if err == errno.ENOENT:
            return
        in_tok = out_tok
        n = batch


def _lookup_batch_fallback(
    fd: int, key_size: int, value_size: int, batch: int
) -> Iterator[tuple[list[bytes], list[bytes]]]:
    ks: list[bytes] = []
    vs: list[bytes] = []
    for key in map_keys(fd, key_size):
        value = map_lookup(fd, key, value_size)
        if value is None:  # deleted between get_next_key and lookup
            continue
        ks.append(key)
        vs.append(value)
        if len(ks) >= batch:
            yield ks, vs
            ks, vs = [], []
    if ks:
        yield ks, vs


def map_update_batch(
    fd: int, keys: Sequence[bytes], values: Sequence[bytes], flags: int = BPF_ANY
) -> None:
    """Update many entries (BPF_MAP_UPDATE_BATCH; element by element where unsupported).

    `flags` applies to every element. On error, entries before the failing one are written.
    """
    info = _layout(fd)
    if len(keys) != len(values):
        raise ValueError("map_update_batch: keys and values differ in length")
    if not keys:
        return
    for k in keys:
        _check_key(info, k, "map_update_batch")
    for v in values:
        if len(v) != info.value_buf_size:
            raise ValueError(
                f"map_update_batch: value of {len(v)} bytes, map needs {info.value_buf_size}"
            )
    # The batch command takes no BPF_NOEXIST/BPF_EXIST (EINVAL): only BPF_ANY and BPF_F_LOCK.
    if flags & ~BPF_F_LOCK:
        for k, v in zip(keys, values, strict=True):
            map_update(fd, k, v, flags)
        return
    err, written = _update_batch(fd, b"".join(keys), b"".join(values), len(keys), flags)
    if not err:
        return
    # Rejected before touching any element (count is left as passed, or 0): a map type without
    # batch support, or a bad first element, which the one-by-one path reports exactly.
    if err in _NO_BATCH and written in (0, len(keys)):
        for k, v in zip(keys, values, strict=True):
            map_update(fd, k, v, flags)
        return
    raise BpfError(err, "map_update_batch", f"fd {int(fd)}, {written}/{len(keys)} written")


def _update_batch(fd: int, keys: bytes, values: bytes, count: int, flags: int = BPF_ANY
                  ) -> tuple[int, int]:
    """One BPF_MAP_UPDATE_BATCH of ``count`` packed keys and values: (errno, count done)."""
    kbuf, vbuf = _in_buf(keys), _in_buf(values)
    attr = _BpfAttr()
    b = attr.batch
    b.keys = ctypes.addressof(kbuf)
    b.values = ctypes.addressof(vbuf)
    b.count = count
    b.map_fd = int(fd)
    b.elem_flags = flags
    _, err = _bpf(BPF_MAP_UPDATE_BATCH, attr)
    return err, b.count


def array_fill(fd: int, values: bytes, value_size: int) -> None:
    """Write indexes 0..n-1 of an array map from ``values`` (n packed values) in one call:
    a ring of 65,537 slots without 65,537 Python objects."""
    n = len(values) // value_size
    import numpy as np  # only here: bpfsys is imported by readers that never fill arrays

    keys = np.arange(n, dtype="<u4").tobytes()
    err, written = _update_batch(fd, keys, values, n)
    if err:
        raise BpfError(err, "array_fill", f"fd {int(fd)}, {written}/{n} written")


def map_delete_batch(fd: int, keys: Sequence[bytes]) -> int:
    """Delete many keys, skipping absent ones; returns how many were deleted."""
    info = _layout(fd)
    for k in keys:
        _check_key(info, k, "map_delete_batch")
    deleted = 0
    start = 0
    buf = _in_buf(b"".join(keys))
    while start < len(keys):
        want = len(keys) - start
        attr = _BpfAttr()
        b = attr.batch
        b.keys = ctypes.addressof(buf) + start * info.key_size
        b.count = want
        b.map_fd = int(fd)
        _, err = _bpf(BPF_MAP_DELETE_BATCH, attr)
        if not err:
            deleted += want
            break
        if err in _NO_BATCH and b.count in (0, want):
            deleted += sum(map_delete(fd, k) for k in keys[start:])
            break
        deleted += b.count
        start += b.count
        if err != errno.ENOENT:
            raise BpfError(err, "map_delete_batch", f"fd {int(fd)}, {deleted} deleted")
        start += 1  # the kernel stops at an absent key: skip it and go on
    return deleted


# --- programs -------------------------------------------------------------------------------


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """Encode one struct bpf_insn (little-endian host)."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


BPF_MOV64_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
BPF_EXIT = 0x95  # BPF_JMP | BPF_EXIT


def prog_load_xdp(insns: bytes, license: str = "GPL", name: str = "", prog_flags: int = 0) -> Fd:
    """Load an XDP program from raw instructions; the verifier log goes into the error."""
    if not insns or len(insns) % 8:
        raise ValueError("prog_load_xdp: instructions must be a non-empty multiple of 8 bytes")
    code = _in_buf(insns)
    lic = ctypes.create_string_buffer(license.encode())

    def attempt(log: ctypes.Array | None) -> tuple[int, int]:
        attr = _BpfAttr()
        p = attr.prog_load
        p.prog_type = BPF_PROG_TYPE_XDP
        p.insn_cnt = len(insns) // 8
        p.insns = ctypes.addressof(code)
        p.license = ctypes.addressof(lic)
        p.prog_flags = prog_flags
        p.prog_name = _obj_name(name)
        if log is not None:
            p.log_level = 1
            p.log_size = len(log)
            p.log_buf = ctypes.addressof(log)
        return _bpf(BPF_PROG_LOAD, attr)

    # Load without a log first, as libbpf does: logging slows the verifier down.
    fd, err = attempt(None)
    if not err:
        return Fd(fd)
    log = ctypes.create_string_buffer(1 << 20)
    fd, err2 = attempt(log)
    if not err2:  # loaded on the retry (e.g. a passing EAGAIN)
        return Fd(fd)
    text = log.value.decode(errors="replace")
    raise BpfError(err, "prog_load_xdp", f"{len(insns) // 8} insns", log=text)


def load_xdp_return(verdict: int, name: str = "") -> Fd:
    """Load `r0 = verdict; exit`."""
    return prog_load_xdp(insn(BPF_MOV64_K, imm=verdict) + insn(BPF_EXIT), name=name)


def load_xdp_pass(name: str = "xdplb_pass") -> Fd:
    """Load the 2-instruction program that returns XDP_PASS."""
    return load_xdp_return(XDP_PASS, name)


# --- test runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestRunResult:
    """Outcome of BPF_PROG_TEST_RUN."""

    __test__ = False  # not a pytest test class, despite the name

    retval: int
    data_out: bytes
    duration_ns: int  # mean per run
    ctx_out: bytes | None = None


XDP_MD_SIZE = 24


def xdp_md(frame_len: int, ingress_ifindex: int = 0, rx_queue_index: int = 0) -> bytes:
    """A struct xdp_md for `prog_test_run(ctx_in=...)`.

    The kernel wants data = data_meta = 0, data_end = frame length and egress_ifindex = 0;
    ingress_ifindex must exist in the caller's netns and rx_queue_index be one of its queues.
    """
    return struct.pack("<6I", 0, frame_len, 0, ingress_ifindex, rx_queue_index, 0)


def prog_test_run(
    prog_fd: int,
    data: bytes,
    repeat: int = 1,
    ctx_in: bytes | None = None,
    data_out_size: int | None = None,
    flags: int = 0,
) -> TestRunResult:
    """Run a program once (or `repeat` times) on `data` with BPF_PROG_TEST_RUN.

    Not retried on a too-small output buffer, because runs have map side effects.
    """
    din = _in_buf(data)
    out_size = data_out_size if data_out_size is not None else len(data) + 4096
    dout = ctypes.create_string_buffer(max(out_size, 1))
    cin = _in_buf(ctx_in) if ctx_in is not None else None
    cout = ctypes.create_string_buffer(len(ctx_in)) if ctx_in is not None else None
    attr = _BpfAttr()
    t = attr.test
    t.prog_fd = int(prog_fd)
    t.data_in = ctypes.addressof(din)
    t.data_size_in = len(data)
    t.data_out = ctypes.addressof(dout)
    t.data_size_out = out_size
    t.repeat = repeat
    t.flags = flags
    if ctx_in is not None:
        t.ctx_in = _addr(cin)
        t.ctx_size_in = len(ctx_in)
        t.ctx_out = _addr(cout)
        t.ctx_size_out = len(ctx_in)
    _, err = _bpf(BPF_PROG_TEST_RUN, attr)
    if err:
        detail = f"frame of {len(data)} bytes"
        if err == errno.ENOSPC:
            detail += f", output needs {t.data_size_out} bytes, buffer has {out_size}"
        elif err == errno.EINVAL and len(data) < 14:
            detail += ", shorter than an Ethernet header"
        raise BpfError(err, "prog_test_run", detail)
    return TestRunResult(
        retval=t.retval,
        data_out=ctypes.string_at(dout, t.data_size_out),
        duration_ns=t.duration,
        ctx_out=cout.raw[: t.ctx_size_out] if cout is not None else None,
    )
