"""Two engines, one interface: frames through the real BPF program (BPF_PROG_TEST_RUN, on
private maps) or through the Python data path (``pydatapath.py``, on ``UserMaps``).

Nothing is attached and nothing live is touched: each engine owns maps that only it fills,
through the same ``MapSync`` the agent uses. Next hops come from the network namespace the
engine runs in, as for an attached program. Used by tests, ``xdplb replay`` and ``xdplb fuzz``;
running both on the same frames is how the two data paths are held to each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from xdplb.abi.codec import from_be16, ipv4_of
from xdplb.abi.layout import (
    CLOCK_COUNTERS,
    CLOCK_FIELDS,
    MAP_BY_NAME,
    OUTCOMES,
    Counter,
    Flow,
    field_spans,
)
from xdplb.agent.mapsync import MapSync
from xdplb.config import Config
from xdplb.kernel import bpfsys
from xdplb.kernel.loader import Program, compile_program
from xdplb.kernel.maps import KernelMaps, sum_percpu
from xdplb.model.desired import DesiredState, desired_state
from xdplb.userspace.datapath import ACTIONS, PyDatapath
from xdplb.userspace.fib import Fib
from xdplb.userspace.parse import OK, forward_key, parse
from xdplb.userspace.usermaps import UserMaps

VERDICTS = ACTIONS
MIN_FRAME = 14  # BPF_PROG_TEST_RUN refuses shorter frames (no NIC delivers them either)
# XDP's linear buffer: a page less XDP_PACKET_HEADROOM (256) and skb_shared_info (320). The
# program sees no further (and cannot be attached to a device whose frames are longer).
MAX_FRAME = 4096 - 256 - 320
EFFECTS = ("created", "hit", "rebalanced", "reply", "none")

_OUTCOME_NAMES = [c.name.lower() for c in OUTCOMES]
_COUNTERS = MAP_BY_NAME["counters"]
_CLOCK_SPANS = field_spans(Flow, CLOCK_FIELDS)  # where the two data paths may differ


def without_clock(raw: bytes) -> bytes:
    """A flow entry with what depends on the clock zeroed, for comparison."""
    out = bytearray(raw)
    for start, stop in _CLOCK_SPANS:
        out[start:stop] = bytes(stop - start)
    return bytes(out)


class FrameSizeError(ValueError):
    """A frame no XDP program would be given."""


@dataclass(frozen=True)
class RunResult:
    verdict: str  # aborted, drop, pass, tx, redirect
    data: bytes  # the frame as the program left it
    counters: dict[str, int]  # counters this frame moved (delta)
    reason: str  # the outcome counter (pass_not_vip, pass_ttl, tx...); the verdict if none
    effect: str  # on the flow table: one of EFFECTS
    backend: str | None  # "addr:port" of the flow's backend, for balanced frames and replies

    def comparable(self) -> tuple:
        """What another engine must reproduce exactly: all but the clock's doing."""
        counters = {k: v for k, v in self.counters.items() if k not in CLOCK_COUNTERS}
        return (self.verdict, self.data, counters, self.reason, self.effect, self.backend)


@dataclass(frozen=True)
class FlowTable:
    """What a data path remembers: tracked flows (without timestamps) and per-VIP /
    per-backend statistics (the reverse NAT is the agent's, not the data path's). Equal
    tables mean equal state."""

    flows: dict[bytes, bytes]
    vip_stats: dict[int, bytes]
    backend_stats: dict[int, bytes]
    fnat_ports: dict[bytes, bytes] = field(default_factory=dict)  # fullnat's reply table
    half_open: dict[bytes, bytes] = field(default_factory=dict)  # new flows, not confirmed yet

    def diff(self, other: FlowTable) -> list[str]:
        """Human-readable differences, empty when equal."""
        out = []
        for name in ("flows", "vip_stats", "backend_stats", "fnat_ports", "half_open"):
            a, b = getattr(self, name), getattr(other, name)
            for k in sorted(set(a) | set(b), key=repr):
                if a.get(k) != b.get(k):
                    out.append(f"{name}[{_hex(k)}]: {_hex(a.get(k))} != {_hex(b.get(k))}")
        return out


def _hex(v: object) -> str:
    return v.hex() if isinstance(v, bytes) else repr(v)


def check_frame(frame: bytes) -> None:
    if not MIN_FRAME <= len(frame) <= MAX_FRAME:
        raise FrameSizeError(f"frame of {len(frame)} bytes: XDP runs on {MIN_FRAME} to "
                             f"{MAX_FRAME} bytes")


def _endpoint(frame: bytes, src: bool) -> str | None:
    """addr:port of a frame's source or destination (TCP/UDP), or None."""
    rc, p = parse(frame)
    if rc != OK or p.sport < 0:
        return None
    a = p.ip + (12 if src else 16)
    port = p.sport if src else p.dport
    return f"{'.'.join(map(str, frame[a : a + 4]))}:{int.from_bytes(frame[port:port + 2], 'big')}"


class Engine:
    """Maps filled from a config through MapSync, and frames run on them. Subclasses give
    the maps and ``_execute``."""

    name = ""

    def __init__(self, maps: KernelMaps | UserMaps, cfg: Config,
                 tx_ifindexes: list[int] | None = None) -> None:
        self.maps = maps
        self.flow_max = cfg.flows.max_entries
        self.sync = MapSync(maps)
        self.state: DesiredState
        self.configure(cfg)
        if tx_ifindexes:
            self.sync.set_tx_ports(tx_ifindexes)

    def configure(self, cfg: Config, down: frozenset = frozenset()) -> None:
        """Apply a config (``down``: backend keys marked failed), as the agent does."""
        if cfg.flows.max_entries != self.flow_max:
            raise ValueError("flows.max_entries is fixed per engine (the BPF program is "
                             "compiled with it)")
        current = self.sync.read_current()
        self.state = desired_state(cfg, current, down)
        self.sync.apply(self.state, current)

    def _execute(self, frame: bytes, ingress_ifindex: int) -> tuple[str, bytes]:
        raise NotImplementedError

    def routes_changed(self) -> None:
        """Links, routes or neighbours of the namespace changed (the kernel's FIB is live;
        the scapy engine's copy is re-read)."""

    def _counter_blobs(self) -> dict[bytes, bytes]:
        return dict(self.maps.raw_items("counters"))

    def run(self, frame: bytes, ingress_ifindex: int = 0) -> RunResult:
        """One frame arriving on ``ingress_ifindex`` (0: loopback, as BPF_PROG_TEST_RUN
        without a context), and what it did."""
        check_frame(frame)
        rc, p = parse(frame)
        key = forward_key(frame, p) if rc == OK else None
        existed = key is not None and self.maps.tracked_flow(key) is not None
        before = self._counter_blobs()
        verdict, data = self._execute(frame, ingress_ifindex)
        after = self._counter_blobs()
        delta = {}
        for k, blob in after.items():
            if blob != before.get(k):
                n = sum_percpu(_COUNTERS, blob) - sum_percpu(_COUNTERS, before[k])
                delta[Counter(int.from_bytes(k, "little")).name.lower()] = n
        reason = next((c for c in _OUTCOME_NAMES if c in delta), verdict)
        if "reply" in delta:
            effect, backend = "reply", _endpoint(frame, src=True)
        elif "new_flow_untracked" in delta:  # balanced over the new-flow rate, no entry
            effect, backend = "untracked", None
        elif "new_flow" in delta or "flow_hit" in delta:
            effect = "hit" if "flow_hit" in delta else "rebalanced" if existed else "created"
            backend = self._flow_backend(key)
        else:
            effect, backend = "none", None
        return RunResult(verdict, data, delta, reason, effect, backend)

    def _flow_backend(self, key: bytes | None) -> str | None:
        """addr:port of the backend the tracked flow ``key`` names (in dsr the frame that
        leaves does not show it: its destination stays the VIP, or is wrapped)."""
        f = self.maps.tracked_flow(key) if key is not None else None
        be = self.maps.lookup("backends", f.backend_id) if f is not None else None
        if be is None:
            return None
        return f"{ipv4_of(be.addr)}:{from_be16(be.port)}"

    def flow_table(self, stats: bool = True) -> FlowTable:
        """The state to compare (``stats=False``: flow entries only, which is cheaper)."""
        flows = {k: without_clock(v) for k, v in self.maps.raw_items("flows")}
        fnat = dict(self.maps.raw_items("fnat_ports"))
        half = {k: without_clock(v) for k, v in self.maps.raw_items("half_open")}

        def sums(name: str) -> dict[int, bytes]:
            m = MAP_BY_NAME[name]
            return {int.from_bytes(k, "little"): bytes(sum_percpu(m, v))
                    for k, v in self.maps.raw_items(name) if v.strip(b"\0")}

        if not stats:
            return FlowTable(flows, {}, {}, fnat, half)
        return FlowTable(flows, sums("vip_stats"), sums("backend_stats"), fnat, half)

    def clear_flows(self) -> None:
        for name in ("flows", "half_open", "fnat_ports"):
            for k, _ in list(self.maps.raw_items(name)):
                self.maps.delete(name, k)

    def close(self) -> None:
        self.maps.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BpfEngine(Engine):
    """The BPF program, compiled with private maps, under BPF_PROG_TEST_RUN (needs BCC)."""

    name = "bpf"

    def __init__(self, cfg: Config, tx_ifindexes: list[int] | None = None) -> None:
        self.program: Program = compile_program(cfg.flows.max_entries)
        super().__init__(KernelMaps(self.program.map_fds, own=False), cfg, tx_ifindexes)

    def _execute(self, frame: bytes, ingress_ifindex: int) -> tuple[str, bytes]:
        ctx = bpfsys.xdp_md(len(frame), ingress_ifindex) if ingress_ifindex else None
        res = bpfsys.prog_test_run(self.program.prog_fd, frame, ctx_in=ctx)
        return VERDICTS.get(res.retval, str(res.retval)), res.data_out

    def close(self) -> None:
        self.program.close()


class ScapyEngine(Engine):
    """The Python data path on UserMaps, next hops from ``fib.Fib`` (no BCC needed)."""

    name = "scapy"

    def __init__(self, cfg: Config, tx_ifindexes: list[int] | None = None) -> None:
        maps = UserMaps(cfg.flows.max_entries)
        self.fib = Fib()
        self.datapath = PyDatapath(maps, self.fib)
        super().__init__(maps, cfg, tx_ifindexes)

    def _execute(self, frame: bytes, ingress_ifindex: int) -> tuple[str, bytes]:
        out = self.datapath.run(frame, ingress_ifindex)
        return VERDICTS[out.action], out.data

    def routes_changed(self) -> None:
        self.fib.invalidate()

    def close(self) -> None:
        self.fib.close()


ENGINES: dict[str, type[Engine]] = {"bpf": BpfEngine, "scapy": ScapyEngine}


def open_engine(kind: str, cfg: Config, tx_ifindexes: list[int] | None = None) -> Engine:
    """An engine by name: "bpf" or "scapy"."""
    return ENGINES[kind](cfg, tx_ifindexes)


@contextlib.contextmanager
def engine_pair(cfg: Config, tx_ifindexes: list[int] | None = None
                ) -> Iterator[tuple[BpfEngine, ScapyEngine]]:
    """Both data paths on the same config, to run side by side; closed on the way out."""
    with BpfEngine(cfg, tx_ifindexes) as bpf, ScapyEngine(cfg, tx_ifindexes) as py:
        yield bpf, py


