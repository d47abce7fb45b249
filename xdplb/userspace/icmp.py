"""ICMP the balancer sends itself, rule for rule as bpf/icmp.h: the reply to an echo request
to a VIP address, and Time Exceeded for a packet to a VIP whose TTL runs out here, both from
the VIP, back by XDP_TX."""

from __future__ import annotations

import struct

from xdplb.userspace import csum
from xdplb.userspace.parse import Pkt

ICMP_ECHOREPLY, ICMP_ECHO, ICMP_TIME_EXCEEDED = 0, 8, 11
ICMP_TTL = 64
QUOTE = 28  # the IPv4 header (without options here) and 8 bytes of its payload




def is_echo_request(buf: bytes | bytearray, p: Pkt) -> bool:
    return p.icmp >= 0 and buf[p.icmp] == ICMP_ECHO and buf[p.icmp + 1] == 0


def echo_reply(buf: bytearray, p: Pkt) -> None:
    """xl_icmp_echo: the request turned in place into its reply: MACs and addresses swapped
    (the IPv4 checksum does not change with the order of its words), a fresh TTL, type 0."""
    ip, ic = p.ip, p.icmp
    buf[0:6], buf[6:12] = buf[6:12], buf[0:6]
    buf[ip + 12 : ip + 16], buf[ip + 16 : ip + 20] = buf[ip + 16 : ip + 20], buf[ip + 12 : ip + 16]
    csum.set_byte(buf, ip + 8, ICMP_TTL, ip + 10)
    csum.set_byte(buf, ic, ICMP_ECHOREPLY, ic + 2)
    # RFC 1624's update gives 0x0000 for a message that sums to zero (an empty echo with id
    # and sequence 0); only 0xffff verifies there, and it is right for every message.
    if buf[ic + 2] == buf[ic + 3] == 0:
        buf[ic + 2] = buf[ic + 3] = 0xFF


def csum_words(b: bytes | bytearray) -> int:
    """xl_csum_words: the Internet checksum of words just written (checksum field 0), as the
    program stores it (little-endian loads)."""
    return ~csum.fold(sum(csum.load16(b, i) for i in range(0, len(b), 2))) & 0xFFFF


def time_exceeded(buf: bytearray, p: Pkt) -> None:
    """xl_icmp_time_exceeded: the frame becomes the Time Exceeded that quotes it (its IPv4
    header and 8 bytes), from the VIP to its sender."""
    ip = p.ip
    quote = bytes(buf[ip : ip + QUOTE])
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + QUOTE, 0, 0, ICMP_TTL, 1, 0,
                                quote[16:20], quote[12:16]))
    csum.store16(hdr, 10, csum_words(hdr))
    msg = bytearray(struct.pack("!BBHI", ICMP_TIME_EXCEEDED, 0, 0, 0)) + quote
    csum.store16(msg, 2, csum_words(msg))
    buf[:] = buf[6:12] + buf[0:6] + b"\x08\x00" + hdr + msg
