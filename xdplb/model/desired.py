"""Config -> desired state: VIP and backend ids, and each VIP's ring: a Maglev table
(schedulers maglev, source-hash), its turn sequence (wrr, rr, random: model/sequence.py) or
its serving backends (least-conn).

Ids index the BPF arrays, and a tracked flow stores its backend's id, so ids must stay
stable across reloads and restarts: they are allocated against what the maps already hold
(``Current``), keeping every id whose VIP or backend is still configured.

The reverse NAT is desired state too (``reverse_nat``): which VIPs each backend endpoint
(address, port, protocol) serves, and how many VIP addresses each backend address serves per
protocol, for the fragment rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xdplb.abi.codec import PROTO_NAMES, PROTOCOLS
from xdplb.abi.layout import (
    LC_MAX_BACKENDS,
    MAX_BACKENDS,
    MAX_VIPS,
    NO_BACKEND,
    REV_ANY_PORT,
    REV_TARGETS,
    Forwarding,
    Scheduler,
)
from xdplb.config import Config
from xdplb.model import maglev, sequence

Service = tuple[str, int, int]  # (address, port, ip proto): what a VIP serves
BackendKey = tuple[int, str, int]  # (vip id, address, target port)
Endpoint = tuple[str, int, int]  # (backend address, port or REV_ANY_PORT, ip proto)
RevTargetSpec = tuple[str, int, int, int]  # (VIP address, VIP port, vip id, backend id)


@dataclass(frozen=True)
class DesiredBackend:
    backend_id: int
    address: str
    port: int  # target port (the VIP's when the config gives none)
    weight: int
    down: bool = False
    backup: bool = False  # in the ring only while no primary of its VIP is up

    @property
    def up(self) -> bool:
        """Could it take new flows: not failed, not drained, weight above 0."""
        return not self.down and self.weight > 0

    @property
    def maglev_key(self) -> bytes:
        """Identity hashed into the Maglev permutation: the same on every node."""
        return f"{self.address}:{self.port}".encode()


@dataclass(frozen=True)
class DesiredVip:
    vip_id: int
    name: str
    address: str
    port: int
    proto: int
    backends: tuple[DesiredBackend, ...]
    ring: np.ndarray = field(compare=False, repr=False)  # backend id per slot
    mode: Forwarding = Forwarding.NAT
    source: str | None = None  # fullnat: the configured source; None: toward each backend
    ports: tuple[int, int] = (0, 0)  # fullnat: first and last source port
    scheduler: Scheduler = Scheduler.MAGLEV

    @property
    def serving(self) -> str:
        """Which backends get new flows: ``primary`` while any primary is up, else
        ``backup`` while any backup is, else ``none``."""
        return serving(self.backends)

    @property
    def needs_source(self) -> bool:
        """Does the data path need the balancer's own address toward each backend?"""
        return self.mode in (Forwarding.FULLNAT, Forwarding.DSR_IPIP)

    @property
    def key(self) -> Service:
        return (self.address, self.port, self.proto)

    @property
    def ring_size(self) -> int:
        """Slots of the VIP's ring (its Maglev table size, or its sequence's length)."""
        return len(self.ring)


@dataclass(frozen=True)
class DesiredState:
    vips: tuple[DesiredVip, ...]
    seed: int
    next_hop_ttl_ns: int = 0
    udp_idle_ns: int = 0
    new_flow_rate: int = 0  # flows.new_flow_rate_limit: dsr new flows a second (0: no limit)

    def backend_ids(self) -> set[int]:
        return {b.backend_id for v in self.vips for b in v.backends}

    def reverse_nat(self) -> dict[Endpoint, tuple[RevTargetSpec, ...]]:
        """The ``rev_nat`` entries this state needs. An endpoint (port given) lists the VIPs
        it serves, by vip id; an address (port REV_ANY_PORT) lists the VIP addresses it
        serves for the protocol, once each (port and ids 0). Down and drained backends are
        included: their flows still get replies. Only nat VIPs: fullnat replies are found by
        their own port (fnat_ports), dsr replies never pass the balancer."""
        out: dict[Endpoint, set[RevTargetSpec]] = {}
        for v in self.vips:
            if v.mode != Forwarding.NAT:
                continue
            for b in v.backends:
                out.setdefault((b.address, b.port, v.proto), set()).add(
                    (v.address, v.port, v.vip_id, b.backend_id))
                out.setdefault((b.address, REV_ANY_PORT, v.proto), set()).add(
                    (v.address, 0, 0, 0))
        return {k: tuple(sorted(t, key=lambda x: (x[2], x[0]))) for k, t in out.items()}


@dataclass
class Current:
    """Ids already in the maps (empty for a fresh start)."""

    vip_ids: dict[Service, int] = field(default_factory=dict)
    backend_ids: dict[BackendKey, int] = field(default_factory=dict)


class CapacityError(ValueError):
    """More VIPs or backends than the data path's arrays hold."""


def _allocate(wanted: list, taken: dict, limit: int, what: str) -> dict:
    """Keep existing ids for keys still wanted; give new keys the lowest free ids, ids that
    were not in use before first: an id freed by this change is reused only when nothing
    else is left, so a removed backend's flows are not silently inherited by a new one."""
    out = {k: taken[k] for k in wanted if k in taken}
    kept, before = set(out.values()), set(taken.values())
    free = (i for ids in ((i for i in range(limit) if i not in before),
                          (i for i in range(limit) if i in before and i not in kept))
            for i in ids)
    for k in wanted:
        if k not in out:
            try:
                out[k] = next(free)
            except StopIteration:
                raise CapacityError(f"too many {what} (the data path holds {limit})") from None
    return out


MODES = {"nat": Forwarding.NAT, "fullnat": Forwarding.FULLNAT, "dsr-l2": Forwarding.DSR_L2,
         "dsr-ipip": Forwarding.DSR_IPIP}
MODE_NAMES = {m: name for name, m in MODES.items()}
SCHEDULERS = {"maglev": Scheduler.MAGLEV, "source-hash": Scheduler.SOURCE_HASH,
              "wrr": Scheduler.WRR, "rr": Scheduler.RR, "random": Scheduler.RANDOM,
              "least-conn": Scheduler.LEAST_CONN}
SCHEDULER_NAMES = {s: name for name, s in SCHEDULERS.items()}


def serving(backends: tuple[DesiredBackend, ...]) -> str:
    """The set a VIP's ring holds (``DesiredVip.serving``): backups stand in for the primaries
    only while none of them is up, as keepalived's sorry server and nginx's ``backup`` do."""
    for role, backup in (("primary", False), ("backup", True)):
        if any(b.up for b in backends if b.backup == backup):
            return role
    return "none"


def backend_label(vip_name: str, address: str, port: int) -> str:
    """How health checks, drains and logs name a backend: ``web/10.20.0.11:80``."""
    return f"{vip_name}/{address}:{port}"


def desired_state(
    cfg: Config,
    current: Current | None = None,
    down: frozenset[str] = frozenset(),
    drained: frozenset[str] = frozenset(),
) -> DesiredState:
    """Compute the state the maps must hold for ``cfg``. ``down`` names (by
    :func:`backend_label`) failed backends: they keep their ids but leave the Maglev ring and
    their flows re-balance. ``drained`` ones get weight 0: no new flows, flows stay. Backups
    are in the ring only while no primary is up (:func:`serving`); out of it they keep their
    tracked flows, as a drained backend does."""
    current = current or Current()
    vip_keys = [(str(v.address), v.port, PROTOCOLS[v.protocol]) for v in cfg.vips]
    vip_ids = _allocate(vip_keys, current.vip_ids, MAX_VIPS, "VIPs")

    backend_keys: list[BackendKey] = []
    for v, vk in zip(cfg.vips, vip_keys, strict=True):
        backend_keys += [(vip_ids[vk], str(b.address), b.target_port(v)) for b in v.backends]
    backend_ids = _allocate(backend_keys, current.backend_ids, MAX_BACKENDS, "backends")

    seed = cfg.maglev.seed
    vips = []
    for v, vk in zip(cfg.vips, vip_keys, strict=True):
        vid = vip_ids[vk]
        bes = []
        for b in v.backends:
            bk = (vid, str(b.address), b.target_port(v))
            label = backend_label(v.name, bk[1], bk[2])
            weight = 0 if label in drained else b.weight
            bes.append(DesiredBackend(backend_ids[bk], bk[1], bk[2], weight, label in down,
                                      b.backup))
        # Only the serving set is in the ring; the others keep their ids and tracked flows.
        sched = SCHEDULERS[v.scheduler]
        vips.append(DesiredVip(vid, v.name, vk[0], vk[1], vk[2], tuple(bes),
                               _ring(bes, sched, cfg.table_size_of(v), seed),
                               MODES[v.mode], None if v.source is None else str(v.source),
                               v.port_range if v.forwarding == "fullnat" else (0, 0), sched))
    state = DesiredState(tuple(vips), seed, cfg.flows.next_hop_cache_ms * 1_000_000,
                         round(cfg.flows.udp_idle_timeout * 1e9), cfg.flows.new_flow_rate_limit)
    _check_reverse(state)
    return state


def _ring(bes: list[DesiredBackend], sched: Scheduler, table_size: int, seed: int
          ) -> np.ndarray:
    """A VIP's ring over its serving set: backend id per slot (NO_BACKEND: none)."""
    backups = serving(tuple(bes)) == "backup"
    weights = [b.weight if b.up and b.backup == backups else 0 for b in bes]
    ids = np.array([b.backend_id for b in bes] + [NO_BACKEND], dtype=np.uint32)
    if sched in (Scheduler.MAGLEV, Scheduler.SOURCE_HASH):
        table = maglev.build_table([(b.maglev_key, w) for b, w in zip(bes, weights, strict=True)],
                                   table_size, seed)
        return ids[np.where(table < 0, len(bes), table)]
    if sched == Scheduler.LEAST_CONN:  # the serving backends, one slot each (config checks
        # LC_MAX_BACKENDS; DNS may find more: the pick compares the first ones)
        turns = sequence.round_robin(weights)[:LC_MAX_BACKENDS]
    elif sched == Scheduler.RR:
        turns = sequence.round_robin(weights)
    else:
        turns = sequence.smooth_wrr(weights)
    # No serving backend: one empty slot (a ring of 0 slots would not be a map)
    return ids[np.array(turns or [len(bes)], dtype=np.int64)]


def ring_slots(state: DesiredState) -> dict[int, int]:
    """Slots each backend holds in its VIP's ring, by backend id (what readers show as its
    Maglev share), without reading the rings back from the kernel."""
    out: dict[int, int] = {}
    for v in state.vips:
        ids, counts = np.unique(v.ring[v.ring != NO_BACKEND], return_counts=True)
        out.update(zip(ids.tolist(), counts.tolist(), strict=True))
    return out


def _check_reverse(state: DesiredState) -> None:
    """Refuse an endpoint that serves more VIPs than a reply can be told apart between: the
    data path tries the flow key of each of at most REV_TARGETS VIPs."""
    for (addr, port, proto), targets in state.reverse_nat().items():
        if port != REV_ANY_PORT and len(targets) > REV_TARGETS:
            vips = ", ".join(f"{a}:{p}" for a, p, _, _ in targets)
            raise CapacityError(
                f"backend {addr}:{port} ({PROTO_NAMES.get(proto, proto)}) serves "
                f"{len(targets)} VIPs ({vips}); the data path tells the replies of at most "
                f"{REV_TARGETS} apart: give the backend another port per VIP")

