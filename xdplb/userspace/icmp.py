"""ICMP the balancer sends itself, rule for rule as bpf/icmp.h, back by XDP_TX: the reply to
an echo request to a VIP address; Time Exceeded for a packet to a VIP whose TTL runs out
here; "fragmentation needed" for a packet with DF set too long for its next hop (path MTU
discovery, both directions). Errors come from the address the packet was sent to and quote
it as it was sent."""

from __future__ import annotations

import struct
from collections.abc import Callable

from xdplb.abi.layout import Counter
from xdplb.userspace import csum
from xdplb.userspace.parse import Pkt

ICMP_ECHOREPLY, ICMP_DEST_UNREACH, ICMP_ECHO, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
ICMP_FRAG_NEEDED = 4  # the code of "fragmentation needed"
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
    csum.store16(buf, ic + 2, csum.icmp_fixup(csum.load16(buf, ic + 2)))


def _error(buf: bytearray, p: Pkt, icmp_type: int, code: int, rest: int) -> None:
    """xl_icmp_error: the frame becomes the ICMP error that quotes it (its IPv4 header and 8
    bytes), from its destination to its sender; ``rest``: the header's second word."""
    ip = p.ip
    quote = bytes(buf[ip : ip + QUOTE])
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + QUOTE, 0, 0, ICMP_TTL, 1, 0,
                                quote[16:20], quote[12:16]))
    csum.store16(hdr, 10, csum.words(hdr))
    msg = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest)) + quote
    csum.store16(msg, 2, csum.words(msg))
    buf[:] = buf[6:12] + buf[0:6] + b"\x08\x00" + hdr + msg


# An error a packet can be turned into: it rewrites the frame and names the event counted.
IcmpError = Callable[..., Counter]


def time_exceeded(buf: bytearray, p: Pkt) -> Counter:
    """xl_icmp_time_exceeded: TTL exceeded in transit (to a VIP, TTL <= 1)."""
    _error(buf, p, ICMP_TIME_EXCEEDED, 0, 0)
    return Counter.TTL_EXCEEDED


def frag_needed(buf: bytearray, p: Pkt, mtu: int) -> Counter:
    """xl_icmp_frag_needed: too long for the next hop, DF set; the sender must use ``mtu``."""
    _error(buf, p, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu)
    return Counter.FRAG_NEEDED


def may_bounce(buf: bytes | bytearray, p: Pkt) -> bool:
    """xl_may_bounce: DF set, not a fragment, no IP options, a transport header to quote."""
    return bool(buf[p.ip + 6] & 0x40) and not p.frag and not p.options and p.sport >= 0
