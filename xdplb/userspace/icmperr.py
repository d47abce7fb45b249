"""ICMP errors about balanced traffic, rule for rule as bpf/icmperr.h: the quoted packet
found, and its quoted address (and port) rewritten with every checksum that covers it. The
decisions (which flow, which backend or VIP) are in datapath.py, as in xdplb.c."""

from __future__ import annotations

from xdplb.userspace import csum
from xdplb.userspace.icmp import ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED
from xdplb.userspace.parse import IPPROTO_TCP, IPPROTO_UDP, Pkt

ICMP_PARAMETERPROB = 12
_ERRORS = (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB)
_OFFMASK = 0x1FFF


def icmp_quote(buf: bytes | bytearray, p: Pkt) -> int:
    """xl_icmp_quote: offset of the quoted IPv4 header (no options, TCP or UDP, not a later
    fragment, 8 bytes of its payload in the packet) of an ICMP error; -1 when none."""
    ic = p.icmp
    if ic < 0 or buf[ic] not in _ERRORS:
        return -1
    end = min(len(buf), p.ip + ((buf[p.ip + 2] << 8) | buf[p.ip + 3]))
    q = ic + 8
    if q + 28 > end or buf[q] != 0x45 or ((buf[q + 6] << 8) | buf[q + 7]) & _OFFMASK \
            or buf[q + 9] not in (IPPROTO_TCP, IPPROTO_UDP):
        return -1
    return q


def quote_rewrite(buf: bytearray, ic: int, q: int, addr: int, new_addr: bytes, port: int,
                  new_port: int) -> None:
    """xl_quote_rewrite: the quoted address at ``addr`` (and the port at ``port`` unless
    new_port is 0; ports as the program loads them): the quoted header's checksum, a quoted
    UDP checksum, and the ICMP checksum over every word that changed."""
    s = csum.load16(buf, ic + 2)
    old_addr = int.from_bytes(buf[addr : addr + 4], "little")
    new = int.from_bytes(new_addr, "little")
    old_check = csum.load16(buf, q + 10)
    csum.set_addr(buf, q, addr, new_addr)
    s = csum.replace4(s, old_addr, new)
    s = csum.replace2(s, old_check, csum.load16(buf, q + 10))
    old_port = csum.load16(buf, port)
    if new_port and new_port != old_port:
        csum.store16(buf, port, new_port)
        s = csum.replace2(s, old_port, new_port)
    if buf[q + 9] == IPPROTO_UDP:
        old_u = csum.load16(buf, q + 26)
        u = csum.replace4(old_u, old_addr, new)
        if csum.load16(buf, port) != old_port:
            u = csum.replace2(u, old_port, csum.load16(buf, port))
        u = csum.udp_fixup(old_u, u)
        csum.store16(buf, q + 26, u)
        s = csum.replace2(s, old_u, u)
    csum.store16(buf, ic + 2, csum.icmp_fixup(s))
