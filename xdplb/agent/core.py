"""The agent: compile, fill the maps from the config, attach, then keep the maps equal to
config + health + drains until told to stop.

The compile runs in a short-lived child (``pinned.build_pinned``) that pins the program and
maps; the agent works on the pins, so LLVM (most of BCC's memory) never stays in it.

Nothing on an interface changes until the config has validated, the interfaces exist,
no foreign XDP program is in the way, and the program has compiled and its maps are
filled: a bad config or a failed compile leaves the running state as it was. Everything
that happens later (health changes, reloads, drains) arrives as an event on one queue and
is applied by the main thread, one at a time. An event that fails is logged and counted and
the loop goes on (``loop.py``): the agent's own failure never detaches the data path.

A running agent owns its interfaces (``instance/locks.py``): a second attach is refused.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdplb.abi.codec import PROTOCOLS
from xdplb.agent import connsweep, faults, flowsweep, fnatsweep, migrate
from xdplb.agent.bgp import Announcer, NodeView, decide
from xdplb.agent.detach import detach_if_ours
from xdplb.agent.discovery import Discovery, DnsFailure, Outcome, Source
from xdplb.agent.errors import AttachError, UsageError
from xdplb.agent.health import HealthChecker, Target
from xdplb.agent.loop import Errors, ProgramWatch, Retry
from xdplb.agent.mapsync import MapSync
from xdplb.agent.neigh import NeighbourKeeper, check_l2_on_link
from xdplb.agent.notify import notify
from xdplb.config import Config, ConfigError, check_backends_not_local, load_config
from xdplb.config.discovery import DiscoveryError, DnsDiscovery, effective_config
from xdplb.instance import locks, pins, runfiles
from xdplb.kernel import bpfsys, offload, xdp_link
from xdplb.kernel.localaddrs import local_addresses, local_port_range
from xdplb.kernel.maps import KernelMaps
from xdplb.kernel.pinned import PinnedProgram, build_pinned
from xdplb.model.desired import DesiredState, backend_label, desired_state, ring_slots

log = logging.getLogger("xdplb")

MODES = ("native", "generic", "auto")
DATAPATHS = ("bpf", "scapy")


def _check_pinned_sizes(group: pins.PinGroup, cfg: Config) -> None:
    """Pinned maps are reused as they are: their sizes must match this config (the Maglev
    rings are not pinned maps: they are replaced at any size)."""
    want = {"flows": cfg.flows.max_entries}
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
                f"(flows.max_entries changed); run "
                f"`xdplb detach {group.ifaces[0]}` first (this drops tracked flows)"
            )


def _ensure_complete_checksums(indexes: dict[str, int]) -> None:
    """Frames must reach the program with complete TCP/UDP checksums (kernel/offload.py):
    fixed where the setting is in reach, else refused, naming it."""
    for idx in indexes.values():
        try:
            done = offload.ensure_complete_checksums(idx)
        except offload.OffloadError as e:
            raise UsageError(str(e)) from e
        if done:
            log.warning("%s", done)


@dataclass
class Agent:
    cfg: Config
    ifaces: list[str]
    mode: str = "auto"
    keep: bool = False
    config_path: str | None = None
    datapath: str = "bpf"  # "scapy": no XDP program; scapy_forwarder.py moves the frames
    drain_time: float = 2.0  # stopping: seconds between withdrawing the routes and detaching
    # Metrics are served: seconds between flow sweeps (flowsweep's counts for their scrapes);
    # 0: no sweeps
    flow_sweep: float = 0.0
    group: pins.PinGroup = field(init=False)
    program: PinnedProgram | None = field(init=False, default=None)
    maps: KernelMaps | None = field(init=False, default=None)
    attached: dict[str, str] = field(init=False, default_factory=dict)  # iface -> mode
    generation: int = field(init=False, default=0)
    # SimpleQueue: its put() is reentrant, so a signal handler may call it while the main
    # thread waits in get() (queue.Queue's lock would deadlock there).
    _events: queue.SimpleQueue = field(init=False, default_factory=queue.SimpleQueue)
    _health: HealthChecker | None = field(init=False, default=None)
    _down: set[str] = field(init=False, default_factory=set)
    _last_event: dict = field(init=False, default_factory=dict)
    forwarder: Any = field(init=False, default=None)  # userspace ScapyForwarder, if scapy
    errors: Errors = field(init=False, default_factory=Errors)
    _retry: Retry = field(init=False, default_factory=Retry)
    _watch: ProgramWatch | None = field(init=False, default=None)
    _owner: locks.Ownership | None = field(init=False, default=None)
    _publish_failing: bool = field(init=False, default=False)
    neighbours: NeighbourKeeper = field(init=False, default_factory=NeighbourKeeper)
    _next_sweep: float = field(init=False, default=0.0)
    _next_flow_sweep: float = field(init=False, default=0.0)
    _next_conns_sweep: float = field(init=False, default=0.0)
    _slots: dict[int, int] = field(init=False, default_factory=dict)  # published for readers
    # backends_from: cfg is the file's config with the discovered backends put in; this is
    # the file's own, which DNS answers are applied to.
    _file_cfg: Config = field(init=False)
    discovery: Discovery = field(init=False)
    _serving: dict[str, str] = field(init=False, default_factory=dict)  # VIP -> serving set
    _bgp: Announcer | None = field(init=False, default=None)  # with a `bgp` section

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}")
        if len(set(self.ifaces)) != len(self.ifaces):
            raise UsageError("an interface is named twice")
        if self.datapath not in DATAPATHS:
            raise UsageError(f"--datapath must be one of {', '.join(DATAPATHS)}")
        if self.datapath == "scapy" and self.keep:
            raise UsageError("--keep needs the bpf data path: the scapy one ends with the agent")
        self.group = pins.group_for(self.ifaces)
        self._file_cfg = self.cfg
        self.discovery = Discovery(self._on_dns)
        if self.config_path:
            self.config_path = str(Path(self.config_path).resolve())

    # --- start -------------------------------------------------------------------------------

    def start(self) -> None:
        try:  # the balancer's own addresses are known only here, in its network namespace
            check_backends_not_local(self.cfg, local_addresses(), self.config_path,
                                     local_port_range())
        except ConfigError as e:
            raise UsageError(f"invalid config, nothing changed:\n{e}") from None
        try:  # before anything changes: an unanswered first query refuses the attach
            self.cfg, sources = self._discovered(self.cfg)
        except (DnsFailure, DiscoveryError) as e:
            raise UsageError(f"{e}; nothing changed") from None
        check_l2_on_link(self.cfg)
        self.discovery.use(sources)
        self._own_interfaces()
        try:
            self._start()
        except BaseException:
            self.discovery.stop()
            self._release()
            raise

    def _own_interfaces(self) -> None:
        """Take the interfaces, before anything changes on them; refuse if an agent has one."""
        try:
            self._owner = locks.take_interfaces(self.ifaces, {
                "ifaces": self.ifaces, "config": self.config_path,
                "pin_dir": str(self.group.path)})
        except locks.Busy as e:
            h = e.holder or {}
            who = (f"the running xdplb agent pid {h['pid']} ({'+'.join(h.get('ifaces', []))}, "
                   f"config {h.get('config')})" if h.get("pid") else "another xdplb attach")
            raise UsageError(
                f"{e} is in use by {who}; stop it first (`xdplb detach {e}` stops it and "
                f"removes its program and pins)") from None

    def _release(self) -> None:
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def _start(self) -> None:
        indexes = {}
        for name in self.ifaces:
            try:
                indexes[name] = xdp_link.ifindex(name)
            except (OSError, LookupError) as e:
                raise UsageError(f"interface {name} not found in this network namespace") from e
        pins.ensure_bpffs()
        replace, older = self._programs_to_replace(indexes)
        if self.datapath == "scapy" and replace:
            raise UsageError(f"{', '.join(replace)} carries xdplb's XDP program; the scapy data "
                             f"path runs without one: `xdplb detach` it first")
        _check_pinned_sizes(self.group, self.cfg)
        if self.datapath == "bpf":  # the scapy data path completes partial checksums itself
            _ensure_complete_checksums(indexes)

        fresh = not self.group.exists()
        try:
            self._start_bgp()  # sessions come up meanwhile; nothing is announced before attach
            self._load_fill_attach(indexes, replace, older)
        except BaseException:
            self._stop_bgp()
            self._detach_all()
            if self.program is not None:
                self.program.close()
                self.program = None
            if fresh:  # leave no half-made pins behind (drains are the instance's: kept)
                runfiles.clear(self.group, keep=runfiles.INSTANCE_FILES)
                self.group.remove()
            raise
        if self.program is not None:
            self._watch = ProgramWatch(bpfsys.prog_info(self.program.prog_fd).id)
        self._health = HealthChecker(self._on_health)
        self._update_health_targets()
        self._announce()
        self._publish()
        log.info("attached to %s (%s)", ", ".join(self.ifaces),
                 ", ".join(f"{k}: {v}" for k, v in self.attached.items()))

    def _load_fill_attach(self, indexes: dict[str, int], replace: dict[str, int],
                          older: list[pins.PinGroup]) -> None:
        if self.datapath == "scapy":
            self._start_scapy(indexes)
            return
        self.program = build_pinned(self.cfg.flows.max_entries, self.group.path)
        self.maps = KernelMaps(self.program.map_fds, own=False)
        self.sync = MapSync(faults.FaultyMaps(self.maps) if faults.enabled() else self.maps)
        for old in older:  # an older build is attached: bring its flows along
            n = migrate.migrate(old, self.program.map_fds)
            log.info("migrated %d entries from older build %s", n, old.path)
        self.apply("start")
        self.sync.set_tx_ports(list(indexes.values()))
        for name, idx in indexes.items():
            self.attached[name] = self._attach_one(name, idx, replace.get(name))
        self._pin_program()
        migrate.record_layout(self.group)
        for old in older:  # flows the old program created while we copied, then its pins
            n = migrate.migrate(old, self.program.map_fds, only_missing=True)
            log.info("replaced older build %s (%d late entries copied)", old.path, n)
            runfiles.clear(old)
            old.remove()

    def _start_scapy(self, indexes: dict[str, int]) -> None:
        # Imported here: scapy costs the bpf data path's agent ~40 MB it never uses.
        from xdplb.userspace.forwarder import STATS_FILE, ScapyForwarder

        self.forwarder = ScapyForwarder(
            self.cfg, indexes, lambda d: runfiles.write_json(self.group, STATS_FILE, d))
        self.maps = self.forwarder.maps
        self.sync = MapSync(self.maps)
        self.apply("start")
        self.sync.set_tx_ports(list(indexes.values()))
        self.attached = self.forwarder.start()

    def _programs_to_replace(
        self, indexes: dict[str, int]
    ) -> tuple[dict[str, int], list[pins.PinGroup]]:
        """Programs on our interfaces we may replace (ours, or an older xdplb build's), by
        interface; and the pin groups of older builds. Anything else is refused."""
        ours = pins.prog_id(self.group)
        replace: dict[str, int] = {}
        older: dict[str, pins.PinGroup] = {}
        for name, idx in indexes.items():
            st = xdp_link.xdp_state(idx)
            if st is None or not st.prog_id:
                continue
            if ours is not None and st.prog_id == ours:
                replace[name] = st.prog_id
                continue
            old = [g for g in pins.groups_with(name) if g.path != self.group.path
                   and pins.prog_id(g) == st.prog_id]
            if not old:
                raise UsageError(
                    f"{name} already carries an XDP program (id {st.prog_id}) that is not this "
                    f"xdplb instance's; remove it first (`xdplb detach {name}` if it is xdplb's)"
                )
            replace[name] = st.prog_id
            older[str(old[0].path)] = old[0]
        return replace, list(older.values())

    def _attach_one(self, name: str, idx: int, old_id: int | None) -> str:
        assert self.program is not None
        old_fd = bpfsys.prog_get_fd_by_id(old_id) if old_id else None
        try:
            modes = ["native", "generic"] if self.mode == "auto" else [self.mode]
            if old_id:  # replacing a program atomically: keep the mode it runs in
                st = xdp_link.xdp_state(idx)
                modes = [st.mode] if st and st.mode in ("native", "generic") else modes
            last: Exception | None = None
            for mode in modes:
                try:
                    xdp_link.xdp_attach(idx, self.program.prog_fd, mode, replace_fd=old_fd)
                    if mode == "generic" and self.mode == "auto" and not old_id:
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
        self.program.promote(self.group.prog)  # the child's staging pin, renamed over the old

    # --- desired state -----------------------------------------------------------------------

    def apply(self, why: str) -> None:
        """Make the maps equal to config + health + drains."""
        drained = runfiles.read_drains(self.group)
        current = self.sync.read_current()
        desired = desired_state(self.cfg, current, frozenset(self._down), frozenset(drained))
        rep = self.sync.apply(desired, current)
        self.neighbours.keep(desired)
        self._log_serving(desired)
        self.generation += 1
        self._slots = ring_slots(desired)
        log.info("%s: maps updated (generation %d): %d backends and %d Maglev slots written, "
                 "%d VIPs added, %d removed, %d backends removed", why, self.generation,
                 rep.backends_written, rep.slots_written, rep.vips_added, rep.vips_removed,
                 rep.backends_removed)

    def _log_serving(self, desired: DesiredState) -> None:
        """Say when a VIP's new flows move between primaries and backups, and (each time)
        when it has no backend to give them to."""
        serving, self._serving = self._serving, {v.name: v.serving for v in desired.vips}
        for v in desired.vips:
            was = serving.get(v.name)
            if v.serving == "none":
                why = "it has no backends" if not v.backends else \
                    "no backend is up (every one down, drained or of weight 0)"
                log.error("VIP %s (%s:%d): %s; its packets are dropped (counter "
                          "drop_no_backend)", v.name, v.address, v.port, why)
            elif v.serving == "backup" and was != "backup":
                log.warning("VIP %s: no primary backend is up: new flows go to its backups "
                            "(%s)", v.name, ", ".join(f"{b.address}:{b.port}"
                                                       for b in v.backends if b.backup))
            elif v.serving == "primary" and was == "backup":
                log.warning("VIP %s: a primary backend is up again: new flows go to the "
                            "primaries, flows on the backups continue", v.name)

    def _discovered(self, cfg: Config) -> tuple[Config, dict[str, Source]]:
        """``cfg`` with its ``backends_from`` VIPs' backends as DNS answers (new sources
        asked now), and the sources to ``use`` once it is applied."""
        sources = self.discovery.first_answers(cfg)
        eff, left_out = effective_config(cfg, {n: s.backends for n, s in sources.items()},
                                         local_addresses())
        for why in left_out:
            log.warning("discovered backend left out: %s", why)
        self._file_cfg = cfg
        return eff, sources

    def _on_dns(self, name: str, src: DnsDiscovery, outcome: Outcome) -> None:
        """From the DNS thread: queue the answer (or failure) for the main loop."""
        self._events.put(("dns", name, src, outcome))

    def _dns_result(self, name: str, src: DnsDiscovery, outcome: Outcome) -> None:
        """Apply a changed DNS answer as a reload diff; a failure keeps the last set."""
        vip = next((v for v in self._file_cfg.vips if v.name == name), None)
        if vip is None or (backends := self.discovery.result(name, src, outcome, vip)) is None:
            return
        try:
            eff, left_out = effective_config(
                self._file_cfg, {**self.discovery.found(), name: backends}, local_addresses())
        except DiscoveryError as e:
            self.discovery.failed(name, f"answer not applied: {e}")
            return
        for why in left_out:
            log.warning("discovered backend left out: %s", why)
        before = {(b.address, b.port): b for b in self.discovery.found().get(name, ())}
        after = {(b.address, b.port): b for b in backends}
        change = (f"+{len(after.keys() - before.keys())} -{len(before.keys() - after.keys())} "
                  f"~{sum(1 for k in after.keys() & before.keys() if after[k] != before[k])}")
        old, self.cfg = self.cfg, eff
        try:
            self.apply(f"dns {name} ({change})")
        except Exception:
            self.cfg = old  # not committed: the next answer brings the change again
            raise
        self.discovery.commit(name, backends)
        self._update_health_targets()

    def _targets(self) -> list[Target]:
        out = []
        for v in self.cfg.vips:
            if v.health_check.type == "none":
                continue
            for b in v.backends:
                port = b.target_port(v)
                out.append(Target(backend_label(v.name, str(b.address), port),
                                  str(b.address), port, v.health_check))
        return out

    def _update_health_targets(self) -> None:
        assert self._health is not None
        targets = self._targets()
        self._health.set_targets(targets)
        keys = {t.key for t in targets}
        self._down &= keys

    def _on_health(self, key: str, up: bool, reason: str) -> None:
        """From the health thread: queue the change for the main loop."""
        self._events.put(("health", key, up, reason))

    # --- run / stop --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve events until SIGINT/SIGTERM (or stop()), then shut down.

        SIGHUP reloads the config file; SIGUSR1 re-reads the drain list. A failed event is
        logged and counted and the next one is served; should the loop itself end by an
        error, the data path is left in place as with ``--keep``."""
        handlers = {
            signal.SIGINT: ("stop",), signal.SIGTERM: ("stop",),
            signal.SIGHUP: ("reload",), signal.SIGUSR1: ("drains",),
        }
        for sig, ev in handlers.items():
            signal.signal(sig, lambda *_, ev=ev: self._events.put(ev))
        notify("READY=1", f"MAINPID={os.getpid()}",
               f"STATUS=balancing on {', '.join(self.ifaces)}")
        stopped = False
        try:
            while True:
                try:
                    ev = self._events.get(timeout=1.0)
                except queue.Empty:
                    self._tick()
                    continue
                if ev[0] == "stop":
                    stopped = True
                    break
                self._serve(ev)
        finally:
            if not stopped:
                log.critical("the event loop ended unexpectedly; leaving the data path as it is")
            self.shutdown(detach=stopped)

    def _serve(self, ev: tuple) -> None:
        kind = ev[0]
        try:
            self._handle(ev)
        except Exception as e:  # the agent's own failure: count it, keep serving
            self.errors.count(kind, e, "the data path keeps forwarding with the last state; "
                              "the maps are written again shortly")
            self._retry.failed()
            self._done(kind, False, f"failed: {e}; the agent retries", error=True)

    def _tick(self) -> None:
        """Once a second without events: retry a failed map write, watch the program,
        publish health results."""
        changed = False
        if self._retry.due():
            try:
                self.apply("retry after an error")
                self._retry.done()
                changed = True
            except Exception as e:
                self.errors.count("retry", e, "retrying later")
                self._retry.failed()
                changed = True
        if self._watch is not None and self._watch.check(list(self.attached)):
            changed = True
        changed |= self._announce()  # also: first health checks passed, peers came up
        self._sweep_fnat()
        self._sweep_flows()
        self._sweep_conns()
        if changed or self._publish_failing:
            self._publish()
        else:
            self._publish_health()

    def _sweep_fnat(self) -> None:
        """Every SWEEP_INTERVAL while a VIP is fullnat: stale reply-table entries go."""
        def sweep() -> None:
            if n := fnatsweep.sweep(self.maps):
                log.info("fullnat: %d stale reply-table entries removed", n)

        self._sweep_every("_next_sweep", fnatsweep.SWEEP_INTERVAL,
                          any(v.forwarding == "fullnat" for v in self.cfg.vips), sweep)

    def _sweep_conns(self) -> None:
        """Every connsweep.SWEEP_INTERVAL while a VIP is least-conn: the ends of
        connections the data path cannot see (eviction, UDP idle) leave its counts."""
        self._sweep_every(
            "_next_conns_sweep", connsweep.SWEEP_INTERVAL,
            any(v.scheduler == "least-conn" for v in self.cfg.vips),
            lambda: connsweep.sweep(self.maps, round(self.cfg.flows.udp_idle_timeout * 1e9)))

    def _sweep_every(self, due: str, interval: float, wanted: bool, sweep) -> None:
        """Run ``sweep`` when ``wanted`` and the time in attribute ``due`` has come, at most
        every ``interval`` seconds; a failure is counted and tried again next time."""
        now = time.monotonic()
        if not wanted or now < getattr(self, due) or self.maps is None:
            return
        setattr(self, due, now + interval)
        try:
            sweep()
        except OSError as e:
            self.errors.count("sweep", e, "sweeping again later")

    def _sweep_flows(self) -> None:
        """Every ``flow_sweep`` seconds (``--flow-sweep``, with metrics): the flow counts that
        need the table, published for metrics scrapes (which then never read it)."""
        now = time.monotonic()
        if not self.flow_sweep or now < self._next_flow_sweep or self.maps is None:
            return
        self._next_flow_sweep = now + self.flow_sweep
        try:
            flowsweep.publish(self.group, self.maps)
        except OSError as e:
            self.errors.count("sweep", e, "sweeping again later")

    def _handle(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "health":
            _, key, up, reason = ev
            # The result is recorded first: if applying it fails, the retry still has it.
            (self._down.discard if up else self._down.add)(key)
            log.warning("backend %s is %s: %s", key, "UP" if up else "DOWN", reason)
            faults.fire("health")
            self.apply(f"health {key}")
            self._done("health", True, f"{key} {'up' if up else 'down'}: {reason}")
        elif kind == "dns":
            self._dns_result(*ev[1:])
        elif kind == "reload":
            self.reload()
        elif kind == "drains":
            faults.fire("drains")
            self.apply("drain list changed")
            drained = sorted(runfiles.read_drains(self.group))
            node = ["node drained"] if runfiles.node_drained(self.group) else []
            self._done("drains", True, ", ".join(node + drained) or "none")
        self._announce()
        self._publish()

    def reload(self) -> bool:
        """Apply the edited config file as a diff; an invalid file changes nothing."""
        if not self.config_path:
            return self._done("reload", False, "no config file to reload")
        faults.fire("reload")
        try:
            cfg = load_config(self.config_path, local_addresses=local_addresses(),
                              local_port_range=local_port_range())
        except ConfigError as e:
            log.error("reload rejected, nothing changed:\n%s", e)
            return self._done("reload", False, str(e))
        if cfg.flows.max_entries != self.cfg.flows.max_entries:
            msg = (f"reload rejected, nothing changed: flows.max_entries "
                   f"{self.cfg.flows.max_entries} -> {cfg.flows.max_entries} resizes the maps; "
                   "restart with `xdplb detach` + `xdplb attach` (drops tracked flows)")
            log.error(msg)
            return self._done("reload", False, msg)
        old, old_file = self.cfg, self._file_cfg
        try:
            self.cfg, sources = self._discovered(cfg)
            check_l2_on_link(self.cfg)
        except (DnsFailure, DiscoveryError, UsageError) as e:
            self.cfg, self._file_cfg = old, old_file
            log.error("reload rejected, nothing changed: %s", e)
            return self._done("reload", False, str(e))
        try:
            self.apply("reload")
        except Exception as e:  # e.g. too many backends for the arrays
            self.cfg, self._file_cfg = old, old_file
            self.apply("reload rolled back")  # if this fails too, the loop retries it
            log.error("reload failed, previous config restored: %s", e)
            return self._done("reload", False, f"failed, previous config restored: {e}")
        self.discovery.use(sources)
        self._update_health_targets()
        note = ""
        if cfg.bgp != old.bgp:  # a new speaker config: its sessions start again
            self._stop_bgp()
            try:
                self._start_bgp()
            except UsageError as e:  # the maps are applied; the speaker is tried again
                self.errors.count("bgp", e, "starting the speaker again in a few seconds")
                note = f"; but bgp: {e}"
        self._announce()
        return self._done("reload", True, f"applied {self.config_path}{note}")

    # --- BGP ---------------------------------------------------------------------------------

    def _start_bgp(self) -> None:
        if self.cfg.bgp is not None:
            self._bgp = Announcer(self.cfg.bgp, self.group)
            self._bgp.start()

    def _stop_bgp(self) -> None:
        if self._bgp is not None:
            self._bgp.stop()
            self._bgp = None

    def _node_view(self, stopping: bool = False) -> NodeView:
        return NodeView(
            attached=bool(self.attached) and not (self._watch and self._watch.lost),
            down=frozenset(self._down), drained=frozenset(runfiles.read_drains(self.group)),
            health=self._health.snapshot() if self._health else {},
            node_drained=runfiles.node_drained(self.group), stopping=stopping)

    def _announce(self) -> bool:
        """Bring the announcements in line with health, drains and the program; True when
        they (or the peers' states) changed."""
        if self._bgp is None:
            return False
        try:
            return self._bgp.update(decide(self.cfg, self._node_view()))
        except (OSError, UsageError) as e:  # a speaker that cannot start or take commands
            self.errors.count("bgp", e, "trying again shortly")
            return False

    def _done(self, kind: str, ok: bool, message: str, error: bool = False) -> bool:
        """Record the answer to an event (``error``: the agent failed, not the request)."""
        self._last_event = {"kind": kind, "ok": ok, "message": message, "time": time.time(),
                            "generation": self.generation, "error": error}
        self._publish()
        return ok

    def _publish(self) -> None:
        """Write agent.json, vips.json, health.json; a failure (a full /run) is logged and
        counted once, and the next tick writes them again."""
        try:
            # VIP names for readers, so that they need not load and validate the config file.
            runfiles.write_vip_names(self.group, self.cfg, self.config_path)
            runfiles.write_json(self.group, runfiles.AGENT_FILE, self._agent_info())
            runfiles.write_json(self.group, runfiles.SLOTS_FILE,
                                {"generation": self.generation, "slots": self._slots})
            runfiles.write_json(self.group, runfiles.POOL_FILE, self._pool_info())
            if self._bgp is not None:
                runfiles.write_json(self.group, runfiles.BGP_FILE, self._bgp.state())
            self._publish_health(raising=True)
        except OSError as e:
            if not self._publish_failing:
                self.errors.count("state_dir", e, f"cannot write {runfiles.run_dir(self.group)}"
                                  "; the data path is unaffected, retrying every second")
                self._publish_failing = True
            return
        if self._publish_failing:
            self._publish_failing = False
            log.warning("state directory %s writable again", runfiles.run_dir(self.group))

    def _agent_info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "config": self.config_path,
            "ifaces": self.ifaces,
            "modes": self.attached,
            "datapath": self.datapath,
            "generation": self.generation,
            "last_event": self._last_event,
            "errors": self.errors.as_dict(),
            "retry_pending": self._retry.pending,
            "program_lost": dict(self._watch.lost) if self._watch else {},
        }

    def _pool_info(self) -> dict[str, Any]:
        """Per VIP: which set serves, its backups, its DNS discovery (for readers)."""
        dns = self.discovery.snapshot()
        return {"vips": {v.name: {
            "key": [str(v.address), v.port, PROTOCOLS[v.protocol]],
            "serving": self._serving.get(v.name),
            "backups": [f"{b.address}:{b.target_port(v)}" for b in v.backends if b.backup],
            # what `xdplb drain` may name in a backends_from VIP (the file lists none)
            "backends": [f"{b.address}:{b.target_port(v)}" for b in v.backends],
            "dns": dns.get(v.name)} for v in self.cfg.vips}}

    def _publish_health(self, raising: bool = False) -> None:
        if self._health is None:
            return
        try:
            runfiles.write_json(self.group, runfiles.HEALTH_FILE,
                                {"backends": self._health.snapshot()})
        except OSError:
            if raising:
                raise
            self._publish_failing = True  # the next tick goes through _publish, which counts

    def stop(self) -> None:
        self._events.put(("stop",))

    def shutdown(self, detach: bool = True) -> None:
        """Stop checks and leave: detach and unpin, unless ``--keep`` (or ``detach`` False:
        the agent failed, and its failure must not take the data path down)."""
        notify("STOPPING=1")
        self.discovery.stop()
        if self._bgp is not None:  # routers first: traffic leaves before the program does
            self._bgp.wait_withdrawn(decide(self.cfg, self._node_view(stopping=True)),
                                     self.drain_time)
            self._stop_bgp()
        if self._health is not None:
            self._health.stop()
            self._health = None
        if self.keep or not detach:
            log.info("leaving the program attached and maps pinned in %s (flows, drains "
                     "kept; `xdplb detach` removes them)", self.group.path)
            for name in (runfiles.AGENT_FILE, runfiles.HEALTH_FILE, runfiles.POOL_FILE,
                         runfiles.BGP_FILE, runfiles.SLOTS_FILE):
                (runfiles.run_dir(self.group) / name).unlink(missing_ok=True)
        else:
            self._detach_all()
            self.neighbours.release()
            runfiles.clear(self.group, keep=runfiles.INSTANCE_FILES)
            self.group.remove()
            log.info("detached from %s", ", ".join(self.ifaces))
        if self.program is not None:
            self.program.close()
            self.program = None
        self._release()

    def _detach_all(self) -> None:
        if self.forwarder is not None:  # the scapy data path: no XDP program to detach
            self.forwarder.stop()
            self.forwarder = None
            self.attached.clear()
        for name in list(self.attached):
            try:
                detach_if_ours(name, self.program.prog_fd if self.program else None)
            except OSError as e:
                log.warning("%s: detach failed: %s", name, e)
            del self.attached[name]
