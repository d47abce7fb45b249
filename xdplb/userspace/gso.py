"""Frames as they were on the wire, from what an AF_PACKET tap hands over.

XDP runs in the driver and sees every frame as it arrived. A tap sits after GRO and after
the checksum bookkeeping of the stack, so it can get what no wire carried: a GRO aggregate
of up to 64 KB (larger than any MTU: it cannot be sent on as it is), or a frame whose
TCP/UDP checksum is only the pseudo-header's, to be completed by offload (a local peer with
TX checksum offload, as veth has by default). With ``PACKET_VNET_HDR`` the kernel says which
(``struct virtio_net_hdr`` in front of each frame); this module turns such a frame back into
the wire frames the scapy data path must see, so that it takes the same decisions as the BPF
program, frame for frame: aggregates are cut at their segment size the way the kernel's GSO
would (TCP sequence numbers, IP ids, FIN/PSH on the last segment, CWR on the first only),
and checksums are computed in full.
"""

from __future__ import annotations

import struct

from scapy.utils import checksum

from xdplb.userspace.parse import IPPROTO_TCP, IPPROTO_UDP, OK, Pkt, parse

PACKET_VNET_HDR = 15  # socket option, SOL_PACKET
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NO_VNET_HDR = bytes(VNET_HDR.size)  # sending: no offload asked for
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP_L4 = 0, 1, 5
GSO_ECN = 0x80
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80


class Unsupported(ValueError):
    """An aggregate this module cannot cut (IPv6, UDP fragmentation offload, BIG TCP)."""


def is_aggregate(vnet: bytes) -> bool:
    return VNET_HDR.unpack(vnet)[1] & ~GSO_ECN != GSO_NONE


def wire_frames(vnet: bytes, frame: bytes) -> list[bytes]:
    """The wire frames behind one tapped frame and its virtio_net_hdr."""
    flags, gso_type, _, gso_size, _, _ = VNET_HDR.unpack(vnet)
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        return [_complete(frame) if flags & F_NEEDS_CSUM else frame]
    rc, p = parse(frame)
    if rc != OK or p is None or p.frag or gso_size == 0:
        raise Unsupported(f"GSO type {gso_type}: not an unfragmented IPv4 datagram")
    if kind == GSO_TCPV4 and p.proto == IPPROTO_TCP:
        return _cut(frame, p, gso_size)
    if kind == GSO_UDP_L4 and p.proto == IPPROTO_UDP:
        return _cut(frame, p, gso_size)
    raise Unsupported(f"GSO type {gso_type} for IP protocol {p.proto}")


def _l4_checksum(ip: bytes | bytearray, l4: bytes | bytearray, proto: int) -> int:
    """TCP/UDP checksum of segment ``l4`` (its checksum field zero) under IPv4 header ip."""
    pseudo = bytes(ip[12:20]) + bytes((0, proto)) + len(l4).to_bytes(2, "big")
    c = checksum(pseudo + bytes(l4))
    return 0xFFFF if c == 0 and proto == IPPROTO_UDP else c  # UDP: 0 would mean "none"


def _check_off(p: Pkt) -> int:
    return p.l4_check - (p.tcp if p.proto == IPPROTO_TCP else p.sport)


def _complete(frame: bytes) -> bytes:
    """A frame whose L4 checksum offload would have completed: complete it here."""
    rc, p = parse(frame)
    if rc != OK or p is None or p.l4_check < 0:
        return frame  # nothing we rewrite: the kernel judges it as it is
    ihl = (frame[p.ip] & 0x0F) * 4
    end = p.ip + ((frame[p.ip + 2] << 8) | frame[p.ip + 3])
    l4 = bytearray(frame[p.ip + ihl : end])
    l4[_check_off(p) : _check_off(p) + 2] = b"\0\0"
    l4[_check_off(p) : _check_off(p) + 2] = _l4_checksum(frame[p.ip : p.ip + ihl], l4,
                                                        p.proto).to_bytes(2, "big")
    return frame[: p.ip + ihl] + bytes(l4) + frame[end:]


def _fix_tcp(l4h: bytearray, i: int, n: int, size: int) -> None:
    """Segment i of n: its sequence number; FIN and PSH on the last only, CWR on the first."""
    seq = int.from_bytes(l4h[4:8], "big")
    l4h[4:8] = ((seq + i * size) & 0xFFFFFFFF).to_bytes(4, "big")
    if i < n - 1:
        l4h[13] &= ~(TCP_FIN | TCP_PSH) & 0xFF
    if i > 0:
        l4h[13] &= ~TCP_CWR & 0xFF


def _cut(frame: bytes, p: Pkt, size: int) -> list[bytes]:
    """Cut an aggregate into segments of ``size`` payload bytes, headers copied and fixed."""
    ip = p.ip
    ihl = (frame[ip] & 0x0F) * 4
    l4 = ip + ihl
    head = (frame[l4 + 12] >> 4) * 4 if p.proto == IPPROTO_TCP else 8
    end = ip + ((frame[ip + 2] << 8) | frame[ip + 3])
    payload = frame[l4 + head : end]
    ip_id = int.from_bytes(frame[ip + 4 : ip + 6], "big")
    n = max(1, -(-len(payload) // size))
    out = []
    for i in range(n):
        chunk = payload[i * size : (i + 1) * size]
        iph = bytearray(frame[ip:l4])
        iph[2:4] = (ihl + head + len(chunk)).to_bytes(2, "big")
        iph[4:6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
        iph[10:12] = b"\0\0"
        iph[10:12] = checksum(bytes(iph)).to_bytes(2, "big")
        l4h = bytearray(frame[l4 : l4 + head])
        if p.proto == IPPROTO_TCP:
            _fix_tcp(l4h, i, n, size)
        else:  # UDP: each datagram has its own header
            l4h[4:6] = (head + len(chunk)).to_bytes(2, "big")
        off = _check_off(p)
        l4h[off : off + 2] = b"\0\0"
        seg = bytes(l4h) + chunk
        l4h[off : off + 2] = _l4_checksum(iph, seg, p.proto).to_bytes(2, "big")
        out.append(frame[:ip] + bytes(iph) + bytes(l4h) + chunk)
    return out
