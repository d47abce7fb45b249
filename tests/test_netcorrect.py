"""The network's own traffic through a real lab, native XDP: a ping of a VIP is answered
from the VIP, and a packet to a VIP whose TTL runs out at the balancer gets Time Exceeded
from the balancer's hop, in the VIP's name (what traceroute relies on), with real sockets in
the client namespace. Before, both went unanswered."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from agent_process import AgentProcess, status
from backend_server import pattern_sha256
from lab import Lab
from pools import BE1, ECHO, VIP, WEB, Vip, pool_yaml
from scapy.layers.inet import ICMP, IP, TCP
from scapy.utils import rdpcap
from testkit.pktcheck import checksum_errors

pytestmark = pytest.mark.root

# A probe with TTL 1 to VIP:port over UDP or TCP; the kernel reports the ICMP error on the
# socket's error queue (IP_RECVERR), as traceroute reads it.
TTL_PROBE = """
import json, select, socket, struct, sys
IP_RECVERR = 11  # linux/in.h; Python's socket module does not name it
proto, port = sys.argv[1], int(sys.argv[2])
kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_IP, socket.IP_TTL, 1)
s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
s.setblocking(False)
if proto == "udp":
    s.sendto(b"probe", ("{vip}", port))
else:
    try:
        s.connect(("{vip}", port))
    except BlockingIOError:
        pass
p = select.poll()
p.register(s, select.POLLERR)
if not p.poll(3000):
    print(json.dumps(None)); sys.exit(0)
_, anc, _, _ = s.recvmsg(512, 512, socket.MSG_ERRQUEUE)
for level, typ, data in anc:
    if level == socket.SOL_IP and typ == IP_RECVERR:
        errno, origin, etype, code = struct.unpack_from("=IBBB", data)
        offender = socket.inet_ntoa(data[20:24])
        print(json.dumps({{"origin": origin, "type": etype, "code": code,
                          "offender": offender}}))
"""
SO_EE_ORIGIN_ICMP, ICMP_TIME_EXCEEDED = 2, 11


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("netcorrect")
    with Lab(topology="one-armed", backends=2, prefix="xlt-nc") as lab:
        pool = tmp / "pool.yaml"
        pool.write_text(pool_yaml(WEB, ECHO))
        agent = AgentProcess(lab, pool, "--mode", "native")
        try:
            yield lab
        finally:
            assert agent.stop() == 0, agent.log_text()


def counters(lab: Lab) -> dict[str, int]:
    return status(lab)["groups"][0]["counters"]


def test_ping_of_a_vip_is_answered_from_the_vip(running):
    lab = running
    before = counters(lab)
    out = lab.run(lab.client_ns, "python3", "-c", PING_FROM_VIP, timeout=20).stdout
    replies = json.loads(out)
    assert len(replies) == 3 and all(r == [VIP, 0, 64] for r in replies), replies
    after = counters(lab)
    assert after["icmp_echo"] - before.get("icmp_echo", 0) == 3


@pytest.mark.parametrize("proto,port", [("udp", 5000), ("tcp", 80)])
def test_ttl_expiry_at_the_balancer_sends_time_exceeded(running, proto, port):
    lab = running
    before = counters(lab)
    out = lab.run(lab.client_ns, "python3", "-c", TTL_PROBE.format(vip=VIP), proto, str(port),
                  timeout=20).stdout
    err = json.loads(out)
    assert err == {"origin": SO_EE_ORIGIN_ICMP, "type": ICMP_TIME_EXCEEDED, "code": 0,
                   "offender": VIP}, out
    after = counters(lab)
    assert after["ttl_exceeded"] - before.get("ttl_exceeded", 0) >= 1
    assert after.get("new_flow", 0) == before.get("new_flow", 0)  # nothing was balanced


# Three echo requests from a raw socket; for each reply: its source, ICMP type and TTL.
PING_FROM_VIP = f"""
import json, os, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(2)
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
out = []
for seq in range(3):
    body = struct.pack("!HH", os.getpid() & 0xFFFF, seq) + b"xdplb-ping" * 4
    hdr = struct.pack("!BBH", 8, 0, 0)
    msg = struct.pack("!BBH", 8, 0, csum(hdr + body)) + body
    s.sendto(msg, ("{VIP}", 0))
    while True:
        pkt, (src, _) = s.recvfrom(2048)
        ihl = (pkt[0] & 15) * 4
        if pkt[ihl] == 0 and pkt[ihl + 4 : ihl + 8] == body[:4]:
            assert csum(pkt[ihl:]) == 0, "bad ICMP checksum"
            out.append([src, pkt[ihl], pkt[8]])
            break
print(json.dumps(out))
"""


@dataclass
class Capture:
    packets: list = field(default_factory=list)  # filled when the capture ends


@contextlib.contextmanager
def capture(lab: Lab, ns: str, *bpf_filter: str, sparse: bool = True) -> Iterator[Capture]:
    """tcpdump on ``ns``'s eth0 while the block runs; its packets once it ends. The file is in
    /tmp (tcpdump drops root, and pytest's directories are root's) and is removed whatever
    happens. ``sparse``: each packet is delivered at once, or a few ICMP errors would wait in
    the kernel's ring past the end of the block (a busy capture keeps the ring's batching,
    without which the kernel drops what tcpdump cannot keep up with)."""
    path = Path("/tmp") / f"{lab.prefix}-{ns}-{time.monotonic_ns()}.pcap"
    mode = ["--immediate-mode"] if sparse else []
    dump = lab.popen(ns, "tcpdump", "-i", "eth0", "-n", "-U", *mode, "-w", str(path),
                     *bpf_filter)
    cap = Capture()
    try:
        time.sleep(1)  # listening
        yield cap
        time.sleep(1)  # the last packets arrive
    finally:
        dump.terminate()
        dump.wait(10)
        try:
            cap.packets = list(rdpcap(str(path)))
        finally:
            path.unlink(missing_ok=True)


# --- a lab with veth's default offloads (TX checksum offload on everywhere) -------------------


def lb_peer(lab: Lab) -> tuple[str, str]:
    """(namespace, interface) of the veth end facing the LB's client interface."""
    (v,) = [v for v in lab.veths if lab.lb_ns in (v.ns_a, v.ns_b)]
    return (v.ns_b, v.if_b) if v.ns_a == lab.lb_ns else (v.ns_a, v.if_a)


def tx_checksumming(lab: Lab, ns: str, iface: str) -> str:
    out = lab.run(ns, "ethtool", "-k", iface).stdout
    return next(line.split(":")[1].strip() for line in out.splitlines()
                if line.startswith("tx-checksumming:"))


def test_default_veth_offloads_are_made_safe_at_attach(tmp_path):
    """A lab built as by hand, TX checksum offload on at every veth end: `attach` turns it
    off on the LB's veth peer (and says so), so the program never rewrites a partial
    checksum; 1 MiB down and up intact, and every frame the client receives from the VIP
    carries checksums that scapy's own sum confirms."""
    with Lab(topology="one-armed", backends=2, prefix="xlt-nco", tx_offload=True) as lab:
        ns, peer = lb_peer(lab)
        assert tx_checksumming(lab, ns, peer) == "on"
        assert tx_checksumming(lab, lab.client_ns, "eth0") == "on"  # the senders keep theirs
        pool = tmp_path / "pool.yaml"
        pool.write_text(pool_yaml(WEB, ECHO))
        agent = AgentProcess(lab, pool, "--mode", "native")
        try:
            assert tx_checksumming(lab, ns, peer) == "off"
            assert f"turned TX checksum offload off on its veth peer {peer}" in agent.log_text()
            # GRO off where the LB's frames arrive (its veth peer, which keeps NAPI by its
            # XDP program): tcpdump must see them as the LB sent them, not merged (a merged
            # packet carries a partial checksum of the kernel's own).
            lab.run(ns, "ethtool", "-K", peer, "gro", "off")
            n = 1 << 20
            with capture(lab, lab.client_ns, "ip", "and", "src", VIP, sparse=False) as cap:
                body = lab.run(lab.client_ns, "sh", "-c",
                               f"curl -s -m 30 'http://{VIP}/bytes?n={n}' | sha256sum; "
                               f"head -c {n} /dev/urandom > /tmp/xlt-nco-up-$$; "
                               f"sha256sum < /tmp/xlt-nco-up-$$; "
                               f"curl -s -m 30 --data-binary @/tmp/xlt-nco-up-$$ "
                               f"'http://{VIP}/echo' | sha256sum; rm -f /tmp/xlt-nco-up-$$",
                               timeout=90).stdout.split("\n")
            down, up_sent, up_back = (line.split()[0] for line in body[:3])
            assert down == pattern_sha256(n)
            assert up_sent == up_back, body
            pkts = [p for p in cap.packets if IP in p and TCP in p]
            assert len(pkts) > 1000 and max(len(p) for p in pkts) <= 1514, len(pkts)
            assert [checksum_errors(bytes(p)) for p in pkts] == [[]] * len(pkts)
        finally:
            assert agent.stop() == 0, agent.log_text()


# --- path MTU discovery through the VIP ----------------------------------------------------------


def _connected_route(lab: Lab, net: str, *extra: str) -> None:
    """Replace the LB's connected route to ``net`` (one-armed: on eth0), e.g. with a locked
    MTU: XDP's FIB lookup then reports packets longer than it (as a smaller MTU further
    along the path would, on a real network)."""
    src = lab.lb_backend_addr if net.startswith("10.20.") else lab.lb_client_addr
    lab.run(lab.lb_ns, "ip", "route", "replace", net, "dev", "eth0", "proto", "kernel",
            "scope", "link", "src", src, *extra)


def _frag_needed(packets: list) -> list:
    return [p for p in packets if ICMP in p and p[ICMP].type == 3 and p[ICMP].code == 4]


def test_path_mtu_discovery_through_the_vip_both_ways(tmp_path):
    """A path MTU of 1400 between the balancer and the backends, then on the client side:
    1 MiB uploads and downloads with DF set complete; the client's "fragmentation needed"
    comes from the VIP and quotes its own packet to the VIP, the backend's comes from the
    client and quotes its own reply (checked with scapy on captures). Before, the kernel
    answered quoting the rewritten packet, which no socket recognised: the transfer hung."""
    with Lab(topology="one-armed", backends=1, prefix="xlt-pm") as lab:
        pool = tmp_path / "pool.yaml"
        pool.write_text(pool_yaml(replace(WEB, backends=WEB.backends[:1])))  # be1 only
        agent = AgentProcess(lab, pool, "--mode", "native")
        be_ns, be_addr = lab.backend_ns[0], lab.backend_addrs[0]
        n = 1 << 20
        try:
            # Upload: the client's 1500-byte segments do not fit toward the backend.
            _connected_route(lab, "10.20.0.0/24", "mtu", "lock", "1400")
            with capture(lab, lab.client_ns, "icmp") as cap:
                out = lab.run(lab.client_ns, "sh", "-c",
                              f"head -c {n} /dev/urandom > {tmp_path}/up; sha256sum < "
                              f"{tmp_path}/up; curl -s -m 30 --data-binary @{tmp_path}/up "
                              f"'http://{VIP}/echo' | sha256sum", timeout=60).stdout.split()
            assert out[0] == out[2], out  # echoed back intact
            errs = _frag_needed(cap.packets)
            assert errs, "no fragmentation needed reached the client"
            for e in errs:
                inner = e[ICMP].payload
                assert (e[IP].src, e[ICMP].nexthopmtu) == (VIP, 1400), e.show(dump=True)
                assert (inner.src, inner.dst, bytes(inner)[22:24]) == (
                    lab.client_addr, VIP, (80).to_bytes(2, "big")), e.show(dump=True)
            # Download: the backend's 1500-byte replies do not fit toward the client.
            _connected_route(lab, "10.20.0.0/24")
            _connected_route(lab, "10.10.0.0/24", "mtu", "lock", "1400")
            # Forget the MTU learned above, or the client advertises an MSS that already fits.
            for ns in (lab.client_ns, be_ns):
                lab.run(ns, "ip", "route", "flush", "cache")
            with capture(lab, be_ns, "icmp") as cap:
                got = lab.run(lab.client_ns, "sh", "-c",
                              f"curl -s -m 30 'http://{VIP}/bytes?n={n}' | sha256sum",
                              timeout=60).stdout.split()[0]
            assert got == pattern_sha256(n)
            errs = _frag_needed(cap.packets)
            assert errs, "no fragmentation needed reached the backend"
            for e in errs:
                inner = e[ICMP].payload
                assert (e[IP].src, e[IP].dst, e[ICMP].nexthopmtu) == (
                    lab.client_addr, be_addr, 1400), e.show(dump=True)
                assert (inner.src, inner.dst) == (be_addr, lab.client_addr), e.show(dump=True)
            assert [checksum_errors(bytes(e)) for e in errs] == [[]] * len(errs)
            assert status(lab)["groups"][0]["counters"]["frag_needed"] >= 2
        finally:
            assert agent.stop() == 0, agent.log_text()


# --- ICMP errors about balanced flows ------------------------------------------------------------

# A connected UDP socket to VIP:port from a fixed port; what a second send then reports
# (the first send's ICMP error, if any, arrives as ECONNREFUSED on the socket).
UDP_REFUSED = """
import errno, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.connect(("{vip}", int(sys.argv[1])))
s.settimeout(2)
s.send(b"anyone?")
try:
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"""

# An ICMP port unreachable to the VIP quoting VIP:port -> this host:cport, as this host's
# kernel would send it for a reply to a closed port.
ERROR_TO_VIP = """
import socket, sys
from scapy.layers.inet import ICMP, IP, UDP
quoted = bytes(IP(src="{vip}", dst=sys.argv[1]) / UDP(sport=int(sys.argv[2]),
                                                    dport=int(sys.argv[3])) / (b"x" * 8))[:28]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(bytes(ICMP(type=3, code=3) / quoted), ("{vip}", 0))
"""


def test_icmp_errors_reach_the_sockets_they_are_about(tmp_path):
    """A UDP VIP whose backend has nothing on the port: the backend's port unreachable
    reaches the client translated, and its connected socket sees ECONNREFUSED (before, the
    error quoted the backend's address and matched no socket: a timeout). An error sent to
    the VIP about a reply reaches the flow's backend quoting the backend's own datagram."""
    closed = Vip("closed", 5999, (BE1,), protocol="udp")
    with Lab(topology="one-armed", backends=1, prefix="xlt-ie") as lab:
        pool = tmp_path / "pool.yaml"
        pool.write_text(pool_yaml(closed, replace(ECHO, backends=ECHO.backends[:1])))
        agent = AgentProcess(lab, pool, "--mode", "native")
        try:
            out = lab.run(lab.client_ns, sys.executable, "-c", UDP_REFUSED.format(vip=VIP),
                          "5999", "41999", timeout=20).stdout.split()
            assert out == ["refused"], out
            # A flow to the echo VIP, then an error about its reply sent to the VIP.
            lab.udp_request(lab.client_ns, VIP, 5000, b"hello", sport=42000)
            with capture(lab, lab.backend_ns[0], "icmp") as cap:
                lab.run(lab.client_ns, sys.executable, "-c", ERROR_TO_VIP.format(vip=VIP),
                        lab.client_addr, "5000", "42000", timeout=20)
            errs = [p for p in cap.packets if ICMP in p and p[ICMP].type == 3]
            assert len(errs) == 1, errs
            e = errs[0]
            inner = e[ICMP].payload
            assert (e[IP].src, e[IP].dst) == (lab.client_addr, BE1), e.show(dump=True)
            assert (inner.src, inner.dst, inner.sport, inner.dport) == (
                BE1, lab.client_addr, 5000, 42000), e.show(dump=True)
            assert checksum_errors(bytes(e)) == []
            counters = status(lab)["groups"][0]["counters"]
            assert counters["icmp_to_client"] >= 1 and counters["icmp_to_backend"] == 1
        finally:
            assert agent.stop() == 0, agent.log_text()
