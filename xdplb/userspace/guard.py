"""Frames the kernel would not route, rule for rule as bpf/guard.h: passed to the kernel
untouched and counted, so that copies of other hosts' frames (a flooding switch, a
promiscuous NIC) and packets the kernel would discard are never balanced."""

from __future__ import annotations

from xdplb.abi.layout import Counter
from xdplb.userspace import csum
from xdplb.userspace.parse import Pkt


def ip_csum_ok(buf: bytes | bytearray, ip: int) -> bool:
    """xl_ip_csum_ok: the checksum of a 20-byte IPv4 header (no options) is right."""
    return csum.words(buf[ip : ip + 20]) == 0


def guard(buf: bytes | bytearray, p: Pkt, own_mac: bytes | None) -> Counter | None:
    """xl_guard: the rule a frame that may be ours breaks, as its outcome; None: none.
    ``own_mac``: the ingress interface's MAC if if_macs knows it (xl_foreign_mac)."""
    if p.vlan:  # no VLAN is served: the kernel (its VLAN device) takes tagged frames
        return Counter.PASS_VLAN
    if buf[0] & 1:  # group bit: broadcast or multicast
        return Counter.PASS_GROUP_MAC
    if own_mac is not None and buf[0:6] != own_mac:  # the kernel drops it (OTHERHOST)
        return Counter.PASS_FOREIGN_MAC
    first = buf[p.ip + 12]
    if first in (0, 127) or first >= 224:  # this host, loopback, 224/3
        return Counter.PASS_MARTIAN
    if not p.options and not ip_csum_ok(buf, p.ip):
        return Counter.PASS_BAD_IP_CSUM
    return None
