"""gso.py: what an AF_PACKET tap hands over, turned back into the frames on the wire."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Dot1Q, Ether
from testkit.pktcheck import checksum_errors

from xdplb.userspace import gso

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
PAYLOAD = bytes(range(256)) * 20  # 5120 bytes


def vnet(gso_type: int = gso.GSO_NONE, size: int = 0, flags: int = 0) -> bytes:
    return gso.VNET_HDR.pack(flags, gso_type, 0, size, 0, 0)


def aggregate(l2=ETH, flags: str = "PA") -> bytes:
    """A GRO aggregate as the tap sees it: one header, a long payload, a stale checksum."""
    pkt = l2 / IP(src="10.10.0.2", dst="10.200.0.10", id=100, flags="DF") / TCP(
        sport=40000, dport=80, seq=1000, flags=flags, chksum=0x1234) / PAYLOAD
    return bytes(pkt)


@pytest.mark.parametrize("l2", [ETH, ETH / Dot1Q(vlan=42)], ids=["untagged", "vlan"])
def test_tcp_aggregate_cut_as_gso_would(l2):
    agg = aggregate(l2, "FPA")
    frames = gso.wire_frames(vnet(gso.GSO_TCPV4, 1448), agg)
    assert len(frames) == 4  # 3 x 1448 + 776
    segs = [Ether(f) for f in frames]
    assert b"".join(bytes(s[TCP].payload) for s in segs) == PAYLOAD
    assert [s[TCP].seq for s in segs] == [1000 + i * 1448 for i in range(4)]
    assert [s[IP].id for s in segs] == [100, 101, 102, 103]
    assert [str(s[TCP].flags) for s in segs] == ["A", "A", "A", "FPA"]  # FIN, PSH: last only
    assert all(s[IP].len == 40 + len(s[TCP].payload) for s in segs)
    assert all(checksum_errors(f) == [] for f in frames)
    l2_len = len(agg) - len(Ether(agg)[IP])
    assert all(f[:l2_len] == agg[:l2_len] for f in frames)  # L2 (and the tag) kept


def test_cwr_only_on_the_first_segment():
    frames = gso.wire_frames(vnet(gso.GSO_TCPV4 | gso.GSO_ECN, 2000), aggregate(flags="CA"))
    assert [str(Ether(f)[TCP].flags) for f in frames] == ["AC", "A", "A"]


def test_udp_aggregate_cut_into_datagrams():
    frame = bytes(ETH / IP(src="10.10.0.2", dst="10.200.0.10") / UDP(sport=5000, dport=53)
                  / PAYLOAD[:3000])
    frames = gso.wire_frames(vnet(gso.GSO_UDP_L4, 1000), frame)
    assert len(frames) == 3
    assert all(Ether(f)[UDP].len == 1008 and checksum_errors(f) == [] for f in frames)
    assert b"".join(bytes(Ether(f)[UDP].payload) for f in frames) == PAYLOAD[:3000]


def test_partial_checksum_completed():
    good = bytes(ETH / IP(src="10.10.0.2", dst="10.200.0.10") / TCP(sport=1, dport=80) / b"x")
    partial = bytearray(good)
    partial[50:52] = b"\xab\xcd"  # what offload would have filled in
    assert checksum_errors(bytes(partial))
    assert gso.wire_frames(vnet(flags=gso.F_NEEDS_CSUM), bytes(partial)) == [good]


def test_plain_frames_untouched():
    frame = aggregate()  # a wrong checksum stays wrong: the kernel judges it, not us
    assert gso.wire_frames(vnet(), frame) == [frame]
    assert not gso.is_aggregate(vnet()) and gso.is_aggregate(vnet(gso.GSO_TCPV4, 1448))


@pytest.mark.parametrize("gso_type", [3, 4])  # UDP fragmentation offload, TCPv6
def test_other_aggregates_refused(gso_type):
    with pytest.raises(gso.Unsupported):
        gso.wire_frames(vnet(gso_type, 1448), aggregate())
