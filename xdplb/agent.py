"""The agent: compile, fill the maps from the config, attach, run until told to stop.

Nothing on an interface changes until the config has validated, the interfaces exist,
no foreign XDP program is in the way, and the program has compiled and its maps are
filled: a bad config or a failed compile leaves the running state as it was.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from xdplb import bpfsys, pins, xdp_link
from xdplb.config import Config
from xdplb.layout import MAP_BY_NAME, MAX_VIPS
from xdplb.maps import KernelMaps
from xdplb.program import Program, compile_program
from xdplb.state import desired_state
from xdplb.sync import MapSync

log = logging.getLogger("xdplb")

MODES = ("native", "generic", "auto")


class AttachError(RuntimeError):
    """Attaching failed; the message says why and what to do."""


class UsageError(ValueError):
    """The request cannot be met as asked (missing interface, foreign program...)."""


def pinned_prog_id(group: pins.PinGroup) -> int | None:
    """Id of the program pinned in a group, or None."""
    if not group.prog.exists():
        return None
    fd = bpfsys.obj_get(group.prog)
    try:
        return bpfsys.prog_info(fd).id
    finally:
        bpfsys.close(fd)


def _check_pinned_sizes(group: pins.PinGroup, cfg: Config) -> None:
    """Pinned maps are reused as they are: their sizes must match this config."""
    want = {
        "maglev": MAX_VIPS * cfg.maglev.table_size,
        "flows": cfg.flows.max_entries,
        "rev_flows": cfg.flows.max_entries,
    }
    for name, n in want.items():
        path = group.map_path(name)
        if not path.exists():
            continue
        fd = bpfsys.obj_get(path)
        try:
            have = bpfsys.map_info(fd).max_entries
        finally:
            bpfsys.close(fd)
        if have != n:
            raise UsageError(
                f"pinned map {path} holds {have} entries but the config needs {n} "
                f"(maglev.table_size or flows.max_entries changed); run "
                f"`xdplb detach {group.ifaces[0]}` first (this drops tracked flows)"
            )


@dataclass
class Agent:
    cfg: Config
    ifaces: list[str]
    mode: str = "auto"
    keep: bool = False
    group: pins.PinGroup = field(init=False)
    program: Program | None = field(init=False, default=None)
    maps: KernelMaps | None = field(init=False, default=None)
    attached: dict[str, str] = field(init=False, default_factory=dict)  # iface -> mode
    _stop: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}")
        if len(set(self.ifaces)) != len(self.ifaces):
            raise UsageError("an interface is named twice")
        self.group = pins.group_for(self.ifaces)

    # --- start -------------------------------------------------------------------------------

    def start(self) -> None:
        indexes = {}
        for name in self.ifaces:
            try:
                indexes[name] = xdp_link.ifindex(name)
            except (OSError, LookupError) as e:
                raise UsageError(f"interface {name} not found in this network namespace") from e
        pins.ensure_bpffs()
        ours = pinned_prog_id(self.group)
        replace: dict[str, int] = {}
        for name, idx in indexes.items():
            st = xdp_link.xdp_state(idx)
            if st is None or not st.prog_id:
                continue
            if ours is not None and st.prog_id == ours:
                replace[name] = st.prog_id
            else:
                raise UsageError(
                    f"{name} already carries an XDP program (id {st.prog_id}) that is not this "
                    f"xdplb instance's; remove it first (`xdplb detach {name}` if it is xdplb's)"
                )
        _check_pinned_sizes(self.group, self.cfg)

        self.program = compile_program(
            self.cfg.maglev.table_size, self.cfg.flows.max_entries, self.group.path
        )
        self.maps = KernelMaps(self.program.map_fds, own=False)
        self.sync = MapSync(self.maps)
        current = self.sync.read_current()
        rep = self.sync.apply(desired_state(self.cfg, current), current)
        self.sync.set_tx_ports(list(indexes.values()))
        log.info("maps filled: %d VIPs, %d backends written, %d Maglev slots written",
                 len(self.cfg.vips), rep.backends_written, rep.slots_written)
        try:
            for name, idx in indexes.items():
                self.attached[name] = self._attach_one(name, idx, replace.get(name))
        except Exception:
            self._detach_all()
            if not replace:
                self.group.remove()
            raise
        self._pin_program()
        log.info("attached to %s (%s)", ", ".join(self.ifaces),
                 ", ".join(f"{k}: {v}" for k, v in self.attached.items()))

    def _attach_one(self, name: str, idx: int, old_id: int | None) -> str:
        assert self.program is not None
        old_fd = bpfsys.prog_get_fd_by_id(old_id) if old_id else None
        try:
            modes = ["native", "generic"] if self.mode == "auto" else [self.mode]
            if old_id:  # replacing our own program: keep the mode it runs in
                st = xdp_link.xdp_state(idx)
                modes = [st.mode] if st and st.mode in ("native", "generic") else modes
            last: Exception | None = None
            for mode in modes:
                try:
                    xdp_link.xdp_attach(idx, self.program.prog_fd, mode, replace_fd=old_fd)
                    if mode == "generic" and self.mode == "auto":
                        log.warning("%s: native XDP not available (%s); using generic mode, "
                                    "which is much slower", name, last)
                    return mode
                except OSError as e:
                    last = e
            raise AttachError(f"cannot attach XDP to {name} in {self.mode} mode: {last}")
        finally:
            if old_fd is not None:
                bpfsys.close(old_fd)

    def _pin_program(self) -> None:
        assert self.program is not None
        if self.group.prog.exists():
            self.group.prog.unlink()
        bpfsys.obj_pin(self.program.prog_fd, self.group.prog)

    # --- run / stop --------------------------------------------------------------------------

    def run(self) -> None:
        """Block until SIGINT/SIGTERM (or stop()), then shut down."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        if self.keep:
            log.info("--keep: leaving the program attached and maps pinned in %s",
                     self.group.path)
        else:
            self._detach_all()
            self.group.remove()
            log.info("detached from %s", ", ".join(self.ifaces))
        if self.program is not None:
            self.program.close()
            self.program = None

    def _detach_all(self) -> None:
        for name in list(self.attached):
            try:
                detach_if_ours(name, self.program.prog_fd if self.program else None)
            except OSError as e:
                log.warning("%s: detach failed: %s", name, e)
            del self.attached[name]


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


def detach(name: str, force: bool = False) -> list[str]:
    """Remove xdplb from ``name`` (program and pins), e.g. after an agent died with them in
    place. Returns what was done; raises LookupError when there was nothing to remove."""
    done: list[str] = []
    idx = xdp_link.ifindex(name)
    st = xdp_link.xdp_state(idx)
    groups = pins.groups_with(name)
    ours = {pinned_prog_id(g) for g in groups} - {None}
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
            if o is not None and o.prog_id and o.prog_id == pinned_prog_id(g):
                still.append(other)
        if still:
            done.append(f"kept pins {g.path}: still attached to {', '.join(still)}")
            continue
        g.remove()
        done.append(f"removed pins {g.path}")
    if not done:
        raise LookupError(f"no xdplb program or pins on {name}")
    return done


def open_group_maps(group: pins.PinGroup) -> KernelMaps:
    """Maps of a pin group, for readers in another process."""
    return KernelMaps.open_pinned(Path(group.path))


__all__ = ["Agent", "AttachError", "UsageError", "detach", "open_group_maps", "MAP_BY_NAME"]
