"""Map layouts and constants shared by the BPF program and Python: the one source of truth.

Every struct a map carries is declared once here as a ctypes ``Structure``; the C
declarations the BPF program compiles against are rendered from the same field lists
(:func:`render_c_header`), together with the map declarations and the counter and flag
constants. Python reads and writes the maps with these ctypes types, whether the maps
live in the kernel (pinned, see ``pins.py``) or in the scapy data path.

Addresses are 16 bytes (IPv4 in the first 4, wire order) in configuration maps, so that
IPv6 can follow without a new layout; flow keys are IPv4 only, because every packet hashes
one: a 40-byte key costs 20 ns a lookup here against 14 ns for 16 bytes, and an IPv6 data
path would get tables of its own. Ports are stored in network byte order, as on the wire.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import time
from dataclasses import dataclass

ADDR_LEN = 16
FAMILY_IPV4 = 2  # AF_INET

# Sizing. Each VIP's Maglev ring is a map of its own (``maglev``: an array of maps), so ring
# memory follows the VIPs configured and their table sizes; MAX_RING_SLOTS bounds the sum
# (2 bytes a slot: abi/ring.py). Backends are per (VIP, backend) pair.
MAX_VIPS = 4096
MAX_BACKENDS = 16384  # < RING_NO_BACKEND: a ring slot is a u16
MAX_RING_SLOTS = 1 << 27
MAX_TX_PORTS = 64
IF_MACS = 256  # if_macs slots: an attached interface's MAC at slot ifindex % IF_MACS
NO_BACKEND = 0xFFFFFFFF  # backend id of "no backend"
# A ring slot is a u16 backend id (MAX_BACKENDS fits), four to a u64 word: abi/ring.py
RING_SLOTS_PER_WORD, RING_NO_BACKEND = 4, 0xFFFF
NO_TX_SLOT = 0xFFFFFFFF  # NextHop.tx_slot: leave by XDP_TX
ADDR_FILTER_BITS = 16
ADDR_MAYBE_VIP, ADDR_MAYBE_BACKEND, ADDR_MAYBE_LB_SOURCE = 1, 2, 4
# fullnat: source ports a new flow tries (its hash's, then the VIP's next ones) before it is
# dropped; see bpf/fullnat.h for why no more.
FNAT_TRIES = 3
IPIP_OVERHEAD = 20  # the outer IPv4 header of dsr/ipip
RATE_WINDOW_NS = 1_000_000_000  # the window of flows.new_flow_rate_limit
OUTER_TTL = 64
# Reverse NAT: VIPs one backend endpoint (address, port, protocol) may serve and be told apart
# by (the data path tries each one's flow key); entries for backends, their addresses, and
# those of backends that left the config (kept for their late replies).
REV_TARGETS = 4
MAX_REV_NAT = 4 * MAX_BACKENDS
REV_ANY_PORT = 0  # RevKey.port of an address entry (every port of it): used for fragments
# scheduler random: its per-flow pick hashes the 5-tuple with seed ^ RANDOM_SALT, so that it is
# independent of the Maglev pick of the same flow and reproducible in both data paths
RANDOM_SALT = 0x5BD1E995
# wrr, rr, random: the longest turn sequence (sum of weights / their gcd); longer ones are
# scaled down (model/sequence.py)
MAX_SEQUENCE = 65537
# least-conn: the most backends a VIP's pick compares (a bounded loop in the program: each
# one costs three map lookups per new flow)
LC_MAX_BACKENDS = 64

U8, U16, U32, U64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
Addr = ctypes.c_uint8 * ADDR_LEN
Addr4 = ctypes.c_uint8 * 4


class Counter(enum.IntEnum):
    """Global per-CPU counters. Each packet bumps exactly one outcome (PASS_*, DROP_*, TX,
    REDIRECT); the rest are events counted on the way."""

    PASS_NOT_IPV4 = 0  # ARP, IPv6, QinQ, anything not IPv4
    PASS_MALFORMED = 1  # broken Ethernet/IPv4, or broken TCP/UDP to a VIP address: kernel judges
    PASS_NOT_VIP = 2  # IPv4 that is neither VIP traffic nor a reply of a tracked flow
    PASS_FIB = 3  # NATed, but the FIB has no neighbour / no route: the kernel forwards it
    PASS_FOREIGN_EGRESS = 4  # NATed, egress interface is not one we are attached to
    # Frames the kernel would not route (bpf/guard.h), judged only when they may be ours:
    PASS_VLAN = 5  # 802.1Q-tagged: xdplb serves untagged traffic, the kernel takes the rest
    PASS_GROUP_MAC = 6  # broadcast or multicast destination MAC
    PASS_MARTIAN = 7  # source 0/8, 127/8, multicast or reserved (224/3): the kernel drops it
    PASS_BAD_IP_CSUM = 8  # IPv4 header checksum wrong: the kernel drops it
    PASS_TTL = 9  # TTL <= 1 on a reply we would forward: the kernel sends Time Exceeded
    DROP_FRAGMENT = 10  # IPv4 fragment addressed to a VIP address
    DROP_IP_OPTIONS = 11  # IPv4 header with options addressed to a VIP address
    DROP_NO_BACKEND = 12  # VIP has no backend that takes flows
    # Fragment from a backend address that cannot be rewritten correctly: the address serves
    # several VIP addresses (for its protocol), or a first fragment whose port maps to no or
    # several VIP ports, or whose TCP/UDP header is not all in it. Never sent as it is.
    DROP_REPLY_FRAGMENT = 13
    # fullnat: every source port the new flow tried is taken (or the port table is full)
    DROP_SOURCE_PORTS = 14
    # fullnat/dsr: no usable next hop (no neighbour, no route, too long without DF, egress not
    # attached). The kernel cannot take these over: it knows nothing of the mode, and a
    # packet from the balancer's own address arriving on a port is a martian to it.
    DROP_NEXT_HOP = 15
    DROP_NOT_ON_LINK = 16  # dsr/l2: the backend is behind a gateway, not on a local segment
    PASS_FOREIGN_MAC = 17  # to another host's unicast MAC (flooding switch, promiscuous NIC)
    TX = 18  # sent back out of the ingress interface
    REDIRECT = 19  # sent out of another attached interface
    NEW_FLOW = 20  # flow created from the Maglev table
    FLOW_HIT = 21  # forward packet matched a tracked flow
    REPLY = 22  # reply of a tracked flow, reverse-NATed
    FIB_MISS = 23  # bpf_fib_lookup did not return success
    FIB_LOOKUP = 24  # bpf_fib_lookup calls; other forwards used their flow's cached next hop
    ICMP_ECHO = 25  # echo request to a VIP address, answered by the program (outcome: tx)
    TTL_EXCEEDED = 26  # TTL <= 1 to a VIP: Time Exceeded sent from the VIP (outcome: tx)
    REPLY_FRAGMENT = 27  # fragment of a reply, source rewritten to the VIP without a flow
    FRAG_NEEDED = 28  # DF set, too long for the next hop: "fragmentation needed" sent back
    ICMP_TO_BACKEND = 29  # ICMP error to a VIP about a reply, sent on to the flow's backend
    ICMP_TO_CLIENT = 30  # ICMP error about a client's packet to a backend, translated to the VIP
    FNAT_PORT_TAKEN = 31  # fullnat: a source port tried for a new flow was in use
    IPIP_ENCAP = 32  # dsr/ipip: packet wrapped in an outer IPv4 header to its backend
    FLOW_CONFIRMED = 33  # a new flow's next packet (TCP: not SYN or RST): half_open -> flows
    # dsr: a new flow over flows.new_flow_rate_limit, balanced by the table, not inserted
    NEW_FLOW_UNTRACKED = 34
    MAX = 35


OUTCOMES = tuple(c for c in Counter if c < Counter.NEW_FLOW)


class BackendFlag(enum.IntFlag):
    VALID = 1  # slot in the backends array is in use
    DOWN = 2  # failed health checks: its flows are re-balanced


class Forwarding(enum.IntEnum):
    """How a VIP's packets reach its backends (``forwarding`` and ``encap`` in pool.yaml).
    A flow keeps the mode it started in (Flow.mode)."""

    NAT = 0  # destination rewritten; replies must route back through the balancer
    FULLNAT = 1  # source rewritten too, to the balancer's address and a port per flow
    DSR_L2 = 2  # frame to the backend's MAC, IP packet as sent; replies go direct
    DSR_IPIP = 3  # wrapped in IPv4 to the backend (outer source: the balancer); direct replies


class Scheduler(enum.IntEnum):
    """How a VIP picks the backend of a new flow (``scheduler`` in pool.yaml; VipInfo). The
    ring is a Maglev table for MAGLEV and SOURCE_HASH, the VIP's turn sequence for WRR, RR
    and RANDOM (model/sequence.py), its serving backends for LEAST_CONN."""

    MAGLEV = 0  # slot = flow hash % ring_size
    SOURCE_HASH = 1  # slot = hash of the client address alone % ring_size
    WRR = 2  # slot = the VIP's shared counter (sched_cursor) % ring_size, one turn a flow
    RR = 3  # as WRR over a sequence of equal turns
    RANDOM = 4  # slot = flow hash with seed ^ RANDOM_SALT % ring_size (a weighted sequence)
    LEAST_CONN = 5  # the ring's backend of fewest open connections per weight (IPVS wlc)


class TcpState(enum.IntEnum):
    NONE = 0  # UDP, or TCP seen mid-stream
    SYN_SEEN = 1
    ESTABLISHED = 2
    FIN = 3
    RST = 4


class _Struct(ctypes.Structure):
    """A struct shared with C: ``c_name`` and per-field comments drive the C rendering."""

    c_name = ""
    _pack_ = 1

    def pack(self) -> bytes:
        return bytes(self)

    @classmethod
    def unpack(cls, data: bytes) -> _Struct:
        return cls.from_buffer_copy(data[: ctypes.sizeof(cls)])


class FlowKey(_Struct):
    """Forward flow: client -> VIP. A reply's flow is found by this key too, rebuilt from the
    reply (client from its destination) and the VIP its source serves (``RevNat``). IPv4."""

    c_name = "xl_flow_key"
    _fields_ = [
        ("src", Addr4),
        ("dst", Addr4),
        ("sport", U16),  # network order
        ("dport", U16),  # network order
        ("proto", U8),
        ("family", U8),
        ("pad", U16),
    ]


class NextHop(_Struct):
    """A flow's cached bpf_fib_lookup result for one direction. Valid while ``ns`` is younger
    than Meta.next_hop_ttl_ns, the packet arrived on ``in_ifindex``, goes to ``daddr`` (a
    flow's backend id may have been given to another address since), is no longer than
    ``max_len`` (the longest IPv4 total length the lookup's MTU check has passed) and has the
    TOS the lookup had (routes may depend on it)."""

    c_name = "xl_next_hop"
    _fields_ = [
        ("ns", U64),  # CLOCK_MONOTONIC (coarse) of the lookup; 0: nothing cached
        ("in_ifindex", U32),
        ("out_ifindex", U32),
        ("tx_slot", U32),  # devmap slot to redirect to; NO_TX_SLOT: XDP_TX (out = in)
        ("daddr", U8 * 4),  # the destination looked up (aligned here: compared as a word)
        ("max_len", U16),
        ("dmac", U8 * 6),
        ("smac", U8 * 6),
        ("tos", U8),
        ("pad", U8),
    ]


class Flow(_Struct):
    """A tracked flow. Counters are plain adds, not atomic: RSS keeps a flow's direction on
    one CPU, and a rare lost count is worth less than a locked add on every packet."""

    c_name = "xl_flow"
    _fields_ = [
        ("backend_id", U32),
        ("vip_id", U32),
        ("first_ns", U64),  # CLOCK_MONOTONIC (coarse)
        ("last_ns", U64),
        ("fwd_packets", U64),
        ("fwd_bytes", U64),
        ("rev_packets", U64),
        ("rev_bytes", U64),
        ("tcp_state", U8),
        ("mode", U8),  # Forwarding: the VIP's mode when the flow started
        ("nat_port", U16),  # fullnat: the flow's source port (network order)
        ("nat_addr", Addr4),  # fullnat: the flow's source address
        ("fwd_nh", NextHop),  # client -> backend
        ("rev_nh", NextHop),  # backend -> client
    ]


# What two data paths running the same frames may do differently: read the clock. Besides
# the timestamps, whether a cached next hop has expired depends on when a frame runs, and
# with it the cache's content and the FIB_LOOKUP count (never the frame that leaves: the
# cache only holds what a lookup would return while routes and neighbours stay put).
CLOCK_FIELDS = ("first_ns", "last_ns", "fwd_nh", "rev_nh")
CLOCK_MONOTONIC_COARSE = 6  # what bpf_ktime_get_coarse_ns reads; `time` has no name for it


def coarse_ns() -> int:
    """The clock the data path stamps flows with (bpf_ktime_get_coarse_ns)."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


CLOCK_COUNTERS = frozenset({"fib_lookup"})


class FnatKey(_Struct):
    """fullnat: a reply's 5-tuple as it arrives (backend -> the balancer's address and the
    flow's port), the key of the flow it answers. Written by the data path with the flow; an
    entry whose flow is gone (evicted, or moved to another port) is stale and taken over by
    the next flow that picks its port, and removed by the agent's sweep."""

    c_name = "xl_fnat_key"
    _fields_ = [
        ("lb_addr", Addr4),
        ("be_addr", Addr4),
        ("lb_port", U16),  # network order
        ("be_port", U16),  # network order
        ("proto", U8),
        ("family", U8),
        ("pad", U16),
    ]


class RevKey(_Struct):
    """A backend endpoint (address, port, protocol) whose replies are reverse-NATed, or with
    port REV_ANY_PORT the address itself (fragments carry no port). IPv4 and 8 bytes, like
    flow keys: it is looked up for every reply."""

    c_name = "xl_rev_key"
    _fields_ = [
        ("addr", Addr4),
        ("port", U16),  # network order; REV_ANY_PORT: the address entry
        ("proto", U8),
        ("family", U8),
    ]


class RevTarget(_Struct):
    """A VIP that a backend endpoint serves: what its replies are rewritten back to, and the
    backend id that the VIP's flows name when this endpoint is their backend."""

    c_name = "xl_rev_target"
    _fields_ = [
        ("vip_addr", Addr4),
        ("vip_port", U16),  # network order; 0 in an address entry
        ("pad", U16),
        ("vip_id", U32),
        ("backend_id", U32),
    ]


class RevNat(_Struct):
    """Written by the agent, never by the data path, so it cannot be evicted under its flows.
    An endpoint entry lists the VIPs the endpoint serves (``count`` of them, at most
    REV_TARGETS); a reply is rewritten only when the forward flow of one of them, rebuilt
    from the reply, is tracked. An address entry counts the VIP addresses the address serves
    for the protocol and names the VIP address when there is exactly one: only then are
    fragments from it rewritten (statelessly: most of them carry no ports)."""

    c_name = "xl_rev_nat"
    _fields_ = [
        ("count", U32),
        ("pad", U32),
        ("targets", RevTarget * REV_TARGETS),
    ]


class VipKey(_Struct):
    c_name = "xl_vip_key"
    _fields_ = [
        ("addr", Addr),
        ("port", U16),  # network order
        ("proto", U8),
        ("family", U8),
    ]


class VipInfo(_Struct):
    c_name = "xl_vip_info"
    _fields_ = [
        ("vip_id", U32),  # index of the VIP's ring in ``maglev`` (and of its counters)
        ("ring_size", U32),  # slots of that ring (M: prime for a Maglev table)
        ("mode", U8),  # Forwarding of the VIP's new flows
        ("scheduler", U8),  # Scheduler: how a new flow's slot is chosen
        ("port_min", U16),  # fullnat: first source port (host order)
        ("port_count", U32),  # fullnat: how many source ports from port_min
    ]


class AddrKey(_Struct):
    c_name = "xl_addr_key"
    _fields_ = [("addr", Addr)]


class Backend(_Struct):
    """One (VIP, backend) pair, indexed by backend id. It names its VIP by key, so a flow
    hit is validated without looking the VIP up: the packet's (daddr, dport, proto) must be
    the backend's VIP."""

    c_name = "xl_backend"
    _fields_ = [
        ("addr", Addr),
        ("port", U16),  # network order; rewritten destination port
        ("family", U8),
        ("flags", U8),  # BackendFlag
        ("vip_id", U32),
        ("weight", U32),  # configured weight (0 = drained); for readers, not the data path
        ("vip_addr", Addr),
        ("vip_port", U16),  # network order
        ("vip_proto", U8),
        ("pad", U8),
        # The balancer's own address toward this backend: fullnat's source, dsr/ipip's outer
        # source (so that ICMP errors about the packets it sends come back to it).
        ("src", Addr),
    ]


class IfMac(_Struct):
    """An attached interface's own MAC, at slot ifindex % IF_MACS (the slot names the
    ifindex: an array lookup is inlined, a hash's is not). Frames to another unicast MAC
    are not ours; a slot two interfaces share, or an empty one, checks nothing."""

    c_name = "xl_if_mac"
    _fields_ = [
        ("ifindex", U32),
        ("mac", U8 * 6),
        ("pad", U8 * 2),
    ]


class Stat(_Struct):
    """Per-CPU packet/byte/flow counter of a VIP or a backend. ``opened - closed`` is its
    open flows, counted per connection by the data path: a flow opens when its next packet
    confirms it (into ``flows``) and closes when a TCP flow established goes to FIN or RST,
    or when the data path replaces its entry (a new connection on the 5-tuple, a UDP flow's
    idle timeout, a backend gone). Flows that end unseen (an LRU eviction, a client that
    vanished) are reconciled by the agent's flow sweep."""

    c_name = "xl_stat"
    _fields_ = [
        ("packets", U64),
        ("bytes", U64),
        ("flows", U64),  # flows created (half-open ones too)
        ("opened", U64),
        ("closed", U64),
    ]


class Meta(_Struct):
    """Settings the program reads when it creates a flow, and what readers need to know."""

    c_name = "xl_meta"
    _fields_ = [
        ("seed", U32),
        # dsr new flows a CPU inserts per RATE_WINDOW_NS before it balances the rest without
        # inserting them (flows.new_flow_rate_limit over the CPUs); 0: no limit
        ("new_flows_per_cpu", U32),
        ("layout", U64),  # layout_version() as an int: readers check it
        ("next_hop_ttl_ns", U64),  # how long a flow's cached next hop is used; 0: never
        ("udp_idle_ns", U64),  # a UDP flow idle this long is over (a new flow next); 0: never
    ]


class RateWindow(_Struct):
    """A CPU's count of inserted new flows in its current window (Meta.new_flows_per_cpu)."""

    c_name = "xl_rate_window"
    _fields_ = [
        ("start_ns", U64),
        ("count", U64),
    ]


@dataclass(frozen=True)
class MapSpec:
    """A BPF map: its BCC table type, key and value types, and size (a constant name or int)."""

    name: str
    kind: str  # BCC table type: hash, array, lru_hash, percpu_array, devmap
    key: type[ctypes._SimpleCData] | type[_Struct]
    value: type[ctypes._SimpleCData] | type[_Struct]
    max_entries: str
    # "agent": configuration the agent writes; "datapath": state the program writes (flows,
    # counters). A trace shares the first kind with the live program and keeps the second.
    written_by: str = "agent"

    @property
    def percpu(self) -> bool:
        return self.kind.startswith("percpu")


MAPS: tuple[MapSpec, ...] = (
    MapSpec("vips", "hash", VipKey, VipInfo, "XL_MAX_VIPS"),
    MapSpec("vip_addrs", "hash", AddrKey, U32, "XL_MAX_VIPS"),
    MapSpec("backends", "array", U32, Backend, "XL_MAX_BACKENDS"),
    # Array of maps: slot vip_id holds that VIP's ring, VipInfo.ring_size u16 backend ids
    # packed four to a u64 word (RING_TEMPLATE, abi/ring.py). The agent creates, fills and
    # swaps rings whole, so a VIP's table size can change on reload; readers open a ring by
    # the map id the slot gives.
    MapSpec("maglev", "array_of_maps", U32, U32, "XL_MAX_VIPS"),
    # One common LRU list: per-CPU lists (BPF_F_NO_COMMON_LRU) measured slower for inserts
    # here (bench/perpacket.py: 1395 vs 1135 ns for a new flow) and split the capacity.
    MapSpec("flows", "lru_hash", FlowKey, Flow, "XL_FLOW_MAX", "datapath"),
    # New flows until their next packet confirms them (TCP: the handshake's ACK, or the next
    # ACK of a flow picked up mid-stream; UDP: a second datagram), then moved to `flows`: a
    # flood from random sources (SYN, ACK or UDP) churns this small LRU, never the
    # established flows (half_open_max() of the flow table's size).
    MapSpec("half_open", "lru_hash", FlowKey, Flow, "XL_HALF_OPEN_MAX", "datapath"),
    # Reverse NAT by backend endpoint, written by the agent: a new flow inserts into `flows`
    # only, and a reply's translation lives as long as its flow (no entry of its own to lose).
    MapSpec("rev_nat", "hash", RevKey, RevNat, "XL_MAX_REV_NAT"),
    # fullnat replies by their 5-tuple: a plain hash (never evicted under a live flow, as an
    # LRU would); stale entries are taken over or swept (see FnatKey).
    MapSpec("fnat_ports", "hash", FnatKey, FlowKey, "XL_FLOW_MAX", "datapath"),
    MapSpec("fnat_cursor", "array", U32, U32, "XL_MAX_VIPS", "datapath"),  # next port, per VIP
    # wrr / rr: the VIP's next turn, ONE counter for all CPUs (not per-CPU: the sequence is
    # shared), taken with an atomic fetch-and-add per new flow; the agent restarts it at 0
    # when it writes a new sequence.
    MapSpec("sched_cursor", "array", U32, U64, "XL_MAX_VIPS", "datapath"),
    # least-conn: open connections per backend as the data path sees them open and close
    # (the points of Stat.opened / closed), ONE shared count (atomic adds), minus the ends it
    # cannot see, which the agent's sweep finds (LRU eviction, UDP idle past the timeout):
    # open = conns - conns_unseen.
    MapSpec("conns", "array", U32, U64, "XL_MAX_BACKENDS", "datapath"),
    MapSpec("conns_unseen", "array", U32, U64, "XL_MAX_BACKENDS"),
    # Prefilter: slot addr_slot(addr) has ADDR_MAYBE_VIP / ADDR_MAYBE_BACKEND set when some
    # VIP / backend address hashes there. An array lookup is inlined by the verifier, so
    # traffic that is neither skips both hash lookups. A superset: it never decides alone.
    MapSpec("addr_filter", "array", U32, U8, "XL_ADDR_FILTER_SIZE"),
    MapSpec("tx_ports", "hash", U32, U32, "XL_MAX_TX_PORTS"),
    MapSpec("tx_devs", "devmap", U32, U32, "XL_MAX_TX_PORTS"),
    MapSpec("if_macs", "array", U32, IfMac, "XL_IF_MACS"),
    MapSpec("counters", "percpu_array", U32, U64, "XL_COUNTER_MAX", "datapath"),
    MapSpec("vip_stats", "percpu_array", U32, Stat, "XL_MAX_VIPS", "datapath"),
    MapSpec("backend_stats", "percpu_array", U32, Stat, "XL_MAX_BACKENDS", "datapath"),
    MapSpec("meta", "array", U32, Meta, "1"),
    MapSpec("new_flow_rate", "percpu_array", U32, RateWindow, "1", "datapath"),
)
MAP_BY_NAME = {m.name: m for m in MAPS}
RING_TEMPLATE = "maglev_ring"  # the inner map type of ``maglev`` (never holds a ring)

_C_SCALARS = {U8: "__u8", U16: "__u16", U32: "__u32", U64: "__u64"}
_STRUCTS: tuple[type[_Struct], ...] = (  # in dependency order
    FlowKey, NextHop, Flow, FnatKey, RevKey, RevTarget, RevNat, VipKey, VipInfo, AddrKey,
    Backend, IfMac, Stat, Meta, RateWindow,
)


def _c_field(name: str, ctype: type) -> str:
    if ctype in _C_SCALARS:
        return f"{_C_SCALARS[ctype]} {name};"
    if issubclass(ctype, ctypes.Array):
        return f"{_c_type(ctype._type_)} {name}[{ctype._length_}];"
    if issubclass(ctype, _Struct):
        return f"struct {ctype.c_name} {name};"
    raise TypeError(f"no C rendering for {ctype}")


def _c_type(t: type) -> str:
    # not .get(): the default would be evaluated (and fail) for scalars
    return _C_SCALARS[t] if t in _C_SCALARS else f"struct {t.c_name}"  # noqa: SIM401


def _alignment(t: type) -> int:
    if issubclass(t, ctypes.Array):
        return _alignment(t._type_)
    if issubclass(t, ctypes.Structure):
        return max(_alignment(ft) for _, ft in t._fields_)
    return ctypes.sizeof(t)


def _check_natural(s: type[_Struct]) -> None:
    """Every field at a multiple of its alignment and no tail padding: C lays the struct
    out exactly as ctypes does with _pack_ = 1."""
    for name, t in s._fields_:
        if getattr(s, name).offset % _alignment(t):
            raise TypeError(f"{s.__name__}.{name} is not naturally aligned: add padding")
    if ctypes.sizeof(s) % _alignment(s):
        raise TypeError(f"{s.__name__} needs tail padding to a multiple of {_alignment(s)}")


def render_structs() -> str:
    """C declarations of the shared structs and constants (no maps)."""
    out = ["/* Generated from xdplb/layout.py: do not edit. */"]
    for c in Counter:
        out.append(f"#define XL_C_{c.name} {int(c)}")
    out.append(f"#define XL_COUNTER_MAX {int(Counter.MAX)}")
    for f in BackendFlag:
        out.append(f"#define XL_BACKEND_{f.name} {int(f)}")
    for s in TcpState:
        out.append(f"#define XL_TCP_{s.name} {int(s)}")
    for m in Forwarding:
        out.append(f"#define XL_MODE_{m.name} {int(m)}")
    for sc in Scheduler:
        out.append(f"#define XL_SCHED_{sc.name} {int(sc)}")
    out += [
        f"#define XL_MAX_VIPS {MAX_VIPS}",
        f"#define XL_MAX_BACKENDS {MAX_BACKENDS}",
        f"#define XL_MAX_TX_PORTS {MAX_TX_PORTS}",
        f"#define XL_IF_MACS {IF_MACS}",
        f"#define XL_NO_BACKEND {NO_BACKEND}u",
        f"#define XL_RING_SLOTS_PER_WORD {RING_SLOTS_PER_WORD}",
        f"#define XL_RING_NO_BACKEND {RING_NO_BACKEND}",
        f"#define XL_NO_TX_SLOT {NO_TX_SLOT}u",
        f"#define XL_FAMILY_IPV4 {FAMILY_IPV4}",
        f"#define XL_ADDR_FILTER_BITS {ADDR_FILTER_BITS}",
        f"#define XL_ADDR_FILTER_SIZE {1 << ADDR_FILTER_BITS}",
        f"#define XL_ADDR_MAYBE_VIP {ADDR_MAYBE_VIP}",
        f"#define XL_ADDR_MAYBE_BACKEND {ADDR_MAYBE_BACKEND}",
        f"#define XL_ADDR_MAYBE_LB_SOURCE {ADDR_MAYBE_LB_SOURCE}",
        f"#define XL_FNAT_TRIES {FNAT_TRIES}",
        f"#define XL_IPIP_OVERHEAD {IPIP_OVERHEAD}",
        f"#define XL_OUTER_TTL {OUTER_TTL}",
        f"#define XL_REV_TARGETS {REV_TARGETS}",
        f"#define XL_MAX_REV_NAT {MAX_REV_NAT}",
        f"#define XL_REV_ANY_PORT {REV_ANY_PORT}",
        f"#define XL_RATE_WINDOW_NS {RATE_WINDOW_NS}ull",
        f"#define XL_RANDOM_SALT {RANDOM_SALT}u",
        f"#define XL_LC_MAX_BACKENDS {LC_MAX_BACKENDS}",
    ]
    for s in _STRUCTS:
        _check_natural(s)
        fields = "\n".join("    " + _c_field(n, t) for n, t in s._fields_)
        # Not packed: a packed struct has alignment 1, and clang then splits every wider
        # field access into byte loads and shifts (measured: ~5x the loads). _check_natural
        # proves the C layout equals the ctypes one (_pack_ = 1) without it.
        out.append(f"struct {s.c_name} {{\n{fields}\n}};")
    return "\n".join(out) + "\n"


def render_maps(pin_dir: str | None, pinned: frozenset[str] | None = None,
                maps: tuple[MapSpec, ...] = MAPS) -> str:
    """BCC map declarations (of ``maps``: the data path's unless another program's are
    given). With ``pin_dir`` the maps (all, or those named in ``pinned``) are pinned there,
    and maps already pinned there are reused; the rest are private."""
    out = []
    for m in maps:
        pin = pin_dir and (pinned is None or m.name in pinned)
        kind = f'"{m.kind}:{pin_dir}/{m.name}"' if pin else f'"{m.kind}"'
        if m.kind == "array_of_maps":
            # BCC creates the outer map from a template inner map; BPF_F_INNER_MAP lets the
            # inner maps differ from it in size (each VIP's table size)
            out.append(f'BPF_F_TABLE("array", __u32, __u64, {RING_TEMPLATE}, 1, '
                       f"BPF_F_INNER_MAP);")
            kind = kind.replace(m.kind, f"{m.kind}${RING_TEMPLATE}")
            out.append(f"BPF_TABLE({kind}, __u32, __u32, {m.name}, {m.max_entries});")
            continue
        if m.kind == "devmap":  # BCC gives redirect_map() only to this declaration form
            out.append(f"BPF_XDP_REDIRECT_MAP({kind}, {_c_type(m.value)}, {m.name}, "
                       f"{m.max_entries});")
            continue
        out.append(
            f"BPF_F_TABLE({kind}, {_c_type(m.key)}, {_c_type(m.value)}, {m.name}, "
            f"{m.max_entries}, 0);"
        )
    return "\n".join(out) + "\n"


def layout_version() -> str:
    """Short digest of every shared struct and map: pins are versioned by it, so a program
    never reopens maps of another layout (BCC does not check types of pinned maps)."""
    return hashlib.sha256(render_structs().encode() + render_maps(None).encode()).hexdigest()[:12]


HALF_OPEN_SHARE, HALF_OPEN_MIN = 8, 1024


def half_open_max(flow_max: int) -> int:
    """Entries of the table of unconfirmed flows for a flow table of ``flow_max``: an eighth
    of it, at least 1,024 (an entry lives one round trip; a flood only recycles faster)."""
    return max(HALF_OPEN_MIN, flow_max // HALF_OPEN_SHARE)


def field_spans(s: type[_Struct], names: tuple[str, ...]) -> list[tuple[int, int]]:
    """Byte ranges of fields named like ``"a"`` or ``"a.b"`` (a field of a nested struct)."""
    spans = []
    for name in names:
        t, off = s, 0
        for part in name.split("."):
            f = getattr(t, part)
            off += f.offset
            t = dict(t._fields_)[part]
        spans.append((off, off + f.size))
    return spans


def addr4(packed: bytes) -> Addr4:
    """A packed IPv4 address as a flow key field."""
    return Addr4(*packed)


def addr16(packed: bytes) -> Addr:
    """A 4- or 16-byte packed address as the 16-byte map field."""
    return Addr(*packed.ljust(ADDR_LEN, b"\0"))
