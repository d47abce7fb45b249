"""The IPIP decapsulation program (bpf/decap.c) in the kernel: compile, pin, attach, and its
maps (the addresses it decapsulates for, its counters).

Compiled in-process: ``xdplb decap attach`` is a one-shot command, so LLVM leaves with it
(the balancer's agent compiles in a child only because it lives for weeks). The maps are
private to the program at load time and pinned by us afterwards, beside the program, so a
later command (status, detach, attach again) finds them; BCC's own pinned-table form would
silently reuse a pin of another layout.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

from xdplb.abi.decap import (
    COUNTER_NAMES,
    ENTRY,
    HEADER,
    MAP_BY_NAME,
    MAPS,
    MAX_LOCAL_ADDRS,
    SOURCE,
    addr_key,
    render_header,
)
from xdplb.kernel import bpfsys, xdp_link
from xdplb.kernel.loader import Program, bpf_dir, inline_includes, load_xdp
from xdplb.kernel.pinned import CompileError

log = logging.getLogger(__name__)

PROG_PIN = "prog"
ADDRS, COUNTERS = "decap_addrs", "decap_counters"
_VALUE = ctypes.sizeof(MAP_BY_NAME[COUNTERS].value)


def compile_decap() -> Program:
    """Compile and load bpf/decap.c (with BCC) with fresh, private maps."""
    d = bpf_dir()
    if not (d / SOURCE).is_file():
        raise CompileError(f"BPF source {d / SOURCE} not found (xdplb installed without it?)")
    text = inline_includes(SOURCE, {HEADER: render_header()}, [d])
    return load_xdp(text, ENTRY, SOURCE, [m.name for m in MAPS])


def pin(program: Program, pin_dir: Path) -> None:
    """Pin the program and its maps in ``pin_dir`` (created); the program last, so a
    directory with a program pin is complete."""
    pin_dir.mkdir(parents=True, exist_ok=True)
    for m in MAPS:
        bpfsys.obj_pin(program.map_fds[m.name], pin_dir / m.name)
    bpfsys.obj_pin(program.prog_fd, pin_dir / PROG_PIN)


def open_pinned(pin_dir: Path) -> dict[str, bpfsys.Fd]:
    """Fds of the pinned program (``prog``) and maps, by name; the caller closes them."""
    fds: dict[str, bpfsys.Fd] = {}
    try:
        for name in (PROG_PIN, *(m.name for m in MAPS)):
            fds[name] = bpfsys.obj_get(pin_dir / name)
    except OSError:
        for fd in fds.values():
            fd.close()
        raise
    return fds


def pinned_prog_id(pin_dir: Path) -> int | None:
    """Id of the program pinned in ``pin_dir``, or None."""
    if not (pin_dir / PROG_PIN).exists():
        return None
    with bpfsys.obj_get(pin_dir / PROG_PIN) as fd:
        return bpfsys.prog_info(fd).id


def read_addrs(fd: int) -> list[IPv4Address]:
    """The addresses in decap_addrs, sorted."""
    keys = bpfsys.map_keys(fd, 4)
    return sorted(IPv4Address(bytes(k)) for k in keys)


def sync_addrs(fd: int, addrs: Iterable[IPv4Address]) -> tuple[list[IPv4Address],
                                                               list[IPv4Address]]:
    """Make decap_addrs hold exactly ``addrs``: new ones first, then the gone ones deleted,
    so an address that stays is never missing for a packet. Returns (added, removed)."""
    want = set(addrs)
    if len(want) > MAX_LOCAL_ADDRS:
        raise ValueError(f"{len(want)} local addresses: the decap map holds {MAX_LOCAL_ADDRS}")
    have = set(read_addrs(fd))
    added, removed = sorted(want - have), sorted(have - want)
    for a in added:
        bpfsys.map_update(fd, _key(a), b"\x01")
    for a in removed:
        bpfsys.map_delete(fd, _key(a))
    return added, removed


def _key(a: IPv4Address) -> bytes:
    return addr_key(a.packed).to_bytes(4, "little")  # the wire bytes, as the program loads them


def read_counters(fd: int) -> dict[str, int]:
    """The counters by name, summed over CPUs."""
    out = {}
    for c, name in COUNTER_NAMES.items():
        raw = bpfsys.map_lookup(fd, int(c).to_bytes(4, "little"), _VALUE)
        vals = bpfsys.percpu_values(raw, _VALUE) if raw else []
        out[name] = sum(int.from_bytes(v, "little") for v in vals)
    return out


def attach(ifindex: int, prog_fd: int, mode: str) -> tuple[str, str | None]:
    """Attach in ``mode`` (native, generic; auto: native, else generic) only if the
    interface carries no XDP program. Returns (the mode used, why native was not used)."""
    modes = ["native", "generic"] if mode == "auto" else [mode]
    last: OSError | None = None
    for m in modes:
        try:
            xdp_link.xdp_attach(ifindex, prog_fd, m, if_noexist=True)
            return m, (str(last) if last else None)
        except xdp_link.NoSuchInterface:
            raise
        except OSError as e:
            last = e
    assert last is not None
    raise last


def detach(ifindex: int, prog_fd: int) -> bool:
    """Detach the program ``prog_fd`` from the interface if it is the attached one."""
    st = xdp_link.xdp_state(ifindex)
    if st is None or st.prog_id != bpfsys.prog_info(prog_fd).id:
        return False
    return xdp_link.xdp_detach(ifindex, mode=st.mode, expected_fd=prog_fd)
