"""The scapy data path against the BPF program, byte for byte: a corpus with one frame per
rule of the data path, hypothesis on random, mutated and well-formed frames and on flows over
changing backend sets, and a 100,000-frame differential fuzz. Both engines run in the bench
namespace (xdplb/benchns.py), where next hops give every bpf_fib_lookup outcome. For every
frame: same verdict, same output bytes, same counters, same flow-table change, and checksums
that scapy confirms."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from socket import inet_aton, inet_ntoa

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pools import BE1, BE2, VIP, Backend, Vip, pool_yaml
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.utils import checksum
from testkit.benchns import CLIENTS, bench_namespace
from testkit.fuzz import (
    MUTATIONS,
    SERVICES,
    FrameGen,
    base_config,
    build,
    mutate,
    reconfigure,
    run_fuzz,
)
from testkit.pktcheck import checksum_errors, rewrite_errors, scapy_recomputed_errors

from xdplb.abi.layout import ADDR_FILTER_BITS, OUTCOMES, coarse_ns, half_open_max
from xdplb.agent import connsweep
from xdplb.config import Config
from xdplb.inspect.trace import flow_key
from xdplb.kernel.bpfsys import possible_cpus
from xdplb.model.hashing import addr_slot
from xdplb.offline.engines import (
    EFFECTS,
    MAX_FRAME,
    MIN_FRAME,
    Engine,
    FrameSizeError,
    RunResult,
    engine_pair,
)

pytestmark = pytest.mark.root

FUZZ_FRAMES = 100_000
CLIENT = "10.10.0.2"
VIP2, VIP3, VIP4 = "10.200.0.20", "10.200.0.30", "10.200.0.40"
LB_SRC = "10.20.0.1"  # the bench's address toward its backends: fullnat's and ipip's source

WEB_8080 = Backend(BE2, port=8080)


def corpus_pool(web: tuple[Backend | str, ...] = (WEB_8080,),
                dns: tuple[Backend | str, ...] = (BE1,), scheduler: str | None = None,
                **flows: int | str) -> str:
    """One VIP per next-hop outcome, each with one backend, so every frame's fate is known;
    tests vary the backends of web and dns, their scheduler, and flow settings."""
    return pool_yaml(
        Vip("web", 80, web, scheduler=scheduler),
        Vip("dns", 53, dns, protocol="udp", scheduler=scheduler),
        Vip("redirect", 443, ("10.30.0.5",), address=VIP2),
        Vip("foreign", 80, ("10.40.0.5",), address=VIP2),
        Vip("smallmtu", 81, ("10.50.0.5",), address=VIP2),
        Vip("noneigh", 80, ("10.20.0.99",), address=VIP3),
        Vip("blackhole", 81, ("10.60.0.5",), address=VIP3),
        Vip("drained", 82, (Backend(BE1, weight=0),), address=VIP3),
        Vip("gateway", 83, ("10.70.0.5",), protocol="udp", address=VIP3),
        # One VIP address per mode besides nat (VIP4), every next-hop outcome they add. The
        # fullnat range has one port: a second flow to the backend finds none.
        Vip("fnat", 80, (BE1,), address=VIP4, forwarding="fullnat",
            source_ports="20000-20000"),
        Vip("fnat-noneigh", 84, ("10.20.0.99",), address=VIP4, forwarding="fullnat"),
        Vip("dsr-l2", 81, (BE1,), address=VIP4, forwarding="dsr", encap="l2"),
        Vip("dsr-l2-routed", 82, ("10.70.0.5",), address=VIP4, forwarding="dsr", encap="l2"),
        Vip("dsr-ipip", 83, (BE1,), address=VIP4, forwarding="dsr"),
        table_size=251, seed=3, flows={"max_entries": 4096, **flows})


CORPUS_CONFIG = corpus_pool()


def config(text: str) -> Config:
    from xdplb.config import parse_config

    return parse_config(text, "parity.yaml")


@pytest.fixture(scope="module")
def bench():
    with bench_namespace(f"xlt-s-par-{os.getpid()}") as b:
        yield b


@pytest.fixture(scope="module")
def pair(bench):
    """A BPF and a scapy engine on the corpus config."""
    with engine_pair(config(CORPUS_CONFIG), bench.attached) as ab:
        yield ab


@pytest.fixture
def fresh(pair):
    """The pair with empty flow tables and the corpus config; equal state at the end."""
    a, b = pair
    cfg = config(CORPUS_CONFIG)
    for e in (a, b):
        e.clear_flows()
        e.configure(cfg)
    same_state(a, b)
    yield a, b
    same_state(a, b)


def run_both(a: Engine, b: Engine, frame: bytes, ingress: int) -> RunResult:
    """One frame through both: identical results, identical flow entries afterwards (so,
    from equal tables, the same change), and checksums scapy confirms on what was
    rewritten."""
    ra, rb = a.run(frame, ingress), b.run(frame, ingress)
    assert ra.comparable() == rb.comparable(), (frame.hex(), ra, rb, ra.data.hex(), rb.data.hex())
    assert a.flow_table(stats=False).diff(b.flow_table(stats=False)) == []
    assert rewrite_errors(frame, ra.data) == []
    return ra


def same_state(a: Engine, b: Engine) -> None:
    """Flow entries and per-VIP / per-backend statistics all equal."""
    assert a.flow_table().diff(b.flow_table()) == []


# --- the corpus: one frame per rule -----------------------------------------------------------


@dataclass
class Case:
    name: str
    frame: bytes
    reason: str  # the outcome counter it must move
    effect: str = "none"
    ingress: str = "d0"
    rewritten: bool = False  # the engines must change it (else: byte-identical)


def eth(dst: str = "02:00:00:00:00:01") -> Ether:
    return Ether(src="02:00:00:00:0a:02", dst=dst)


def filter_twin(addr: str) -> str:
    """Another 10/8 address in the same prefilter slot as ``addr``: a "maybe" that is not."""
    want = addr_slot(inet_aton(addr), ADDR_FILTER_BITS)
    for n in range(1, 1 << 24):
        twin = inet_aton(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
        if addr_slot(twin, ADDR_FILTER_BITS) == want and inet_ntoa(twin) != addr:
            return inet_ntoa(twin)
    raise AssertionError(f"no prefilter twin of {addr} in 10/8")


def corpus() -> Iterator[Case]:
    syn = build(CLIENT, VIP, 6, 40000, 80, flags="S", payload=b"hello")
    yield Case("VIP hit, TCP SYN, port rewritten", syn, "tx", "created", rewritten=True)
    yield Case("TCP ACK of the flow", build(CLIENT, VIP, 6, 40000, 80, flags="A"), "tx", "hit",
               rewritten=True)
    reply = build("10.20.0.12", CLIENT, 6, 8080, 40000, flags="SA", payload=b"x" * 33,
                  smac="02:00:00:00:14:0c")
    yield Case("reply path, source back to VIP:80", reply, "tx", "reply", rewritten=True)
    # ICMP errors about the flow (client:40000 -> VIP:80 -> 10.20.0.12:8080), bpf/icmperr.h.
    fwd_q = bytes(IP(src=CLIENT, dst="10.20.0.12") / TCP(sport=40000, dport=8080))[:28]
    rev_q = bytes(IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000))[:28]
    yield Case("ICMP error to the VIP about a reply: to the backend",
               bytes(eth() / IP(src=CLIENT, dst=VIP) / ICMP(type=3, code=3) / rev_q), "tx",
               rewritten=True)
    yield Case("ICMP error from a router about a forward packet: to the client",
               bytes(eth() / IP(src="10.20.0.254", dst=CLIENT) / ICMP(type=11) / fwd_q), "tx",
               rewritten=True)
    yield Case("ICMP error from the backend itself: source back to the VIP too",
               bytes(eth() / IP(src="10.20.0.12", dst=CLIENT) / ICMP(type=3, code=3) / fwd_q),
               "tx", rewritten=True)
    yield Case("ICMP error about no tracked flow", bytes(
        eth() / IP(src=CLIENT, dst=VIP) / ICMP(type=3, code=3)
        / bytes(IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40999))[:28]), "pass_not_vip")
    yield Case("ICMP error quoting too little", bytes(
        eth() / IP(src=CLIENT, dst=VIP) / ICMP(type=3, code=3) / rev_q[:24]), "pass_not_vip")
    yield Case("ICMP error toward a client about another address", bytes(
        eth() / IP(src="10.20.0.254", dst="10.10.0.3") / ICMP(type=11) / fwd_q), "pass_not_vip")
    yield Case("reply longer than the client side's MTU, DF set: fragmentation needed",
               build("10.20.0.12", CLIENT, 6, 8080, 40000, flags="A", payload=bytes(1600),
                     smac="02:00:00:00:14:0c", df=True), "tx", "reply", rewritten=True)
    yield Case("TCP FIN", build(CLIENT, VIP, 6, 40000, 80, flags="FA"), "tx", "hit",
               rewritten=True)
    yield Case("TCP RST", build(CLIENT, VIP, 6, 40000, 80, flags="R"), "tx", "hit",
               rewritten=True)
    # The connection is over (RST seen): a new SYN on its 5-tuple is a new flow.
    yield Case("SYN reusing a finished flow's 5-tuple", syn, "tx", "rebalanced", rewritten=True)
    yield Case("SYN retransmitted (half-open flow stays)", syn, "tx", "hit", rewritten=True)
    yield Case("stray reply (untracked port)", build("10.20.0.12", CLIENT, 6, 8080, 40001),
               "pass_not_vip")
    yield Case("UDP with checksum", build(CLIENT, VIP, 17, 5353, 53, payload=b"query"), "tx",
               "created", rewritten=True)
    yield Case("UDP without checksum", build(CLIENT, VIP, 17, 5354, 53, payload=b"query",
                                             udp_zero=True), "tx", "created", rewritten=True)
    yield Case("VIP address, port not balanced", build(CLIENT, VIP, 6, 40000, 443), "pass_not_vip")
    yield Case("not a VIP", build(CLIENT, "10.10.0.1", 6, 40000, 22), "pass_not_vip")
    yield Case("to another host's MAC (a flooding switch): the kernel's", build(
        CLIENT, VIP, 6, 40000, 80, flags="A", dmac="02:00:00:00:00:99"), "pass_foreign_mac")
    yield Case("another host's MAC on an interface not attached: not judged", build(
        CLIENT, VIP, 6, 40000, 80, flags="A", dmac="02:00:00:00:00:99"), "redirect", "hit",
        ingress="lo", rewritten=True)
    yield Case("redirect to another attached interface",
               build(CLIENT, VIP2, 6, 40000, 443), "redirect", "created", rewritten=True)
    yield Case("egress not attached", build(CLIENT, VIP2, 6, 40000, 80), "pass_foreign_egress",
               "created", rewritten=True)
    yield Case("larger than the egress MTU (FRAG_NEEDED)",
               build(CLIENT, VIP2, 6, 40000, 81, payload=bytes(700)), "pass_fib", "created",
               rewritten=True)
    yield Case("larger than the egress MTU, DF set: fragmentation needed",
               build(CLIENT, VIP2, 6, 40002, 81, payload=bytes(700), df=True), "tx", "created",
               rewritten=True)
    yield Case("small enough for that MTU", build(CLIENT, VIP2, 6, 40001, 81, payload=bytes(100)),
               "redirect", "created", rewritten=True)
    yield Case("no neighbour (kernel resolves)", build(CLIENT, VIP3, 6, 40000, 80), "pass_fib",
               "created", rewritten=True)
    yield Case("blackhole route", build(CLIENT, VIP3, 6, 40000, 81), "pass_fib", "created",
               rewritten=True)
    yield Case("gateway route", build(CLIENT, VIP3, 17, 40000, 83, payload=b"x"), "tx",
               "created", rewritten=True)
    yield Case("ingress with forwarding off", build("10.11.0.2", VIP, 6, 40000, 80), "pass_fib",
               "created", ingress="d4", rewritten=True)
    yield Case("loopback ingress (bare test run): redirect", build(CLIENT, VIP, 6, 40002, 80),
               "redirect", "created", ingress="lo", rewritten=True)
    yield Case("every backend drained", build(CLIENT, VIP3, 6, 40000, 82), "drop_no_backend")
    # TTL 1 or 0 to a VIP: Time Exceeded from the VIP (traceroute works); on a reply the
    # kernel gets it untouched and sends the error itself.
    yield Case("TTL 1", build(CLIENT, VIP, 6, 40000, 80, ttl=1), "tx", rewritten=True)
    yield Case("TTL 0", build(CLIENT, VIP, 17, 40000, 53, ttl=0, payload=b"q" * 30), "tx",
               rewritten=True)
    yield Case("TTL 1 on a reply", build("10.20.0.12", CLIENT, 6, 8080, 40000, flags="A",
                                         ttl=1), "pass_ttl")
    yield Case("TTL 1, not a VIP", build(CLIENT, "10.20.0.11", 6, 40000, 80, ttl=1),
               "pass_not_vip")
    yield Case("IPv4 options to a VIP", build(CLIENT, VIP, 6, 40000, 80, options=True),
               "drop_ip_options")
    yield Case("IPv4 options elsewhere", build(CLIENT, "10.10.0.1", 6, 40000, 22, options=True),
               "pass_not_vip")
    yield Case("first fragment to a VIP", build(CLIENT, VIP, 6, 40000, 80, more_frags=True),
               "drop_fragment")
    yield Case("later fragment to a VIP", build(CLIENT, VIP, 17, 40000, 53, frag=100),
               "drop_fragment")
    yield Case("fragment elsewhere", build(CLIENT, "10.10.0.1", 17, 1, 2, frag=100),
               "pass_not_vip")
    vlan = build(CLIENT, VIP, 6, 40003, 80, vlan=42)
    # Frames the kernel would not route reach it untouched (bpf/guard.h).
    yield Case("VLAN-tagged, no VLAN served", vlan, "pass_vlan")
    yield Case("VLAN-tagged reply", build("10.20.0.12", CLIENT, 6, 8080, 40000, flags="A",
                                          vlan=42), "pass_vlan")
    yield Case("broadcast MAC to a VIP", build(CLIENT, VIP, 6, 40004, 80,
                                               dmac="ff:ff:ff:ff:ff:ff"), "pass_group_mac")
    yield Case("multicast MAC to a VIP", build(CLIENT, VIP, 17, 40004, 53,
                                               dmac="01:00:5e:00:00:01"), "pass_group_mac")
    for martian in ("0.0.0.0", "127.0.0.1", "224.0.0.5", "240.0.0.1", "255.255.255.255"):
        yield Case(f"martian source {martian}", build(martian, VIP, 6, 40005, 80),
                   "pass_martian")
    bad_csum = bytearray(build(CLIENT, VIP, 6, 40006, 80))
    bad_csum[24] ^= 0x01  # IPv4 header checksum
    yield Case("bad IPv4 header checksum to a VIP", bytes(bad_csum), "pass_bad_ip_csum")
    bad_csum = bytearray(build("10.20.0.12", CLIENT, 6, 8080, 40000, flags="A"))
    bad_csum[25] ^= 0x80
    yield Case("bad IPv4 header checksum on a reply", bytes(bad_csum), "pass_bad_ip_csum")
    qinq = bytes(eth() / Dot1Q(vlan=1) / Dot1Q(vlan=2) / IP(src=CLIENT, dst=VIP) / TCP(dport=80))
    yield Case("QinQ", qinq, "pass_not_ipv4")
    yield Case("ARP", bytes(eth("ff:ff:ff:ff:ff:ff") / ARP(pdst="10.10.0.1")), "pass_not_ipv4")
    yield Case("IPv6", bytes(eth() / IPv6(dst="fd00::1") / TCP(dport=80)), "pass_not_ipv4")
    yield Case("broadcast", bytes(eth("ff:ff:ff:ff:ff:ff") / IP(src=CLIENT, dst="10.10.0.255")
                                  / UDP(dport=80)), "pass_not_vip")
    # Echo requests to a VIP address are answered from the VIP; other ICMP passes (for now).
    yield Case("ICMP echo to a VIP", bytes(eth() / IP(src=CLIENT, dst=VIP, ttl=9)
                                           / ICMP(id=7, seq=3) / (b"p" * 56)), "tx",
               rewritten=True)
    yield Case("ICMP echo to a VIP, TTL 1, empty", bytes(eth() / IP(src=CLIENT, dst=VIP, ttl=1)
                                                         / ICMP()), "tx", rewritten=True)
    yield Case("ICMP echo reply to a VIP", bytes(eth() / IP(src=CLIENT, dst=VIP)
                                                 / ICMP(type=0)), "pass_not_vip")
    yield Case("ICMP echo, code 1", bytes(eth() / IP(src=CLIENT, dst=VIP) / ICMP(code=1)),
               "pass_not_vip")
    yield Case("ICMP echo elsewhere", bytes(eth() / IP(src=CLIENT, dst="10.10.0.1") / ICMP()),
               "pass_not_vip")
    yield Case("ICMP echo fragment to a VIP", bytes(eth() / IP(src=CLIENT, dst=VIP, flags="MF")
                                                    / ICMP()), "drop_fragment")
    yield Case("truncated ICMP to a VIP", bytes(eth() / IP(src=CLIENT, dst=VIP, proto=1)
                                                / b"\x08\x00\x00"), "pass_malformed")
    good = bytearray(syn)
    ip, l4 = 14, 34
    yield Case("truncated Ethernet (VLAN header cut)", bytes(eth())[:12] + b"\x81\x00\x00",
               "pass_malformed")
    yield Case("truncated IP header", bytes(good[: ip + 12]), "pass_malformed")
    yield Case("truncated TCP header", bytes(good[: l4 + 10]), "pass_malformed")
    yield Case("truncated UDP header", build(CLIENT, VIP, 17, 1, 53)[: l4 + 4], "pass_malformed")
    for name, off, value in (("bad IHL (3)", ip, b"\x43"), ("IP version 6 in an IPv4 frame", ip,
                              b"\x65"), ("total length past the frame", ip + 2, b"\x07\xd0"),
                             ("total length shorter than the headers", ip + 2, b"\x00\x1e"),
                             ("TCP data offset 2", l4 + 12, b"\x20")):
        bad = bytearray(good)
        bad[off : off + len(value)] = value
        if off < l4:  # a consistent header checksum: the field's own rule must decide
            bad[ip + 10 : ip + 12] = b"\0\0"
            bad[ip + 10 : ip + 12] = checksum(bytes(bad[ip:l4])).to_bytes(2, "big")
        yield Case(name, bytes(bad), "pass_malformed")
    udp = bytearray(build(CLIENT, VIP, 17, 1, 53, payload=b"abc"))
    udp[l4 + 4 : l4 + 6] = b"\x00\x07"
    yield Case("UDP length 7", bytes(udp), "pass_malformed")
    # L4 headers are only judged for packets that may be ours: to a VIP address (above) or
    # from a backend. Others pass as not ours, also when the prefilter cannot tell.
    for name, src, dst in (("to another address", CLIENT, "10.10.0.1"),
                           ("to a prefilter twin of the VIP", CLIENT, filter_twin(VIP)),
                           ("from a backend", "10.20.0.12", CLIENT)):
        bad = bytearray(build(src, dst, 6, 8080, 40000))
        bad[l4 + 12] = 0x20  # data offset 2
        yield Case(f"TCP data offset 2 {name}", bytes(bad), "pass_not_vip")


def corpus_reverse() -> Iterator[Case]:
    """Replies with IP options and fragments of replies (docs/architecture.md, "Packet
    walk"). Flows of their own (client ports 41000 and 41001), so that they do not depend on
    corpus()."""
    def reply(src: str, proto: int, sport: int, dport: int, **kw) -> bytes:
        return build(src, CLIENT, proto, sport, dport, flags="A", smac="02:00:00:00:14:0c", **kw)

    def refresh_ip_checksum(f: bytearray) -> bytes:
        f[24:26] = b"\0\0"
        f[24:26] = checksum(bytes(f[14 : 14 + (f[14] & 15) * 4])).to_bytes(2, "big")
        return bytes(f)

    yield Case("reverse: a TCP flow to reply to", build(CLIENT, VIP, 6, 41000, 80), "tx",
               "created", rewritten=True)
    yield Case("reverse: a UDP flow to reply to", build(CLIENT, VIP, 17, 41001, 53, payload=b"q"),
               "tx", "created", rewritten=True)
    yield Case("reply with IP options, source back to VIP:80",
               reply(BE2, 6, 8080, 41000, options=True, payload=b"x" * 9), "tx", "reply",
               rewritten=True)
    bad = bytearray(reply(BE2, 6, 8080, 41000, options=True))
    bad[25] ^= 1
    yield Case("reply with IP options, bad header checksum", bytes(bad), "pass_bad_ip_csum")
    yield Case("untracked reply with IP options", reply(BE2, 6, 8080, 41009, options=True),
               "pass_not_vip")
    for name, kw in (("", {}), (", no UDP checksum", {"udp_zero": True}),
                     (", IP options", {"options": True})):
        yield Case(f"first fragment of a UDP reply: address, port, checksum{name}",
                   reply(BE1, 17, 53, 41001, payload=bytes(range(64)), more_frags=True, **kw),
                   "tx", rewritten=True)
    yield Case("later fragment of a UDP reply: address only",
               reply(BE1, 17, 53, 41001, payload=bytes(64), frag=185), "tx", rewritten=True)
    yield Case("last fragment of a TCP reply", reply(BE2, 6, 8080, 41000, frag=100), "tx",
               rewritten=True)
    yield Case("fragment of a reply, TTL 1", reply(BE1, 17, 53, 41001, frag=185, ttl=1),
               "pass_ttl")
    yield Case("first fragment from a backend port no VIP uses",
               reply(BE1, 17, 5353, 41001, more_frags=True), "drop_reply_fragment")
    short = bytearray(reply(BE2, 6, 8080, 41000, more_frags=True)[: 14 + 28])
    short[16:18] = (28).to_bytes(2, "big")  # 8 bytes of TCP: no checksum field
    yield Case("first fragment without its whole TCP header", refresh_ip_checksum(short),
               "drop_reply_fragment")
    yield Case("fragment from a prefilter twin of a backend",
               build(filter_twin(BE1), CLIENT, 17, 53, 41001, frag=185), "pass_not_vip")
    icmp = bytes(eth() / IP(src=BE1, dst=CLIENT, proto=1, frag=10) / bytes(16))
    yield Case("ICMP fragment from a backend", icmp, "pass_not_vip")


def corpus_modes() -> Iterator[Case]:
    """fullnat, dsr/l2 and dsr/ipip (VIP4): new flow, established, fullnat's reply, port
    exhaustion, ipip near the MTU, and the next hops that cannot be handed to the kernel."""
    syn = build(CLIENT, VIP4, 6, 40100, 80, flags="S", payload=b"hi")
    yield Case("fullnat: new flow, source and destination rewritten", syn, "tx", "created",
               rewritten=True)
    yield Case("fullnat: established", build(CLIENT, VIP4, 6, 40100, 80, flags="A"), "tx",
               "hit", rewritten=True)
    yield Case("fullnat: the backend's reply to the balancer's port, back to VIP -> client",
               build(BE1, LB_SRC, 6, 80, 20000, flags="SA"), "tx", "reply", rewritten=True)
    yield Case("fullnat: a reply to a port no flow holds", build(BE1, LB_SRC, 6, 80, 20001),
               "pass_not_vip")
    yield Case("fullnat: the range's only port is taken", build(CLIENT, VIP4, 6, 40101, 80,
                                                                flags="S"), "drop_source_ports")
    yield Case("fullnat: no neighbour: dropped (the kernel cannot take it over)",
               build(CLIENT, VIP4, 6, 40102, 84, flags="S"), "drop_next_hop", "created")
    yield Case("dsr/l2: new flow, only the MACs (and TTL) change",
               build(CLIENT, VIP4, 6, 40200, 81, flags="S"), "tx", "created", rewritten=True)
    yield Case("dsr/l2: established", build(CLIENT, VIP4, 6, 40200, 81, flags="A"), "tx", "hit",
               rewritten=True)
    yield Case("dsr/l2: a backend behind a gateway", build(CLIENT, VIP4, 6, 40201, 82,
                                                           flags="S"), "drop_not_on_link",
               "created")
    yield Case("dsr/ipip: new flow, wrapped", build(CLIENT, VIP4, 6, 40300, 83, flags="S",
                                                    df=True), "tx", "created", rewritten=True)
    yield Case("dsr/ipip: established, 1480 bytes with DF: fits with the outer header",
               build(CLIENT, VIP4, 6, 40300, 83, flags="A", payload=bytes(1440), df=True), "tx",
               "hit", rewritten=True)
    yield Case("dsr/ipip: 1481 bytes with DF: fragmentation needed (MTU 1480)",
               build(CLIENT, VIP4, 6, 40300, 83, flags="A", payload=bytes(1441), df=True), "tx",
               "hit", rewritten=True)
    yield Case("dsr/ipip: 1481 bytes without DF: dropped (the kernel cannot fragment it)",
               build(CLIENT, VIP4, 6, 40300, 83, flags="A", payload=bytes(1441)),
               "drop_next_hop", "hit")
    yield from icmp_modes()


ROUTER = "10.20.0.254"  # a router on the backends' side (bench: a permanent neighbour)


def fnat_error(src: str, icmp: ICMP, sport: int = 20000) -> bytes:
    """An ICMP error to the balancer's address about fullnat's packet LB_SRC:sport -> BE1:80."""
    quote = bytes(IP(src=LB_SRC, dst=BE1) / TCP(sport=sport, dport=80, flags="A"))[:28]
    return bytes(eth() / IP(src=src, dst=LB_SRC) / icmp / quote)


def tunnel_error(mtu: int, sport: int = 40300, outer_dst: str = BE1) -> bytes:
    """A router's "fragmentation needed" about dsr/ipip's outer packet to BE1, quoting the
    outer header, the client's packet header and 8 bytes (as Linux routers do, and more)."""
    inner = IP(src=CLIENT, dst=VIP4, flags="DF") / TCP(sport=sport, dport=83, flags="A")
    quote = bytes(IP(src=LB_SRC, dst=outer_dst, proto=4, flags="DF") / inner)[:48]
    return bytes(eth() / IP(src=ROUTER, dst=LB_SRC) / ICMP(type=3, code=4, nexthopmtu=mtu)
                 / quote)


def icmp_modes() -> Iterator[Case]:
    """ICMP errors about the packets fullnat and dsr/ipip send (after corpus_modes' flows)."""
    yield Case("fullnat: a router's error about our packet: to the client, its packet quoted",
               fnat_error(ROUTER, ICMP(type=3, code=4, nexthopmtu=1400)), "tx", rewritten=True)
    yield Case("fullnat: the backend's own error: from the VIP too",
               fnat_error(BE1, ICMP(type=3, code=3)), "tx", rewritten=True)
    yield Case("fullnat: an error about a port no flow holds",
               fnat_error(ROUTER, ICMP(type=3, code=4, nexthopmtu=1400), 20001),
               "pass_not_vip")
    yield Case("dsr/ipip: frag needed about our outer packet: the client learns MTU - 20",
               tunnel_error(1400), "tx", rewritten=True)
    yield Case("dsr/ipip: frag needed without an MTU (an old router)", tunnel_error(0),
               "pass_not_vip")
    yield Case("dsr/ipip: frag needed about an outer packet of no flow",
               tunnel_error(1400, sport=40399), "pass_not_vip")
    yield Case("dsr/ipip: frag needed naming another backend", tunnel_error(1400,
                                                                          outer_dst=BE2),
               "pass_not_vip")


def test_corpus_same_fate_in_both(bench, fresh):
    a, b = fresh
    seen = set()
    for case in (*corpus(), *corpus_reverse(), *corpus_modes()):
        ingress = bench.ifindex[case.ingress] if case.ingress != "lo" else 0
        r = run_both(a, b, case.frame, ingress)
        assert (r.reason, r.effect) == (case.reason, case.effect), case.name
        assert (r.data != case.frame) == case.rewritten, case.name
        if case.rewritten:
            assert checksum_errors(r.data) == [] and scapy_recomputed_errors(r.data) == [], \
                case.name
        seen.add(r.reason)
    # the corpus reaches every outcome of the data path
    assert {c.name.lower() for c in OUTCOMES} <= seen


def test_echo_reply_is_what_a_host_sends(bench, fresh):
    """The answer to a ping of a VIP, checked against scapy's own reply built from the
    request: addresses and MACs swapped, type 0, a fresh TTL, id, sequence and payload kept,
    checksums scapy computes. Nothing is tracked."""
    a, b = fresh
    req = eth() / IP(src=CLIENT, dst=VIP, ttl=3, id=77) / ICMP(id=0x1234, seq=9) / (b"ping" * 9)
    r = run_both(a, b, bytes(req), bench.ifindex["d0"])
    assert (r.verdict, r.reason, r.effect) == ("tx", "tx", "none")
    want = (Ether(src=req.dst, dst=req.src) / IP(src=VIP, dst=CLIENT, ttl=64, id=77)
            / ICMP(type=0, id=0x1234, seq=9) / (b"ping" * 9))
    assert r.data == bytes(want), (r.data.hex(), bytes(want).hex())
    assert r.counters == {"icmp_echo": 1, "tx": 1}


def test_time_exceeded_quotes_the_packet_as_sent(bench, fresh):
    """TTL 1 to a VIP, new or established flow: the sender gets Time Exceeded from the VIP
    quoting its packet before any rewrite, as scapy builds it; the flow is not touched."""
    a, b = fresh
    run_both(a, b, build(CLIENT, VIP, 6, 40100, 80, flags="S"), 0)  # an established flow
    for frame in (build(CLIENT, VIP, 6, 40100, 80, flags="A", ttl=1, payload=b"d" * 300),
                  build(CLIENT, VIP, 17, 40101, 53, ttl=1, payload=b"q")):
        r = run_both(a, b, frame, bench.ifindex["d0"])
        sent = Ether(frame)
        want = (Ether(src=sent.dst, dst=sent.src) / IP(src=VIP, dst=CLIENT, ttl=64, id=0)
                / ICMP(type=11, code=0) / bytes(sent[IP])[:28])
        assert (r.verdict, r.counters, r.effect) == ("tx", {"ttl_exceeded": 1, "tx": 1},
                                                     "none")
        assert r.data == bytes(want), (r.data.hex(), bytes(want).hex())


def test_fragmentation_needed_quotes_the_packet_as_sent(bench, fresh):
    """Path MTU discovery both ways: a packet with DF set too long for its next hop gets
    "fragmentation needed" with the path's MTU, from the address it was sent to, quoting it
    before any rewrite (what the sender's socket matches), as scapy builds it. Without DF the
    kernel gets it rewritten, to fragment."""
    a, b = fresh
    d0 = bench.ifindex["d0"]
    run_both(a, b, build(CLIENT, VIP, 6, 40200, 80, flags="S"), d0)  # web: 10.20.0.12:8080
    cases = (  # (frame, the MTU the route of its rewritten self has)
        (build(CLIENT, VIP2, 6, 40201, 81, flags="S", payload=bytes(700), df=True),
         576),  # d3 (benchns)
        (build("10.20.0.12", CLIENT, 6, 8080, 40200, flags="A", payload=bytes(1600), df=True,
               smac="02:00:00:00:14:0c"), 1500),
    )
    for frame, mtu in cases:
        r = run_both(a, b, frame, d0)
        sent = Ether(frame)
        want = (Ether(src=sent.dst, dst=sent.src) / IP(src=sent[IP].dst, dst=sent[IP].src,
                                                      ttl=64, id=0)
                / ICMP(type=3, code=4, nexthopmtu=mtu) / bytes(sent[IP])[:28])
        assert r.verdict == "tx" and r.counters.get("frag_needed") == 1, r
        assert r.data == bytes(want), (r.data.hex(), bytes(want).hex())
        assert checksum_errors(r.data) == [] and scapy_recomputed_errors(r.data) == []
    no_df = build(CLIENT, VIP2, 6, 40202, 81, flags="S", payload=bytes(700))
    r = run_both(a, b, no_df, d0)
    assert (r.verdict, r.reason) == ("pass", "pass_fib") and Ether(r.data)[IP].dst == "10.50.0.5"


def l3(frame: bytes) -> IP:
    """A frame's IPv4 packet, to rebuild with changed fields (checksums recomputed)."""
    return Ether(frame)[IP].copy()


def rebuilt(pkt: IP, **fields: object) -> bytes:
    """``pkt`` with ``fields`` changed and every checksum left to scapy."""
    for name, value in fields.items():
        layer, _, field = name.rpartition("_")
        setattr(pkt[{"ip": IP, "tcp": TCP, "udp": UDP, "icmp": ICMP}[layer or "ip"]]
                if layer else pkt, field, value)
    for layer in (IP, TCP, UDP, ICMP):
        if pkt.haslayer(layer):
            del pkt[layer].chksum
    return bytes(pkt)


def test_modes_leave_as_scapy_builds_them(bench, fresh):
    """Each mode's output, from the IPv4 header on, against what scapy builds from the
    input with the fields the mode must change (checksums by scapy), and the MAC of the
    backend where only the frame is redirected."""
    a, b = fresh
    d0 = bench.ifindex["d0"]

    def out(frame: bytes) -> bytes:
        return run_both(a, b, frame, d0).data

    syn = build(CLIENT, VIP4, 6, 40100, 80, flags="S", payload=b"hi")
    got = out(syn)
    assert got[14:] == rebuilt(l3(syn), src=LB_SRC, dst=BE1, ttl=63, tcp_sport=20000)
    reply = build(BE1, LB_SRC, 6, 80, 20000, flags="SA")
    assert out(reply)[14:] == rebuilt(l3(reply), src=VIP4, dst=CLIENT, ttl=63, tcp_sport=80,
                                      tcp_dport=40100)
    err = fnat_error(ROUTER, ICMP(type=3, code=4, nexthopmtu=1400))
    want = l3(err)
    want[IP].dst, want[IP].ttl = CLIENT, 63
    # fnat_error quoted IP(src=LB_SRC, dst=BE1) / TCP(sport=20000, dport=80, flags="A")
    quoted = bytes(IP(src=CLIENT, dst=VIP4) / TCP(sport=40100, dport=80, flags="A"))[:28]
    del want[IP].chksum, want[ICMP].chksum
    want[ICMP].remove_payload()
    assert out(err)[14:] == bytes(want / quoted)

    l2 = build(CLIENT, VIP4, 6, 40200, 81, flags="S")
    got = out(l2)
    assert Ether(got).dst == "02:00:00:00:00:0b" and got[14:] == rebuilt(l3(l2), ttl=63)

    ipip = build(CLIENT, VIP4, 6, 40300, 83, flags="S", tos=0xB8, df=True)
    inner = l3(ipip)
    want = IP(src=LB_SRC, dst=BE1, proto=4, ttl=64, tos=0xB8, id=inner.id, flags="DF") / \
        rebuilt(inner, ttl=63)
    assert out(ipip)[14:] == bytes(want)
    # A router says the path to BE1 takes 1400: the client hears 1380, from the VIP, about
    # its own packet (the one it sent, before we wrapped it).
    want = IP(src=VIP4, dst=CLIENT, ttl=64, id=0) / ICMP(type=3, code=4, nexthopmtu=1380) / \
        bytes(IP(bytes(tunnel_error(1400))[14 + 20 + 8 + 20:]))[:28]
    got = out(tunnel_error(1400))
    assert got[14:] == bytes(want)
    assert checksum_errors(got) == [] and scapy_recomputed_errors(got) == []


def test_icmp_errors_are_translated_like_their_flow(bench, fresh):
    """An error about a balanced flow reaches the socket that sent the quoted packet, in its
    own addresses: to the VIP about a reply -> to the backend, quoting the backend's packet;
    toward the client about its packet to the backend -> quoting its packet to the VIP
    (from the VIP when the backend sent it). The quoted UDP checksum is the one of the
    whole translated datagram; every checksum as scapy computes it."""
    a, b = fresh
    d0 = bench.ifindex["d0"]
    run_both(a, b, build(CLIENT, VIP, 17, 5360, 53, payload=b"q" * 30), d0)  # dns: 10.20.0.11
    def dgram(src: str, dst: str, sport: int, dport: int) -> bytes:
        return bytes(IP(src=src, dst=dst, id=5) / UDP(sport=sport, dport=dport) / (b"r" * 30))
    cases = (  # (outer src, outer dst, quoted as sent, expected outer src, dst, quote)
        (CLIENT, VIP, dgram(VIP, CLIENT, 53, 5360),
         CLIENT, "10.20.0.11", dgram("10.20.0.11", CLIENT, 53, 5360)),
        ("10.20.0.254", CLIENT, dgram(CLIENT, "10.20.0.11", 5360, 53),
         "10.20.0.254", CLIENT, dgram(CLIENT, VIP, 5360, 53)),
        ("10.20.0.11", CLIENT, dgram(CLIENT, "10.20.0.11", 5360, 53),
         VIP, CLIENT, dgram(CLIENT, VIP, 5360, 53)),
    )
    for src, dst, quoted, want_src, want_dst, want_quoted in cases:
        frame = bytes(eth() / IP(src=src, dst=dst, ttl=20) / ICMP(type=3, code=3) / quoted[:28])
        r = run_both(a, b, frame, d0)
        assert r.verdict == "tx", r
        want = IP(src=want_src, dst=want_dst, ttl=19) / ICMP(type=3, code=3) / want_quoted[:28]
        assert bytes(Ether(r.data)[IP]) == bytes(want), (r.data.hex(), bytes(want).hex())
        assert checksum_errors(r.data) == [] and scapy_recomputed_errors(r.data) == []


def test_frame_size_limits(fresh):
    """Frames no XDP program is run on (runts, longer than its linear buffer) are refused by
    both engines; the longest allowed one runs, alike."""
    a, b = fresh
    for e in (a, b):
        for n in (MIN_FRAME - 1, MAX_FRAME + 1):
            with pytest.raises(FrameSizeError):
                e.run(bytes(n))
    big = build(CLIENT, VIP, 6, 40000, 80, payload=bytes(MAX_FRAME - 54))
    assert len(big) == MAX_FRAME
    assert run_both(a, b, big, 0).reason == "pass_fib"  # over d0's MTU: FRAG_NEEDED


def test_rebalance_after_backend_removed(fresh):
    """A flow whose backend goes re-picks from the current ring: same in both."""
    a, b = fresh
    for e in (a, b):
        e.configure(config(corpus_pool(web=(WEB_8080, BE1))))
    rnd = random.Random(5)
    sports = rnd.sample(range(30000, 40000), 60)
    for s in sports:
        run_both(a, b, build(CLIENT, VIP, 6, s, 80), 0)
    for e in (a, b):
        e.configure(config(corpus_pool(web=(BE1,))))
    effects = [run_both(a, b, build(CLIENT, VIP, 6, s, 80, flags="A"), 0).effect
               for s in sports]
    assert "rebalanced" in effects and "hit" in effects


def test_cached_next_hop_holds_only_for_its_destination(fresh):
    """A backend removed in one change gives up its id, a backend added in the next may get
    it, and the removed one's flows follow the id. Their cached next hop (the old backend's
    MAC) must not be used for the new address: here the new one's neighbour has failed, so
    a fresh lookup hands the packet to the kernel (which resolves ARP). With a cache TTL of
    10 s only the destination check can make that happen."""
    a, b = fresh
    old, new = WEB_8080, Backend("10.20.0.15", port=8080)  # bench: .12 permanent, .15 failed

    def web(*backends: Backend) -> None:
        for e in (a, b):
            e.configure(config(corpus_pool(web=backends, next_hop_cache_ms=10_000)))

    def bid(backend: Backend) -> int | None:
        ids = {(addr, port): i for (_, addr, port), i in a.sync.read_current().backend_ids.items()}
        return ids.get((backend.address, backend.port))

    web(old)
    first = run_both(a, b, build(CLIENT, VIP, 6, 31000, 80, flags="S"), 0)
    assert (first.reason, first.backend) == ("redirect", "10.20.0.12:8080")
    assert run_both(a, b, build(CLIENT, VIP, 6, 31000, 80, flags="A"), 0).reason == "redirect"
    was = bid(old)
    web(Backend(BE1))  # the old one goes; its id is free
    web(Backend(BE1), new)
    assert bid(new) == was  # the precondition: the id was handed on
    r = run_both(a, b, build(CLIENT, VIP, 6, 31000, 80, flags="A"), 0)
    assert (r.effect, r.backend, r.reason) == ("hit", "10.20.0.15:8080", "pass_fib")


def test_new_flows_wait_apart_until_their_next_packet(fresh):
    """A SYN's flow is tracked in half_open, its backend's SYN-ACK is reverse-NATed from
    there, and the client's ACK moves it to flows (flow_confirmed); a TTL-expired ACK does
    not (the backend never sees it). A UDP flow is confirmed by its second datagram, a TCP
    flow picked up mid-stream by its next ACK."""
    a, b = fresh
    key = flow_key(CLIENT, 40500, VIP, 80, 6)
    run_both(a, b, build(CLIENT, VIP, 6, 40500, 80, flags="S"), 0)
    for e in (a, b):
        assert e.maps.lookup("half_open", key) is not None and e.maps.lookup("flows", key) is None
    assert run_both(a, b, build(BE2, CLIENT, 6, 8080, 40500, flags="SA",
                                smac="02:00:00:00:14:0c"), 0).effect == "reply"
    run_both(a, b, build(CLIENT, VIP, 6, 40500, 80, flags="A", ttl=1), 0)
    assert a.maps.lookup("half_open", key) is not None
    r = run_both(a, b, build(CLIENT, VIP, 6, 40500, 80, flags="A"), 0)
    assert r.effect == "hit" and r.counters.get("flow_confirmed") == 1, r
    for e in (a, b):
        assert e.maps.lookup("half_open", key) is None and e.maps.lookup("flows", key) is not None
    for proto, port, first, then in ((17, 53, "", ""), (6, 80, "A", "PA")):
        key = flow_key(CLIENT, 40600, VIP, port, proto)
        assert run_both(a, b, build(CLIENT, VIP, proto, 40600, port, flags=first or "S"),
                        0).effect == "created"
        assert a.maps.lookup("half_open", key) is not None
        r = run_both(a, b, build(CLIENT, VIP, proto, 40600, port, flags=then or "S"), 0)
        assert r.counters.get("flow_confirmed") == 1 and a.maps.lookup("flows", key), r


def test_a_flood_never_evicts_an_established_flow(fresh):
    """Far more new flows from random sources (SYN, ACK and UDP) than half_open holds (1,024
    for this table of 4,096): each engine on its own (the kernel's LRU evicts approximately)
    still has every established flow, and their packets hit."""
    a, b = fresh
    est = [build(CLIENT, VIP, 6, 41000 + i, 80, flags=f) for i in range(20) for f in "SA"]
    for frame in est:
        run_both(a, b, frame, 0)
    rnd = random.Random(7)
    flood = []
    for _ in range(6000):
        proto, port = rnd.choice(((6, 80), (17, 53)))
        src = f"10.{rnd.randrange(1, 200)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        flood.append(build(src, VIP, proto, rnd.randrange(1024, 65536), port,
                           flags=rnd.choice("SA")))
    for e in (a, b):
        for frame in flood:
            e.run(frame, 0)
        for i in range(20):
            r = e.run(build(CLIENT, VIP, 6, 41000 + i, 80, flags="A"), 0)
            assert r.effect == "hit", (e.name, i, r)
        n_half = sum(1 for _ in e.maps.raw_items("half_open"))
        assert n_half <= half_open_max(a.flow_max), (e.name, n_half)
        e.clear_flows()  # the kernel's LRU evicted other half-open entries than ours


def test_open_flows_counted_per_connection(fresh):
    """A flow opens when confirmed and closes at an established flow's FIN or RST, or when
    its entry is replaced while open (a reused 5-tuple, a backend gone); a half-open flow's
    RST, a FIN after a FIN, a retransmitted SYN count nothing. Both engines, per VIP and
    backend."""
    a, b = fresh

    def counts() -> tuple[int, int]:
        sums = [e.maps.percpu_sums("backend_stats") for e in (a, b)]
        both = [(sum(s.opened for s in x.values()), sum(s.closed for s in x.values()))
                for x in sums]
        assert both[0] == both[1], both
        vips = [e.maps.percpu_sums("vip_stats") for e in (a, b)]
        assert [(sum(s.opened for s in x.values()), sum(s.closed for s in x.values()))
                for x in vips] == both  # a flow counts on its VIP as on its backend
        return both[0]

    def send(sport: int, flags: str) -> None:
        run_both(a, b, build(CLIENT, VIP, 6, sport, 80, flags=flags), 0)

    base = counts()
    send(44000, "S")
    send(44000, "S")  # retransmitted: still half-open
    assert counts() == base
    send(44000, "A")
    assert counts() == (base[0] + 1, base[1])  # confirmed: open
    send(44000, "FA")
    send(44000, "FA")
    assert counts() == (base[0] + 1, base[1] + 1)  # closed once
    send(44001, "S")
    send(44001, "R")  # half-open: never opened, nothing closes
    assert counts() == (base[0] + 1, base[1] + 1)
    send(44002, "S")
    send(44002, "A")
    send(44002, "S")  # a new connection on the 5-tuple replaces the open one
    assert counts() == (base[0] + 2, base[1] + 2)
    send(44003, "A")
    send(44003, "A")  # picked up mid-stream and confirmed: established
    send(44003, "R")
    assert counts() == (base[0] + 3, base[1] + 3)
    for e in (a, b):  # a confirmed UDP flow replaced after its idle timeout
        e.configure(config(corpus_pool(udp_idle_timeout="100ms")))
    for _ in range(2):
        run_both(a, b, build(CLIENT, VIP, 17, 44004, 53, payload=b"q"), 0)
    assert counts() == (base[0] + 4, base[1] + 3)
    time.sleep(0.15)
    run_both(a, b, build(CLIENT, VIP, 17, 44004, 53, payload=b"q"), 0)
    assert counts() == (base[0] + 4, base[1] + 4)


def test_new_flows_over_the_rate_go_untracked(fresh):
    """flows.new_flow_rate_limit: a CPU inserts its share of dsr new flows per second; the
    rest are balanced by the table all the same, without an entry (their next packet is a
    new flow again). nat and fullnat flows, whose replies need the entry, are always
    inserted. The window restarts after a second. Same in both engines, on one CPU (the
    windows are per CPU)."""
    a, b = fresh
    share = 5
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # BPF_PROG_TEST_RUN counts on the caller's CPU
    try:
        for e in (a, b):
            e.configure(config(corpus_pool(new_flow_rate_limit=share * possible_cpus())))
        dsr = [run_both(a, b, build(CLIENT, VIP4, 6, 42000 + i, 81, flags="S"), 0)
               for i in range(share + 3)]
        assert [r.effect for r in dsr] == ["created"] * share + ["untracked"] * 3, dsr
        assert {(r.verdict, Ether(r.data)[Ether].dst) for r in dsr} == \
            {(dsr[0].verdict, Ether(dsr[0].data)[Ether].dst)}  # all sent to the one backend
        again = run_both(a, b, build(CLIENT, VIP4, 6, 42000 + share, 81, flags="A"), 0)
        assert again.effect == "untracked" and again.verdict == dsr[0].verdict
        nat = run_both(a, b, build(CLIENT, VIP, 6, 42100, 80, flags="S"), 0)
        assert nat.effect == "created", nat  # over the rate, still tracked
        time.sleep(1.05)
        r = run_both(a, b, build(CLIENT, VIP4, 6, 42050, 81, flags="S"), 0)
        assert r.effect == "created", r
    finally:
        os.sched_setaffinity(0, cpus)
        for e in (a, b):
            e.configure(config(CORPUS_CONFIG))


def test_reused_tuple_after_drain_is_balanced_anew(fresh):
    """A pure SYN on a tracked 5-tuple opens a new connection (the client reused its port):
    it is balanced anew, so a drained backend gets none, whether the old connection was seen
    to end (FIN, RST) or not (established). A half-open flow's retransmitted SYN, and every
    other packet, stays on its backend. Same in both engines."""
    a, b = fresh
    for e in (a, b):
        e.configure(config(corpus_pool(web=(WEB_8080, BE1))))
    on = {s: run_both(a, b, build(CLIENT, VIP, 6, s, 80, flags="S"), 0).backend
          for s in range(30000, 30060)}
    drained, other = "10.20.0.11:80", "10.20.0.12:8080"
    mine = [s for s, be in on.items() if be == drained]
    assert len(mine) >= 6, on
    ends = {s: ("FA", "R", "A")[i % 3] for i, s in enumerate(mine)}  # last packet of each

    def send(s: int, flags: str) -> tuple[str, str | None]:
        r = run_both(a, b, build(CLIENT, VIP, 6, s, 80, flags=flags), 0)
        return r.effect, r.backend

    for s, last in ends.items():
        assert send(s, "S") == ("hit", drained), s  # retransmitted SYN of a half-open flow
        assert send(s, "A") == ("hit", drained), s  # established
        assert send(s, last) == ("hit", drained), s
    for e in (a, b):
        e.configure(config(corpus_pool(web=(WEB_8080, Backend(BE1, weight=0)))))
    for s, last in ends.items():
        assert send(s, last) == ("hit", drained), s  # the old connection's packets stay
        assert send(s, "S") == ("rebalanced", other), (s, last)  # a new one does not
        assert send(s, "S") == ("hit", other), s


def nginx_wrr(weights: dict[str, int]) -> Iterator[str]:
    """nginx's smooth weighted round robin, as ngx_http_upstream_get_peer writes it: every
    peer's current weight grows by its weight, the largest (first of equals) is chosen and
    loses the total. An expectation independent of model/sequence.py."""
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    while True:
        best = None
        for peer, w in weights.items():
            if w:
                current[peer] += w
                if best is None or current[peer] > current[best]:
                    best = peer
        current[best] -= total
        yield best


def test_wrr_new_flows_take_nginx_turns(fresh):
    """scheduler wrr: new flows take the VIP's backends in nginx's smooth order (3:1: a a b a),
    one turn a flow: a half-open flow's retransmitted SYN and a confirmed flow's packets are
    flow-table hits and take no turn. rr: equal turns, weight ignored but weight 0 (drained)
    still takes none. Same in both engines."""
    a, b = fresh
    three, one = "10.20.0.12:8080", "10.20.0.11:80"
    for e in (a, b):
        e.configure(config(corpus_pool(web=(Backend(BE2, port=8080, weight=3),
                                             Backend(BE1, weight=1)), scheduler="wrr")))
    got = []
    for i in range(40):
        r = run_both(a, b, build(CLIENT, VIP, 6, 31000 + i, 80, flags="S"), 0)
        assert r.effect == "created", r
        got.append(r.backend)
        if i % 5 == 0:  # retransmitted SYN, then the handshake's ACK: same backend, no turn
            for flags in ("S", "A"):
                again = run_both(a, b, build(CLIENT, VIP, 6, 31000 + i, 80, flags=flags), 0)
                assert (again.effect, again.backend) == ("hit", r.backend), (i, flags, again)
    assert got == list(islice(nginx_wrr({three: 3, one: 1}), len(got)))
    assert (got.count(three), got.count(one)) == (30, 10)

    for e in (a, b):
        e.configure(config(corpus_pool(
            web=(Backend(BE2, port=8080, weight=3), Backend(BE1, weight=1),
                 Backend("10.20.0.13", weight=0)), scheduler="rr")))
    got = [run_both(a, b, build(CLIENT, VIP, 6, 32000 + i, 80, flags="S"), 0).backend
           for i in range(10)]
    assert got == [three, one] * 5, got


def test_source_hash_keeps_a_client_on_one_backend(fresh):
    """scheduler source-hash: every flow of one client address (any port, TCP or UDP) goes to
    one backend; clients spread over the backends by the Maglev ring. Same in both engines."""
    a, b = fresh
    bes = (WEB_8080, BE1, "10.20.0.13")
    for e in (a, b):
        e.configure(config(corpus_pool(web=bes, dns=bes[1:], scheduler="source-hash")))
    per_client: dict[str, set[str | None]] = {}
    for ci, client in enumerate(CLIENTS[:8]):
        for i in range(12):
            r = run_both(a, b, build(client, VIP, 6, 33000 + 17 * i + ci, 80, flags="S"), 0)
            assert r.effect == "created", r
            per_client.setdefault(client, set()).add(r.backend)
        udp = {run_both(a, b, build(client, VIP, 17, 34000 + i, 53), 0).backend
               for i in range(6)}
        assert len(udp) == 1, (client, udp)
    assert all(len(s) == 1 for s in per_client.values()), per_client
    assert len(set().union(*per_client.values())) >= 2, per_client


def test_random_is_a_weighted_per_flow_pick(fresh):
    """scheduler random: each new flow's backend is a pseudo-random pick weighted by weight
    (the 5-tuple hashed with a second seed over the weighted sequence): reproducible, so both
    engines pick the same; 400 flows at 3:1 land near 300/100."""
    a, b = fresh
    three, one = "10.20.0.12:8080", "10.20.0.11:80"
    for e in (a, b):
        e.configure(config(corpus_pool(web=(Backend(BE2, port=8080, weight=3),
                                             Backend(BE1, weight=1)), scheduler="random")))
    got = [run_both(a, b, build(CLIENT, VIP, 6, 35000 + i, 80, flags="S"), 0).backend
           for i in range(400)]
    assert 260 <= got.count(three) <= 340 and got.count(three) + got.count(one) == 400, \
        got.count(three)
    assert got[:40] != list(islice(nginx_wrr({three: 3, one: 1}), 40))  # not the wrr order


def test_least_conn_follows_open_connections(fresh):
    """scheduler least-conn (IPVS wlc): a new flow goes to the backend with the fewest open
    connections per weight (the first of equals), counted per connection: at its
    confirmation (a half-open flow does not count) and its end (FIN, RST). Ends the data
    path cannot see are the agent's sweep's (agent/connsweep.py): an evicted entry, a UDP
    flow idle past the timeout. Same in both engines, against a count kept here."""
    a, b = fresh
    heavy, light = "10.20.0.12:8080", "10.20.0.11:80"  # weights 2 and 1, in ring order
    udp1, udp2 = "10.20.0.11:53", "10.20.0.13:53"
    for e in (a, b):
        e.configure(config(corpus_pool(
            web=(Backend(BE2, port=8080, weight=2), Backend(BE1, weight=1)),
            dns=(BE1, "10.20.0.13"), scheduler="least-conn", udp_idle_timeout="1s")))
        connsweep.sweep(e.maps, 10**9)  # earlier tests' flows were cleared unseen
    weight = {heavy: 2, light: 1, udp1: 1, udp2: 1}
    open_ = dict.fromkeys(weight, 0)
    held: list[tuple[int, str]] = []

    def expect(*bes: str) -> str:
        return min(bes, key=lambda x: Fraction(open_[x], weight[x]))  # first of equals

    def connect(sport: int, confirm: bool = True) -> str:
        r = run_both(a, b, build(CLIENT, VIP, 6, sport, 80, flags="S"), 0)
        assert (r.effect, r.backend) == ("created", expect(heavy, light)), (sport, open_, r)
        if confirm:
            run_both(a, b, build(CLIENT, VIP, 6, sport, 80, flags="A"), 0)
            open_[r.backend] += 1
            held.append((sport, r.backend))
        return r.backend

    for i in range(12):
        connect(36000 + i, confirm=i % 4 != 3)  # every fourth stays half-open: not counted
    assert open_ == {heavy: 6, light: 3, udp1: 0, udp2: 0}
    for sport, be in [h for h in held if h[1] == heavy][:4]:  # four of heavy's end
        run_both(a, b, build(CLIENT, VIP, 6, sport, 80, flags="FA" if sport % 2 else "R"), 0)
        open_[be] -= 1
    assert [connect(36100 + i) for i in range(3)] == [heavy, heavy, heavy]

    # Evicted (as the LRU would: no packet says so): light's connections no longer weigh
    # once the agent's sweep has seen they are gone.
    for sport, be in held:
        if be == light:
            for e in (a, b):
                e.maps.delete("flows", flow_key(CLIENT, sport, VIP, 80, 6))
            open_[light] -= 1
    r = run_both(a, b, build(CLIENT, VIP, 6, 36200, 80, flags="S"), 0)  # half-open: no count
    assert r.backend == heavy, r  # before the sweep: light's stale 3 > heavy's 5 / 2
    for e in (a, b):
        connsweep.sweep(e.maps, 10**9)
    assert [connect(36300 + i) for i in range(2)] == [light, light]

    # UDP: two confirmed flows to each backend, then idle past the timeout: the sweep finds
    # them over (their next datagram would be a new flow), and they weigh nothing.
    for i in range(3):
        r = run_both(a, b, build(CLIENT, VIP, 17, 37000 + i, 53), 0)
        assert r.backend == expect(udp1, udp2), (i, r)
        run_both(a, b, build(CLIENT, VIP, 17, 37000 + i, 53), 0)
        open_[r.backend] += 1
    assert (open_[udp1], open_[udp2]) == (2, 1)
    time.sleep(1.1)
    for e in (a, b):
        connsweep.sweep(e.maps, 10**9)
    open_[udp1] = open_[udp2] = 0
    assert run_both(a, b, build(CLIENT, VIP, 17, 37100, 53), 0).backend == udp1  # not udp2


def test_udp_flow_idle_past_the_timeout_is_a_new_flow(fresh):
    """A UDP flow idle for flows.udp_idle_timeout is over: the client's next datagram is
    balanced anew (a drained backend gets no more); before that, and with 0, it stays."""
    a, b = fresh
    drained, other = "10.20.0.11:53", "10.20.0.12:53"

    def configure(idle: str, weight: int = 1) -> None:
        text = corpus_pool(dns=(Backend(BE1, weight=weight), BE2), udp_idle_timeout=idle)
        for e in (a, b):
            e.configure(config(text))

    def send(s: int) -> tuple[str, str | None]:
        r = run_both(a, b, build(CLIENT, VIP, 17, s, 53, payload=b"q"), 0)
        return r.effect, r.backend

    configure("200ms")
    mine = [s for s in range(31000, 31040) if send(s)[1] == drained]
    assert len(mine) >= 4
    keep, expire = mine[: len(mine) // 2], mine[len(mine) // 2 :]
    configure("200ms", weight=0)  # drained: its flows continue while they are active
    for s in mine:
        assert send(s) == ("hit", drained), s
    time.sleep(0.1)
    for s in keep:  # active again within the timeout
        assert send(s) == ("hit", drained), s
    time.sleep(0.15)
    for s in keep:
        assert send(s) == ("hit", drained), s
    for s in expire:  # idle 250 ms > 200 ms: a new flow, elsewhere
        assert send(s) == ("rebalanced", other), s
        assert send(s) == ("hit", other), s
    # A stamp from a moment later (a reply on another CPU read the clock after this packet
    # did) is idle 0, not idle for ever.
    key = flow_key(CLIENT, keep[0], VIP, 53, 17)
    for e in (a, b):
        f = e.maps.lookup("flows", key)
        f.last_ns = coarse_ns() + 50_000_000
        e.maps.update("flows", key, f)
    assert send(keep[0]) == ("hit", drained)
    configure("0", weight=0)  # 0: never
    time.sleep(0.3)
    for s in keep:
        assert send(s) == ("hit", drained), s


# --- hypothesis -------------------------------------------------------------------------------

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def ingresses(bench) -> st.SearchStrategy[int]:
    return st.sampled_from(bench.ingresses)


@st.composite
def well_formed(draw) -> bytes:
    addr, port, proto = draw(st.sampled_from(SERVICES))
    p = 6 if proto == "tcp" else 17
    return build(draw(st.sampled_from(CLIENTS)), addr, p, draw(st.integers(1, 65535)),
                 draw(st.sampled_from((port, port, 22))),
                 flags=draw(st.sampled_from(("S", "A", "PA", "FA", "R", "SA", ""))),
                 payload=draw(st.binary(max_size=700)), ttl=draw(st.integers(0, 255)),
                 tos=draw(st.integers(0, 255)),
                 vlan=draw(st.none() | st.integers(0, 4094)), options=draw(st.booleans()),
                 frag=draw(st.sampled_from((0, 0, 0, 1, 185))),
                 more_frags=draw(st.booleans()), udp_zero=draw(st.booleans()))


def test_fast_builder_is_scapy_byte_for_byte():
    """fuzz.build() (struct) makes exactly what scapy builds from the same fields."""
    from scapy.layers.inet import IPOption_Router_Alert

    @given(st.sampled_from((6, 17)), st.integers(0, 65535), st.integers(0, 65535),
           st.sampled_from(("S", "PA", "FA", "R", "")), st.binary(max_size=64),
           st.integers(0, 255), st.integers(0, 255), st.none() | st.integers(0, 4094),
           st.booleans(), st.integers(0, 8191), st.booleans())
    @settings(max_examples=200, deadline=None, derandomize=True)
    def check(proto, sport, dport, flags, payload, ttl, tos, vlan, options, frag, mf):
        ip = IP(src=CLIENT, dst=VIP, ttl=ttl, tos=tos, frag=frag, flags="MF" if mf else 0,
                options=[IPOption_Router_Alert()] if options else [])
        l4 = (TCP(sport=sport, dport=dport, flags=flags, seq=1000) if proto == 6
              else UDP(sport=sport, dport=dport))
        e = eth()
        pkt = (e / Dot1Q(vlan=vlan) if vlan is not None else e) / ip / l4 / payload
        assert build(CLIENT, VIP, proto, sport, dport, flags=flags, payload=payload, ttl=ttl,
                     tos=tos, vlan=vlan, options=options, frag=frag, more_frags=mf) == bytes(pkt)

    check()


def test_random_frames(bench, fresh):
    a, b = fresh

    @given(st.binary(min_size=14, max_size=300), ingresses(bench))
    @SETTINGS
    def check(frame, ingress):
        run_both(a, b, frame, ingress)

    check()


def test_mutated_frames(bench, fresh):
    a, b = fresh

    @given(well_formed(), st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=4),
           st.integers(0, 2**32), ingresses(bench))
    @SETTINGS
    def check(frame, names, seed, ingress):
        run_both(a, b, mutate(frame, names, random.Random(seed)), ingress)

    check()


def test_well_formed_frames_verify(bench, fresh):
    """Well-formed frames of every kind: whatever the engines rewrite, scapy recomputes the
    same checksums."""
    a, b = fresh

    @given(well_formed(), ingresses(bench))
    @SETTINGS
    def check(frame, ingress):
        r = run_both(a, b, frame, ingress)
        if r.data != frame:
            assert scapy_recomputed_errors(r.data) == []

    check()


step = st.one_of(
    st.tuples(st.just("config"), st.integers(0, 2**32)),
    st.tuples(st.just("packet"), st.integers(0, len(CLIENTS) - 1), st.integers(20000, 20020),
              st.integers(0, len(SERVICES) - 1), st.sampled_from(("S", "A", "FA", "R", "PA")),
              st.booleans()),
)


def test_flows_over_changing_backend_sets(bench, fresh):
    """Sequences of forward packets, replies of the flows they made, and config changes
    (backends added, removed, reweighted, marked down): same decisions and the same flow
    tables throughout."""
    a, b = fresh

    @given(st.lists(step, min_size=1, max_size=40))
    @settings(max_examples=100, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    def check(steps):
        for e in (a, b):
            e.clear_flows()
            e.configure(base_config(a.flow_max))
        d0 = bench.ifindex["d0"]
        for s in steps:
            if s[0] == "config":
                reconfigure((a, b), random.Random(s[1]), down_share=0.2)
                continue
            _, ci, sport, si, flags, reply = s
            addr, port, proto = SERVICES[si]
            p = 6 if proto == "tcp" else 17
            r = run_both(a, b, build(CLIENTS[ci], addr, p, sport, port, flags=flags), d0)
            if reply and r.backend:
                be, bport = r.backend.split(":")
                run_both(a, b, build(be, CLIENTS[ci], p, int(bport), sport, flags="A"), d0)
        same_state(a, b)

    check()


# --- the fuzz ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_pair(bench):
    with engine_pair(base_config(), bench.attached) as ab:
        yield ab


def test_fuzz_100k_frames_no_difference(bench, fuzz_pair):
    a, b = fuzz_pair
    for e in (a, b):
        e.clear_flows()
        e.configure(base_config())
    t = time.monotonic()
    rep = run_fuzz(a, b, FrameGen(2024, bench), FUZZ_FRAMES)
    assert rep.difference is None, rep.difference
    same_state(a, b)
    assert rep.frames == FUZZ_FRAMES
    # It reached every outcome and every flow effect, across backend-set changes.
    assert {c.name.lower() for c in OUTCOMES} <= set(rep.verdicts), rep.verdicts
    assert set(EFFECTS) <= set(rep.effects), rep.effects
    assert rep.epochs >= 10
    print(f"\nfuzz: {FUZZ_FRAMES} frames in {time.monotonic() - t:.1f}s; "
          + ", ".join(f"{n} {rep.rate(n):.0f} frames/s" for n in rep.seconds))


def test_fuzz_finds_a_planted_difference(bench, fuzz_pair, monkeypatch):
    """The fuzz can fail: a data path that forgets the UDP zero-checksum rule is caught."""
    from xdplb.userspace import csum

    a, b = fuzz_pair
    for e in (a, b):
        e.clear_flows()
        e.configure(base_config())
    monkeypatch.setattr(csum, "udp_fixup", lambda old, new: new)
    rep = run_fuzz(a, b, FrameGen(7, bench), 20000)
    assert rep.difference is not None and rep.frames < 20000


def test_checksum_checks_can_fail():
    good = build(CLIENT, VIP, 6, 1, 80, payload=b"data")
    bad_ip, bad_tcp = bytearray(good), bytearray(good)
    bad_ip[24] ^= 1
    bad_tcp[-1] ^= 1
    assert checksum_errors(good) == [] and scapy_recomputed_errors(good) == []
    assert checksum_errors(bytes(bad_ip)) and scapy_recomputed_errors(bytes(bad_ip))
    assert checksum_errors(bytes(bad_tcp)) and scapy_recomputed_errors(bytes(bad_tcp))
    assert rewrite_errors(good, bytes(bad_tcp)) and not rewrite_errors(bytes(bad_tcp), good)
