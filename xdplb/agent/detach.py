"""``xdplb detach``: remove what a dead agent (or ``--keep``) left on an interface: its XDP
program, its pins and run files (the drain list too), and the nftables table of a scapy data
path. An agent still running on the interface is stopped first (SIGTERM, then its exit).
``detach --all`` removes the pins of instances whose namespace or interface is gone."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import time
from pathlib import Path

from xdplb.agent.errors import UsageError
from xdplb.instance import locks, pins, runfiles
from xdplb.kernel import bpfsys, xdp_link
from xdplb.userspace import nftguard

CLONE_NEWNET = 0x40000000


def detach_if_ours(name: str, prog_fd: int | None) -> bool:
    """Detach the XDP program of ``name`` if it is the one ``prog_fd`` refers to."""
    idx = xdp_link.ifindex(name)
    st = xdp_link.xdp_state(idx)
    if st is None or not st.prog_id:
        return False
    if prog_fd is not None and bpfsys.prog_info(prog_fd).id != st.prog_id:
        return False
    xdp_link.xdp_detach(idx)
    return True


def stop_owner(name: str, timeout: float = 30.0) -> str | None:
    """Stop the agent running on ``name`` (SIGTERM; it leaves as it would on Ctrl-C) and
    wait until it has let go of the interface. None when no agent runs there."""
    own = locks.owner(name)
    if not own or not own.get("pid"):
        return None
    pid = int(own["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while locks.owner(name) is not None:
        if time.monotonic() > deadline:
            raise OSError(f"the agent pid {pid} on {name} did not stop within {timeout:g}s")
        time.sleep(0.1)
    return f"stopped the running agent pid {pid} ({'+'.join(own.get('ifaces') or [name])})"


def detach(name: str, force: bool = False) -> list[str]:
    """Remove xdplb from ``name`` (program and pins), e.g. after an agent died with them in
    place. Returns what was done; raises LookupError when there was nothing to remove."""
    done: list[str] = []
    if stopped := stop_owner(name):
        done.append(stopped)
    idx = xdp_link.ifindex(name)
    for table in nftguard.tables_on(idx):  # left by a scapy data path that died
        nftguard.remove_table(table)
        done.append(f"removed nftables table netdev {table}")
    st = xdp_link.xdp_state(idx)
    groups = pins.groups_with(name)
    ours = {pins.prog_id(g) for g in groups} - {None}
    if st is not None and st.prog_id:
        if st.prog_id in ours or force:
            xdp_link.xdp_detach(idx)
            done.append(f"detached program {st.prog_id} from {name}")
        else:
            raise UsageError(
                f"{name} carries XDP program {st.prog_id}, which is not xdplb's; "
                f"use --force to remove it anyway"
            )
    for g in groups:
        still = []
        for other in g.ifaces:
            if other == name:
                continue
            try:
                o = xdp_link.xdp_state(xdp_link.ifindex(other))
            except (OSError, LookupError):
                continue
            if o is not None and o.prog_id and o.prog_id == pins.prog_id(g):
                still.append(other)
        if still:
            done.append(f"kept pins {g.path}: still attached to {', '.join(still)}")
            continue
        runfiles.clear(g)
        g.remove()
        done.append(f"removed pins {g.path}")
    for g in _run_state_only(name):  # a drain list kept after a stop without --keep
        runfiles.clear(g)
        done.append(f"removed run state {runfiles.run_dir(g)}")
    if not done:
        raise LookupError(f"no xdplb program or pins on {name}")
    return done


def _run_state_only(iface: str) -> list[pins.PinGroup]:
    """Groups of this namespace with ``iface`` that have run state but no pins."""
    out = []
    for v in _dirs(runfiles.RUN_ROOT):
        d = v / pins.netns_name()
        for g in _dirs(d):
            group = pins.PinGroup(pins.ns_dir(d.name, v.name) / g.name)
            if iface in group.ifaces and not group.exists():
                out.append(group)
    return out


def _dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def detach_stale() -> list[str]:
    """Remove the pins and run state of every instance whose network namespace or one of
    whose interfaces is gone (no agent can run there any more; e.g. ``kill -9`` and then the
    namespace deleted: the maps stay in bpffs, ~360 MB with the default sizes, until their
    pins go). Instances with a running agent are never touched."""
    done: list[str] = []
    found: dict[tuple[str, str, str], pins.PinGroup] = {}
    for root in (pins.BPFFS / pins.ROOT_NAME, runfiles.RUN_ROOT):
        for v in _dirs(root):
            for ns in _dirs(v):
                for g in _dirs(ns):
                    found[(v.name, ns.name, g.name)] = pins.PinGroup(
                        pins.ns_dir(ns.name, v.name) / g.name)
    links: dict[str, set[str] | None] = {}
    for (_, ns, _), group in sorted(found.items()):
        if ns not in links:
            links[ns] = links_in(ns)
        have = links[ns]
        missing = [] if have is None else [i for i in group.ifaces if i not in have]
        if have is not None and not missing:
            continue
        if any(locks.owner(i, ns) for i in group.ifaces):
            done.append(f"kept {group.path}: its agent still runs")
            continue
        why = (f"namespace {ns} is gone" if have is None
               else f"{', '.join(missing)} gone from namespace {ns}")
        runfiles.clear(group)
        if group.exists():
            group.remove()
            done.append(f"removed pins {group.path} ({why})")
        else:
            done.append(f"removed run state {runfiles.run_dir(group)} ({why})")
    return done


def _netns_path(ns: str) -> str | None:
    """A path that opens network namespace ``ns`` (a pins.netns_name()), or None if gone."""
    if ns == "host":
        return "/proc/1/ns/net"
    if ns.startswith("ns") and ns[2:].isdigit():  # unnamed: find a process still in it
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and os.stat(p / "ns" / "net").st_ino == int(ns[2:]):
                    return str(p / "ns" / "net")
            except OSError:
                continue
        return None
    path = Path("/run/netns") / ns
    return str(path) if path.is_file() and os.sep not in ns else None


def links_in(ns: str) -> set[str] | None:
    """Interface names of namespace ``ns``, or None when the namespace is gone. Read by a
    forked child that enters it, so that this process stays where it is."""
    if ns == pins.netns_name():
        return {n for _, n in socket.if_nameindex()}
    path = _netns_path(ns)
    if path is None:
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: enter, list, report, exit without running any cleanup
        code = 1
        try:
            os.close(r)
            fd = os.open(path, os.O_RDONLY)
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) == 0:
                os.write(w, json.dumps([n for _, n in socket.if_nameindex()]).encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:  # there, but not enterable: not gone
        raise OSError(f"cannot enter network namespace {ns} ({path}) to list its interfaces")
    return set(json.loads(out))
