"""bpf_fib_lookup for the scapy data path: the kernel's IPv4 forwarding lookup (net/core/
filter.c, bpf_ipv4_fib_lookup with flags 0 and the MTU check XDP asks for), computed over the
links, rules, routes and neighbours of the calling network namespace as pyroute2 reads them.

Same inputs (destination, source, TOS, protocol, total length, ingress ifindex), same result
codes and the same next hop (egress ifindex, its MAC, the neighbour's MAC) as the helper, so
both data paths send a packet the same way. Rules are walked like fib_rules_lookup, tables
like fib_table_lookup (longest prefix, then TOS, then metric). Not modelled: multipath hashing
(the first live next hop is taken; the kernel hashes with a per-boot random seed), nexthop
objects, VRFs (l3mdev rules), learned PMTU exceptions.

The namespace (that of the thread looking up, as for BPF_PROG_TEST_RUN) is read once and
cached; ``invalidate()`` makes the next lookup read it again (the attached forwarder calls it
on every rtnetlink change).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

# enum bpf_fib_lookup results (include/uapi/linux/bpf.h)
SUCCESS, BLACKHOLE, UNREACHABLE, PROHIBIT, NOT_FWDED, FWD_DISABLED = 0, 1, 2, 3, 4, 5
UNSUPP_LWT, NO_NEIGH, FRAG_NEEDED = 6, 7, 8
RESULT_NAMES = {SUCCESS: "success", BLACKHOLE: "blackhole", UNREACHABLE: "unreachable",
                PROHIBIT: "prohibit", NOT_FWDED: "not_fwded", FWD_DISABLED: "fwd_disabled",
                UNSUPP_LWT: "unsupp_lwt", NO_NEIGH: "no_neigh", FRAG_NEEDED: "frag_needed"}

# Kernel constants the lookup depends on.
RTN_UNICAST, RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW, RTN_NAT = 1, 6, 7, 8, 9, 10
RTN_XRESOLVE = 11
FR_ACT_TO_TBL, FR_ACT_GOTO, FR_ACT_NOP = 1, 2, 3
FR_ACT_BLACKHOLE, FR_ACT_UNREACHABLE, FR_ACT_PROHIBIT = 6, 7, 8
FIB_RULE_INVERT = 0x2
RTNH_F_DEAD = 0x1
NUD_VALID = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08  # PERMANENT|NOARP|REACHABLE|PROBE|STALE|DELAY
IFF_LOOPBACK, IFF_POINTOPOINT = 0x8, 0x10
RTAX_MTU = 2
IP_MAX_MTU = 0xFFF0
RT_TOS_MASK = 0x1C  # the legacy TOS bits routes and rules match on
LOOPBACK_IFINDEX = 1
MAX_CACHED = 65536

# fib_props[type].error, and how bpf_ipv4_fib_lookup maps errors to results
_EAGAIN = -errno.EAGAIN
_TYPE_ERRORS = {RTN_BLACKHOLE: -errno.EINVAL, RTN_UNREACHABLE: -errno.EHOSTUNREACH,
                RTN_PROHIBIT: -errno.EACCES, RTN_THROW: _EAGAIN, RTN_NAT: -errno.EINVAL,
                RTN_XRESOLVE: -errno.EINVAL}
_ERROR_RESULTS = {-errno.EINVAL: BLACKHOLE, -errno.EHOSTUNREACH: UNREACHABLE,
                  -errno.EACCES: PROHIBIT}
_RULE_ERRORS = {FR_ACT_UNREACHABLE: -errno.ENETUNREACH, FR_ACT_PROHIBIT: -errno.EACCES,
                FR_ACT_BLACKHOLE: -errno.EINVAL}


@dataclass(frozen=True)
class FibResult:
    rc: int  # a result code above, or a negative errno (-ENODEV: no such ingress device)
    ifindex: int = 0  # egress device
    smac: bytes = b""
    dmac: bytes = b""
    mtu: int = 0  # FRAG_NEEDED: the path's MTU (the helper's mtu_result), else 0
    # SUCCESS: the next hop's address, which the helper leaves in ipv4_dst (the gateway, or
    # the destination itself when it is on a local segment)
    nexthop: bytes = b""

    @property
    def name(self) -> str:
        return RESULT_NAMES.get(self.rc, f"error {self.rc}")


@dataclass(frozen=True)
class _Link:
    name: str
    mac: bytes
    mtu: int
    flags: int
    forwarding: bool | None  # None: no IPv4 config on the device (in_dev missing)


@dataclass(frozen=True)
class _Nexthop:
    gateway: bytes | None
    oif: int
    flags: int


@dataclass(frozen=True)
class _Route:
    """A fib_alias: one route of a prefix."""

    tos: int
    priority: int
    type: int
    nexthops: tuple[_Nexthop, ...]
    flags: int
    mtu: int  # a locked (or fwd_use_pmtu) route MTU, else 0
    lwt: bool  # encapsulation (lightweight tunnel) on the route


@dataclass
class _Rule:
    priority: int
    action: int
    table: int
    src: int
    srcmask: int
    dst: int
    dstmask: int
    tos: int
    iif: int  # 0: any; -1: a named device that does not exist
    oif: int
    mark_mask: int
    mark: int
    ip_proto: int
    sport: tuple[int, int] | None
    dport: tuple[int, int] | None
    uid: tuple[int, int] | None
    invert: bool
    goto: int
    suppress_prefixlen: int


@dataclass
class _Table:
    by_prefix: dict[tuple[int, int], list[_Route]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)  # prefix lengths present, longest first


def _ip(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


def _mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0


def _mac(text: str | None) -> bytes:
    return bytes.fromhex(text.replace(":", "")) if text else bytes(6)


class _Snapshot:
    """The namespace's links, rules, tables and neighbours at one moment."""

    def __init__(self, ipr: IPRoute) -> None:
        self.links = {l_["index"]: self._link(l_) for l_ in ipr.get_links()}
        names = {lk.name: i for i, lk in self.links.items()}
        self.use_pmtu = _sysctl("net/ipv4/ip_forward_use_pmtu") == 1
        self.rules = [self._rule(r, names) for r in ipr.get_rules(family=socket.AF_INET)]
        self.tables: dict[int, _Table] = {}
        for r in ipr.route("dump", family=socket.AF_INET):
            self._add_route(r)
        for t in self.tables.values():
            t.lengths = sorted({plen for plen, _ in t.by_prefix}, reverse=True)
            for routes in t.by_prefix.values():
                routes.sort(key=lambda a: (-a.tos, a.priority))  # stable: insertion order next
        self.neigh: dict[tuple[int, int], tuple[int, bytes]] = {}
        for n in ipr.get_neighbours(family=socket.AF_INET):
            dst = n.get_attr("NDA_DST")
            if dst:
                self.neigh[(n["ifindex"], _ip(dst))] = (n["state"], _mac(n.get_attr("NDA_LLADDR")))

    @staticmethod
    def _link(msg) -> _Link:
        spec = msg.get_attr("IFLA_AF_SPEC")
        inet = spec.get_attr("AF_INET") if spec is not None else None
        fwd = bool(inet["forwarding"]) if inet else None
        return _Link(msg.get_attr("IFLA_IFNAME"), _mac(msg.get_attr("IFLA_ADDRESS")),
                     msg.get_attr("IFLA_MTU") or 0, msg["flags"], fwd)

    @staticmethod
    def _rule(msg, names: dict[str, int]) -> _Rule:
        def dev(attr: str) -> int:
            name = msg.get_attr(attr)
            return 0 if not name else names.get(name, -1)

        def prefix(attr: str, plen: int) -> tuple[int, int]:
            a = msg.get_attr(attr)
            return (_ip(a), _mask(plen)) if a else (0, 0)

        def port_range(attr: str) -> tuple[int, int] | None:
            r = msg.get_attr(attr)
            return (r["start"], r["end"]) if r else None

        src, srcmask = prefix("FRA_SRC", msg["src_len"])
        dst, dstmask = prefix("FRA_DST", msg["dst_len"])
        mark = msg.get_attr("FRA_FWMARK") or 0
        mask = msg.get_attr("FRA_FWMASK")
        uid = msg.get_attr("FRA_UID_RANGE")
        suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
        return _Rule(
            priority=msg.get_attr("FRA_PRIORITY") or 0, action=msg["action"],
            table=msg.get_attr("FRA_TABLE") or msg["table"], src=src, srcmask=srcmask,
            dst=dst, dstmask=dstmask, tos=msg["tos"],
            # l3mdev (VRF) rules are not modelled: they match nothing here
            iif=-1 if msg.get_attr("FRA_L3MDEV") else dev("FRA_IIFNAME"),
            oif=dev("FRA_OIFNAME"), mark=mark,
            mark_mask=mask if mask is not None else (0xFFFFFFFF if mark else 0),
            ip_proto=msg.get_attr("FRA_IP_PROTO") or 0,
            sport=port_range("FRA_SPORT_RANGE"), dport=port_range("FRA_DPORT_RANGE"),
            uid=(uid["start"], uid["end"]) if uid else None,
            invert=bool(msg["flags"] & FIB_RULE_INVERT), goto=msg.get_attr("FRA_GOTO") or 0,
            suppress_prefixlen=-1 if suppress is None or suppress == 0xFFFFFFFF else suppress,
        )

    def _add_route(self, msg) -> None:
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        plen = msg["dst_len"]
        dst = msg.get_attr("RTA_DST")
        net = _ip(dst) & _mask(plen) if dst else 0
        gw = msg.get_attr("RTA_GATEWAY")
        multipath = msg.get_attr("RTA_MULTIPATH")
        if multipath:
            hops = tuple(_Nexthop(_packed(h.get_attr("RTA_GATEWAY")), h["oif"], h["flags"])
                         for h in multipath)
        elif msg.get_attr("RTA_OIF") is not None:
            hops = (_Nexthop(_packed(gw), msg.get_attr("RTA_OIF"), msg["flags"]),)
        else:
            hops = ()
        metrics = dict((msg.get_attr("RTA_METRICS") or {"attrs": []})["attrs"])
        locked = metrics.get("RTAX_LOCK", 0) & (1 << RTAX_MTU)
        mtu = metrics.get("RTAX_MTU", 0) if (locked or self.use_pmtu) else 0
        route = _Route(msg["tos"], msg.get_attr("RTA_PRIORITY") or 0, msg["type"], hops,
                       msg["flags"], mtu, msg.get_attr("RTA_ENCAP") is not None)
        t = self.tables.setdefault(table, _Table())
        t.by_prefix.setdefault((plen, net), []).append(route)


def _packed(addr: str | None) -> bytes | None:
    return ipaddress.IPv4Address(addr).packed if addr else None


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", name).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class _Flow:
    daddr: int
    saddr: int
    tos: int
    proto: int
    iif: int


class Fib:
    """bpf_fib_lookup over the calling namespace's FIB, cached until ``invalidate()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap: _Snapshot | None = None
        self._cache: dict[tuple[bytes, bytes, int, int, int], tuple[FibResult, int]] = {}

    def close(self) -> None:
        """Drop the cache (no socket is held between reads)."""
        self.invalidate()

    def invalidate(self) -> None:
        """Forget what was read: the next lookup reads links, routes, neighbours again."""
        with self._lock:
            self._snap = None
            self._cache = {}

    def snapshot(self) -> _Snapshot:
        with self._lock:
            if self._snap is None:
                # A socket per read: pyroute2's are per thread, and it opens in the
                # namespace of the thread that reads, which is the one to look up in.
                with IPRoute() as ipr:
                    self._snap = _Snapshot(ipr)
            return self._snap

    def lookup(self, daddr: bytes, saddr: bytes, tos: int, proto: int, tot_len: int,
               ifindex: int) -> FibResult:
        """What bpf_fib_lookup(ctx, {AF_INET, tos, l4_protocol, tot_len, ipv4_src, ipv4_dst,
        ifindex}, sizeof, 0) returns for an XDP program. Addresses as 4 wire bytes."""
        key = (daddr, saddr, tos, proto, ifindex)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._lookup(self.snapshot(), _Flow(int.from_bytes(daddr, "big"),
                               int.from_bytes(saddr, "big"), tos, proto, ifindex))
            if len(self._cache) >= MAX_CACHED:
                self._cache = {}
            self._cache[key] = hit
        res, mtu = hit
        if mtu and tot_len > mtu:  # checked once a route is found, before the neighbour
            return FibResult(FRAG_NEEDED, mtu=mtu)
        return res

    # --- the lookup: (result without the MTU check, MTU of the path or 0) -------------------

    def _lookup(self, s: _Snapshot, fl: _Flow) -> tuple[FibResult, int]:
        dev = s.links.get(fl.iif)
        if dev is None:
            return FibResult(-errno.ENODEV), 0
        if not dev.forwarding:
            return FibResult(FWD_DISABLED), 0
        err, route, hop = self._fib_lookup(s, fl)
        if err:
            return FibResult(_ERROR_RESULTS.get(err, NOT_FWDED)), 0
        if route.type != RTN_UNICAST:
            return FibResult(NOT_FWDED), 0
        out = s.links.get(hop.oif)
        if out is None:
            return FibResult(NOT_FWDED), 0
        mtu = route.mtu or min(out.mtu, IP_MAX_MTU)
        # The MTU check comes here in the kernel; lookup() applies it to the cached result.
        if route.lwt:
            return FibResult(UNSUPP_LWT), mtu
        nh = int.from_bytes(hop.gateway, "big") if hop.gateway else fl.daddr
        if out.flags & (IFF_LOOPBACK | IFF_POINTOPOINT):
            nh = 0
        state, lladdr = s.neigh.get((hop.oif, nh), (0, b""))
        if not state & NUD_VALID:
            return FibResult(NO_NEIGH, hop.oif), mtu
        return FibResult(SUCCESS, hop.oif, out.mac, lladdr,
                         nexthop=hop.gateway or fl.daddr.to_bytes(4, "big")), mtu

    def _fib_lookup(self, s: _Snapshot, fl: _Flow) -> tuple[int, _Route, _Nexthop]:
        """fib_rules_lookup: (0, route, next hop) or (negative errno, ...)."""
        rules = s.rules
        i = 0
        while i < len(rules):
            r = rules[i]
            i += 1
            if not _rule_match(r, fl):
                continue
            if r.action == FR_ACT_GOTO:
                target = next((j for j in range(i, len(rules))
                               if rules[j].priority >= r.goto), None)
                if target is None or rules[target].priority != r.goto:
                    continue
                i = target  # jump: the target rule is matched next, like `goto jumped`
                continue
            if r.action == FR_ACT_NOP:
                continue
            if r.action != FR_ACT_TO_TBL:
                return _RULE_ERRORS.get(r.action, -errno.EINVAL), None, None  # type: ignore
            table = s.tables.get(r.table)
            if table is None:
                continue  # -EAGAIN: no such table
            err, route, hop, plen = _table_lookup(table, fl)
            if err == 0 and plen <= r.suppress_prefixlen:
                continue
            if err != _EAGAIN:
                return err, route, hop  # type: ignore
        return -errno.ENETUNREACH, None, None  # type: ignore


def _rule_match(r: _Rule, fl: _Flow) -> bool:
    ok = (
        (r.iif == 0 or r.iif == fl.iif)
        and r.oif == 0  # the flow has no output interface
        and not (r.mark & r.mark_mask)  # the flow's mark is 0
        and (r.uid is None or r.uid[0] <= 0 <= r.uid[1])  # uid 0: sock_net_uid(net, NULL)
        and not ((fl.saddr ^ r.src) & r.srcmask)
        and not ((fl.daddr ^ r.dst) & r.dstmask)
        and (not r.tos or r.tos == fl.tos & RT_TOS_MASK)
        and (not r.ip_proto or r.ip_proto == fl.proto)
        and (r.sport is None or r.sport[0] <= 0 <= r.sport[1])  # ports are not passed
        and (r.dport is None or r.dport[0] <= 0 <= r.dport[1])
    )
    return ok != r.invert


def _table_lookup(t: _Table, fl: _Flow) -> tuple[int, _Route | None, _Nexthop | None, int]:
    """fib_table_lookup: longest prefix first; among its routes the first whose TOS fits
    and that has a live next hop; error route types end the lookup."""
    tos = fl.tos & RT_TOS_MASK
    for plen in t.lengths:
        for route in t.by_prefix.get((plen, fl.daddr & _mask(plen)), ()):
            if route.tos and route.tos != tos:
                continue
            err = _TYPE_ERRORS.get(route.type, 0)
            if err:
                return err, None, None, plen
            if route.flags & RTNH_F_DEAD:
                continue
            hop = next((h for h in route.nexthops if not h.flags & RTNH_F_DEAD), None)
            if hop is not None:
                return 0, route, hop, plen
    return _EAGAIN, None, None, 0
