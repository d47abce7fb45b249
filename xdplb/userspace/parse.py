"""Frame parsing for the scapy data path, rule for rule as bpf/parse.h: Ethernet (+ one
802.1Q tag) and IPv4, then TCP/UDP/ICMP only for packets that may be ours, with the same
bounds checks and the same verdicts. Offsets into
the frame, not objects: this runs for every packet, and scapy's dissection is far too slow.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdplb.abi.layout import ADDR_LEN, FAMILY_IPV4

OK, NOT_IPV4, MALFORMED = 0, 1, 2  # enum xl_parse_result

ETH_LEN = 14
VLAN_LEN = 4
IP_MIN = 20
TCP_MIN = 20
UDP_LEN = 8
ETH_P_IP = b"\x08\x00"
ETH_P_8021Q = b"\x81\x00"
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
ICMP_LEN = 8
IP_MF_OFFMASK = 0x3FFF
ADDR_PAD = bytes(ADDR_LEN - 4)
FAMILY_PAD = bytes((FAMILY_IPV4, 0, 0))  # family, then the u16 pad of xl_flow_key


@dataclass
class Pkt:
    """What xl_parse fills in: offsets of the headers in the frame."""

    ip: int  # offset of the IPv4 header
    proto: int
    frag: bool  # MF set or offset != 0
    options: bool  # IHL > 5
    vlan: bool = False  # one 802.1Q tag
    sport: int = -1  # offset of the source port; -1 unless TCP/UDP and not a fragment
    dport: int = -1
    l4_check: int = -1
    tcp: int = -1  # offset of the TCP header; -1 unless TCP
    icmp: int = -1  # offset of the ICMP header; -1 unless ICMP and not a fragment


def parse_l3(buf: bytes | bytearray) -> tuple[int, Pkt | None]:
    """(OK, Pkt) or (NOT_IPV4 | MALFORMED, None), as xl_parse_l3(): Ethernet and IPv4."""
    end = len(buf)
    if end < ETH_LEN:
        return MALFORMED, None
    off = ETH_LEN
    h_proto = buf[12:14]
    if h_proto == ETH_P_8021Q:
        if off + VLAN_LEN > end:
            return MALFORMED, None
        h_proto = buf[16:18]
        off += VLAN_LEN
    if h_proto != ETH_P_IP:  # a second tag (QinQ) lands here too: not parsed
        return NOT_IPV4, None
    ip = off
    if ip + IP_MIN > end:
        return MALFORMED, None
    vihl = buf[ip]
    ihl = (vihl & 0x0F) * 4
    tot = (buf[ip + 2] << 8) | buf[ip + 3]
    if vihl >> 4 != 4 or ihl < IP_MIN or tot < ihl or ip + tot > end:
        return MALFORMED, None
    frag = (((buf[ip + 6] << 8) | buf[ip + 7]) & IP_MF_OFFMASK) != 0
    return OK, Pkt(ip, buf[ip + 9], frag, ihl > IP_MIN, off != ETH_LEN)


def parse_l4(buf: bytes | bytearray, p: Pkt) -> int:
    """OK or MALFORMED, as xl_parse_l4(): fills in p's TCP/UDP/ICMP offsets unless a
    fragment."""
    if p.frag:
        return OK  # no trustworthy L4 header
    end, ip = len(buf), p.ip
    ihl = (buf[ip] & 0x0F) * 4
    l4 = ip + ihl
    l4_len = ((buf[ip + 2] << 8) | buf[ip + 3]) - ihl
    if p.proto == IPPROTO_TCP:
        if l4 + TCP_MIN > end:  # bounds against the frame, as the verifier demands
            return MALFORMED
        doff = (buf[l4 + 12] >> 4) * 4
        if doff < TCP_MIN or doff > l4_len:
            return MALFORMED
        p.tcp, p.sport, p.dport, p.l4_check = l4, l4, l4 + 2, l4 + 16
    elif p.proto == IPPROTO_UDP:
        if l4 + UDP_LEN > end:
            return MALFORMED
        ulen = (buf[l4 + 4] << 8) | buf[l4 + 5]
        if ulen < UDP_LEN or ulen > l4_len:
            return MALFORMED
        p.sport, p.dport, p.l4_check = l4, l4 + 2, l4 + 6
    elif p.proto == IPPROTO_ICMP:
        if l4 + ICMP_LEN > end or l4_len < ICMP_LEN:
            return MALFORMED
        p.icmp = l4
    return OK


def parse(buf: bytes | bytearray) -> tuple[int, Pkt | None]:
    """Both layers: (OK, Pkt) or (NOT_IPV4 | MALFORMED, None)."""
    rc, p = parse_l3(buf)
    if rc == OK and parse_l4(buf, p) != OK:
        return MALFORMED, None
    return rc, p


def flow_key(src: bytes, dst: bytes, sport: bytes, dport: bytes, proto: int) -> bytes:
    """An xl_flow_key's bytes from IPv4 addresses and ports as on the wire."""
    return src + dst + sport + dport + bytes((proto,)) + FAMILY_PAD


def forward_key(buf: bytes | bytearray, p: Pkt) -> bytes | None:
    """The flow key of a parsed frame (its 5-tuple as sent), or None without ports."""
    if p.sport < 0:
        return None
    ip = p.ip
    return flow_key(bytes(buf[ip + 12 : ip + 16]), bytes(buf[ip + 16 : ip + 20]),
                    bytes(buf[p.sport : p.sport + 2]), bytes(buf[p.dport : p.dport + 2]), p.proto)
