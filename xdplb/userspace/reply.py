"""The reverse NAT's lookups, rule for rule as bpf/reply.h: the ``rev_nat`` entry of a backend
endpoint or address, the tracked flow a reply answers, and the checks a reply's fragment or
IPv4 options need. The decisions themselves are ``PyDatapath._from_backend`` and friends."""

from __future__ import annotations

from typing import Any

from xdplb.abi.layout import FAMILY_IPV4, REV_ANY_PORT, RevNat, RevTarget
from xdplb.userspace import csum
from xdplb.userspace.parse import IPPROTO_TCP, TCP_MIN, UDP_LEN, Pkt, flow_key

_ANY_PORT = REV_ANY_PORT.to_bytes(2, "big")
IP_OFFMASK = 0x1FFF


def rev_key(addr: bytes, port: bytes, proto: int) -> bytes:
    """An xl_rev_key's bytes: IPv4 address and port as on the wire (the family ends it)."""
    return addr + port + bytes((proto, FAMILY_IPV4))


def address_key(addr: bytes, proto: int) -> bytes:
    """The key of an address entry (every port of ``addr``): what fragments are judged by."""
    return rev_key(addr, _ANY_PORT, proto)


def reply_flow(flows: Any, rn: RevNat, client: bytes, cport: bytes, proto: int
               ) -> tuple[Any, RevTarget | None]:
    """xl_reply_flow: (the tracked flow a reply to ``client:cport`` answers, the VIP it goes
    back to), or (None, None). The first VIP whose flow names this backend wins, else the
    first whose flow is tracked at all."""
    first: tuple[Any, RevTarget | None] = (None, None)
    for t in rn.targets[: min(rn.count, len(rn.targets))]:
        f = flows.ref(flow_key(client, bytes(t.vip_addr), cport,
                               t.vip_port.to_bytes(2, "little"), proto))
        if f is None:
            continue
        if f.backend_id == t.backend_id:
            return f, t
        if first[0] is None:
            first = (f, t)
    return first


def ip_csum_ok_opts(buf: bytes | bytearray, ip: int) -> bool:
    """xl_ip_header_ok (csum.h): the checksum of an IPv4 header with options is right."""
    return csum.words(buf[ip : ip + (buf[ip] & 0x0F) * 4]) == 0


def is_first_fragment(buf: bytes | bytearray, ip: int) -> bool:
    return ((buf[ip + 6] << 8) | buf[ip + 7]) & IP_OFFMASK == 0


def first_fragment_l4(buf: bytes | bytearray, p: Pkt) -> bool:
    """xl_first_fragment_l4: a first fragment that holds its whole TCP/UDP header (ports and
    checksum) gets p's port and checksum offsets."""
    ip = p.ip
    l4 = ip + (buf[ip] & 0x0F) * 4
    end = min(len(buf), ip + ((buf[ip + 2] << 8) | buf[ip + 3]))
    tcp = p.proto == IPPROTO_TCP
    if l4 + (TCP_MIN if tcp else UDP_LEN) > end:
        return False
    p.sport, p.dport, p.l4_check = l4, l4 + 2, l4 + (16 if tcp else 6)
    return True
