"""bpf/decap.c in Python, rule for rule and byte for byte: the IPIP decapsulation of a
"dsr, encap ipip" backend. tests/test_decap.py holds the two to each other on the same
frames (verdict, output bytes, counters).

Rules (see bpf/decap.c): not an untagged IPv4 frame, not protocol 4, or not to one of our
addresses: passed untouched. IPIP to us with a consistent outer header (version 4, IHL >= 5,
total length >= IHL and within the frame, right checksum, not a fragment) and inner header
(version 4, IHL >= 5, total length = outer total length - outer IHL, IHL within it): the
outer header is cut out (Ethernet addresses kept, trailing padding kept) and the inner
packet passed. Any other IPIP to us is dropped.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

from xdplb.abi.decap import IPPROTO_IPIP, DecapCounter
from xdplb.userspace import csum

ETH_LEN = 14
IP_MIN = 20
ETH_P_IP = b"\x08\x00"
IP_MF_OFFMASK = 0x3FFF


@dataclass(frozen=True)
class DecapResult:
    action: str  # "pass" or "drop"
    data: bytes  # the frame as it leaves (the input when untouched)
    counter: DecapCounter


def decap(frame: bytes, local: Container[bytes]) -> DecapResult:
    """One frame; ``local``: the packed IPv4 addresses decap_addrs holds."""
    end = len(frame)
    if end < ETH_LEN or frame[12:14] != ETH_P_IP:
        return DecapResult("pass", frame, DecapCounter.PASS_NOT_IPV4)
    ip = ETH_LEN
    if ip + IP_MIN > end or frame[ip + 9] != IPPROTO_IPIP:
        return DecapResult("pass", frame, DecapCounter.PASS_NOT_IPIP)
    if frame[ip + 16 : ip + 20] not in local:
        return DecapResult("pass", frame, DecapCounter.PASS_NOT_LOCAL)

    def drop(c: DecapCounter) -> DecapResult:
        return DecapResult("drop", frame, c)

    ohl = (frame[ip] & 0x0F) * 4
    tot = int.from_bytes(frame[ip + 2 : ip + 4], "big")
    if frame[ip] >> 4 != 4 or ohl < IP_MIN or tot < ohl or ip + tot > end:
        return drop(DecapCounter.DROP_MALFORMED)
    if csum.fold(sum(csum.load16(frame, ip + i) for i in range(0, ohl, 2))) != 0xFFFF:
        return drop(DecapCounter.DROP_BAD_CSUM)
    if int.from_bytes(frame[ip + 6 : ip + 8], "big") & IP_MF_OFFMASK:
        return drop(DecapCounter.DROP_FRAGMENT)
    inner = ip + ohl
    if inner + IP_MIN > end:
        return drop(DecapCounter.DROP_MALFORMED)
    ihl = (frame[inner] & 0x0F) * 4
    itot = int.from_bytes(frame[inner + 2 : inner + 4], "big")
    if frame[inner] >> 4 != 4 or ihl < IP_MIN or itot != tot - ohl or ihl > itot:
        return drop(DecapCounter.DROP_MALFORMED)
    return DecapResult("pass", frame[:12] + ETH_P_IP + frame[inner:], DecapCounter.DECAP)


@dataclass
class PyDecap:
    """The program with its maps: the local addresses and the counters."""

    local: set[bytes] = field(default_factory=set)
    counters: dict[str, int] = field(
        default_factory=lambda: {c.name.lower(): 0 for c in DecapCounter
                                 if c != DecapCounter.MAX})

    def run(self, frame: bytes) -> DecapResult:
        res = decap(frame, self.local)
        self.counters[res.counter.name.lower()] += 1
        return res
