"""The data path in Python: bpf/xdplb.c and its headers rule for rule, on ``UserMaps``
(parse.py, guard.py, icmp.py and reply.py mirror bpf/parse.h, guard.h, icmp.h and reply.h).

Same rules in the same order, the same counters, the same checksum arithmetic (``csum.py``),
the same TCP state tracking, flow hash and Maglev slot, and next hops from ``fib.py``. It
runs on a frame's bytes and returns the XDP action and the frame as the program would leave
it; what to do with it (send it, replay it, compare it) is the caller's business. Tests hold
it to byte-for-byte parity with the BPF program (tests/test_parity.py), so a change to one
must be made to the other.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from xdplb.abi.layout import (
    ADDR_FILTER_BITS,
    ADDR_MAYBE_BACKEND,
    ADDR_MAYBE_LB_SOURCE,
    ADDR_MAYBE_VIP,
    FAMILY_IPV4,
    FNAT_TRIES,
    IF_MACS,
    IPIP_OVERHEAD,
    LC_MAX_BACKENDS,
    NO_BACKEND,
    NO_TX_SLOT,
    OUTER_TTL,
    RANDOM_SALT,
    RATE_WINDOW_NS,
    Backend,
    BackendFlag,
    Counter,
    Flow,
    FlowKey,
    Forwarding,
    NextHop,
    RevTarget,
    Scheduler,
    Stat,
    TcpState,
    VipInfo,
    coarse_ns,
)
from xdplb.model.hashing import addr_slot, flow_hash, source_hash
from xdplb.userspace import csum
from xdplb.userspace.fib import FRAG_NEEDED, LOOPBACK_IFINDEX, SUCCESS, Fib
from xdplb.userspace.fullnat import fnat_key, htons, same_holder
from xdplb.userspace.guard import guard
from xdplb.userspace.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_FRAG_NEEDED,
    IcmpError,
    echo_reply,
    frag_needed,
    is_echo_request,
    may_bounce,
    time_exceeded,
)
from xdplb.userspace.icmperr import icmp_quote, quote_rewrite
from xdplb.userspace.parse import (
    ADDR_PAD,
    ETH_LEN,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MALFORMED,
    NOT_IPV4,
    OK,
    Pkt,
    flow_key,
    parse_l3,
    parse_l4,
)
from xdplb.userspace.reply import (
    address_key,
    first_fragment_l4,
    ip_csum_ok_opts,
    is_first_fragment,
    reply_flow,
    rev_key,
)
from xdplb.userspace.usermaps import UserMaps, key_bytes

# enum xdp_action
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4
ACTIONS = {XDP_ABORTED: "aborted", XDP_DROP: "drop", XDP_PASS: "pass", XDP_TX: "tx",
           XDP_REDIRECT: "redirect"}

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
_VALID, _DOWN = int(BackendFlag.VALID), int(BackendFlag.DOWN)
_ZERO = key_bytes(0)
_COUNTER_KEYS = [key_bytes(c) for c in range(int(Counter.MAX))]
_FAMILY = bytes((FAMILY_IPV4,))
_NAT, _FULLNAT = Forwarding.NAT, Forwarding.FULLNAT
_DSR_L2, _DSR_IPIP = Forwarding.DSR_L2, Forwarding.DSR_IPIP
_IPPROTO_IPIP = 4
_U64 = (1 << 64) - 1


class Outcome(NamedTuple):
    action: int  # XDP_*
    data: bytes  # the frame as the program leaves it
    egress: int  # ifindex it leaves by (TX: the ingress one; REDIRECT: the target), else 0


def _serves(be: Backend | None, daddr: bytes, dport: bytes, proto: int) -> bool:
    """xl_backend_serves: in use, not failed, and (daddr, dport, proto) is its VIP."""
    return be is not None and bool(be.flags & _VALID) and not be.flags & _DOWN \
        and bytes(be.vip_addr)[:4] == daddr and be.vip_port == int.from_bytes(dport, "little") \
        and be.vip_proto == proto


def _stat_add(s: Stat | None, length: int, flows: int) -> None:
    if s is not None:
        s.packets += 1
        s.bytes += length
        s.flows += flows


def _tcp_track(f: Flow, buf: bytearray, tcp: int, reply: bool) -> bool:
    """xl_tcp_track: coarse TCP state, enough to tell half-open, established and closing.
    True when it closes an established flow (counted by the caller: xl_flow_count)."""
    if tcp < 0:
        return False
    flags = buf[tcp + 13]
    st = f.tcp_state
    if flags & TCP_RST:
        st = TcpState.RST
    elif flags & TCP_FIN:
        st = TcpState.FIN
    elif flags & TCP_SYN and not flags & TCP_ACK and not reply and st != TcpState.ESTABLISHED:
        st = TcpState.SYN_SEEN
    elif flags & TCP_ACK and not flags & TCP_SYN and st == TcpState.SYN_SEEN and not reply:
        st = TcpState.ESTABLISHED
    closes = False
    if st != f.tcp_state:
        closes = f.tcp_state == TcpState.ESTABLISHED and not _open_state(st)
        f.tcp_state = st
    return closes


def _open_state(st: int) -> bool:
    """xl_flow_open_state: is a confirmed flow in TCP state ``st`` still open?"""
    return st not in (TcpState.FIN, TcpState.RST)


def _rewrite(buf: bytearray, p: Pkt, addr: int, new_addr: bytes, port: int, new_port: int
             ) -> None:
    """xl_rewrite: the address at ``addr`` (and the port at ``port`` unless new_port is 0),
    with the IPv4 and L4 checksums; the L4 one covers the address via the pseudo-header."""
    old = int.from_bytes(buf[addr : addr + 4], "little")
    new = int.from_bytes(new_addr, "little")
    l4_old = csum.load16(buf, p.l4_check)
    l4 = csum.replace4(l4_old, old, new)
    csum.set_addr(buf, p.ip, addr, new_addr)
    old_port = csum.load16(buf, port)
    if new_port and new_port != old_port:
        l4 = csum.replace2(l4, old_port, new_port)
        csum.store16(buf, port, new_port)
    if p.proto == IPPROTO_UDP:
        l4 = csum.udp_fixup(l4_old, l4)
    csum.store16(buf, p.l4_check, l4)


def decrement_ttl(buf: bytearray, ip: int) -> None:
    # TTL shares a 16-bit checksum word with the protocol byte.
    csum.set_byte(buf, ip + 8, buf[ip + 8] - 1, ip + 10)


_IN_FLOWS, _IN_HALF_OPEN = 1, 2  # where the entry a new flow replaces was found


class _Tracked:
    """xl_flow_find: a flow in flows, or, not confirmed yet, in half_open."""

    def __init__(self, flows: Any, half_open: Any) -> None:
        self.flows, self.half_open = flows, half_open

    def ref(self, fk: bytes) -> Flow | None:
        f = self.flows.ref(fk)
        if f is None:
            f = self.half_open.ref(fk)
        return f


def _confirms(buf: bytearray, p: Pkt) -> bool:
    """xl_confirms: does a new flow's next packet confirm it? TCP: ACK without SYN or RST
    (the handshake's, or the next of a flow picked up mid-stream); UDP: any."""
    if p.tcp < 0:
        return True
    flags = buf[p.tcp + 13]
    return bool(flags & TCP_ACK) and not flags & (TCP_SYN | TCP_RST)


class PyDatapath:
    """xdplb_main() over UserMaps."""

    def __init__(self, maps: UserMaps, fib: Fib, clock=coarse_ns) -> None:
        t = maps.tables
        self.vips, self.vip_addrs, self.backends = t["vips"], t["vip_addrs"], t["backends"]
        self.maglev, self.flows, self.rev_nat = t["maglev"], t["flows"], t["rev_nat"]
        self.fnat_ports, self.fnat_cursor = t["fnat_ports"], t["fnat_cursor"]
        self.half_open, self.if_macs = t["half_open"], t["if_macs"]
        self.new_flow_rate, self.sched_cursor = t["new_flow_rate"], t["sched_cursor"]
        self.conns, self.conns_unseen = t["conns"], t["conns_unseen"]
        self.tracked = _Tracked(self.flows, self.half_open)
        self.tx_ports, self.tx_devs, self.meta = t["tx_ports"], t["tx_devs"], t["meta"]
        self.counters, self.vip_stats = t["counters"], t["vip_stats"]
        self.backend_stats, self.addr_filter = t["backend_stats"], t["addr_filter"]
        self.fib = fib
        self.clock = clock

    def run(self, frame: bytes, ingress_ifindex: int = 0) -> Outcome:
        """One frame, as the program sees it arriving on ``ingress_ifindex`` (0: loopback,
        as BPF_PROG_TEST_RUN without a context)."""
        buf = bytearray(frame)
        action, egress = self._main(buf, ingress_ifindex or LOOPBACK_IFINDEX)
        return Outcome(action, bytes(buf), egress)

    def _count(self, c: Counter) -> None:
        self.counters.ref(_COUNTER_KEYS[c]).value += 1

    def _pass(self, c: Counter) -> tuple[int, int]:
        """xl_pass: to the kernel untouched, counted as ``c`` (its outcome)."""
        self._count(c)
        return XDP_PASS, 0

    @staticmethod
    def _ttl_expired(buf: bytearray, p: Pkt) -> bool:
        """xl_ttl_expired: TTL 1 or less; the sender gets Time Exceeded (to a VIP: from the
        program; a reply: from the kernel, which gets it untouched)."""
        return buf[p.ip + 8] <= 1

    def _time_exceeded(self, buf: bytearray, p: Pkt, ingress: int) -> tuple[int, int]:
        """xl_icmp_time_exceeded, sent back from the VIP."""
        return self._icmp_error(buf, p, ingress, time_exceeded)

    def _icmp_error(self, buf: bytearray, p: Pkt, ingress: int, error: IcmpError, *args: int
                    ) -> tuple[int, int]:
        """xl_icmp_error: the frame becomes ``error`` (icmp.py) quoting it, sent back."""
        self._count(error(buf, p, *args))
        self._count(Counter.TX)
        return XDP_TX, ingress

    def _maybe(self, addr: bytes) -> int:
        """The prefilter bits of an address (a superset: they never decide alone)."""
        return self.addr_filter.get(key_bytes(addr_slot(addr, ADDR_FILTER_BITS))).value

    def _own_mac(self, ingress: int) -> bytes | None:
        """xl_foreign_mac's entry: the ingress interface's MAC, None if if_macs has none."""
        own = self.if_macs.ref(key_bytes(ingress % IF_MACS))
        return bytes(own.mac) if own is not None and own.ifindex == ingress else None

    def _vip_addr(self, daddr: bytes) -> bool:
        """Is ``daddr`` a VIP address (any port, any protocol)?"""
        return self.vip_addrs.ref(daddr + ADDR_PAD) is not None

    def _main(self, buf: bytearray, ingress: int) -> tuple[int, int]:
        rc, p = parse_l3(buf)
        if rc == NOT_IPV4:
            return self._pass(Counter.PASS_NOT_IPV4)
        if rc == MALFORMED:
            return self._pass(Counter.PASS_MALFORMED)
        ip = p.ip
        saddr, daddr = bytes(buf[ip + 12 : ip + 16]), bytes(buf[ip + 16 : ip + 20])
        # Most traffic is neither to a VIP address nor from a backend: passed without a look
        # at its L4 header.
        maybe_vip = bool(self._maybe(daddr) & ADDR_MAYBE_VIP)
        # The source's bit waits for VIP candidates: an established flow never needs it.
        maybe_backend = not maybe_vip and bool(self._maybe(saddr) & ADDR_MAYBE_BACKEND)
        # ICMP may be an error about a flow from anywhere (a router): rare, so looked at.
        if not maybe_vip and not maybe_backend and p.proto != IPPROTO_ICMP:
            return self._pass(Counter.PASS_NOT_VIP)
        rule = guard(buf, p, self._own_mac(ingress))
        if rule is not None:
            return self._pass(rule)
        if parse_l4(buf, p) != OK:
            # Malformed only if it was ours to judge: a prefilter collision must not decide.
            ours = maybe_vip and self._vip_addr(daddr)
            return self._pass(Counter.PASS_MALFORMED if ours else Counter.PASS_NOT_VIP)
        if maybe_vip:
            if p.sport >= 0 and not p.frag and not p.options:
                sport, dport = bytes(buf[p.sport : p.sport + 2]), bytes(buf[p.dport : p.dport + 2])
                fk = flow_key(saddr, daddr, sport, dport, p.proto)
                # Flow first: its backend naming this packet's VIP proves the VIP.
                f = self.flows.ref(fk)
                old = _IN_FLOWS if f is not None else 0
                if f is None:
                    f = self.half_open.ref(fk)
                    old = _IN_HALF_OPEN if f is not None else 0
                if f is not None:
                    be = self.backends.ref(key_bytes(f.backend_id))
                    now = self.clock()
                    if _serves(be, daddr, dport, p.proto) and not self._reopens(f, buf, p, now):
                        return self._established(buf, p, f, be, ingress, now, fk, old)
                vip = self.vips.ref(daddr + ADDR_PAD + dport + bytes((p.proto,)) + _FAMILY)
                if vip is not None:
                    return self._new_flow(buf, p, fk, vip, ingress, f, old)
            if self._vip_addr(daddr):
                # Rules for VIP addresses: fragments and IP options are never balanced.
                if p.frag:
                    self._count(Counter.DROP_FRAGMENT)
                    return XDP_DROP, 0
                if p.options:
                    self._count(Counter.DROP_IP_OPTIONS)
                    return XDP_DROP, 0
                if is_echo_request(buf, p):
                    echo_reply(buf, p)
                    self._count(Counter.ICMP_ECHO)
                    self._count(Counter.TX)
                    return XDP_TX, ingress
                q = icmp_quote(buf, p)
                if q >= 0:
                    return self._icmp_to_backend(buf, p, q, ingress)
                return self._pass(Counter.PASS_NOT_VIP)
        mtu = self._icmp_tunnel_mtu(buf, p) \
            if p.icmp >= 0 and self._maybe(daddr) & ADDR_MAYBE_LB_SOURCE else 0
        if mtu:
            return self._icmp_tunnel_send(buf, p, mtu, ingress)
        q = icmp_quote(buf, p)
        if q >= 0:
            return self._icmp_to_client(buf, p, q, ingress)
        if maybe_backend or self._maybe(saddr) & ADDR_MAYBE_BACKEND:
            return self._from_backend(buf, p, ingress)
        return self._pass(Counter.PASS_NOT_VIP)

    def _icmp_to_backend(self, buf: bytearray, p: Pkt, q: int, ingress: int
                         ) -> tuple[int, int]:
        """xl_icmp_to_backend: an ICMP error to a VIP address about a packet the VIP sent,
        to the backend of that packet's flow."""
        ip, qp = p.ip, q + 20  # the quoted ports (TCP's sit where UDP's do)
        be = None
        if buf[q + 12 : q + 16] == buf[ip + 16 : ip + 20]:
            fk = flow_key(bytes(buf[q + 16 : q + 20]), bytes(buf[q + 12 : q + 16]),
                          bytes(buf[qp + 2 : qp + 4]), bytes(buf[qp : qp + 2]), buf[q + 9])
            f = self.tracked.ref(fk)
            be = self.backends.ref(key_bytes(f.backend_id)) if f is not None else None
        # nat flows only: a fullnat or dsr backend's packets did not leave as the quote shows
        if be is None or f.mode != _NAT or not be.flags & _VALID \
                or bytes(be.vip_addr)[:4] != buf[q + 12 : q + 16] \
                or be.vip_port != csum.load16(buf, qp) or be.vip_proto != buf[q + 9]:
            return self._pass(Counter.PASS_NOT_VIP)
        if self._ttl_expired(buf, p):
            return self._pass(Counter.PASS_TTL)
        to = bytes(be.addr)[:4]
        h, _ = self._route(buf, p, ingress, None, self.clock(), bytes(buf[ip + 12 : ip + 16]), to)
        csum.set_addr(buf, ip, ip + 16, to)
        quote_rewrite(buf, p.icmp, q, q + 12, to, qp, be.port)
        self._count(Counter.ICMP_TO_BACKEND)
        return self._send(buf, p, ingress, h)

    def _icmp_fnat_to_client(self, buf: bytearray, p: Pkt, q: int, fk: bytes, ingress: int
                             ) -> tuple[int, int]:
        """xl_icmp_fnat_to_client: an error about a fullnat packet as it left, to the client,
        quoting the client's packet as the client sent it."""
        ip, qp = p.ip, q + 20
        if self._ttl_expired(buf, p):
            return self._pass(Counter.PASS_TTL)
        vip, client = fk[4:8], fk[0:4]
        from_backend = buf[ip + 12 : ip + 16] == buf[q + 16 : q + 20]
        h, _ = self._route(buf, p, ingress, None, self.clock(),
                           vip if from_backend else bytes(buf[ip + 12 : ip + 16]), client)
        if from_backend:
            csum.set_addr(buf, ip, ip + 12, vip)
        csum.set_addr(buf, ip, ip + 16, client)
        quote_rewrite(buf, p.icmp, q, q + 12, client, qp, int.from_bytes(fk[8:10], "little"))
        quote_rewrite(buf, p.icmp, q, q + 16, vip, qp + 2, int.from_bytes(fk[10:12], "little"))
        self._count(Counter.ICMP_TO_CLIENT)
        return self._send(buf, p, ingress, h)

    def _icmp_tunnel_mtu(self, buf: bytearray, p: Pkt) -> int:
        """xl_icmp_tunnel_mtu: "fragmentation needed" about a dsr/ipip outer packet of ours;
        the MTU for its client (less the outer header), or 0."""
        ic, ip = p.icmp, p.ip
        if buf[ic] != ICMP_DEST_UNREACH or buf[ic + 1] != ICMP_FRAG_NEEDED:
            return 0
        o, i = ic + 8, ic + 28  # the quoted outer header, the quoted client packet
        if i + 28 > min(len(buf), ip + ((buf[ip + 2] << 8) | buf[ip + 3])):
            return 0
        if buf[o] != 0x45 or buf[o + 9] != _IPPROTO_IPIP or buf[o + 12 : o + 16] != \
                buf[ip + 16 : ip + 20] or buf[i] != 0x45 or \
                ((buf[i + 6] << 8) | buf[i + 7]) & 0x1FFF or \
                buf[i + 9] not in (IPPROTO_TCP, IPPROTO_UDP):
            return 0
        mtu = (buf[ic + 6] << 8) | buf[ic + 7]
        if mtu < IPIP_OVERHEAD + 68:
            return 0
        fk = flow_key(bytes(buf[i + 12 : i + 16]), bytes(buf[i + 16 : i + 20]),
                      bytes(buf[i + 20 : i + 22]), bytes(buf[i + 22 : i + 24]), buf[i + 9])
        f = self.tracked.ref(fk)
        be = self.backends.ref(key_bytes(f.backend_id)) \
            if f is not None and f.mode == _DSR_IPIP else None
        if be is None or bytes(be.addr)[:4] != buf[o + 16 : o + 20]:
            return 0
        return mtu - IPIP_OVERHEAD

    def _icmp_tunnel_send(self, buf: bytearray, p: Pkt, mtu: int, ingress: int
                          ) -> tuple[int, int]:
        """xl_icmp_tunnel_send: the quoted client packet becomes the frame's packet, then
        the "fragmentation needed" that quotes it, routed to the client from the VIP."""
        ours, theirs = bytes(buf[0:6]), bytes(buf[6:12])
        del buf[p.ip : p.icmp + 28]
        buf[0:6], buf[6:12], buf[12:14] = theirs, ours, b"\x08\x00"  # the builder swaps them
        e = Pkt(ETH_LEN, IPPROTO_ICMP, False, False)
        frag_needed(buf, e, mtu)
        e = Pkt(ETH_LEN, IPPROTO_ICMP, False, False, icmp=ETH_LEN + 20)
        h, _ = self._route(buf, e, ingress, None, self.clock(), bytes(buf[26:30]),
                           bytes(buf[30:34]))
        self._count(Counter.ICMP_TO_CLIENT)
        if h is None:
            return XDP_PASS, 0
        return self._out(buf, ingress, h)

    def _icmp_to_client(self, buf: bytearray, p: Pkt, q: int, ingress: int
                        ) -> tuple[int, int]:
        """xl_icmp_to_client: an ICMP error toward a client about a packet it sent to a
        backend of a tracked flow, translated back to the VIP (fullnat's: to our own
        address, see _icmp_fnat_to_client)."""
        ip, qp = p.ip, q + 20
        if buf[q + 12 : q + 16] == buf[ip + 16 : ip + 20] \
                and self._maybe(bytes(buf[q + 12 : q + 16])) & ADDR_MAYBE_LB_SOURCE:
            f, fk = self._fnat_find(bytes(buf[q + 12 : q + 16]), csum.load16(buf, qp),
                                    bytes(buf[q + 16 : q + 20]), csum.load16(buf, qp + 2),
                                    buf[q + 9])
            if f is not None:
                return self._icmp_fnat_to_client(buf, p, q, fk, ingress)
        f = t = None
        if buf[q + 12 : q + 16] == buf[ip + 16 : ip + 20]:
            rn = self.rev_nat.ref(rev_key(bytes(buf[q + 16 : q + 20]),
                                          bytes(buf[qp + 2 : qp + 4]), buf[q + 9]))
            if rn is not None:
                f, t = reply_flow(self.tracked, rn, bytes(buf[q + 12 : q + 16]),
                                  bytes(buf[qp : qp + 2]), buf[q + 9])
        if f is None or t is None:
            return self._pass(Counter.PASS_NOT_VIP)
        if self._ttl_expired(buf, p):
            return self._pass(Counter.PASS_TTL)
        vip = bytes(t.vip_addr)
        from_backend = buf[ip + 12 : ip + 16] == buf[q + 16 : q + 20]
        h, _ = self._route(buf, p, ingress, None, self.clock(),
                           vip if from_backend else bytes(buf[ip + 12 : ip + 16]),
                           bytes(buf[ip + 16 : ip + 20]))
        if from_backend:
            csum.set_addr(buf, ip, ip + 12, vip)
        quote_rewrite(buf, p.icmp, q, q + 16, vip, qp + 2, t.vip_port)
        self._count(Counter.ICMP_TO_CLIENT)
        return self._send(buf, p, ingress, h)

    def _reopens(self, f: Flow, buf: bytearray, p: Pkt, now: int) -> bool:
        """xl_reopens: is the entry's connection over, the packet a new flow? TCP: a pure SYN
        (a reused 5-tuple), except on a half-open flow (a retransmission). UDP: the flow has
        been idle for meta.udp_idle_ns (0: never)."""
        if p.tcp >= 0:
            return buf[p.tcp + 13] & (TCP_SYN | TCP_ACK) == TCP_SYN \
                and f.tcp_state != TcpState.SYN_SEEN
        idle = self.meta.ref(_ZERO).udp_idle_ns
        return bool(idle) and now - f.last_ns >= idle

    def _established(self, buf: bytearray, p: Pkt, f: Flow, be: Backend, ingress: int,
                     now: int, fk: bytes, where: int) -> tuple[int, int]:
        """Client -> VIP of a tracked flow whose backend still serves it; a new one (in
        half_open: ``where``) this packet confirms moves to flows, if it goes on."""
        if self._ttl_expired(buf, p):
            return self._time_exceeded(buf, p, ingress)
        if where == _IN_HALF_OPEN and _confirms(buf, p):
            f = self._promote(fk, f, p.tcp >= 0)
        self._count(Counter.FLOW_HIT)
        return self._to_backend(buf, p, f, be, f.backend_id, f.vip_id, now, 0, ingress)

    def _new_flow(self, buf: bytearray, p: Pkt, fk: bytes, vip: VipInfo, ingress: int,
                  of: Flow | None, old: int) -> tuple[int, int]:
        """Client -> VIP without a flow that can take it: the Maglev ring picks (replacing
        entry ``of``, found ``old``)."""
        if self._ttl_expired(buf, p):
            return self._time_exceeded(buf, p, ingress)
        saddr, daddr, sport, dport = fk[:4], fk[4:8], fk[8:10], fk[10:12]
        seed = self.meta.ref(_ZERO).seed
        h = flow_hash(saddr, daddr, int.from_bytes(sport, "big"), int.from_bytes(dport, "big"),
                      p.proto, seed)
        # The VIP's own ring; a slot outside it (ring_size naming a ring being swapped in)
        # finds no owner, as the inner map lookup fails in the BPF program
        ring = self.maglev.ring(vip.vip_id)
        slot = self._sched_slot(vip, fk, h, seed)
        owner = int(ring[slot]) if ring is not None and vip.ring_size and slot < len(ring) \
            else None
        if owner is None or owner == NO_BACKEND:
            self._count(Counter.DROP_NO_BACKEND)
            return XDP_DROP, 0
        bid = owner
        be = self.backends.ref(key_bytes(bid))
        if not _serves(be, daddr, dport, p.proto):
            self._count(Counter.DROP_NO_BACKEND)
            return XDP_DROP, 0
        if vip.mode in (_FULLNAT, _DSR_IPIP) and not any(bytes(be.src)[:4]):
            self._count(Counter.DROP_NEXT_HOP)  # no route, so no address of ours, toward it
            return XDP_DROP, 0
        now = self.clock()
        # Sent on its way (counters, next hop filled in), then inserted: one LRU insert.
        nf = Flow()
        nf.backend_id, nf.vip_id, nf.first_ns = bid, vip.vip_id, now
        nf.mode = vip.mode
        if nf.mode == _FULLNAT:
            src = bytes(be.src)[:4]
            nf.nat_port = self._fnat_port(vip, be, fk, h, src)
            if not nf.nat_port:
                return XDP_DROP, 0
            nf.nat_addr[:] = src
        self._count(Counter.NEW_FLOW)
        verdict = self._to_backend(buf, p, nf, be, bid, vip.vip_id, now, 1, ingress)
        # Into half_open until its next packet confirms it; an entry it replaces in flows goes.
        # Only dsr flows (whose replies need no entry) may go untracked, over the rate.
        if nf.mode not in (_NAT, _FULLNAT) and not self._insert_allowed(now):
            return verdict
        self.half_open.put(fk, nf)
        if old == _IN_FLOWS and of is not None:
            if _open_state(of.tcp_state):
                self._flow_count(of, closed=True)  # replaced while open: its connection is over
            self.flows.remove(fk)
        return verdict

    def _sched_slot(self, vip: VipInfo, fk: bytes, h: int, seed: int) -> int:
        """xl_sched_slot (bpf/sched.h): the ring slot the VIP's scheduler gives a new flow."""
        size = vip.ring_size
        if not size:
            return 0
        sched = vip.scheduler
        if sched == Scheduler.LEAST_CONN:
            return self._least_conn(vip.vip_id, size)
        if sched == Scheduler.SOURCE_HASH:
            return source_hash(fk[:4], seed) % size
        if sched in (Scheduler.WRR, Scheduler.RR):
            turn = self.sched_cursor.ref(key_bytes(vip.vip_id))
            if turn is None:
                return 0
            n = turn.value
            turn.value = (n + 1) & _U64  # __sync_fetch_and_add on a u64
            return n % size
        if sched == Scheduler.RANDOM:
            return flow_hash(fk[:4], fk[4:8], int.from_bytes(fk[8:10], "big"),
                             int.from_bytes(fk[10:12], "big"), fk[12], seed ^ RANDOM_SALT) % size
        return h % size

    def _least_conn(self, vip_id: int, size: int) -> int:
        """xl_least_conn: the slot of the ring's backend with the fewest open connections
        per weight (conns - conns_unseen), the first of equals, over at most
        LC_MAX_BACKENDS slots."""
        ring = self.maglev.ring(vip_id)
        if ring is None:
            return 0
        best, best_conns, best_weight = 0, 0, 0
        for i in range(min(size, LC_MAX_BACKENDS)):
            if i >= len(ring):  # the inner map lookup fails past the ring's words
                break
            bid = int(ring[i]) & 0xFFFF
            be = self.backends.ref(key_bytes(bid))
            c, u = self.conns.ref(key_bytes(bid)), self.conns_unseen.ref(key_bytes(bid))
            if be is None or c is None or u is None or not be.weight:
                continue
            open_ = (c.value - u.value) & _U64
            n = open_ if open_ < 1 << 63 else 0  # signed: below zero counts as none
            if not best_weight or n * best_weight < best_conns * be.weight:
                best, best_conns, best_weight = i, n, be.weight
        return best

    def _flow_seen(self, f: Flow | None, buf: bytearray, p: Pkt, now: int, reply: bool
                   ) -> NextHop | None:
        """xl_flow_seen: one packet of a tracked flow (None: none), one direction: last seen,
        counters, TCP state. Returns that direction's next-hop cache."""
        if f is None:
            return None
        f.last_ns = now
        if reply:
            f.rev_packets += 1
            f.rev_bytes += len(buf)
        else:
            f.fwd_packets += 1
            f.fwd_bytes += len(buf)
        if _tcp_track(f, buf, p.tcp, reply):
            self._flow_count(f, closed=True)
        return f.rev_nh if reply else f.fwd_nh

    def _flow_count(self, f: Flow, closed: bool) -> None:
        """xl_flow_count: one more opened (or closed) flow on its VIP and backend."""
        for table, i in ((self.vip_stats, f.vip_id), (self.backend_stats, f.backend_id)):
            s = table.ref(key_bytes(i))
            if s is not None:
                if closed:
                    s.closed += 1
                else:
                    s.opened += 1
        c = self.conns.ref(key_bytes(f.backend_id))  # least-conn's shared count
        if c is not None:
            c.value = (c.value + (-1 if closed else 1)) & _U64

    def _insert_allowed(self, now: int) -> bool:
        """xl_insert_allowed: under meta.new_flows_per_cpu new flows in this window."""
        limit = self.meta.ref(_ZERO).new_flows_per_cpu
        if not limit:
            return True
        w = self.new_flow_rate.ref(_ZERO)
        if (now - w.start_ns) % (1 << 64) >= RATE_WINDOW_NS:  # unsigned, as in C
            w.start_ns, w.count = now, 0
        if w.count >= limit:
            self._count(Counter.NEW_FLOW_UNTRACKED)
            return False
        w.count += 1
        return True

    def _promote(self, fk: bytes, f: Flow, tcp: bool) -> Flow:
        """xl_promote: unconfirmed flow ``f`` moved into flows (a TCP one is established)."""
        copy = Flow.from_buffer_copy(bytes(f))
        if tcp:
            copy.tcp_state = TcpState.ESTABLISHED
        self.flows.put(fk, copy)
        self.half_open.remove(fk)
        self._count(Counter.FLOW_CONFIRMED)
        self._flow_count(copy, closed=False)
        return self.flows.ref(fk)

    def _to_backend(self, buf: bytearray, p: Pkt, f: Flow, be: Backend, bid: int,
                    vip_id: int, now: int, created: int, ingress: int) -> tuple[int, int]:
        """xl_to_backend: flow accounting, next hop, and the flow's mode: nat rewrites the
        destination, fullnat the source too, dsr/l2 only the MACs, dsr/ipip wraps the
        packet. ``f`` is the tracked entry, or a new one not inserted yet."""
        mode = f.mode
        nh = self._flow_seen(f, buf, p, now, False)
        _stat_add(self.vip_stats.ref(key_bytes(vip_id)), len(buf), created)
        _stat_add(self.backend_stats.ref(key_bytes(bid)), len(buf), created)
        ip = p.ip
        to = bytes(be.addr)[:4]
        frm = bytes(f.nat_addr) if mode == _FULLNAT else bytes(be.src)[:4] \
            if mode == _DSR_IPIP else bytes(buf[ip + 12 : ip + 16])
        overhead = IPIP_OVERHEAD if mode == _DSR_IPIP else 0
        h, too_big = self._route(buf, p, ingress, nh, now, frm, to, overhead, mode)
        if too_big:
            return self._icmp_error(buf, p, ingress, frag_needed, too_big)
        if mode == _NAT:
            _rewrite(buf, p, ip + 16, to, p.dport, be.port)
            return self._send(buf, p, ingress, h)
        if h is None:
            return XDP_DROP, 0  # counted by _resolve
        if mode == _DSR_IPIP:
            return self._send_ipip(buf, p, ingress, h, frm, to)
        if mode == _FULLNAT:
            _rewrite(buf, p, ip + 16, to, p.dport, be.port)
            _rewrite(buf, p, ip + 12, frm, p.sport, f.nat_port)
        return self._send(buf, p, ingress, h)

    def _fnat_port(self, vip: VipInfo, be: Backend, fk: bytes, h: int, src: bytes) -> int:
        """xl_fnat_port: a source port for the new flow ``fk``: the one its hash picks, then
        the VIP's next in turn; a port whose entry names a live flow (not this one) is
        taken. The port (network order) with its entry written, or 0: exhausted (counted)."""
        count = vip.port_count
        cursor = self.fnat_cursor.ref(key_bytes(vip.vip_id))
        if count and cursor is not None:
            for i in range(FNAT_TRIES):
                idx = h % count
                if i:
                    idx = cursor.value % count
                    cursor.value += 1
                port = htons(vip.port_min + idx)
                k = fnat_key(src, port, bytes(be.addr)[:4], be.port, fk[12])
                owner = self.fnat_ports.ref(k)
                if owner is not None and bytes(owner) != fk \
                        and self._fnat_holder(bytes(owner), k) is not None:
                    self._count(Counter.FNAT_PORT_TAKEN)
                    continue
                try:
                    self.fnat_ports.put(k, FlowKey.from_buffer_copy(fk))
                except OSError:  # full: the agent's sweep makes room
                    continue
                return port
        self._count(Counter.DROP_SOURCE_PORTS)
        return 0

    def _fnat_holder(self, fk: bytes, k: bytes) -> Flow | None:
        """xl_fnat_holder: the flow keyed ``fk`` if it still holds entry ``k``'s port."""
        f = self.tracked.ref(fk)
        return f if f is not None and same_holder(f, k) else None

    def _fnat_find(self, lb: bytes, lb_port: int, be: bytes, be_port: int, proto: int
                   ) -> tuple[Flow | None, bytes]:
        """xl_fnat_find: the fullnat flow holding our ``lb``:``lb_port`` toward backend
        ``be``:``be_port`` (ports as the program loads them), and its key."""
        k = fnat_key(lb, lb_port, be, be_port, proto)
        owner = self.fnat_ports.ref(k)
        if owner is None:
            return None, b""
        fk = bytes(owner)
        return self._fnat_holder(fk, k), fk

    def _fnat_reply(self, buf: bytearray, p: Pkt, f: Flow, fk: bytes, ingress: int
                    ) -> tuple[int, int]:
        """xl_fnat_reply: backend -> the flow's source address and port, rewritten to VIP ->
        client and routed toward the client."""
        if self._ttl_expired(buf, p):  # to our own address: the kernel would not forward it
            return self._time_exceeded(buf, p, ingress)
        now = self.clock()
        nh = self._flow_seen(f, buf, p, now, True)
        self._count(Counter.REPLY)
        ip = p.ip
        vip, client = fk[4:8], fk[0:4]
        h, too_big = self._route(buf, p, ingress, nh, now, vip, client)
        if too_big:
            return self._icmp_error(buf, p, ingress, frag_needed, too_big)
        _rewrite(buf, p, ip + 16, client, p.dport, int.from_bytes(fk[8:10], "little"))
        _rewrite(buf, p, ip + 12, vip, p.sport, int.from_bytes(fk[10:12], "little"))
        return self._send(buf, p, ingress, h)

    def _send_ipip(self, buf: bytearray, p: Pkt, ingress: int, h: NextHop, src: bytes,
                   dst: bytes) -> tuple[int, int]:
        """xl_send_ipip: TTL decremented, then wrapped in an outer IPv4 header from ``src``
        to ``dst`` (TOS and DF copied, id copied) and sent by ``h``."""
        ip = p.ip
        decrement_ttl(buf, ip)
        length = ((buf[ip + 2] << 8) | buf[ip + 3]) + IPIP_OVERHEAD
        outer = bytearray(IPIP_OVERHEAD)
        outer[0], outer[1] = 0x45, buf[ip + 1]
        outer[2:4] = length.to_bytes(2, "big")
        outer[4:6] = buf[ip + 4 : ip + 6]
        outer[6], outer[7] = buf[ip + 6] & 0x40, 0
        outer[8], outer[9] = OUTER_TTL, _IPPROTO_IPIP
        outer[12:16], outer[16:20] = src, dst
        csum.store16(outer, 10, csum.words(outer))
        buf[ip:ip] = outer
        buf[12:14] = b"\x08\x00"
        self._count(Counter.IPIP_ENCAP)
        return self._out(buf, ingress, h)

    def _from_backend(self, buf: bytearray, p: Pkt, ingress: int) -> tuple[int, int]:
        """xl_from_backend: a reply, a reply's fragment, or none of ours (untouched)."""
        ip = p.ip
        if p.options and not ip_csum_ok_opts(buf, ip):
            return self._pass(Counter.PASS_BAD_IP_CSUM)
        if p.frag and p.proto in (IPPROTO_TCP, IPPROTO_UDP):
            return self._reply_fragment(buf, p, ingress)
        if p.sport >= 0 and self._maybe(bytes(buf[ip + 16 : ip + 20])) & ADDR_MAYBE_LB_SOURCE:
            f, fk = self._fnat_find(bytes(buf[ip + 16 : ip + 20]), csum.load16(buf, p.dport),
                                    bytes(buf[ip + 12 : ip + 16]), csum.load16(buf, p.sport),
                                    p.proto)
            if f is not None:
                return self._fnat_reply(buf, p, f, fk, ingress)
        if p.sport >= 0:
            saddr, sport = bytes(buf[ip + 12 : ip + 16]), bytes(buf[p.sport : p.sport + 2])
            rn = self.rev_nat.ref(rev_key(saddr, sport, p.proto))
            if rn is not None:
                f, t = reply_flow(self.tracked, rn, bytes(buf[ip + 16 : ip + 20]),
                                  bytes(buf[p.dport : p.dport + 2]), p.proto)
                if f is not None:
                    return self._reply(buf, p, f, t, ingress)
        return self._pass(Counter.PASS_NOT_VIP)

    def _reply(self, buf: bytearray, p: Pkt, f: Flow, t: RevTarget, ingress: int
               ) -> tuple[int, int]:
        """xl_reply: backend -> client reply of a tracked flow, the source back to the VIP."""
        if self._ttl_expired(buf, p):
            return self._pass(Counter.PASS_TTL)
        now = self.clock()
        nh = self._flow_seen(f, buf, p, now, True)
        self._count(Counter.REPLY)
        ip = p.ip
        h, too_big = self._route(buf, p, ingress, nh, now, bytes(t.vip_addr),
                                 bytes(buf[ip + 16 : ip + 20]))
        if too_big:  # to the backend, from the client: its own packet quoted
            return self._icmp_error(buf, p, ingress, frag_needed, too_big)
        _rewrite(buf, p, ip + 12, bytes(t.vip_addr), p.sport, t.vip_port)
        return self._send(buf, p, ingress, h)

    def _reply_fragment(self, buf: bytearray, p: Pkt, ingress: int) -> tuple[int, int]:
        """xl_reply_fragment: a fragment from a backend address (TCP/UDP), rewritten without
        the flow table when its address serves one VIP address (a first fragment: and its
        port one VIP port), else dropped; from other addresses, passed untouched."""
        ip = p.ip
        saddr = bytes(buf[ip + 12 : ip + 16])
        an = self.rev_nat.ref(address_key(saddr, p.proto))
        if an is None:
            return self._pass(Counter.PASS_NOT_VIP)
        vip = bytes(an.targets[0].vip_addr)
        en = None
        first = is_first_fragment(buf, ip)
        if an.count == 1 and first and first_fragment_l4(buf, p):
            en = self.rev_nat.ref(rev_key(saddr, bytes(buf[p.sport : p.sport + 2]), p.proto))
        if an.count != 1 or (first and not (en is not None and en.count == 1
                                            and bytes(en.targets[0].vip_addr) == vip)):
            self._count(Counter.DROP_REPLY_FRAGMENT)
            return XDP_DROP, 0
        if self._ttl_expired(buf, p):
            return self._pass(Counter.PASS_TTL)
        self._count(Counter.REPLY_FRAGMENT)
        if en is not None:  # the first fragment: its L4 checksum covers the whole datagram
            _rewrite(buf, p, ip + 12, vip, p.sport, en.targets[0].vip_port)
        else:
            csum.set_addr(buf, ip, ip + 12, vip)
        # Already rewritten: a fragment is never bounced (may_bounce), so the lookup is for
        # the packet as it now is.
        h, _ = self._route(buf, p, ingress, None, self.clock(), bytes(buf[ip + 12 : ip + 16]),
                           bytes(buf[ip + 16 : ip + 20]))
        return self._send(buf, p, ingress, h)

    def _resolve(self, buf: bytearray, p: Pkt, ingress: int, nh: NextHop | None, now: int,
                 saddr: bytes, daddr: bytes, overhead: int = 0, mode: int = _NAT
                 ) -> tuple[NextHop | None, int]:
        """xl_resolve: bpf_fib_lookup for the packet once rewritten to (saddr, daddr),
        remembered in ``nh`` when the flow has one. (hop, 0), or (None, 0) when the kernel
        must take the packet (nat) or it is dropped (the other modes: the kernel cannot take
        them over; dsr/l2 also needs the backend on a local segment), counted, or (None, mtu)
        when the sender gets "fragmentation needed" with that MTU."""
        ip = p.ip
        tot_len = (buf[ip + 2] << 8) | buf[ip + 3]
        res = self.fib.lookup(daddr, saddr, buf[ip + 1], p.proto, tot_len + overhead, ingress)
        self._count(Counter.FIB_LOOKUP)
        if res.rc != SUCCESS:
            if nh is not None:
                nh.ns = 0
            self._count(Counter.FIB_MISS)
            if res.rc == FRAG_NEEDED and may_bounce(buf, p) and res.mtu > overhead:
                return None, res.mtu - overhead
            self._count(Counter.PASS_FIB if mode == _NAT else Counter.DROP_NEXT_HOP)
            return None, 0
        if mode == _DSR_L2 and res.nexthop != daddr:
            if nh is not None:
                nh.ns = 0
            self._count(Counter.DROP_NOT_ON_LINK)
            return None, 0
        tx_slot = NO_TX_SLOT
        if res.ifindex != ingress:
            slot = self.tx_ports.ref(key_bytes(res.ifindex))
            if slot is None:
                if nh is not None:
                    nh.ns = 0
                self._count(Counter.PASS_FOREIGN_EGRESS if mode == _NAT
                            else Counter.DROP_NEXT_HOP)
                return None, 0
            tx_slot = slot.value
        h = nh if nh is not None else NextHop()
        h.ns, h.in_ifindex, h.out_ifindex, h.tx_slot = now, ingress, res.ifindex, tx_slot
        h.daddr[:] = daddr
        h.max_len, h.tos = tot_len, buf[ip + 1]
        h.dmac[:] = res.dmac
        h.smac[:] = res.smac
        return h, 0

    def _route(self, buf: bytearray, p: Pkt, ingress: int, nh: NextHop | None, now: int,
               saddr: bytes, daddr: bytes, overhead: int = 0, mode: int = _NAT
               ) -> tuple[NextHop | None, int]:
        """xl_route: the flow's fresh cached next hop (same ingress, destination and TOS, no
        longer than the packet that filled it), else xl_resolve's answer."""
        ip = p.ip
        if (nh is None or not nh.ns or now - nh.ns >= self.meta.ref(_ZERO).next_hop_ttl_ns
                or nh.in_ifindex != ingress or bytes(nh.daddr) != daddr
                or ((buf[ip + 2] << 8) | buf[ip + 3]) > nh.max_len
                or buf[ip + 1] != nh.tos):
            return self._resolve(buf, p, ingress, nh, now, saddr, daddr, overhead, mode)
        return nh, 0

    def _send(self, buf: bytearray, p: Pkt, ingress: int, h: NextHop | None
              ) -> tuple[int, int]:
        """xl_send: by the next hop ``h`` (None: to the kernel, as routed); TTL decremented
        only when we send the packet ourselves."""
        if h is None:
            return XDP_PASS, 0
        decrement_ttl(buf, p.ip)
        return self._out(buf, ingress, h)

    def _out(self, buf: bytearray, ingress: int, h: NextHop) -> tuple[int, int]:
        """xl_out: the next hop's MACs, and out by XDP_TX or the devmap."""
        buf[0:6] = bytes(h.dmac)
        buf[6:12] = bytes(h.smac)
        if h.tx_slot == NO_TX_SLOT:
            self._count(Counter.TX)
            return XDP_TX, ingress
        self._count(Counter.REDIRECT)
        dev = self.tx_devs.ref(key_bytes(h.tx_slot))
        if dev is None:  # bpf_redirect_map(map, slot, 0) on an empty slot
            return XDP_ABORTED, 0
        return XDP_REDIRECT, dev.value
