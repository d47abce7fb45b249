"""``xdplb trace``: where a flow goes now and why, from the real program.

The program is compiled again, sharing the instance's live config maps (VIPs, backends,
Maglev rings, reverse NAT, meta, TX ports) while its flow table, counters and stats are
private. The live flow entry of the 5-tuple (for a backend's reply: of the flow it answers),
if any, is copied in, and one
synthetic frame runs through BPF_PROG_TEST_RUN: the live flow table is never touched and
nothing is sent. The answer is cross-checked with the Python model (flow table, then
hash + Maglev ring) and, when this build has it, the scapy data path on a copy of the same
maps; any disagreement is reported.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from xdplb.abi.codec import PROTO_NAMES, PROTOCOLS, be16, from_be16, ipv4_of
from xdplb.abi.layout import (
    FAMILY_IPV4,
    IF_MACS,
    MAPS,
    NO_BACKEND,
    RANDOM_SALT,
    Flow,
    FlowKey,
    Forwarding,
    Scheduler,
    addr4,
    coarse_ns,
)
from xdplb.inspect.catalog import (
    Catalog,
    VipRef,
    forwarding,
    read_rings,
    scheduler_name,
    split_endpoint,
)
from xdplb.inspect.flowtable import STATE_NAMES
from xdplb.inspect.reader import Reader
from xdplb.kernel import bpfsys, xdp_link
from xdplb.kernel.loader import compile_program
from xdplb.kernel.maps import KernelMaps, read_counters
from xdplb.model.hashing import flow_hash, source_hash
from xdplb.userspace.datapath import ACTIONS as VERDICTS
from xdplb.userspace.fullnat import fnat_key, same_holder
from xdplb.userspace.reply import reply_flow, rev_key

# Shared with the live program; every other map (flows, counters...) is the trace's own.
CONFIG_MAPS = frozenset(m.name for m in MAPS if m.written_by == "agent")
PRIVATE_FLOWS = 4096  # the private table holds one entry; no need for the live size
TTL = 64


@dataclass(frozen=True)
class Probe:
    """The 5-tuple of the packet to trace, as the balancer receives it."""

    proto: int
    src: str
    sport: int
    dst: str
    dport: int

    @classmethod
    def parse(cls, proto: str, src: str, dst: str) -> Probe:
        """From ``tcp|udp``, ``SRC:SPORT``, ``DST:DPORT``; ValueError when malformed."""
        if proto.lower() not in PROTOCOLS:
            raise ValueError(f"protocol must be tcp or udp, not {proto!r}")
        (s, sp), (d, dp) = split_endpoint(src), split_endpoint(dst)
        return cls(PROTOCOLS[proto.lower()], s, sp, d, dp)

    def key(self) -> FlowKey:
        return flow_key(self.src, self.sport, self.dst, self.dport, self.proto)

    def frame(self, tcp_flags: str, dst_mac: str = "02:00:00:00:00:ff") -> bytes:
        """The probe as a frame; ``dst_mac``: the ingress interface's (else the program
        leaves it to the kernel as another host's, pass_foreign_mac)."""
        from scapy.layers.inet import IP, TCP, UDP
        from scapy.layers.l2 import Ether

        l4 = (TCP(sport=self.sport, dport=self.dport, flags=tcp_flags, seq=1)
              if self.proto == socket.IPPROTO_TCP else UDP(sport=self.sport, dport=self.dport))
        return bytes(Ether(src="02:00:00:00:00:fe", dst=dst_mac)
                     / IP(src=self.src, dst=self.dst, ttl=TTL) / l4 / b"xdplb-trace")


def flow_key(src: str, sport: int, dst: str, dport: int, proto: int) -> FlowKey:
    return FlowKey(addr4(ipaddress.IPv4Address(src).packed),
                   addr4(ipaddress.IPv4Address(dst).packed),
                   socket.htons(sport), socket.htons(dport), proto, FAMILY_IPV4)


def _endpoint(addr: str, port: int) -> str:
    return f"{addr}:{port}"


@dataclass
class Live:
    """What the live tables hold for the probe."""

    flow_key: FlowKey | None = None
    flow: Flow | None = None
    reply: bool = False  # the probe is a backend's reply of a tracked flow
    vip: tuple[str, int] | None = None  # a reply's VIP: what its source is rewritten to
    read_ns: int = 0  # when the tables were read: the trace answers as of then
    fnat_key: bytes | None = None  # a fullnat reply: its fnat_ports entry (the flow's key)

    def flow_as_read(self) -> Flow | None:
        """The flow with its timestamps moved on by the time since the read, so that a data
        path running it now (after compiling, seconds later) sees the idle time it had when
        it was read: program and models answer for the same moment."""
        if self.flow is None:
            return None
        f = Flow.from_buffer_copy(self.flow)
        shift = coarse_ns() - self.read_ns
        f.first_ns += shift
        f.last_ns += shift
        for nh in (f.fwd_nh, f.rev_nh):
            if nh.ns:  # 0: nothing cached
                nh.ns += shift
        return f


class _LiveFlows:
    """The live flow table as the reverse NAT's lookups see a table (``ref``)."""

    def __init__(self, maps: KernelMaps) -> None:
        self.maps = maps

    def ref(self, key: bytes) -> Flow | None:
        return self.maps.tracked_flow(key)


def _live_state(maps: KernelMaps, p: Probe) -> Live:
    live = Live(read_ns=coarse_ns())
    src, dst = (ipaddress.IPv4Address(a).packed for a in (p.src, p.dst))
    # A fullnat reply (backend -> the balancer's address and a flow's port), as the data
    # path looks for one first: fnat_ports names the flow, which must still hold the port.
    fk = fnat_key(dst, be16(p.dport), src, be16(p.sport), p.proto)
    owner = maps.lookup("fnat_ports", fk)
    if owner is not None:
        f = maps.tracked_flow(owner)
        if f is not None and same_holder(f, fk):
            live.reply, live.flow, live.flow_key, live.fnat_key = True, f, owner, fk
            live.vip = (ipv4_of(owner.dst), from_be16(owner.dport))
            return live
    rn = maps.lookup("rev_nat", rev_key(src, p.sport.to_bytes(2, "big"), p.proto))
    if rn is not None:  # from a backend endpoint: the reply of a tracked flow?
        f, t = reply_flow(_LiveFlows(maps), rn, dst, p.dport.to_bytes(2, "big"), p.proto)
        if f is not None:
            live.reply, live.flow = True, f
            live.vip = (ipv4_of(t.vip_addr), from_be16(t.vip_port))
            live.flow_key = flow_key(p.dst, p.dport, *live.vip, p.proto)
            return live
    live.flow_key, live.flow = p.key(), maps.tracked_flow(p.key())
    return live


def _seed(maps: KernelMaps, live: Live) -> None:
    """A trace's private tables: the live flow entry, and a fullnat reply's port entry."""
    if live.flow is not None:
        maps.update("flows", live.flow_key, live.flow_as_read())
    if live.fnat_key is not None:
        maps.update("fnat_ports", live.fnat_key, live.flow_key)


def _seed_turn(own: Any, live_maps: KernelMaps, cat: Catalog, p: Probe) -> None:
    """The probe's VIP's next wrr / rr turn, copied from the live counter into the trace's
    own (the probe takes it there, not in the live program)."""
    vip = _find_vip(cat, p)
    if vip is not None:
        own.update("sched_cursor", vip.id, int(live_maps.lookup("sched_cursor", vip.id) or 0))


def _out(mode: int, address: str, port: int, p: Probe) -> str:
    """Where a forward packet of ``mode`` leaves addressed: dsr/l2 keeps the VIP (only the
    MACs change); the other modes name the backend (dsr/ipip: the outer header's)."""
    if mode == Forwarding.DSR_L2:
        return _endpoint(p.dst, p.dport)
    return _endpoint(address, port or p.dport)


def _find_vip(cat: Catalog, p: Probe):
    return next((v for v in cat.vips.values()
                 if (v.address, v.port, v.proto) == (p.dst, p.dport, p.proto)), None)


def model(maps: KernelMaps, cat: Catalog, p: Probe, live: Live) -> dict[str, Any]:
    """What the Python model of the data path predicts: decision and destination."""
    if live.reply:
        return {"decision": "reply", "out": _endpoint(*live.vip)}
    vip = _find_vip(cat, p)
    if vip is None:
        return {"decision": "not_vip", "out": _endpoint(p.dst, p.dport)}
    f = live.flow
    if f is not None and not _udp_idle_over(cat, p, f, live.read_ns):
        be = cat.backends.get(f.backend_id)
        if be is not None and not be.down and be.vip_id == vip.id:
            return {"decision": "tracked", "backend_id": be.id,
                    "out": _out(f.mode, be.address, be.port, p)}
    h = _sched_key(maps, cat, vip, p)
    slot = h % vip.ring_size if vip.ring_size else 0
    table = maps.ring(vip.id, vip.ring_size)
    owner = int(table[slot]) if table is not None and slot < len(table) else NO_BACKEND
    ring = {"hash": h, "seed": cat.seed, "ring_size": vip.ring_size, "slot": slot,
            "owner": None if owner == NO_BACKEND else owner,
            "scheduler": scheduler_name(vip.scheduler)}
    be = cat.backends.get(owner) if owner != NO_BACKEND else None
    decision = "rebalanced" if f is not None else "new"
    if be is None or be.down or be.vip_id != vip.id:
        return {"decision": "drop", "reason": "drop_no_backend", "maglev": ring}
    if vip.mode in (Forwarding.FULLNAT, Forwarding.DSR_IPIP) and be.source is None:
        # no route toward the backend when the agent applied: no address to send from
        return {"decision": "drop", "reason": "drop_next_hop", "maglev": ring}
    return {"decision": decision, "backend_id": be.id, "maglev": ring,
            "out": _out(vip.mode, be.address, be.port, p)}


def _sched_key(maps: KernelMaps, cat: Catalog, vip: VipRef, p: Probe) -> int:
    """What the VIP's scheduler takes the slot of (bpf/sched.h): the flow hash (maglev), the
    client address's (source-hash), the 5-tuple's with the random seed (random), or the
    VIP's next turn (wrr, rr: as the counter stands now)."""
    src, dst = ipaddress.IPv4Address(p.src).packed, ipaddress.IPv4Address(p.dst).packed
    if vip.scheduler == Scheduler.SOURCE_HASH:
        return source_hash(src, cat.seed)
    if vip.scheduler in (Scheduler.WRR, Scheduler.RR):
        return int(maps.lookup("sched_cursor", vip.id) or 0)
    seed = cat.seed ^ RANDOM_SALT if vip.scheduler == Scheduler.RANDOM else cat.seed
    return flow_hash(src, dst, p.sport, p.dport, p.proto, seed)


def _udp_idle_over(cat: Catalog, p: Probe, f: Flow, now: int) -> bool:
    """Had this UDP flow been idle for flows.udp_idle_timeout at ``now`` (its next datagram
    is a new flow)? The data path's xl_reopens for UDP."""
    return p.proto == socket.IPPROTO_UDP and cat.udp_idle_ns > 0 \
        and now - f.last_ns >= cat.udp_idle_ns


def _decision(counters: dict[str, int], rebalanced: bool) -> str:
    """The program's own account of the packet, from the counters it moved."""
    if counters.get("reply"):
        return "reply"
    if counters.get("flow_hit"):
        return "tracked"
    if counters.get("new_flow"):
        return "rebalanced" if rebalanced else "new"
    if any(k.startswith("drop_") for k in counters):
        return "drop"
    return "not_vip" if counters.get("pass_not_vip") else "pass"


def _ingress(r: Reader, live: Live) -> str:
    # Replies arrive on the backend side: the last interface of a two-armed balancer.
    return r.group.ifaces[-1 if live.reply else 0]


def _tcp_flags(live: Live) -> str:
    return "A" if live.flow is not None else "S"  # mid-flow, or opening one


def run_bpf(r: Reader, p: Probe, live: Live) -> dict[str, Any]:
    """The probe through the real program, on private flow tables seeded from ``live``."""
    program = compile_program(PRIVATE_FLOWS, r.group.path, pinned=CONFIG_MAPS)
    try:
        own = KernelMaps(program.map_fds, own=False)
        _seed(own, live)
        _seed_turn(own, r.maps, r.catalog, p)
        ingress = _ingress(r, live)
        frame = p.frame(_tcp_flags(live), _own_mac(r.maps, ingress))
        before = read_counters(own)
        res = bpfsys.prog_test_run(program.prog_fd, frame,
                                   ctx_in=bpfsys.xdp_md(len(frame), xdp_link.ifindex(ingress)))
        after = read_counters(own)
    finally:
        program.close()
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    return {"verdict": VERDICTS.get(res.retval, str(res.retval)), "ingress": ingress,
            "counters": moved, "out": _out_endpoint(res.data_out, p.proto, live.reply)}


def _own_mac(maps: KernelMaps, ingress: str) -> str:
    """The MAC the agent recorded for interface ``ingress`` (if_macs), as text."""
    idx = xdp_link.ifindex(ingress)
    own = maps.lookup("if_macs", idx % IF_MACS)
    if own is None or own.ifindex != idx:
        return "02:00:00:00:00:ff"
    return ":".join(f"{b:02x}" for b in bytes(own.mac))


def _out_endpoint(frame: bytes, proto: int, reply: bool) -> str | None:
    """Where the frame leaving the program is addressed (its source, for a reply)."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    if IP not in pkt:
        return None
    l4 = pkt[TCP] if proto == socket.IPPROTO_TCP else pkt[UDP]
    ip = pkt[IP]
    return _endpoint(ip.src, l4.sport) if reply else _endpoint(ip.dst, l4.dport)


def scapy_model(r: Reader, p: Probe, live: Live, ingress: str) -> dict[str, Any] | None:
    """The same probe through the scapy data path (xdplb/pydatapath.py) on a copy of the
    live config maps, when this build has that engine."""
    try:
        from xdplb.userspace.datapath import ACTIONS, PyDatapath
        from xdplb.userspace.fib import Fib
        from xdplb.userspace.usermaps import UserMaps
    except ImportError:
        return None
    cat = r.catalog
    um = UserMaps(PRIVATE_FLOWS)
    for name in CONFIG_MAPS - {"maglev"}:
        um.update_many(name, r.maps.items(name))
    for vid, ring in read_rings(r.maps, cat).items():
        um.put_ring(vid, ring)
    _seed(um, live)
    _seed_turn(um, r.maps, cat, p)
    fib = Fib()
    try:
        before = read_counters(um)
        res = PyDatapath(um, fib).run(
            p.frame(_tcp_flags(live), _own_mac(r.maps, ingress)), xdp_link.ifindex(ingress))
        after = read_counters(um)
    finally:
        fib.close()
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    return {"verdict": ACTIONS.get(res.action, str(res.action)),
            "decision": _decision(moved, live.flow is not None),
            "out": _out_endpoint(res.data, p.proto, live.reply)}


def trace(r: Reader, p: Probe) -> dict[str, Any]:
    """Trace ``p`` through instance ``r``: the program's answer, the model's, and whether
    they agree."""
    cat = r.catalog
    live = _live_state(r.maps, p)
    predicted = model(r.maps, cat, p, live)
    bpf = run_bpf(r, p, live)
    bpf["decision"] = _decision(bpf["counters"], live.flow is not None)
    vip = _find_vip(cat, p) if not live.reply else None
    models = [{"engine": "hash+ring", **{k: v for k, v in predicted.items() if k != "maglev"}}]
    if (sp := scapy_model(r, p, live, bpf["ingress"])) is not None:
        models.append({"engine": "scapy", **sp})
    disagree = []
    for m in models:
        for field in ("verdict", "decision", "out"):
            # a dropped packet goes nowhere, whatever its bytes say
            if field in m and m[field] != bpf[field] and not (
                    field == "out" and "drop" in (bpf["decision"], bpf["verdict"])):
                disagree.append(f"{m['engine']} model says {field} {m[field]}, "
                                f"the program says {bpf[field]}")
    out: dict[str, Any] = {
        "proto": PROTO_NAMES[p.proto],
        "src": _endpoint(p.src, p.sport), "dst": _endpoint(p.dst, p.dport),
        "vip": cat.vip_json(vip.id) if vip else None,
        "verdict": bpf["verdict"],
        "decision": bpf["decision"],
        "out": bpf["out"],
        "ingress": bpf["ingress"],
        "backend": None,
        "tracked_flow": _flow_json(live, cat, p),
        "maglev": predicted.get("maglev"),
        "counters": bpf["counters"],
        "models": models,
        "agree": not disagree,
        "disagreements": disagree,
    }
    bid = predicted.get("backend_id")
    if bpf["decision"] in ("tracked", "new", "rebalanced") and bid in cat.backends:
        b = cat.backends[bid]
        out["backend"] = {"backend_id": b.id, "address": b.address, "port": b.port}
    return out


def _flow_json(live: Live, cat: Catalog, p: Probe) -> dict[str, Any] | None:
    f = live.flow
    if f is None:
        return None
    now = live.read_ns  # as of the read, like the decision
    be = cat.backends.get(f.backend_id)
    fwd, encap = forwarding(f.mode)
    return {
        "backend_id": f.backend_id,
        "backend": be.endpoint if be else None,
        "backend_down": be.down if be else None,
        "forwarding": fwd, "encap": encap,
        "source": f"{ipv4_of(f.nat_addr)}:{from_be16(f.nat_port)}"
        if f.mode == Forwarding.FULLNAT else None,
        "age_s": round(max(now - f.first_ns, 0) / 1e9, 3),
        "idle_s": round(max(now - f.last_ns, 0) / 1e9, 3),
        "tcp_state": STATE_NAMES.get(f.tcp_state, str(f.tcp_state)),
        "udp_idle_over": _udp_idle_over(cat, p, f, live.read_ns),
        "fwd_packets": f.fwd_packets, "fwd_bytes": f.fwd_bytes,
        "rev_packets": f.rev_packets, "rev_bytes": f.rev_bytes,
    }
