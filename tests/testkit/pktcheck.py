"""Independent checks of the frames a data path emits: the IPv4 header checksum and the
TCP/UDP checksum (over pseudo-header + datagram) or the ICMP one (over the message) summed
afresh with scapy's Internet checksum, where the data paths only ever update them incrementally.

Headers are located here with their own few lines, not with ``parse.py``: a checker that
shared the code it checks could not catch its mistakes. No scapy dissection either: it is
~100x slower, and the fuzz checks every output frame.
"""

from __future__ import annotations

import struct

from scapy.utils import checksum

_ICMP, _TCP, _UDP = 1, 6, 17


def checksum_errors(frame: bytes) -> list[str]:
    """What is wrong with a frame's IPv4 and TCP/UDP/ICMP checksums: empty when they are right,
    or when there is no IPv4 header (with one optional 802.1Q tag) to check."""
    ip = 14
    etype = frame[12:14]
    if etype == b"\x81\x00":
        ip, etype = 18, frame[16:18]
    if etype != b"\x08\x00" or len(frame) < ip + 20:
        return []
    ihl = (frame[ip] & 0x0F) * 4
    tot, frag = struct.unpack_from("!H2xH", frame, ip + 2)
    if ihl < 20 or tot < ihl or ip + tot > len(frame):
        return ["IPv4 header inconsistent with the frame"]
    errors = []
    if checksum(frame[ip : ip + ihl]) != 0:
        errors.append(f"bad IPv4 header checksum {frame[ip + 10 : ip + 12].hex()}")
    proto = frame[ip + 9]
    seg = frame[ip + ihl : ip + tot]
    if frag & 0x3FFF or proto not in (_ICMP, _TCP, _UDP):
        return errors
    if proto == _ICMP:  # over the whole message, no pseudo-header
        if len(seg) >= 4 and checksum(seg) != 0:
            errors.append(f"bad ICMP checksum {seg[2:4].hex()}")
        return errors
    at = 16 if proto == _TCP else 6
    if len(seg) < at + 2 or (proto == _UDP and seg[6:8] == b"\x00\x00"):
        return errors  # too short to carry a checksum / UDP "no checksum"
    # Summed over the pseudo-header and the segment including its checksum: 0 when right.
    pseudo = frame[ip + 12 : ip + 20] + struct.pack("!BBH", 0, proto, len(seg))
    if checksum(pseudo + seg) != 0:
        name = "TCP" if proto == _TCP else "UDP"
        errors.append(f"bad {name} checksum {seg[at : at + 2].hex()}")
    return errors


def scapy_recomputed_errors(frame: bytes) -> list[str]:
    """The same verdict the slow, thorough way: scapy dissects the frame, forgets the
    checksums and builds it again; the rebuilt checksums must be the ones sent."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    if IP not in pkt or pkt[IP].ihl is None:
        return []
    ip = pkt[IP]
    errors = []
    fresh = Ether(frame)
    del fresh[IP].chksum
    l4 = ip.payload if not (ip.frag or ip.flags.MF) else None
    if isinstance(l4, TCP | ICMP) or (isinstance(l4, UDP) and l4.chksum != 0):
        del fresh[IP].payload.chksum
    rebuilt = Ether(bytes(fresh))
    if rebuilt[IP].chksum != ip.chksum:
        errors.append(f"IPv4 checksum {ip.chksum:#06x}, scapy computes {rebuilt[IP].chksum:#06x}")
    if isinstance(l4, TCP | UDP | ICMP) and rebuilt[IP].payload.chksum != l4.chksum:
        errors.append(f"{type(l4).__name__} checksum {l4.chksum:#06x}, scapy computes "
                      f"{rebuilt[IP].payload.chksum:#06x}")
    return errors


def rewrite_errors(before: bytes, after: bytes) -> list[str]:
    """Checksum mistakes a data path made turning ``before`` into ``after``: none when it
    left the frame alone; when it rewrote a frame whose checksums were right, they must still
    be right. (Updates are incremental, so a checksum that arrived wrong stays wrong: that is
    the sender's mistake, and the kernel's to judge.)"""
    if after == before or checksum_errors(before):
        return []
    return checksum_errors(after)
