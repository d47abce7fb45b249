"""``xdplb replay``: a capture through each data path, as a user runs it, in the bench
namespace. Both engines must tell the same story, packet by packet, and write the same
output capture."""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest
from agent_process import XDPLB
from pools import BE2, VIP, Backend, Vip, pool_yaml
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import RawPcapReader, RawPcapWriter, wrpcap
from testkit.benchns import Bench, bench_namespace
from testkit.fuzz import build
from testkit.pktcheck import checksum_errors, scapy_recomputed_errors

pytestmark = pytest.mark.root

CLIENT = "10.10.0.2"
POOL = pool_yaml(Vip("web", 80, (Backend(BE2, port=8080),)),
                 Vip("far", 80, ("10.30.0.5",), address="10.200.0.20"),
                 table_size=251, flows={"max_entries": 4096})
KEYS = {"index", "verdict", "reason", "backend", "flow", "in_len", "out_len"}
# (frame, verdict, reason, flow effect, backend) in capture order: flows carry over
CONVERSATION = [
    (build(CLIENT, VIP, 6, 40000, 80, flags="S"), "tx", "tx", "created", "10.20.0.12:8080"),
    (build("10.20.0.12", CLIENT, 6, 8080, 40000, flags="SA", smac="02:00:00:00:14:0c"),
     "tx", "tx", "reply", "10.20.0.12:8080"),
    (build(CLIENT, VIP, 6, 40000, 80, flags="A", payload=b"GET /"), "tx", "tx", "hit",
     "10.20.0.12:8080"),
    (build(CLIENT, "10.200.0.20", 6, 40000, 80), "redirect", "redirect", "created",
     "10.30.0.5:80"),
    (build(CLIENT, VIP, 6, 40001, 80, ttl=1), "tx", "tx", "none", None),  # Time Exceeded
    (bytes(Ether(src="02:00:00:00:0a:02", dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.10.0.1")),
     "pass", "pass_not_ipv4", "none", None),
    (bytes(12), "error", None, "none", None),  # a runt: no XDP program ever sees one
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    (tmp / "pool.yaml").write_text(POOL)
    w = RawPcapWriter(str(tmp / "in.pcap"), linktype=1)
    w.write_header(None)
    for i, (f, *_) in enumerate(CONVERSATION):
        w.write_packet(f, sec=1_700_000_000 + i, usec=0)
    w.close()
    with bench_namespace(f"xlt-s-rp-{os.getpid()}") as b:
        yield b, tmp


def replay(b: Bench, tmp, datapath: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(XDPLB), "--netns", b.name, "replay", str(tmp / "in.pcap"), "--config",
         str(tmp / "pool.yaml"), "--datapath", datapath, "--out", str(tmp / f"{datapath}.pcap"),
         *extra], capture_output=True, text=True, timeout=120, check=True)


def frames(path) -> list[bytes]:
    with RawPcapReader(str(path)) as r:
        return [data for data, _ in r]


@pytest.fixture(scope="module")
def both(bench):
    b, tmp = bench
    out = {}
    for dp in ("bpf", "scapy"):
        p = replay(b, tmp, dp, "--json", "--iface", "d0", "--iface", "d1")
        out[dp] = [json.loads(line) for line in p.stdout.splitlines()]
    return out


def test_json_schema_and_story(both):
    recs = both["scapy"]
    assert [r["index"] for r in recs] == list(range(len(CONVERSATION)))
    for r, (frame, verdict, reason, flow, backend) in zip(recs, CONVERSATION, strict=True):
        assert set(r) == KEYS
        assert (r["verdict"], r["flow"], r["backend"], r["in_len"]) == \
            (verdict, flow, backend, len(frame))
        if reason is not None:
            assert r["reason"] == reason
        assert (r["out_len"] is None) == (verdict in ("drop", "error"))


def test_engines_agree_and_write_the_same_capture(bench, both):
    _, tmp = bench
    assert both["bpf"] == both["scapy"]
    out = frames(tmp / "bpf.pcap")
    assert out == frames(tmp / "scapy.pcap")
    assert len(out) == sum(r["out_len"] is not None for r in both["bpf"])
    for f in out:
        assert checksum_errors(f) == [] and scapy_recomputed_errors(f) == []
    syn = Ether(out[0])
    assert (syn[IP].dst, syn[TCP].dport, syn[IP].ttl) == ("10.20.0.12", 8080, 63)
    assert (Ether(out[1])[IP].src, Ether(out[1])[TCP].sport) == (VIP, 80)


def test_human_output_and_loopback_default(bench):
    """Without --iface frames arrive on lo and nothing is attached: balanced frames go to
    the kernel (egress not attached), in both engines alike."""
    b, tmp = bench
    out = {dp: replay(b, tmp, dp).stdout.splitlines() for dp in ("bpf", "scapy")}
    assert out["bpf"] == out["scapy"]
    assert out["bpf"][0] == "#0 pass (pass_foreign_egress) flow=created " \
                            "backend=10.20.0.12:8080 54->54"


def test_bad_captures_are_usage_errors(bench):
    b, tmp = bench
    (tmp / "notpcap.pcap").write_text("hello\n")
    wrpcap(str(tmp / "ip.pcap"), [IP(dst=VIP) / TCP()])  # raw IP link type, not Ethernet
    (tmp / "null.pcapng").write_bytes(pcapng_one_frame(linktype=0, frame=bytes(60)))  # DLT_NULL
    for name, want in (("notpcap.pcap", "not a pcap"), ("ip.pcap", "only Ethernet"),
                       ("null.pcapng", "link type 0, only Ethernet")):
        p = subprocess.run([str(XDPLB), "--netns", b.name, "replay", str(tmp / name),
                            "--config", str(tmp / "pool.yaml"), "--datapath", "scapy",
                            "--out", str(tmp / "x.pcap")], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2 and want in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


def pcapng_one_frame(linktype: int, frame: bytes) -> bytes:
    """A pcapng file by hand (section header, one interface of ``linktype``, one enhanced
    packet block): scapy's writer only writes Ethernet interfaces."""
    def block(kind: int, body: bytes) -> bytes:
        body += bytes(-len(body) % 4)
        n = 12 + len(body)
        return struct.pack("<II", kind, n) + body + struct.pack("<I", n)

    shb = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = block(1, struct.pack("<HHI", linktype, 0, 65535))
    epb = block(6, struct.pack("<IIIII", 0, 0, 0, len(frame), len(frame)) + frame)
    return shb + idb + epb


def test_pcapng_capture_same_story(bench, both):
    b, tmp = bench
    from scapy.utils import wrpcapng

    wrpcapng(str(tmp / "in.pcapng"), [Ether(f) for f in frames(tmp / "in.pcap") if len(f) >= 14])
    p = subprocess.run([str(XDPLB), "--netns", b.name, "replay", str(tmp / "in.pcapng"),
                        "--config", str(tmp / "pool.yaml"), "--datapath", "scapy", "--out",
                        str(tmp / "ng.pcap"), "--json", "--iface", "d0", "--iface", "d1"],
                       capture_output=True, text=True, timeout=60, check=True)
    got = [json.loads(line) for line in p.stdout.splitlines()]
    assert got == [r for r in both["scapy"] if r["verdict"] != "error"]
