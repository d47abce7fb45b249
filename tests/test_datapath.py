"""The data path, frames in, frames out, every byte checked: the real BPF program under
BPF_PROG_TEST_RUN and the scapy data path, each test run against both engines.

Runs inside a private network namespace holding veth interfaces, addresses and permanent
neighbours, so bpf_fib_lookup resolves next hops as it would on a live balancer.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections import Counter
from dataclasses import replace

import pytest
from pools import BE1, DNS, VIP, WEB, Backend, Vip, pool_yaml
from pyroute2 import netns as pr_netns
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.utils import checksum
from testkit.pktcheck import checksum_errors, rewrite_errors

from xdplb.abi.codec import vip_key
from xdplb.config import Config, parse_config
from xdplb.model.hashing import flow_hash
from xdplb.offline.engines import Engine, open_engine

pytestmark = pytest.mark.root

NS = f"xlt-dp-{os.getpid()}"
LB_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
LB_MAC1 = "02:00:00:00:00:03"  # d1's: a frame arriving there is for the balancer only to it
BE_MACS = {"10.20.0.11": "02:00:00:00:00:11", "10.20.0.12": "02:00:00:00:00:12",
           "10.30.0.5": "02:00:00:00:00:35"}
CLIENT = "10.10.0.2"


def config(web: tuple[Backend | str, ...] = WEB.backends, far: str = "10.30.0.5",
           table: int | None = None, **flows: int) -> Config:
    """The module's pool: web (weighted, one backend on another port), dns, far (a backend on
    d1), empty (drained), noneigh (a backend without a neighbour); tests vary web's backends,
    far's backend, its table size and flow settings."""
    return parse_config(pool_yaml(
        replace(WEB, backends=web, table_size=table), DNS,
        Vip("far", 80, (far,), address="10.200.0.20"),
        Vip("empty", 80, (Backend(BE1, weight=0),), address="10.200.0.30"),
        Vip("noneigh", 80, ("10.20.0.99",), address="10.200.0.40"),
        table_size=65537, seed=7, flows={"max_entries": 65536, **flows}), "test.yaml")


def _ip(*args: str) -> None:
    subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True)


@pytest.fixture(scope="module", params=["bpf", "scapy"])
def lab(request):
    """A namespace with two links (d0: clients + backends, d1: another backend net), and an
    engine of each kind in it."""
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        # veth pairs, not dummy links: this kernel has no dummy module.
        _ip("link", "add", "d0", "address", LB_MAC, "type", "veth", "peer", "name", "d0p")
        _ip("link", "add", "d1", "address", LB_MAC1, "type", "veth", "peer", "name", "d1p")
        for a, dev in (("10.10.0.1/24", "d0"), ("10.20.0.1/24", "d0"), ("10.30.0.1/24", "d1")):
            _ip("addr", "add", a, "dev", dev)
        for dev in ("d0", "d0p", "d1", "d1p", "lo"):
            _ip("link", "set", dev, "up")
        _ip("neigh", "add", CLIENT, "lladdr", CLIENT_MAC, "dev", "d0", "nud", "permanent")
        for addr, mac in BE_MACS.items():
            dev = "d1" if addr.startswith("10.30.") else "d0"
            _ip("neigh", "add", addr, "lladdr", mac, "dev", dev, "nud", "permanent")
        subprocess.run(["ip", "netns", "exec", NS, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True)
        pr_netns.pushns(NS)
        try:
            from xdplb.kernel import xdp_link

            idx = {d: xdp_link.ifindex(d) for d in ("d0", "d1")}
            engine = open_engine(request.param, config(), [idx["d0"], idx["d1"]])
            try:
                yield engine, idx
            finally:
                engine.close()
        finally:
            pr_netns.popns()
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.fixture
def eng(lab, monkeypatch):
    """The engine, flows cleared; every frame it rewrites has its checksums verified."""
    engine, idx = lab
    engine.clear_flows()
    run = engine.run

    def checked(frame: bytes, ingress_ifindex: int = 0):
        r = run(frame, ingress_ifindex)
        assert rewrite_errors(frame, r.data) == []
        return r

    monkeypatch.setattr(engine, "run", checked)
    return engine, idx["d0"], idx["d1"]


def syn(sport=40000, dst=VIP, dport=80, ttl=64, flags="S", payload=b"", **ip):
    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT, dst=dst, ttl=ttl, **ip)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=1000) / payload)


def udp(sport=40000, dst=VIP, dport=53, payload=b"hello", chksum=None):
    pkt = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT, dst=dst) / UDP(
        sport=sport, dport=dport) / payload
    if chksum is not None:
        pkt[UDP].chksum = chksum
    return bytes(pkt)


def assert_checksums(raw: bytes) -> Ether:
    """IPv4 header and TCP/UDP checksums of a frame are valid (checked by scapy)."""
    assert checksum_errors(raw) == []
    return Ether(raw)


def expected_backend(engine: Engine, vip_name: str, src: str, dst: str, sport: int,
                     dport: int, proto: int) -> str:
    """Where the Python model (hash + Maglev ring) says a new flow goes."""
    import ipaddress

    v = next(v for v in engine.state.vips if v.name == vip_name)
    h = flow_hash(ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
                  sport, dport, proto, engine.state.seed)
    bid = int(v.ring[h % v.ring_size])
    return next(b.address for b in v.backends if b.backend_id == bid)


def test_non_vip_passes_byte_identical(eng):
    engine, d0, _ = eng
    frames = [
        syn(dst="10.10.0.1", dport=22),
        syn(dst=VIP, dport=443),  # VIP address, port not balanced
        udp(dst="8.8.8.8"),
        bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.10.0.1")),
        bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(dst="fd00::1") / TCP(dport=80)),
        bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT, dst=VIP) / ICMP(type=13)),
        bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src=CLIENT,
              dst="10.10.0.255") / UDP(dport=80)),
    ]
    for f in frames:
        r = engine.run(f, d0)
        assert r.verdict == "pass"
        assert r.data == f


def test_new_flow_dnat_tx(eng):
    engine, d0, _ = eng
    r = engine.run(syn(sport=41000), d0)
    assert r.verdict == "tx"
    assert r.counters.get("new_flow") == 1 and r.counters.get("tx") == 1
    pkt = assert_checksums(r.data)
    want = expected_backend(engine, "web", CLIENT, VIP, 41000, 80, 6)
    assert pkt[IP].dst == want
    assert pkt[IP].src == CLIENT  # backends see the real client
    assert pkt[IP].ttl == 63
    assert pkt[TCP].dport == (8080 if want == "10.20.0.12" else 80)
    assert pkt[TCP].sport == 41000
    assert pkt[Ether].dst == BE_MACS[want] and pkt[Ether].src == LB_MAC
    # Same flow again: a flow-table hit to the same backend.
    r2 = engine.run(syn(sport=41000, flags="A"), d0)
    assert r2.counters.get("flow_hit") == 1
    assert Ether(r2.data)[IP].dst == want


def test_hash_and_maglev_match_python_and_weights(eng):
    """Every new flow goes where Python's hash + ring predict; 3:1 weights hold."""
    engine, d0, _ = eng
    seen: Counter[str] = Counter()
    for sport in range(20000, 24000):
        r = engine.run(syn(sport=sport), d0)
        got = Ether(r.data)[IP].dst
        assert got == expected_backend(engine, "web", CLIENT, VIP, sport, 80, 6), sport
        seen[got] += 1
    share = seen["10.20.0.11"] / sum(seen.values())
    assert 0.72 < share < 0.78, seen


def test_reply_reverse_nat(eng):
    engine, d0, _ = eng
    sport = next(s for s in range(30000, 31000)
                 if expected_backend(engine, "web", CLIENT, VIP, s, 80, 6) == "10.20.0.12")
    engine.run(syn(sport=sport), d0)
    reply = bytes(Ether(src=BE_MACS["10.20.0.12"], dst=LB_MAC)
                  / IP(src="10.20.0.12", dst=CLIENT, ttl=64)
                  / TCP(sport=8080, dport=sport, flags="SA") / (b"x" * 33))
    r = engine.run(reply, d0)
    assert r.verdict == "tx" and r.counters.get("reply") == 1
    pkt = assert_checksums(r.data)
    assert (pkt[IP].src, pkt[TCP].sport) == (VIP, 80)
    assert (pkt[IP].dst, pkt[TCP].dport) == (CLIENT, sport)
    assert pkt[IP].ttl == 63 and pkt[Ether].dst == CLIENT_MAC
    # A reply-looking packet of an untracked flow passes untouched.
    stray = bytes(Ether(src=BE_MACS["10.20.0.12"], dst=LB_MAC)
                  / IP(src="10.20.0.12", dst=CLIENT) / TCP(sport=8080, dport=sport + 1))
    r = engine.run(stray, d0)
    assert r.verdict == "pass" and r.data == stray


def test_udp_checksums(eng):
    engine, d0, _ = eng
    r = engine.run(udp(sport=5555, chksum=0), d0)
    assert r.verdict == "tx"
    pkt = assert_checksums(r.data)
    assert pkt[UDP].chksum == 0  # "no checksum" stays so
    r = engine.run(udp(sport=5556, payload=b"some payload"), d0)
    pkt = assert_checksums(r.data)
    assert pkt[UDP].chksum != 0


def test_random_payloads_keep_checksums_valid(eng):
    engine, d0, _ = eng
    rnd = random.Random(1)
    for _ in range(300):
        payload = rnd.randbytes(rnd.randrange(0, 200))
        sport = rnd.randrange(1024, 65535)
        f = (syn(sport=sport, flags="PA", payload=payload) if rnd.random() < 0.5
             else udp(sport=sport, payload=payload))
        r = engine.run(f, d0)
        assert r.verdict == "tx"
        assert_checksums(r.data)


def test_redirect_to_other_interface(eng):
    engine, d0, d1 = eng
    r = engine.run(syn(dst="10.200.0.20"), d0)
    assert r.verdict == "redirect" and r.counters.get("redirect") == 1
    pkt = assert_checksums(r.data)
    assert pkt[IP].dst == "10.30.0.5" and pkt[Ether].dst == BE_MACS["10.30.0.5"]


def test_no_neighbour_passes_natted_without_ttl_change(eng):
    engine, d0, _ = eng
    r = engine.run(syn(dst="10.200.0.40"), d0)
    assert r.verdict == "pass" and r.counters.get("fib_miss") == 1
    pkt = assert_checksums(r.data)
    assert pkt[IP].dst == "10.20.0.99" and pkt[IP].ttl == 64  # the kernel decrements


def test_drops_by_rule(eng):
    engine, d0, _ = eng
    cases = {
        "drop_fragment": bytes(Ether(src=CLIENT_MAC, dst=LB_MAC)
                               / IP(src=CLIENT, dst=VIP, flags="MF", frag=0) / TCP(dport=80)),
        "drop_ip_options": syn(options=[IPOption_Router_Alert()]),
        "drop_no_backend": syn(dst="10.200.0.30"),
    }
    for counter, frame in cases.items():
        r = engine.run(frame, d0)
        assert r.verdict == "drop", counter
        assert r.counters.get(counter) == 1, (counter, r.counters)
    # The same fragment and options to a non-VIP pass untouched.
    for f in (bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT, dst="10.10.0.1",
                                                           frag=10) / (b"x" * 20)),
              syn(dst="10.10.0.1", options=[IPOption_Router_Alert()])):
        r = engine.run(f, d0)
        assert r.verdict == "pass" and r.data == f


def test_ttl_expiry_to_a_vip_gets_time_exceeded_from_the_vip(eng):
    """TTL 1 or 0 to a VIP: the sender gets Time Exceeded from the VIP, quoting its packet as
    sent (IPv4 header and 8 bytes), checked against what scapy builds; no flow is made. A
    reply with TTL 1 goes to the kernel untouched (it routes it and sends the error)."""
    engine, d0, _ = eng
    for ttl in (1, 0):
        f = syn(sport=41000 + ttl, ttl=ttl, payload=b"x" * 100)
        r = engine.run(f, d0)
        assert (r.verdict, r.counters, r.effect) == ("tx", {"ttl_exceeded": 1, "tx": 1},
                                                     "none"), ttl
        sent = Ether(f)
        want = (Ether(src=sent.dst, dst=sent.src) / IP(src=VIP, dst=CLIENT, ttl=64, id=0)
                / ICMP(type=11, code=0) / bytes(sent[IP])[:28])
        assert r.data == bytes(want), (r.data.hex(), bytes(want).hex())
    addr, port = engine.run(syn(sport=41001), d0).backend.split(":")  # the reply's flow
    reply = bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=addr, dst=CLIENT, ttl=1)
                  / TCP(sport=int(port), dport=41001, flags="SA"))
    r = engine.run(reply, d0)
    assert (r.verdict, r.data, r.counters) == ("pass", reply, {"pass_ttl": 1})


def test_malformed_pass_untouched(eng):
    engine, d0, _ = eng
    good = syn()
    eth_ip = 14 + 20
    bad_ihl = bytearray(good)
    bad_ihl[14] = 0x43  # IHL 3
    long_len = bytearray(good)
    long_len[16:18] = (2000).to_bytes(2, "big")
    short_len = bytearray(good)
    short_len[16:18] = (30).to_bytes(2, "big")  # shorter than IP + TCP headers
    short_len[24:26] = b"\0\0"  # with a right header checksum: the length's rule decides
    short_len[24:26] = checksum(bytes(short_len[14:34])).to_bytes(2, "big")
    bad_doff = bytearray(good)
    bad_doff[eth_ip + 12] = 0x20  # data offset 2
    frames = {
        "truncated ip": good[:14 + 12],
        "truncated tcp": good[: eth_ip + 10],
        "bad ihl": bytes(bad_ihl),
        "total length past end": bytes(long_len),
        "total length too short": bytes(short_len),
        "bad tcp doff": bytes(bad_doff),
        "truncated udp": udp()[: eth_ip + 4],
        "truncated vlan": bytes(Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x8100)) + b"\x00",
    }
    for what, f in frames.items():
        if len(f) < 14:
            continue
        r = engine.run(f, d0)
        assert r.verdict == "pass", what
        assert r.data == f, what
        assert r.counters.get("pass_malformed") == 1, (what, r.counters)


def test_vlan_tagged(eng):
    """No VLAN is served: a tagged frame to a VIP goes to the kernel untouched (its VLAN
    device takes it), never redirected with the tag still on; nothing is tracked."""
    engine, d0, _ = eng
    f = bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1Q(vlan=42) / IP(src=CLIENT, dst=VIP)
              / TCP(sport=45000, dport=80, flags="S"))
    r = engine.run(f, d0)
    assert (r.verdict, r.data, r.counters, r.effect) == ("pass", f, {"pass_vlan": 1}, "none")
    # QinQ is not parsed: passed untouched.
    qq = bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1Q(vlan=1) / Dot1Q(vlan=2)
               / IP(src=CLIENT, dst=VIP) / TCP(dport=80))
    r = engine.run(qq, d0)
    assert r.verdict == "pass" and r.data == qq


def test_established_flow_survives_ring_change(eng):
    """The flow table wins over the Maglev table: draining 10.20.0.11 (weight 0) gives it
    no new flows, and its established flows stay."""
    engine, d0, _ = eng
    first = {s: Ether(engine.run(syn(sport=s), d0).data)[IP].dst for s in range(50000, 50200)}
    assert "10.20.0.11" in first.values()
    try:
        engine.configure(config(web=(Backend(BE1, weight=0), *WEB.backends[1:])))
        for sport, dst in first.items():
            r = engine.run(syn(sport=sport, flags="A"), d0)
            assert r.counters.get("flow_hit") == 1
            assert Ether(r.data)[IP].dst == dst
        for s in range(60000, 60100):
            assert Ether(engine.run(syn(sport=s), d0).data)[IP].dst == "10.20.0.12"
    finally:
        engine.configure(config())


def test_removed_backend_flows_rebalance(eng):
    engine, d0, _ = eng
    on_12 = [s for s in range(51000, 51300)
             if expected_backend(engine, "web", CLIENT, VIP, s, 80, 6) == "10.20.0.12"]
    for s in on_12:
        engine.run(syn(sport=s), d0)
    cfg2 = config(web=WEB.backends[:1])
    try:
        engine.configure(cfg2)
        for s in on_12:
            r = engine.run(syn(sport=s, flags="A"), d0)
            assert r.verdict == "tx"
            assert Ether(r.data)[IP].dst == "10.20.0.11"
    finally:
        engine.configure(config())


def test_removed_backend_late_replies_still_rewritten(eng):
    """A backend that leaves the config keeps its reverse entries: its late replies are still
    rewritten to the VIP (never leaked with the backend's address). Guards the prefilter,
    whose bits must outlive the backend."""
    engine, d0, d1 = eng
    r = engine.run(syn(sport=47000, dst="10.200.0.20"), d0)
    assert Ether(r.data)[IP].dst == "10.30.0.5"
    try:
        engine.configure(config(far="10.30.0.6"))
        reply = bytes(Ether(src=BE_MACS["10.30.0.5"], dst=LB_MAC1)
                      / IP(src="10.30.0.5", dst=CLIENT) / TCP(sport=80, dport=47000, flags="A"))
        r = engine.run(reply, d1)
        assert r.verdict == "redirect" and r.counters.get("reply") == 1
        pkt = assert_checksums(r.data)
        assert (pkt[IP].src, pkt[TCP].sport) == ("10.200.0.20", 80)
    finally:
        engine.configure(config())


def test_rings_read_back_as_written(eng):
    """What a restarted agent reads back (one batched slice per VIP) is the ring it wrote,
    so its first sync rewrites nothing."""
    from xdplb.agent.mapsync import MapSync

    engine, _, _ = eng
    fresh = MapSync(engine.maps)  # a new agent: no ring cache
    for v in engine.state.vips:
        got = fresh._ring_now(v.vip_id, v.ring_size)
        assert (got == v.ring.astype("uint32")).all(), v.name
    assert fresh.apply(engine.state, fresh.read_current()).slots_written == 0


def test_table_size_changes_on_reload(eng):
    """A VIP's table size changes with a reload: a new ring of the new size is swapped in
    whole (growing or shrinking), new flows follow it, tracked flows stay."""
    engine, d0, _ = eng
    engine.run(syn(sport=42000), d0)
    kept = Ether(engine.run(syn(sport=42000, flags="A"), d0).data)[IP].dst  # confirmed
    try:
        for n, size in enumerate((1021, 251, 65537)):
            engine.configure(config(web=WEB.backends, table=size))
            web = next(v for v in engine.state.vips if v.name == "web")
            assert engine.maps.lookup("vips", vip_key(*web.key)).ring_size == size
            assert engine.maps.ring(web.vip_id, size).tolist() == web.ring.tolist()
            assert len(web.ring) == size
            r = engine.run(syn(sport=42000, flags="A"), d0)
            assert r.counters.get("flow_hit") == 1 and Ether(r.data)[IP].dst == kept
            for sport in range(43000 + 200 * n, 43200 + 200 * n):  # new flows each round
                got = Ether(engine.run(syn(sport=sport), d0).data)[IP].dst
                assert got == expected_backend(engine, "web", CLIENT, VIP, sport, 80, 6), \
                    (size, sport)
    finally:
        engine.configure(config())


def _configure_cache(engine: Engine, ms: int) -> None:
    engine.configure(config(next_hop_cache_ms=ms))


def _sport_to(engine: Engine, backend: str, start: int) -> int:
    return next(s for s in range(start, start + 1000)
                if expected_backend(engine, "web", CLIENT, VIP, s, 80, 6) == backend)


def test_next_hop_cached_per_flow_until_it_expires(eng):
    """An established flow reuses its next hop for next_hop_cache_ms: a neighbour's new MAC
    reaches a new flow at once and an established one once its cache expires."""
    engine, d0, _ = eng
    new_mac = "02:00:00:00:00:99"
    s1, s2 = _sport_to(engine, "10.20.0.12", 52000), _sport_to(engine, "10.20.0.12", 53000)
    _configure_cache(engine, 10_000)
    try:
        r = engine.run(syn(sport=s1), d0)
        assert r.counters.get("fib_lookup") == 1 and Ether(r.data).dst == BE_MACS["10.20.0.12"]
        _ip("neigh", "replace", "10.20.0.12", "lladdr", new_mac, "dev", "d0", "nud", "permanent")
        engine.routes_changed()
        r = engine.run(syn(sport=s1, flags="A"), d0)  # cached: no lookup, the old MAC
        assert r.verdict == "tx" and "fib_lookup" not in r.counters, r.counters
        pkt = assert_checksums(r.data)
        assert pkt.dst == BE_MACS["10.20.0.12"] and pkt[IP].ttl == 63
        assert Ether(engine.run(syn(sport=s2), d0).data).dst == new_mac  # a new flow
        _configure_cache(engine, 50)
        time.sleep(0.2)  # past the TTL (the coarse clock ticks every few ms)
        r = engine.run(syn(sport=s1, flags="A"), d0)
        assert r.counters.get("fib_lookup") == 1 and Ether(r.data).dst == new_mac
        _configure_cache(engine, 0)  # 0: a lookup for every packet
        for _ in range(2):
            assert engine.run(syn(sport=s1, flags="A"), d0).counters.get("fib_lookup") == 1
    finally:
        _ip("neigh", "replace", "10.20.0.12", "lladdr", BE_MACS["10.20.0.12"], "dev", "d0",
            "nud", "permanent")
        engine.routes_changed()
        engine.configure(config())


def test_next_hop_cache_keeps_the_mtu_check(eng):
    """A cached next hop covers packets up to the size its lookup checked: a longer one is
    looked up again, and one over the egress MTU goes to the kernel (ICMP, fragmentation)."""
    engine, d0, _ = eng
    _configure_cache(engine, 10_000)
    try:
        assert engine.run(syn(sport=46000), d0).verdict == "tx"
        r = engine.run(syn(sport=46000, flags="PA", payload=b"x" * 1000), d0)
        assert r.verdict == "tx" and r.counters.get("fib_lookup") == 1  # longer: looked up
        r = engine.run(syn(sport=46000, flags="PA", payload=b"x" * 500), d0)
        assert r.verdict == "tx" and "fib_lookup" not in r.counters  # covered
        big = syn(sport=46000, flags="PA", payload=b"x" * 1600)  # d0's MTU is 1500
        r = engine.run(big, d0)
        assert r.verdict == "pass" and r.counters.get("fib_miss") == 1, r.counters
        assert Ether(r.data)[IP].ttl == 64  # the kernel forwards (and decrements) it
        r = engine.run(syn(sport=46000, flags="PA"), d0)  # the miss emptied the cache
        assert r.verdict == "tx" and r.counters.get("fib_lookup") == 1
    finally:
        engine.configure(config())


def test_reply_next_hop_cached(eng):
    engine, d0, _ = eng
    sport = _sport_to(engine, "10.20.0.12", 54000)
    engine.run(syn(sport=sport), d0)
    reply = bytes(Ether(src=BE_MACS["10.20.0.12"], dst=LB_MAC)
                  / IP(src="10.20.0.12", dst=CLIENT) / TCP(sport=8080, dport=sport, flags="A"))
    first, second = engine.run(reply, d0), engine.run(reply, d0)
    assert first.counters.get("fib_lookup") == 1 and "fib_lookup" not in second.counters
    assert first.data == second.data and Ether(second.data).dst == CLIENT_MAC


def test_flow_needs_a_backend_of_its_own_vip(eng):
    """A flow hit is checked by the backend's VIP key (no VIP lookup): a backend id that
    now belongs to another VIP does not take the flow along."""
    from xdplb.abi.codec import vip_key

    engine, d0, _ = eng
    sport = _sport_to(engine, "10.20.0.12", 55000)
    assert engine.run(syn(sport=sport), d0).counters.get("new_flow") == 1
    web = next(v for v in engine.state.vips if v.name == "web")
    bid = next(b.backend_id for b in web.backends if b.address == "10.20.0.12")
    be = engine.maps.lookup("backends", bid)
    other = vip_key("10.200.0.20", 80, 6)
    moved = type(be).from_buffer_copy(bytes(be))
    moved.vip_addr, moved.vip_port = other.addr, other.port
    engine.maps.update("backends", bid, moved)
    try:
        r = engine.run(syn(sport=sport, flags="A"), d0)
        assert "flow_hit" not in r.counters
        assert r.verdict == "drop" and r.counters.get("drop_no_backend") == 1  # the ring's pick
    finally:
        engine.maps.update("backends", bid, be)
