"""The VIPs and backends a running balancer holds, by id, as its pinned maps say.

VIP names are not in the maps: they come from the live agent, which publishes them
(``runfiles.vip_names``) and the path of its config file (``runfiles.agent_info``). With no
live agent (only pins left) VIPs go by address:port.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xdplb.abi.codec import PROTO_NAMES, PROTOCOLS, from_be16, ipv4_of
from xdplb.abi.layout import Backend, BackendFlag, Forwarding, Scheduler
from xdplb.instance import pins, runfiles
from xdplb.kernel.maps import KernelMaps

if TYPE_CHECKING:
    import numpy as np

    from xdplb.model.desired import Service

log = logging.getLogger("xdplb")

# A mode as readers print it: pool.yaml's `forwarding` and `encap` (encap None but for dsr).
# model.desired.MODES names the same modes for the agent; readers do not load numpy for it.
FORWARDING: dict[int, tuple[str, str | None]] = {
    Forwarding.NAT: ("nat", None),
    Forwarding.FULLNAT: ("fullnat", None),
    Forwarding.DSR_L2: ("dsr", "l2"),
    Forwarding.DSR_IPIP: ("dsr", "ipip"),
}


# A scheduler as pool.yaml names it (model.desired.SCHEDULERS, without numpy)
SCHEDULER_NAMES: dict[int, str] = {
    Scheduler.MAGLEV: "maglev", Scheduler.SOURCE_HASH: "source-hash", Scheduler.WRR: "wrr",
    Scheduler.RR: "rr", Scheduler.RANDOM: "random", Scheduler.LEAST_CONN: "least-conn",
}


def scheduler_name(sched: int) -> str:
    """pool.yaml's name of a Scheduler value; an unknown one as its number."""
    return SCHEDULER_NAMES.get(sched, str(sched))


def forwarding(mode: int) -> tuple[str, str | None]:
    """(forwarding, encap) of a Forwarding value; an unknown one as its number."""
    return FORWARDING.get(mode, (str(mode), None))


def mode_text(forwarding: str | None, encap: str | None) -> str:
    """A mode in one word for tables: ``nat``, ``fullnat``, ``dsr/l2``, ``dsr/ipip``."""
    if forwarding is None:
        return "-"
    return f"{forwarding}/{encap}" if encap else forwarding


def role_text(backup: bool, serving: str | None) -> str:
    """A backend's role after its state in tables: `` backup``, or `` backup, serving``
    while its VIP's backups take the new flows (no primary is up); nothing for a primary."""
    if not backup:
        return ""
    return " backup, serving" if serving == "backup" else " backup"


@dataclass(frozen=True)
class VipRef:
    id: int
    address: str
    port: int
    proto: int
    name: str | None = None
    mode: int = Forwarding.NAT  # VipInfo.mode: how its new flows are forwarded
    source_ports: tuple[int, int] | None = None  # fullnat: first and last source port
    ring_size: int = 0  # VipInfo.ring_size: slots of its ring
    scheduler: int = Scheduler.MAGLEV  # VipInfo.scheduler: how its new flows pick a slot

    @property
    def forwarding(self) -> tuple[str, str | None]:
        return forwarding(self.mode)

    @property
    def protocol(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def label(self) -> str:
        """The name when known, else ``tcp 10.200.0.10:80``."""
        return self.name or f"{self.protocol} {self.endpoint}"


@dataclass(frozen=True)
class BackendRef:
    id: int
    vip_id: int
    address: str
    port: int
    weight: int
    down: bool  # the data path's flag: failed health checks
    source: str | None = None  # Backend.src: the balancer's address toward it (fullnat, ipip)

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Catalog:
    vips: dict[int, VipRef]
    backends: dict[int, BackendRef]  # valid slots of the backends array only
    seed: int
    udp_idle_ns: int = 0  # meta.udp_idle_ns: a UDP flow idle this long is over (0: never)
    # From the live agent (pool.json): backup backends by id, each VIP's serving set, and
    # all it published per VIP (name, serving, backups, dns), by VIP id.
    backups: frozenset[int] = frozenset()
    serving: dict[int, str] = field(default_factory=dict)
    published: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, maps: KernelMaps, group: pins.PinGroup | None = None,
             roles_of: pins.PinGroup | None = None) -> Catalog:
        """Decode the config maps; names from the live agent's config when ``group`` has one;
        backups and serving sets from the agent of ``group`` or ``roles_of`` (which reads
        only what the agent published: no config file)."""
        names = vip_names(group) if group is not None else {}
        vips = {}
        for k, info in maps.items("vips"):
            key = (ipv4_of(k.addr), from_be16(k.port), k.proto)
            ports = (info.port_min, info.port_min + info.port_count - 1) \
                if info.port_count else None
            vips[info.vip_id] = VipRef(info.vip_id, *key, names.get(key), info.mode, ports,
                                       info.ring_size, info.scheduler)
        backends = {}
        # Plain ints: IntFlag's & costs more than the rest of a slot's decoding; and only
        # the slots in use are decoded (their flags byte read in place), of 16,384.
        valid, down = int(BackendFlag.VALID), int(BackendFlag.DOWN)
        size, flags_at = ctypes.sizeof(Backend), Backend.flags.offset
        bid = 0
        for chunk in maps.raw_values("backends"):
            for at in range(0, len(chunk), size):
                if chunk[at + flags_at] & valid:
                    be = Backend.from_buffer_copy(chunk, at)
                    src = bytes(be.src)[:4]
                    backends[bid] = BackendRef(bid, be.vip_id, ipv4_of(be.addr),
                                               from_be16(be.port), be.weight,
                                               bool(be.flags & down),
                                               ipv4_of(src) if any(src) else None)
                bid += 1
        meta = maps.lookup("meta", 0)
        roles = pool_by_vip(where, vips) if (where := group or roles_of) else {}
        backups = {b.id for b in backends.values()
                   if b.endpoint in roles.get(b.vip_id, {}).get("backups", ())}
        return cls(vips, backends, meta.seed, meta.udp_idle_ns,
                   frozenset(backups), {vid: r["serving"] for vid, r in roles.items()}, roles)

    @property
    def named(self) -> bool:
        return any(v.name for v in self.vips.values())

    def vip_backends(self, vip_id: int) -> list[BackendRef]:
        return sorted((b for b in self.backends.values() if b.vip_id == vip_id),
                      key=lambda b: b.id)

    def health_key(self, b: BackendRef) -> str | None:
        """The key health results are published under (``web/10.20.0.11:80``), if named."""
        vip = self.vips.get(b.vip_id)
        return f"{vip.name}/{b.endpoint}" if vip and vip.name else None

    def find_vips(self, spec: str) -> list[VipRef]:
        """VIPs matching ``NAME``, ``ADDR`` or ``ADDR:PORT``; ValueError for a malformed or
        unknown one (the message lists what there is)."""
        host, port = split_endpoint(spec, port_required=False)
        if host is None:
            found = [v for v in self.vips.values() if v.name == spec]
            if not found and not self.named:
                raise ValueError(f"VIP names need a running agent (its config names them); "
                                 f"give ADDR:PORT instead of {spec!r}")
        else:
            found = [v for v in self.vips.values()
                     if v.address == host and port in (None, v.port)]
        if not found:
            have = ", ".join(sorted(v.label for v in self.vips.values())) or "none"
            raise ValueError(f"no VIP {spec!r} here (VIPs: {have})")
        return found

    def vip_json(self, vip_id: int) -> dict[str, Any]:
        """A VIP's identity fields as readers print them, with its forwarding mode."""
        v = self.vips.get(vip_id)
        if v is None:
            return {"vip_id": vip_id, "vip": None, "vip_address": None, "vip_port": None,
                    "protocol": None, "forwarding": None, "encap": None}
        fwd, encap = v.forwarding
        return {"vip_id": v.id, "vip": v.name, "vip_address": v.address, "vip_port": v.port,
                "protocol": v.protocol, "forwarding": fwd, "encap": encap}


def pool_by_vip(group: pins.PinGroup, vips: dict[int, VipRef]) -> dict[int, dict[str, Any]]:
    """What the live agent published per VIP (``runfiles.pool``, with its ``name``) by VIP
    id: serving set, backups, DNS discovery. Empty without a live agent."""
    pool = runfiles.pool(group) if runfiles.agent_info(group) else {}
    by_key = {tuple(p.get("key") or ()): {**p, "name": name} for name, p in pool.items()}
    return {vid: row for vid, v in vips.items()
            if (row := by_key.get((v.address, v.port, v.proto)))}


def vip_names(group: pins.PinGroup) -> dict[Service, str]:
    """(address, port, proto) -> name from the live agent's config; empty when unknown."""
    info = runfiles.agent_info(group)
    if not info or not info.get("config"):
        return {}
    published = runfiles.vip_names(group, info)
    if published is not None:
        return published
    # An agent that publishes no names, or a config file edited since: read the file.
    from xdplb.config import ConfigError, load_config

    try:
        cfg = load_config(info["config"])
    except (ConfigError, OSError) as e:
        log.debug("VIP names unavailable: %s", e)
        return {}
    return {(str(v.address), v.port, PROTOCOLS[v.protocol]): v.name for v in cfg.vips}


def split_endpoint(spec: str, port_required: bool = True) -> tuple[str | None, int | None]:
    """``ADDR:PORT`` (or ``ADDR`` when the port is optional) -> (address, port); (None,
    None) when ``spec`` is no address at all (a name). ValueError when malformed."""
    host, sep, port_s = spec.rpartition(":")
    if not sep:
        host, port_s = spec, ""
    try:
        addr = str(ipaddress.IPv4Address(host))
    except ValueError:
        if sep or port_required:
            raise ValueError(f"{spec!r}: {host!r} is not an IPv4 address") from None
        return None, None
    if not port_s:
        if port_required:
            raise ValueError(f"{spec!r}: want ADDR:PORT")
        return addr, None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"{spec!r}: {port_s!r} is not a port (1-65535)")
    return addr, int(port_s)


def read_rings(maps: KernelMaps, cat: Catalog) -> dict[int, np.ndarray]:
    """Each VIP's Maglev ring (backend id per slot), by VIP id; a VIP without one (being
    added) is left out."""
    rings = {vid: maps.ring(vid, v.ring_size) for vid, v in cat.vips.items()}
    return {vid: r for vid, r in rings.items() if r is not None}
