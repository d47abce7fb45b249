"""The IPIP decapsulation program of DSR backends (bpf/decap.c, ``xdplb decap``).

Parity: the compiled program under BPF_PROG_TEST_RUN against the Python twin
(xdplb/userspace/decap.py) on a corpus with one frame per rule and on hypothesis-mutated
frames: same verdict, same output bytes, same counter; decapsulated frames equal the inner
packet as scapy builds it after Ether(), untouched ones the input.

End to end: a sender namespace (standing in for the balancer) and a backend namespace on a
veth pair; the backend holds the VIP on lo (arp_ignore=1, arp_announce=2, rp_filter=0) and
runs ``xdplb decap attach eth0`` (via --netns, and via ip netns exec). IPIP-wrapped UDP
reaches a server bound to the VIP with the client's address, which answers from the VIP; a
wrapped SYN gets a SYN-ACK; ping keeps working; status counts; detach removes everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw, raw
from testkit.pktcheck import checksum_errors

from xdplb.abi import decap as abi
from xdplb.abi.layout import MAPS, render_maps
from xdplb.userspace.decap import PyDecap

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
XDPLB = Path(sys.executable).with_name("xdplb")
ME, OTHER = "10.30.0.2", "10.30.0.99"  # backend address (outer destination); someone else's
BALANCER = "10.30.0.1"
CLIENT, VIP = "10.10.0.2", "10.200.0.10"
LOCAL = (ME, VIP)
SMAC, DMAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
VERDICTS = {1: "drop", 2: "pass"}  # XDP_DROP, XDP_PASS (anything else fails the test)


# --- the ABI ----------------------------------------------------------------------------------


def test_header_and_program_agree():
    """Every counter is bumped by the program, the map names it uses are the ABI's, and the
    balancer's map declarations render as before (render_maps' default is its own list)."""
    src = (ROOT / "bpf" / "decap.c").read_text()
    for c in abi.OUTCOMES:
        assert f"XD_C_{c.name})" in src, c
    for m in abi.MAPS:
        assert f"{m.name}.lookup" in src, m.name
        assert f" {m.name}, " in abi.render_header()
    assert render_maps(None) == render_maps(None, maps=MAPS)
    assert abi.ENTRY in src and abi.decap_version() != ""


# --- parity: BPF_PROG_TEST_RUN vs the Python twin ----------------------------------------------


@dataclass(frozen=True)
class Out:
    verdict: str
    data: bytes
    counters: dict[str, int]


class BpfDecap:
    """The compiled program on private maps, run by BPF_PROG_TEST_RUN."""

    def __init__(self, local: tuple[str, ...]) -> None:
        from xdplb.kernel import decap as kdecap

        self.k = kdecap
        self.program = kdecap.compile_decap()
        kdecap.sync_addrs(self.program.map_fds[kdecap.ADDRS], [IPv4Address(a) for a in local])

    def run(self, frame: bytes) -> Out:
        from xdplb.kernel import bpfsys

        fd = self.program.map_fds[self.k.COUNTERS]
        before = self.k.read_counters(fd)
        res = bpfsys.prog_test_run(self.program.prog_fd, frame)
        after = self.k.read_counters(fd)
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        return Out(VERDICTS.get(res.retval, f"retval {res.retval}"), res.data_out, delta)

    def close(self) -> None:
        self.program.close()


class PyEngine:
    def __init__(self, local: tuple[str, ...]) -> None:
        self.d = PyDecap({IPv4Address(a).packed for a in local})

    def run(self, frame: bytes) -> Out:
        before = dict(self.d.counters)
        res = self.d.run(frame)
        delta = {k: v - before[k] for k, v in self.d.counters.items() if v != before[k]}
        return Out(res.action, res.data, delta)


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[BpfDecap, PyEngine]]:
    bpf = BpfDecap(LOCAL)
    try:
        yield bpf, PyEngine(LOCAL)
    finally:
        bpf.close()


def eth(payload, **kw) -> Ether:
    return Ether(src=SMAC, dst=DMAC, **kw) / payload


def outer(inner, dst: str = ME, **kw) -> IP:
    return IP(src=BALANCER, dst=dst, **kw) / inner


def fix_csum(frame: bytearray, ip: int = 14) -> bytes:
    """The IPv4 header checksum at ``ip`` recomputed (after a field was changed)."""
    from scapy.utils import checksum

    ihl = (frame[ip] & 0x0F) * 4
    frame[ip + 10 : ip + 12] = b"\0\0"
    frame[ip + 10 : ip + 12] = checksum(bytes(frame[ip : ip + ihl])).to_bytes(2, "big")
    return bytes(frame)


def edit(pkt, at: int, value: bytes, csum: bool = True) -> bytes:
    """A frame with bytes at ``at`` replaced (the outer checksum fixed unless told)."""
    b = bytearray(raw(pkt))
    b[at : at + len(value)] = value
    return fix_csum(b) if csum else bytes(b)


UDP_IN = IP(src=CLIENT, dst=VIP) / UDP(sport=40000, dport=53) / b"query"
TCP_IN = IP(src=CLIENT, dst=VIP) / TCP(sport=40001, dport=80, flags="S", seq=1000)
ICMP_IN = IP(src=CLIENT, dst=VIP) / ICMP(id=7, seq=1) / b"ping"
OPTS_IN = IP(src=CLIENT, dst=VIP, options=[IPOption_NOP()] * 4) / UDP(sport=1, dport=2)
OUT = 14  # the outer IPv4 header in an untagged frame
INNER = OUT + 20  # the inner header behind an outer header without options

# name -> (frame, the counter it bumps, the inner packet scapy builds for a decapsulated one)
CORPUS: dict[str, tuple[bytes, str, object]] = {
    "udp": (raw(eth(outer(UDP_IN))), "decap", UDP_IN),
    "tcp_syn": (raw(eth(outer(TCP_IN))), "decap", TCP_IN),
    "icmp": (raw(eth(outer(ICMP_IN))), "decap", ICMP_IN),
    "to_vip_address": (raw(eth(outer(UDP_IN, dst=VIP))), "decap", UDP_IN),
    "inner_options": (raw(eth(outer(OPTS_IN))), "decap", OPTS_IN),
    "outer_options": (raw(eth(outer(UDP_IN, options=[IPOption_NOP()] * 8))), "decap", UDP_IN),
    "outer_df": (raw(eth(outer(UDP_IN, flags="DF"))), "decap", UDP_IN),
    "inner_fragment": (raw(eth(outer(IP(src=CLIENT, dst=VIP, flags="MF", proto=17)
                                    / (b"x" * 16)))), "decap",
                       IP(src=CLIENT, dst=VIP, flags="MF", proto=17) / (b"x" * 16)),
    "not_to_us": (raw(eth(outer(UDP_IN, dst=OTHER))), "pass_not_local", None),
    "outer_mf": (raw(eth(outer(UDP_IN, flags="MF"))), "drop_fragment", None),
    "outer_offset": (raw(eth(outer(UDP_IN, frag=5))), "drop_fragment", None),
    "bad_outer_csum": (raw(eth(outer(UDP_IN, chksum=0x1234))), "drop_bad_csum", None),
    "truncated_inner": (raw(eth(outer(Raw(bytes(raw(UDP_IN))[:12]), proto=4))),
                        "drop_malformed", None),
    "inner_len_short": (edit(eth(outer(UDP_IN)), INNER + 2, (len(UDP_IN) - 1).to_bytes(2, "big")),
                        "drop_malformed", None),
    "inner_len_long": (edit(eth(outer(UDP_IN)), INNER + 2, (len(UDP_IN) + 1).to_bytes(2, "big")),
                       "drop_malformed", None),
    "inner_ihl_4": (edit(eth(outer(UDP_IN)), INNER, b"\x44"), "drop_malformed", None),
    "inner_ihl_past_len": (edit(eth(outer(IP(src=CLIENT, dst=VIP, ihl=15, proto=17)
                                         / (b"\0" * 20))), INNER, b"\x4f"), "drop_malformed", None),
    "inner_v6": (raw(eth(outer(IPv6(src="fd00::1", dst="fd00::2") / UDP(), proto=4))),
                 "drop_malformed", None),
    "outer_v5": (edit(eth(outer(UDP_IN)), OUT, b"\x55"), "drop_malformed", None),
    "outer_ihl_4": (edit(eth(outer(UDP_IN)), OUT, b"\x44", csum=False), "drop_malformed", None),
    "outer_len_past_frame": (edit(eth(outer(UDP_IN)), OUT + 2, (20 + len(UDP_IN) + 9)
                                  .to_bytes(2, "big")), "drop_malformed", None),
    "outer_len_below_ihl": (edit(eth(outer(UDP_IN)), OUT + 2, (19).to_bytes(2, "big")),
                            "drop_malformed", None),
    "udp_to_us": (raw(eth(IP(src=BALANCER, dst=ME) / UDP(sport=1, dport=2))),
                  "pass_not_ipip", None),
    "runt_ipv4": (raw(eth(Raw(b"\x45\x00\x00\x14" + b"\0" * 5 + b"\x04"), type=0x0800)),
                  "pass_not_ipip",
                  None),
    "arp": (raw(eth(ARP(psrc=BALANCER, pdst=ME))), "pass_not_ipv4", None),
    "vlan_ipip": (raw(eth(Dot1Q(vlan=5) / outer(UDP_IN))), "pass_not_ipv4", None),
    "ipv6": (raw(eth(IPv6(src="fd00::1", dst="fd00::2") / UDP())), "pass_not_ipv4", None),
    "bare_ethernet": (raw(eth(Raw(b""), type=0x0800)), "pass_not_ipip", None),
}


def run_both(engines, frame: bytes) -> Out:
    bpf, py = engines
    a, b = bpf.run(frame), py.run(frame)
    assert a == b, (frame.hex(), a, b)
    assert sum(a.counters.values()) == 1 and set(a.counters.values()) == {1}, a
    if a.counters != {"decap": 1}:
        assert a.data == frame  # untouched, dropped or passed
    return a


@pytest.mark.parametrize("name", CORPUS)
def test_corpus(engines, name):
    frame, counter, inner = CORPUS[name]
    out = run_both(engines, frame)
    assert out.counters == {counter: 1}
    assert out.verdict == ("drop" if counter.startswith("drop_") else "pass")
    if inner is not None:
        assert out.data == raw(Ether(src=SMAC, dst=DMAC) / inner)
        assert checksum_errors(out.data) == []


def test_padding_after_the_packet_stays(engines):
    """A frame longer than the outer total length (Ethernet padding) keeps its tail: the
    kernel trims by the IPv4 total length."""
    frame = raw(eth(outer(UDP_IN))) + b"\0" * 6
    out = run_both(engines, frame)
    assert out.counters == {"decap": 1}
    assert out.data == raw(Ether(src=SMAC, dst=DMAC) / UDP_IN) + b"\0" * 6


@st.composite
def mutated(draw) -> bytes:
    """A corpus frame with header bytes changed, cut or extended; the outer checksum fixed
    half of the time, so that the rules behind it are reached too."""
    frame = bytearray(draw(st.sampled_from([f for f, _, _ in CORPUS.values()])))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, min(len(frame), INNER + 24) - 1))  # headers, mostly
        frame[at] = draw(st.sampled_from([0, 1, 4, 5, 0x45, 0x46, 0x4F, 0x20, 0x40, 0xFF,
                                          draw(st.integers(0, 255))]))
    cut = draw(st.integers(0, 3))
    if cut == 1:
        frame = frame[: draw(st.integers(14, len(frame)))]
    elif cut == 2:
        frame += draw(st.binary(max_size=24))
    if draw(st.booleans()) and len(frame) >= OUT + 20 and frame[OUT] & 0x0F >= 5 \
            and len(frame) >= OUT + (frame[OUT] & 0x0F) * 4:
        frame = bytearray(fix_csum(frame))
    return bytes(frame)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=mutated())
def test_mutated_frames_agree(engines, frame):
    out = run_both(engines, frame)
    if out.counters == {"decap": 1}:  # then scapy reads the inner packet as we left it
        inner = IP(frame[OUT + (frame[OUT] & 0x0F) * 4 :])
        assert out.data[:14] == frame[:12] + b"\x08\x00"
        assert out.data == raw(Ether(src=frame[6:12], dst=frame[:6]) / inner)


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(min_size=14, max_size=120))
def test_random_bytes_agree(engines, frame):
    run_both(engines, frame)


# --- end to end: a sender and a backend namespace -------------------------------------------


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@dataclass(frozen=True)
class Pair:
    sender: str
    backend: str
    backend_mac: str

    def xdplb(self, way: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        pre = ([str(XDPLB), "--netns", self.backend] if way == "--netns"
               else ["ip", "netns", "exec", self.backend, str(XDPLB)])
        p = sh(*pre, *args, check=False)
        assert "Traceback" not in p.stderr, p.stderr
        if check:
            assert p.returncode == 0, (args, p.stdout, p.stderr)
        return p

    def py(self, ns: str, code: str, *args: str, timeout: float = 30,
           background: bool = False):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code), *args]
        if background:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        return sh(*cmd, timeout=timeout)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """sender eth0 10.30.0.1/24 <-veth-> backend eth0 10.30.0.2/24, VIP on the backend's lo,
    default route back through the sender (the balancer stands in for the clients' way)."""
    pid = os.getpid()
    s, b = f"xdc-s-{pid}", f"xdc-b-{pid}"
    try:
        sh("ip", "netns", "add", s)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"xdcs{pid}", "netns", s, "type", "veth", "peer", "name",
           f"xdcb{pid}", "netns", b)
        for ns, dev, addr, mac in ((s, f"xdcs{pid}", BALANCER, SMAC),
                                   (b, f"xdcb{pid}", ME, DMAC)):
            sh("ip", "-n", ns, "link", "set", dev, "name", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "address", mac)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            # veth leaves locally made TCP/UDP with a partial checksum (the lab notes): both
            # ends originate traffic here.
            sh("ip", "netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off")
        sh("ip", "-n", b, "addr", "add", f"{VIP}/32", "dev", "lo")
        sh("ip", "-n", b, "route", "add", "default", "via", BALANCER)
        for key, value in (("conf.all.arp_ignore", 1), ("conf.all.arp_announce", 2),
                           ("conf.all.rp_filter", 0), ("conf.eth0.rp_filter", 0),
                           ("conf.lo.rp_filter", 0)):
            sh("ip", "netns", "exec", b, "sysctl", "-qw", f"net.ipv4.{key}={value}")
        yield Pair(s, b, DMAC)
    finally:
        sh("ip", "netns", "exec", b, str(XDPLB), "decap", "detach", "eth0", check=False)
        for ns in (s, b):
            sh("ip", "netns", "del", ns, check=False)
        from xdplb.instance import decap as places

        for ns in (s, b):  # pins outlive namespaces: never leave them behind
            places.for_iface("eth0", ns).remove()


UDP_SERVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(15)
print("ready", flush=True)
data, addr = s.recvfrom(2048)
s.sendto(b"answer:" + data, addr)  # bound to the VIP: the answer comes from it
print(json.dumps({"data": data.decode(), "from": addr}), flush=True)
"""

TCP_LISTENER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
time.sleep(20)
"""

SENDER = """
import json, sys, threading, time
from scapy.all import AsyncSniffer, Ether, IP, TCP, UDP, raw, sendp
args = json.loads(sys.argv[1])
inner = (UDP(sport=args["sport"], dport=args["dport"]) / args["payload"].encode()
         if args["proto"] == "udp" else
         TCP(sport=args["sport"], dport=args["dport"], flags="S", seq=4242))
pkt = (Ether(src=args["smac"], dst=args["dmac"]) / IP(src=args["balancer"], dst=args["me"])
       / IP(src=args["client"], dst=args["vip"]) / inner)
got = []  # AsyncSniffer.results is only set by stop()
ready = threading.Event()
sniff = AsyncSniffer(iface="eth0", store=False, prn=got.append, started_callback=ready.set,
                     lfilter=lambda p: IP in p and p[IP].dst == args["client"])
sniff.start()
assert ready.wait(10), "the sniffer did not start"
sendp(pkt, iface="eth0", verbose=False)
deadline = time.time() + 5
while time.time() < deadline and not got:
    time.sleep(0.05)
sniff.stop()
print(json.dumps([raw(p).hex() for p in got]))
"""


PING = """
import sys
from scapy.all import ICMP, IP, sr1
for seq in (1, 2):  # echo replies (type 0), no iputils-ping needed
    r = sr1(IP(dst=sys.argv[1]) / ICMP(id=0x4242, seq=seq), timeout=2, verbose=False)
    print(r[ICMP].type if r is not None and ICMP in r else "none")
"""


def send_ipip(pair: Pair, proto: str, dport: int, sport: int = 40000,
              payload: str = "") -> list[bytes]:
    """Send one IPIP-wrapped packet client -> VIP from the sender; frames back to the client."""
    args = {"proto": proto, "sport": sport, "dport": dport, "payload": payload,
            "smac": SMAC, "dmac": pair.backend_mac, "balancer": BALANCER, "me": ME,
            "client": CLIENT, "vip": VIP}
    out = pair.py(pair.sender, SENDER, json.dumps(args)).stdout.strip().splitlines()[-1]
    return [bytes.fromhex(h) for h in json.loads(out)]


def start(pair: Pair, code: str, *args: str) -> subprocess.Popen:
    p = pair.py(pair.backend, code, *args, background=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr
    return p


def status(pair: Pair, way: str) -> dict:
    return json.loads(pair.xdplb(way, "decap", "status", "--json").stdout)


def xdp_prog(pair: Pair) -> int | None:
    link = json.loads(sh("ip", "-n", pair.backend, "-j", "link", "show", "eth0").stdout)[0]
    return (link.get("xdp") or {}).get("prog", {}).get("id")


@pytest.mark.parametrize("way", ["--netns", "ip netns exec"])
def test_backend_decapsulates(pair, way):
    from xdplb.instance import decap as places

    where = places.for_iface("eth0", pair.backend)
    try:
        p = pair.xdplb(way, "decap", "attach", "eth0")
        assert "decap attached to eth0" in p.stdout and VIP in p.stdout, p.stdout
        assert where.complete() and xdp_prog(pair) is not None
        (row,) = status(pair, way)["interfaces"]
        assert row["attached"] and row["mode"] == "native" and row["pin_dir"] == str(where.path)
        assert {ME, VIP} <= set(row["addresses"]) and row["addresses_current"]
        assert "127.0.0.1" not in row["addresses"]  # martian from the wire: the kernel's

        # UDP to the VIP: the server sees the client's address and answers from the VIP.
        server = start(pair, UDP_SERVER, VIP, "5353")
        back = send_ipip(pair, "udp", 5353, payload="hello")
        out, err = server.communicate(timeout=20)
        assert json.loads(out.splitlines()[-1]) == {"data": "hello", "from": [CLIENT, 40000]}
        (answer,) = [Ether(f) for f in back if UDP in Ether(f)]
        assert (answer[IP].src, answer[UDP].sport, bytes(answer[UDP].payload)) == (
            VIP, 5353, b"answer:hello")
        assert checksum_errors(raw(answer)) == []

        # A wrapped SYN: the backend's stack answers SYN-ACK, from the VIP, to the client.
        listener = start(pair, TCP_LISTENER, VIP, "8080")
        try:
            back = send_ipip(pair, "tcp", 8080, sport=40001)
        finally:
            listener.kill()
            listener.communicate()
        synack = [Ether(f) for f in back if TCP in Ether(f)]
        assert synack and synack[0][TCP].flags == "SA", back
        assert (synack[0][IP].src, synack[0][TCP].sport, synack[0][TCP].ack) == (VIP, 8080, 4243)
        assert checksum_errors(raw(synack[0])) == []

        # Not IPIP: untouched.
        assert pair.py(pair.sender, PING, ME).stdout.split() == ["0", "0"]

        counters = status(pair, way)["interfaces"][0]["counters"]
        assert counters["decap"] == 2, counters
        assert counters["pass_not_ipip"] >= 2 and counters["drop_malformed"] == 0, counters

        # Attach again after adding an address: refreshed in place, same program.
        prog = xdp_prog(pair)
        sh("ip", "-n", pair.backend, "addr", "add", "10.200.0.20/32", "dev", "lo")
        (row,) = status(pair, way)["interfaces"]
        assert not row["addresses_current"]
        p = pair.xdplb(way, "decap", "attach", "eth0")
        assert "already attached" in p.stdout and "+10.200.0.20" in p.stdout, p.stdout
        (row,) = status(pair, way)["interfaces"]
        assert "10.200.0.20" in row["addresses"] and row["addresses_current"]
        assert xdp_prog(pair) == prog
    finally:
        sh("ip", "-n", pair.backend, "addr", "del", "10.200.0.20/32", "dev", "lo", check=False)
        p = pair.xdplb(way, "decap", "detach", "eth0", check=False)
    assert p.returncode == 0 and "detached decap program" in p.stdout, (p.stdout, p.stderr)
    assert xdp_prog(pair) is None and not where.exists()
    assert pair.xdplb(way, "decap", "status", check=False).returncode == 3
    assert pair.xdplb(way, "decap", "detach", "eth0", check=False).returncode == 3


def test_refuses_another_program(pair):
    """A foreign XDP program, and one pinned as the balancer's, are refused (exit 2) and kept."""
    from xdplb.instance import pins
    from xdplb.kernel import bpfsys, xdp_link

    group = pins.group_for(["eth0"], ns=pair.backend)
    with bpfsys.load_xdp_pass() as fd:
        xdp_link.xdp_attach("eth0", fd, "native", netns=pair.backend)
        try:
            p = pair.xdplb("--netns", "decap", "attach", "eth0", check=False)
            assert p.returncode == 2 and "not xdplb's" in p.stderr, p.stderr
            group.path.mkdir(parents=True)
            bpfsys.obj_pin(fd, group.prog)
            p = pair.xdplb("--netns", "decap", "attach", "eth0", check=False)
            assert p.returncode == 2 and "xdplb's balancer" in p.stderr, p.stderr
            p = pair.xdplb("--netns", "decap", "detach", "eth0", check=False)
            assert p.returncode == 2 and "not the decap program" in p.stderr, p.stderr
            assert xdp_prog(pair) == bpfsys.prog_info(fd).id
            assert not (places_dir := _decap_dir(pair)).exists(), places_dir
        finally:
            group.remove()
            xdp_link.xdp_detach("eth0", netns=pair.backend)


def test_older_version_is_named_and_detached(pair):
    """A decap program pinned by another xdplb version (another map layout) is not taken for
    this one's: attach refuses naming it, detach removes it and its pins."""
    from xdplb.instance import decap as places
    from xdplb.kernel import decap as kdecap
    from xdplb.kernel import xdp_link

    old = places.DecapPins(places.ns_dir(pair.backend, "0" * 12) / "eth0")
    program = kdecap.compile_decap()
    try:
        kdecap.pin(program, old.path)
        xdp_link.xdp_attach("eth0", program.prog_fd, "native", netns=pair.backend)
        p = pair.xdplb("--netns", "decap", "attach", "eth0", check=False)
        assert p.returncode == 2 and "another xdplb version" in p.stderr, p.stderr
        p = pair.xdplb("--netns", "decap", "detach", "eth0")
        assert "detached decap program" in p.stdout and str(old.path) in p.stdout, p.stdout
        assert xdp_prog(pair) is None and not old.exists()
    finally:
        program.close()
        xdp_link.xdp_detach("eth0", netns=pair.backend)
        old.remove()


def _decap_dir(pair: Pair) -> Path:
    from xdplb.instance import decap as places

    return places.for_iface("eth0", pair.backend).path


@pytest.mark.parametrize("args", [("attach", "nosuch0"), ("detach", "nosuch0"),
                                  ("status", "nosuch0"), ("attach", "eth0", "--mode", "hw")])
def test_usage_errors(pair, args):
    p = pair.xdplb("--netns", "decap", *args, check=False)
    assert p.returncode == 2 and p.stderr.strip() and not p.stdout, (p.stdout, p.stderr)
    assert xdp_prog(pair) is None


def test_missing_namespace_is_a_usage_error():
    p = sh(str(XDPLB), "--netns", f"xdc-none-{os.getpid()}", "decap", "status", check=False)
    assert p.returncode == 2 and "no network namespace" in p.stderr
