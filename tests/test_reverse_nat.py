"""Reverse NAT that cannot leak: a reply's translation is found from the backend endpoint
(``rev_nat``, written by the agent) and the flow it answers, so nothing per flow can be
evicted while the flow lives; fragments of replies are rewritten by the backend's address
when that serves one VIP address, and dropped otherwise (docs/architecture.md).

- the desired state and MapSync: which entries, kept for backends that left, refused when an
  endpoint serves more VIPs than a reply can be told apart between;
- both engines on frames (BPF and scapy, byte for byte): a flow whose reverse entry would
  have been evicted, an endpoint serving two VIPs, a 4 KB UDP answer in fragments,
  fragments that cannot be rewritten;
- the lab, real sockets: live connections through a tiny flow table under churn, and 4 KB
  UDP answers, with a capture on the client showing no frame from a backend address.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
from agent_process import AgentProcess, status
from lab import Lab
from pools import BE1, BE2, VIP, Backend, Vip, pool_yaml
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.l2 import Ether
from scapy.utils import checksum, rdpcap
from testkit.benchns import LB_MAC, bench_namespace
from testkit.fuzz import build
from testkit.pktcheck import checksum_errors, rewrite_errors

from xdplb.abi.layout import MAX_REV_NAT, REV_ANY_PORT, REV_TARGETS, Counter
from xdplb.agent.mapsync import MapSync, rev_key
from xdplb.config import ConfigError, parse_config
from xdplb.model.desired import CapacityError, desired_state
from xdplb.offline.engines import Engine, RunResult, engine_pair
from xdplb.userspace.usermaps import UserMaps

CLIENT = "10.10.0.2"
VIP2 = "10.200.0.20"
BE_MAC = "02:00:00:00:14:0c"
TCP, UDP_P = socket.IPPROTO_TCP, socket.IPPROTO_UDP
FLOW_MAX = 1024  # the smallest table the config allows: easy to overrun


def pool(**flows: int | str) -> str:
    """web: BE2:8080, which also serves web2 on another VIP address (so replies from it must
    be told apart by their flows, and its TCP fragments cannot be rewritten); dns and dns-alt:
    BE1:53 for two ports of one VIP address (later fragments can be rewritten, first ones
    cannot); big: BE1:5000 alone (every fragment can be rewritten)."""
    return pool_yaml(
        Vip("web", 80, (Backend(BE2, port=8080),)),
        Vip("web2", 80, (Backend(BE2, port=8080), BE1), address=VIP2),
        Vip("dns", 53, (BE1,), protocol="udp"),
        Vip("dns-alt", 5353, (Backend(BE1, port=53),), protocol="udp"),
        Vip("big", 5000, (BE1,), protocol="udp"),
        table_size=251, seed=3, flows={"max_entries": FLOW_MAX, **flows})


# --- desired state and MapSync (no root) ----------------------------------------------------


def synced(text: str, maps: UserMaps | None = None) -> UserMaps:
    maps = maps or UserMaps(FLOW_MAX)
    sync = MapSync(maps)
    cur = sync.read_current()
    sync.apply(desired_state(parse_config(text, "rev.yaml"), cur), cur)
    return maps


def entry(maps: UserMaps, addr: str, port: int, proto: int) -> list[tuple[str, int, int]]:
    """A rev_nat entry as [(VIP address, VIP port, backend id)]; [] for none at all, and an
    address entry that names no VIP as [("", 0, count)]."""
    v = maps.lookup("rev_nat", rev_key(addr, port, proto))
    if v is None:
        return []
    named = [(socket.inet_ntoa(bytes(t.vip_addr)), socket.ntohs(t.vip_port), t.backend_id)
             for t in v.targets[: v.count] if any(t.vip_addr)]
    return named if len(named) == v.count else [("", 0, v.count)]


def test_entries_follow_the_config():
    m = synced(pool())
    web = entry(m, BE2, 8080, TCP)
    assert [(a, p) for a, p, _ in web] == [(VIP, 80), (VIP2, 80)]
    assert len({b for _, _, b in web}) == 2  # one backend id per (VIP, backend) pair
    assert [(a, p) for a, p, _ in entry(m, BE1, 53, UDP_P)] == [(VIP, 53), (VIP, 5353)]
    # address entries: the VIP address when there is one, else only how many
    assert entry(m, BE2, REV_ANY_PORT, TCP) == [("", 0, 2)]
    assert [a for a, _, _ in entry(m, BE1, REV_ANY_PORT, UDP_P)] == [VIP]
    assert [a for a, _, _ in entry(m, BE1, REV_ANY_PORT, TCP)] == [VIP2]
    assert entry(m, BE2, REV_ANY_PORT, UDP_P) == []


def test_entries_of_a_removed_backend_stay_until_room_is_needed():
    """Like its prefilter bit, a removed backend's entry stays (its flows outlive it); a
    current mapping overwrites it, and stale entries go first when the map runs full."""
    m = synced(pool())
    before = entry(m, BE1, 5000, UDP_P)
    synced(pool_yaml(Vip("web", 80, (Backend(BE2, port=8080),)), table_size=251), m)
    assert entry(m, BE1, 5000, UDP_P) == before  # kept: late replies still rewritten
    synced(pool_yaml(Vip("big", 5000, (BE1,), protocol="udp", address=VIP2), table_size=251), m)
    assert [a for a, _, _ in entry(m, BE1, 5000, UDP_P)] == [VIP2]  # the config wins
    t = m.table("rev_nat")
    for i in range(MAX_REV_NAT - len(t.data)):  # fill the map with stale entries
        t.put(bytes(rev_key(f"10.99.{i >> 8}.{i & 255}", 1, UDP_P)), t.spec.value())
    synced(pool(), m)  # needs room for new entries: stale ones make it
    assert entry(m, BE2, 8080, TCP) and len(t.data) == MAX_REV_NAT


def test_an_endpoint_serving_too_many_vips_is_refused():
    """The config refuses it (FILE:LINE), and the desired state would too."""
    vips = [Vip(f"v{i}", 80 + i, (Backend(BE1, port=8000),)) for i in range(REV_TARGETS + 1)]
    with pytest.raises((ConfigError, CapacityError), match=r"8000.* serves .* VIPs"):
        desired_state(parse_config(pool_yaml(*vips), "rev.yaml"))
    desired_state(parse_config(pool_yaml(*vips[:REV_TARGETS]), "rev.yaml"))  # at most: fine


# --- both engines, frames -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    with bench_namespace(f"xlt-s-rev-{os.getpid()}") as b:
        yield b


@pytest.fixture
def pair(bench):
    """Both engines on pool(), empty flow tables."""
    with engine_pair(parse_config(pool(), "rev.yaml"), bench.attached) as ab:
        yield ab, bench.ifindex["d0"]


def both(a: Engine, b: Engine, frame: bytes, ingress: int) -> RunResult:
    """One frame through both engines: the same verdict, bytes, counters and effect, and
    right checksums on what they rewrote. (Flow tables are compared by the tests that keep
    them small: with a full table the kernel's LRU only approximates the scapy one's.)"""
    ra, rb = a.run(frame, ingress), b.run(frame, ingress)
    assert ra.comparable() == rb.comparable(), (frame.hex(), ra, rb)
    assert rewrite_errors(frame, ra.data) == []
    return ra


def same_tables(a: Engine, b: Engine) -> None:
    assert a.flow_table().diff(b.flow_table()) == []


def reply(src: str, sport: int, dport: int, proto: int = TCP, flags: str = "A", **kw) -> bytes:
    return build(src, CLIENT, proto, sport, dport, flags=flags, smac=BE_MAC, **kw)


def source(frame: bytes) -> tuple[str, int]:
    ip = Ether(frame)[IP]
    return ip.src, ip.payload.sport


@pytest.mark.root
def test_flow_whose_reverse_entry_would_have_been_evicted(pair):
    """A tracked flow's reverse translation lives as long as the flow: 3,000 new flows go
    through a 1,024-entry table while the flow sends now and then, and its reply, the first
    after all of them, still leaves from the VIP. (Before, the reverse entry was an LRU entry
    of its own, refreshed only by replies: this churn evicted it, and the reply left with the
    backend's address.)"""
    (a, b), d0 = pair
    assert both(a, b, build(CLIENT, VIP, TCP, 41000, 80), d0).effect == "created"
    for r in range(30):
        for i in range(100):
            n = r * 100 + i
            syn = build(f"10.10.0.{3 + n % 7}", VIP, TCP, 20000 + n, 80)
            assert both(a, b, syn, d0).effect == "created"
        assert both(a, b, build(CLIENT, VIP, TCP, 41000, 80, flags="A"), d0).effect == "hit"
    res = both(a, b, reply(BE2, 8080, 41000), d0)
    assert (res.verdict, res.effect) == ("tx", "reply")
    assert source(res.data) == (VIP, 80)
    assert sum(a.maps.lookup("counters", Counter.NEW_FLOW)) > 2.9 * FLOW_MAX  # overrun 3x


def _sport_on(a: Engine, b: Engine, d0: int, vip: str, backend: str, start: int) -> int:
    """A client port whose new flow to vip:80 lands on ``backend``."""
    for s in range(start, start + 200):
        r = both(a, b, build(CLIENT, vip, TCP, s, 80), d0)
        if r.backend == backend:
            return s
    raise AssertionError(f"no flow to {vip} landed on {backend}")


@pytest.mark.root
def test_replies_of_an_endpoint_serving_two_vips(pair):
    """BE2:8080 serves web (VIP) and web2 (VIP2): each reply leaves from the VIP of the flow
    it answers, found by rebuilding that flow's key for each."""
    (a, b), d0 = pair
    s1 = _sport_on(a, b, d0, VIP, f"{BE2}:8080", 42000)
    s2 = _sport_on(a, b, d0, VIP2, f"{BE2}:8080", 43000)
    s3 = _sport_on(a, b, d0, VIP2, f"{BE1}:80", 44000)
    for sport, vip in ((s1, VIP), (s2, VIP2)):
        r = both(a, b, reply(BE2, 8080, sport, flags="PA", payload=b"answer"), d0)
        assert (r.effect, source(r.data)) == ("reply", (vip, 80)), sport
        assert checksum_errors(r.data) == []
    assert source(both(a, b, reply(BE1, 80, s3), d0).data) == (VIP2, 80)
    # from the right address but a port no flow of this client went to: not ours
    stray = reply(BE2, 8080, 45999)
    assert both(a, b, stray, d0).data == stray
    same_tables(a, b)


def _udp_answer(size: int, sport: int, dport: int, *, zero_checksum: bool = False
                ) -> list[bytes]:
    """A UDP answer of ``size`` bytes from BE1 to the client, fragmented for a 1500 MTU."""
    payload = bytes(i * 7 & 255 for i in range(size))
    pkt = IP(src=BE1, dst=CLIENT, id=4242, ttl=64) / UDP(sport=sport, dport=dport) / payload
    if zero_checksum:
        pkt[UDP].chksum = 0
    return [bytes(Ether(src=BE_MAC, dst=LB_MAC) / f) for f in fragment(pkt, fragsize=1480)]


def _reassembled(frames: list[bytes]) -> tuple[IP, bytes]:
    """The datagram the client's kernel puts together: the first fragment's header and the
    L4 bytes of all of them by offset."""
    ips = sorted((Ether(f)[IP] for f in frames), key=lambda ip: ip.frag)
    data = b"".join(bytes(ip.payload) for ip in ips)
    return ips[0], data


@pytest.mark.root
@pytest.mark.parametrize("zero_checksum", [False, True])
def test_a_4k_udp_answer_leaves_in_fragments_from_the_vip(pair, zero_checksum):
    """Every fragment of a 4 KB answer (in order or not) leaves from the VIP; put together,
    it is a datagram from VIP:5000 whose UDP checksum is right (or still "none")."""
    (a, b), d0 = pair
    assert both(a, b, build(CLIENT, VIP, UDP_P, 41001, 5000, payload=b"size=4096"),
                d0).effect == "created"
    frames = _udp_answer(4096, 5000, 41001, zero_checksum=zero_checksum)
    assert len(frames) == 3
    for order in (frames, frames[::-1]):
        out = []
        for f in order:
            r = both(a, b, f, d0)
            assert (r.verdict, r.reason, r.counters.get("reply_fragment")) == ("tx", "tx", 1)
            assert Ether(r.data)[IP].src == VIP and checksum_errors(r.data) == []
            out.append(r.data)
        first, l4 = _reassembled(out)
        sport, dport, length, check = struct.unpack("!HHHH", l4[:8])
        assert (sport, dport, length) == (5000, 41001, 8 + 4096)
        pseudo = socket.inet_aton(VIP) + socket.inet_aton(CLIENT) + struct.pack(
            "!BBH", 0, UDP_P, len(l4))
        assert check == 0 if zero_checksum else checksum(pseudo + l4) == 0
    same_tables(a, b)


@pytest.mark.root
def test_fragments_that_cannot_be_rewritten_are_dropped(pair):
    """BE2 serves two VIP addresses for TCP: none of its fragments can be given the right
    source, and all are dropped. BE1:53 answers for two ports of one VIP address: its later
    fragments get the address, first fragments (which would need the port) are dropped."""
    (a, b), d0 = pair
    for kw in ({"more_frags": True}, {"frag": 100}, {"frag": 185, "more_frags": True}):
        r = both(a, b, reply(BE2, 8080, 41002, payload=bytes(32), **kw), d0)
        assert (r.verdict, r.reason) == ("drop", "drop_reply_fragment"), kw
    r = both(a, b, reply(BE1, 53, 41003, UDP_P, payload=bytes(32), more_frags=True), d0)
    assert r.reason == "drop_reply_fragment"
    r = both(a, b, reply(BE1, 53, 41003, UDP_P, payload=bytes(32), frag=185), d0)
    assert r.reason == "tx" and Ether(r.data)[IP].src == VIP


# --- the lab: real sockets ------------------------------------------------------------------

LAB_POOL = pool_yaml(Vip("stream", 7000, (BE1, BE2)), Vip("echo", 5000, (BE1, BE2),
                                                            protocol="udp"),
                     flows={"max_entries": FLOW_MAX})

LIVE_UNDER_CHURN = """
import socket, sys
rounds, churn = int(sys.argv[1]), int(sys.argv[2])
live = []
for _ in range(4):  # long-lived connections, one line echoed per round
    c = socket.create_connection(("{vip}", 7000), timeout=3)
    f = c.makefile("rb")
    f.readline()  # backend=<name>
    live.append((c, f))
new = 0
for r in range(rounds):
    for _ in range(churn):  # new flows, one datagram each (its answer awaited)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"churn", ("{vip}", 5000))
        s.recvfrom(2048)
        s.close()
        new += 1
    for c, f in live:
        line = b"round %d\\n" % r
        c.sendall(line)
        assert f.readline() == line, r
print(new)
"""

BIG_ANSWERS = """
import socket, sys
n, size = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"size=%d" % size, ("{vip}", 5000))
    data, peer = s.recvfrom(65535)
    print(peer[0], peer[1], len(data))
    s.close()
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rev")
    with Lab(topology="one-armed", backends=2, prefix="xlt-rev") as lab:
        cfg = tmp / "pool.yaml"
        cfg.write_text(LAB_POOL)
        agent = AgentProcess(lab, cfg, "--mode", "native")
        try:
            yield lab
        finally:
            assert agent.stop() == 0, agent.log_text()


def _captured(lab: Lab, script: str, *args: str) -> tuple[str, list]:
    """Run ``script`` in the client namespace with tcpdump capturing there; (its output,
    the IPv4 packets that reached the client)."""
    cap = Path("/tmp") / f"xlt-rev-client-{os.getpid()}.pcap"  # visible in the netns
    log = cap.with_suffix(".log")
    with log.open("wb") as err:
        # --immediate-mode: else frames wait in the capture ring's block until it times out,
        # and a short run's end (SIGTERM) can come first
        dump = lab.popen(lab.client_ns, "tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode",
                         "-w", str(cap), "ip", stderr=err)
    try:
        deadline = time.monotonic() + 20
        while b"listening on" not in log.read_bytes():
            assert dump.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        out = lab.run(lab.client_ns, sys.executable, "-c", script.replace("{vip}", VIP),
                      *args, timeout=180).stdout
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait(10)
    try:
        pkts = [p for p in rdpcap(str(cap)) if IP in p and p[IP].dst == lab.client_addr]
    finally:
        cap.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
    return out, pkts


def _no_backend_source(lab: Lab, pkts: list) -> None:
    leaked = [p.summary() for p in pkts if p[IP].src in lab.backend_addrs]
    assert not leaked, f"{len(leaked)} frames from a backend address: {leaked[:5]}"


@pytest.mark.root
def test_live_connections_through_a_tiny_flow_table(lab):
    """Four long-lived TCP connections keep working while 2,400 new UDP flows churn a
    1,024-entry flow table: every echo comes back, and no frame reaches the client from a
    backend's address."""
    out, pkts = _captured(lab, LIVE_UNDER_CHURN, "12", "200")
    assert int(out) == 2400
    _no_backend_source(lab, pkts)
    assert {p[IP].src for p in pkts} == {VIP}
    counters = status(lab)["groups"][0]["counters"]
    assert counters["new_flow"] >= 2 * FLOW_MAX and counters["reply"] > 2400, counters


@pytest.mark.root
def test_4k_udp_answers_reach_the_client_from_the_vip(lab):
    """A UDP service whose answers are 4 KB (fragmented by the backend): each one arrives
    whole from VIP:5000; the capture holds their fragments, all from the VIP with right
    checksums, and not one frame from a backend's address."""
    before = status(lab)["groups"][0]["counters"]
    out, pkts = _captured(lab, BIG_ANSWERS, "20", "4096")
    assert out.split("\n")[:-1] == [f"{VIP} 5000 4096"] * 20
    _no_backend_source(lab, pkts)
    frags = [p for p in pkts if p[IP].flags.MF or p[IP].frag]
    assert len(frags) >= 20 * 3 and {p[IP].src for p in frags} == {VIP}
    assert not [e for p in frags if (e := checksum_errors(bytes(p)))]
    by_id: dict[int, list[bytes]] = {}
    for p in frags:
        by_id.setdefault(p[IP].id, []).append(bytes(p))
    for parts in by_id.values():  # every datagram put together: UDP checksum right
        first, l4 = _reassembled(parts)
        pseudo = socket.inet_aton(first.src) + socket.inet_aton(first.dst) + struct.pack(
            "!BBH", 0, UDP_P, len(l4))
        assert struct.unpack("!H", l4[6:8])[0] == 0 or checksum(pseudo + l4) == 0
    after = status(lab)["groups"][0]["counters"]
    assert after["reply_fragment"] - before.get("reply_fragment", 0) >= 20 * 3
    assert after.get("drop_reply_fragment", 0) == 0
