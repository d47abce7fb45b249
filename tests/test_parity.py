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
from socket import inet_aton, inet_ntoa

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
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

from xdplb.abi.layout import ADDR_FILTER_BITS, OUTCOMES, coarse_ns
from xdplb.config import Config
from xdplb.inspect.trace import flow_key
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
VIP, VIP2, VIP3 = "10.200.0.10", "10.200.0.20", "10.200.0.30"

# One VIP per next-hop outcome, each with one backend, so every frame's fate is known.
CORPUS_CONFIG = f"""
vips:
  - {{name: web, address: {VIP}, port: 80, protocol: tcp,
      backends: [{{address: 10.20.0.12, port: 8080}}]}}
  - {{name: dns, address: {VIP}, port: 53, protocol: udp, backends: [{{address: 10.20.0.11}}]}}
  - {{name: redirect, address: {VIP2}, port: 443, protocol: tcp,
      backends: [{{address: 10.30.0.5}}]}}
  - {{name: foreign, address: {VIP2}, port: 80, protocol: tcp,
      backends: [{{address: 10.40.0.5}}]}}
  - {{name: smallmtu, address: {VIP2}, port: 81, protocol: tcp,
      backends: [{{address: 10.50.0.5}}]}}
  - {{name: noneigh, address: {VIP3}, port: 80, protocol: tcp,
      backends: [{{address: 10.20.0.99}}]}}
  - {{name: blackhole, address: {VIP3}, port: 81, protocol: tcp,
      backends: [{{address: 10.60.0.5}}]}}
  - {{name: drained, address: {VIP3}, port: 82, protocol: tcp,
      backends: [{{address: 10.20.0.11, weight: 0}}]}}
  - {{name: gateway, address: {VIP3}, port: 83, protocol: udp,
      backends: [{{address: 10.70.0.5}}]}}
maglev: {{table_size: 251, seed: 3}}
flows: {{max_entries: 4096}}
"""


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
    yield Case("redirect to another attached interface",
               build(CLIENT, VIP2, 6, 40000, 443), "redirect", "created", rewritten=True)
    yield Case("egress not attached", build(CLIENT, VIP2, 6, 40000, 80), "pass_foreign_egress",
               "created", rewritten=True)
    yield Case("larger than the egress MTU (FRAG_NEEDED)",
               build(CLIENT, VIP2, 6, 40000, 81, payload=bytes(700)), "pass_fib", "created",
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
    yield Case("TTL 1", build(CLIENT, VIP, 6, 40000, 80, ttl=1), "drop_ttl")
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
    yield Case("VLAN-tagged (tag kept)", vlan, "tx", "created", rewritten=True)
    qinq = bytes(eth() / Dot1Q(vlan=1) / Dot1Q(vlan=2) / IP(src=CLIENT, dst=VIP) / TCP(dport=80))
    yield Case("QinQ", qinq, "pass_not_ipv4")
    yield Case("ARP", bytes(eth("ff:ff:ff:ff:ff:ff") / ARP(pdst="10.10.0.1")), "pass_not_ipv4")
    yield Case("IPv6", bytes(eth() / IPv6(dst="fd00::1") / TCP(dport=80)), "pass_not_ipv4")
    yield Case("broadcast", bytes(eth("ff:ff:ff:ff:ff:ff") / IP(src=CLIENT, dst="10.10.0.255")
                                  / UDP(dport=80)), "pass_not_vip")
    yield Case("ICMP to a VIP", bytes(eth() / IP(src=CLIENT, dst=VIP) / ICMP()), "pass_not_vip")
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


def test_corpus_same_fate_in_both(bench, fresh):
    a, b = fresh
    seen = set()
    for case in corpus():
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
    two = CORPUS_CONFIG.replace("[{address: 10.20.0.12, port: 8080}]",
                                "[{address: 10.20.0.12, port: 8080}, {address: 10.20.0.11}]")
    for e in (a, b):
        e.configure(config(two))
    rnd = random.Random(5)
    sports = rnd.sample(range(30000, 40000), 60)
    for s in sports:
        run_both(a, b, build(CLIENT, VIP, 6, s, 80), 0)
    for e in (a, b):
        e.configure(config(CORPUS_CONFIG.replace("address: 10.20.0.12, port: 8080",
                                                 "address: 10.20.0.11")))
    effects = [run_both(a, b, build(CLIENT, VIP, 6, s, 80, flags="A"), 0).effect
               for s in sports]
    assert "rebalanced" in effects and "hit" in effects


def test_reused_tuple_after_drain_is_balanced_anew(fresh):
    """A pure SYN on a tracked 5-tuple opens a new connection (the client reused its port):
    it is balanced anew, so a drained backend gets none, whether the old connection was seen
    to end (FIN, RST) or not (established). A half-open flow's retransmitted SYN, and every
    other packet, stays on its backend. Same in both engines."""
    a, b = fresh
    two = CORPUS_CONFIG.replace("[{address: 10.20.0.12, port: 8080}]",
                                "[{address: 10.20.0.12, port: 8080}, {address: 10.20.0.11}]")
    for e in (a, b):
        e.configure(config(two))
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
        e.configure(config(two.replace("{address: 10.20.0.11}",
                                       "{address: 10.20.0.11, weight: 0}")))
    for s, last in ends.items():
        assert send(s, last) == ("hit", drained), s  # the old connection's packets stay
        assert send(s, "S") == ("rebalanced", other), (s, last)  # a new one does not
        assert send(s, "S") == ("hit", other), s


def test_udp_flow_idle_past_the_timeout_is_a_new_flow(fresh):
    """A UDP flow idle for flows.udp_idle_timeout is over: the client's next datagram is
    balanced anew (a drained backend gets no more); before that, and with 0, it stays."""
    a, b = fresh
    dns = ("[{address: 10.20.0.11}]", "[{address: 10.20.0.11}, {address: 10.20.0.12}]")
    two = CORPUS_CONFIG.replace(*dns)
    drained, other = "10.20.0.11:53", "10.20.0.12:53"

    def configure(idle: str, weight: int = 1) -> None:
        text = two.replace("{address: 10.20.0.11}", f"{{address: 10.20.0.11, weight: {weight}}}")
        text = text.replace("max_entries: 4096", f"max_entries: 4096, udp_idle_timeout: {idle}")
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
