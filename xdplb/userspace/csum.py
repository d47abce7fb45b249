"""Incremental Internet checksum updates (RFC 1624, eqn. 3), exactly as bpf/csum.h.

Values are 16- and 32-bit words as the BPF program loads them from the packet: little-endian
loads of wire bytes (``int.from_bytes(b, "little")``). One's-complement sums do not care about
byte order as long as old and new are loaded the same way, and keeping the C program's
arithmetic (rather than recomputing) is what makes both data paths emit the same bytes.
"""

from __future__ import annotations


def fold(s: int) -> int:
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return s & 0xFFFF


def replace2(check: int, old: int, new: int) -> int:
    return ~fold((~check & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF


def replace4(check: int, old: int, new: int) -> int:
    s = (~check & 0xFFFF) + (~old & 0xFFFF) + (~(old >> 16) & 0xFFFF)
    s += (new & 0xFFFF) + (new >> 16)
    return ~fold(s) & 0xFFFF


def udp_fixup(old_check: int, new_check: int) -> int:
    """UDP: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff."""
    if old_check == 0:
        return 0
    return 0xFFFF if new_check == 0 else new_check


def words(b: bytes | bytearray) -> int:
    """xl_csum_words: the Internet checksum of ``b`` (16-bit words, as the program loads
    them): over words just written with a checksum field of 0 the value to store; over words
    that carry a right checksum, 0."""
    return ~fold(sum(load16(b, i) for i in range(0, len(b), 2))) & 0xFFFF


def load16(buf: bytes | bytearray, off: int) -> int:
    """A 16-bit word as the BPF program loads it from the packet (little-endian host)."""
    return buf[off] | (buf[off + 1] << 8)


def store16(buf: bytearray, off: int, v: int) -> None:
    buf[off] = v & 0xFF
    buf[off + 1] = v >> 8


def set_byte(buf: bytearray, off: int, value: int, check: int) -> None:
    """xl_set_byte: ``buf[off] = value`` (off the first byte of its 16-bit word, as TTL or
    ICMP type), the checksum at ``check`` updated for that word."""
    old = load16(buf, off)
    buf[off] = value
    store16(buf, check, replace2(load16(buf, check), old, load16(buf, off)))


def set_addr(buf: bytearray, ip: int, addr: int, new_addr: bytes) -> None:
    """xl_set_addr: the IPv4 address at ``addr`` of the header at ``ip``, and that header's
    checksum (all that a fragment without the L4 header needs)."""
    old = int.from_bytes(buf[addr : addr + 4], "little")
    new = int.from_bytes(new_addr, "little")
    store16(buf, ip + 10, replace4(load16(buf, ip + 10), old, new))
    buf[addr : addr + 4] = new_addr


def icmp_fixup(check: int) -> int:
    """xl_icmp_fixup: after an incremental update RFC 1624 gives 0x0000 for a message that
    sums to zero, where only 0xffff verifies; 0xffff is right for every message."""
    return check or 0xFFFF
