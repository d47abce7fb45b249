"""Desired state -> maps, touching only what changed, in an order the data path never
sees half-done: backends and their reverse NAT before the ring slots that point at them, a
VIP's ring before the VIP itself; on removal the VIP goes first, then its backends are
invalidated (their tracked flows then re-balance instead of being blackholed)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from xdplb.abi.codec import be16, from_be16, ipv4_of, vip_key
from xdplb.abi.layout import (
    ADDR_FILTER_BITS,
    ADDR_MAYBE_BACKEND,
    ADDR_MAYBE_LB_SOURCE,
    ADDR_MAYBE_VIP,
    FAMILY_IPV4,
    IF_MACS,
    REV_ANY_PORT,
    U8,
    AddrKey,
    Backend,
    BackendFlag,
    IfMac,
    Meta,
    RevKey,
    RevNat,
    Scheduler,
    VipInfo,
    addr4,
    addr16,
    layout_version,
)
from xdplb.kernel.localaddrs import link_macs, source_toward
from xdplb.model.desired import (
    Current,
    DesiredState,
    DesiredVip,
    RevTargetSpec,
)
from xdplb.model.hashing import addr_slot

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    slots_written: int = 0
    backends_written: int = 0
    vips_added: int = 0
    vips_removed: int = 0
    backends_removed: int = 0
    reverse_written: int = 0


class MapSync:
    """Keeps a maps object (kernel or userspace) equal to the desired state."""

    def __init__(self, maps, source_of: Callable[[str], str | None] = source_toward) -> None:
        self.maps = maps
        # The balancer's address toward a backend, for fullnat and dsr/ipip (the kernel's
        # route, unless the config names a source)
        self.source_of = source_of
        self.rings: dict[int, np.ndarray] = {}  # vip id -> ring as last written

    def read_current(self) -> Current:
        """Ids the maps hold now (for stable allocation, e.g. after a restart)."""
        cur = Current()
        for k, info in self.maps.items("vips"):
            cur.vip_ids[(ipv4_of(k.addr), from_be16(k.port), k.proto)] = info.vip_id
        for bid, be in self.maps.items("backends"):
            if be.flags & BackendFlag.VALID:
                cur.backend_ids[(be.vip_id, ipv4_of(be.addr), from_be16(be.port))] = bid
        return cur

    def _ring_now(self, vip_id: int, size: int) -> np.ndarray | None:
        """The ring of ``vip_id`` as the maps hold it (as last written, or read once; of
        ``size`` slots when it is a ring of that size)."""
        if vip_id not in self.rings:
            ring = self.maps.ring(vip_id, size)
            if ring is None:
                return None
            self.rings[vip_id] = ring
        return self.rings[vip_id]

    def apply(self, desired: DesiredState, current: Current) -> SyncReport:
        rep = SyncReport()
        m = self.maps
        # The rate is counted per CPU (RSS spreads flows over them): an even share each
        per_cpu = -(-desired.new_flow_rate // m.cpus())
        m.update("meta", 0, Meta(desired.seed, per_cpu, int(layout_version(), 16),
                                 desired.next_hop_ttl_ns, desired.udp_idle_ns))

        # 1. removed VIPs go first: their id may be reused by a VIP added below
        wanted = {v.key: v for v in desired.vips}
        for key in current.vip_ids:
            if key not in wanted:
                m.delete("vips", vip_key(*key))
                rep.vips_removed += 1

        # 2. backends (new ones become valid before any slot points at them)
        sources = self._sources(desired)
        for v in desired.vips:
            vip = vip_key(*v.key)  # a backend names its VIP: the data path checks flows by it
            for b in v.backends:
                flags = BackendFlag.VALID | (BackendFlag.DOWN if b.down else 0)
                src = sources.get((v.vip_id, b.address))
                new = Backend(addr16(ipaddress.IPv4Address(b.address).packed),
                              be16(b.port), FAMILY_IPV4, int(flags), v.vip_id, b.weight,
                              vip.addr, vip.port, vip.proto, 0,
                              addr16(ipaddress.IPv4Address(src).packed) if src else addr16(b""))
                old = m.lookup("backends", b.backend_id)
                if old is None or bytes(old) != bytes(new):
                    m.update("backends", b.backend_id, new)
                    rep.backends_written += 1

        # 3. reverse NAT and prefilter bits for every backend and VIP address, before the
        # VIPs appear: a flow's first reply finds its translation
        rep.reverse_written = self._write_reverse(desired)
        self._mark_addresses(desired, set(sources.values()))

        # 4. rings, slot by slot where they differ
        for v in desired.vips:
            rep.slots_written += self._write_ring(v)

        # 5. VIPs (now that their rings are complete) and their addresses
        for key, v in wanted.items():
            have = m.lookup("vips", vip_key(*key))
            if current.vip_ids.get(key) != v.vip_id or have is None \
                    or bytes(have) != bytes(vip_info(v)):
                m.update("vips", vip_key(*key), vip_info(v))
                rep.vips_added += 1
        addrs = {k[0] for k in wanted}
        for k, _ in list(m.items("vip_addrs")):
            if ipv4_of(k.addr) not in addrs:
                m.delete("vip_addrs", k)
        for a in addrs:
            m.update("vip_addrs", AddrKey(addr16(ipaddress.IPv4Address(a).packed)), 1)

        # 6. backends no longer configured: invalid, so their flows move on
        keep = desired.backend_ids()
        for bid in set(current.backend_ids.values()) - keep:
            m.update("backends", bid, Backend())
            rep.backends_removed += 1
        # 7. rings of VIPs that left (known from this run, or from the maps after a restart)
        live = {v.vip_id for v in desired.vips}
        for vid in {*self.rings, *current.vip_ids.values()} - live:
            self.maps.drop_ring(vid)
            self.rings.pop(vid, None)
        return rep

    def _sources(self, desired: DesiredState) -> dict[tuple[int, str], str]:
        """(vip id, backend address) -> the balancer's address toward it, for the VIPs whose
        mode needs one. One route lookup per backend address."""
        out: dict[tuple[int, str], str] = {}
        looked: dict[str, str | None] = {}
        for v in desired.vips:
            if not v.needs_source:
                continue
            for b in v.backends:
                src = v.source
                if src is None:
                    if b.address not in looked:
                        looked[b.address] = self.source_of(b.address)
                    src = looked[b.address]
                if src is None:
                    # Its new flows are dropped (drop_next_hop) until a route appears and
                    # the next apply finds one
                    log.warning("VIP %s: no route toward backend %s, so no address to send "
                                "to it from: its new flows are dropped (add a route, or set "
                                "`source`)", v.name, b.address)
                    continue
                out[(v.vip_id, b.address)] = src
        return out

    def _write_reverse(self, desired: DesiredState) -> int:
        """``rev_nat`` from the desired state, writing only changed entries. Entries of
        endpoints and addresses that left the config stay, as their prefilter bits do: the
        flows of a removed backend outlive it, and its late replies must still be rewritten.
        They go only when the map would not hold the current ones otherwise."""
        want = {bytes(rev_key(*k)): rev_nat(k[1], t) for k, t in desired.reverse_nat().items()}
        have = {bytes(k): bytes(v) for k, v in self.maps.items("rev_nat")}
        stale = [k for k in have if k not in want]
        excess = len(stale) + len(want) - self.maps.max_entries("rev_nat")
        for k in stale[: max(excess, 0)]:
            self.maps.delete("rev_nat", RevKey.from_buffer_copy(k))
        changed = [(RevKey.from_buffer_copy(k), v) for k, v in want.items()
                   if have.get(k) != bytes(v)]
        self.maps.update_many("rev_nat", changed)
        return len(changed)

    def _mark_addresses(self, desired: DesiredState, sources: set[str]) -> None:
        """Set the prefilter bits of every VIP and backend address, and of the balancer's
        own addresses that fullnat replies come back to. Bits are never cleared: a removed
        backend's reverse entries outlive it, and its late replies must still be rewritten;
        a stale bit only costs the hash lookups the filter would have saved."""
        want: dict[int, int] = {}
        for a in sources:
            slot = addr_slot(ipaddress.IPv4Address(a).packed, ADDR_FILTER_BITS)
            want[slot] = want.get(slot, 0) | ADDR_MAYBE_LB_SOURCE
        for v in desired.vips:
            addrs = [(v.address, ADDR_MAYBE_VIP)] + [(b.address, ADDR_MAYBE_BACKEND)
                                                      for b in v.backends]
            for a, bit in addrs:
                slot = addr_slot(ipaddress.IPv4Address(a).packed, ADDR_FILTER_BITS)
                want[slot] = want.get(slot, 0) | bit
        for slot, bits in want.items():
            have = self.maps.lookup("addr_filter", slot) or 0
            if have | bits != have:
                self.maps.update("addr_filter", slot, have | bits)

    def _write_ring(self, v: DesiredVip) -> int:
        """Write ``v``'s ring: the slots that differ, or, for a VIP without one or with a
        table of another size, a whole new ring swapped in. The VIP's ring_size and the
        ring it finds are written in an order that keeps every slot the data path computes
        inside the ring: a smaller table's size first, a larger table's after (step 5)."""
        new = v.ring.astype(np.uint32)
        have = self._ring_now(v.vip_id, len(new))
        if have is not None and len(have) == len(new):
            changed = np.nonzero(have != new)[0]
            self.maps.ring_update(v.vip_id, new, changed)
            self.rings[v.vip_id] = new
            if len(changed):
                self._restart_turns(v)
            return len(changed)
        if have is not None and len(new) < len(have):
            old = self.maps.lookup("vips", vip_key(*v.key))
            if old is not None and old.vip_id == v.vip_id:
                self.maps.update("vips", vip_key(*v.key), vip_info(v))
        self.maps.put_ring(v.vip_id, new)
        self.rings[v.vip_id] = new
        self._restart_turns(v)
        return len(new)

    def _restart_turns(self, v: DesiredVip) -> None:
        """A new sequence of a wrr / rr VIP starts at its first turn, as nginx's does on
        reload (a data-path write racing this one only shifts where it starts)."""
        if v.scheduler in (Scheduler.WRR, Scheduler.RR):
            self.maps.update("sched_cursor", v.vip_id, 0)

    def set_tx_ports(self, ifindexes: list[int], macs: dict[int, bytes] | None = None) -> None:
        """Interfaces packets may be redirected to: ifindex -> devmap slot -> ifindex; and
        their own MACs (``macs``, else read from the kernel), so that frames to other hosts'
        MACs are left to the kernel. Two interfaces on one if_macs slot check nothing."""
        for slot, idx in enumerate(ifindexes):
            self.maps.update("tx_devs", slot, idx)
            self.maps.update("tx_ports", idx, slot)
        macs = link_macs(ifindexes) if macs is None else macs
        slots: dict[int, list[int]] = {}
        for idx in ifindexes:
            slots.setdefault(idx % IF_MACS, []).append(idx)
        for slot, idxs in slots.items():
            mac = macs.get(idxs[0]) if len(idxs) == 1 else None
            self.maps.update("if_macs", slot,
                             IfMac(idxs[0], (U8 * 6)(*mac), (U8 * 2)()) if mac else IfMac())


def vip_info(v: DesiredVip) -> VipInfo:
    """A VIP's ``vips`` value: its ring and how its new flows are forwarded."""
    lo, hi = v.ports
    return VipInfo(v.vip_id, v.ring_size, int(v.mode), int(v.scheduler), lo,
                   hi - lo + 1 if hi else 0)


def rev_key(address: str, port: int, proto: int) -> RevKey:
    """The ``rev_nat`` key of a backend endpoint (port REV_ANY_PORT: of its address)."""
    return RevKey(addr4(ipaddress.IPv4Address(address).packed), be16(port), proto, FAMILY_IPV4)


def rev_nat(port: int, targets: tuple[RevTargetSpec, ...]) -> RevNat:
    """The ``rev_nat`` value of an endpoint (``port`` given) or an address (REV_ANY_PORT):
    ``count`` VIPs or VIP addresses; an address entry names its VIP address only when it is
    the only one (the data path rewrites fragments from that address only then)."""
    out = RevNat(len(targets))
    if port == REV_ANY_PORT and len(targets) != 1:
        return out
    for t, (vip_addr, vip_port, vip_id, backend_id) in zip(out.targets, targets, strict=False):
        t.vip_addr[:] = ipaddress.IPv4Address(vip_addr).packed
        t.vip_port, t.vip_id, t.backend_id = be16(vip_port), vip_id, backend_id
    return out
