"""Which XDP program an interface runs, read with one rtnetlink request on a plain socket.

Readers (``xdplb status``) need nothing more, and importing pyroute2 would cost them ~20 MB and
~0.15 s, more than the rest of the command. The agent attaches and detaches with xdp_link.py
(pyroute2); both decode IFLA_XDP with ``decode_xdp``, so they agree on what is attached. Works
in the calling thread's network namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from dataclasses import dataclass, field

# include/uapi/linux/if_link.h
XDP_ATTACHED_NONE = 0
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2
XDP_ATTACHED_HW = 3
XDP_ATTACHED_MULTI = 4

IFLA_IFNAME = 3
IFLA_XDP = 43
IFLA_XDP_ATTACHED = 2
IFLA_XDP_PROG_ID = 4
# The per-mode program ids; with several modes attached the first of these names the state.
MODE_PROG_ID = {"native": 5, "generic": 6, "offload": 7}  # IFLA_XDP_{DRV,SKB,HW}_PROG_ID

# IFLA_XDP_ATTACHED raw (ints) or as pyroute2 decodes it (strings).
ATTACHED = {
    XDP_ATTACHED_DRV: "native",
    XDP_ATTACHED_SKB: "generic",
    XDP_ATTACHED_HW: "offload",
    "xdp": "native",
    "xdpgeneric": "generic",
    "xdpoffload": "offload",
}

# include/uapi/linux/netlink.h, rtnetlink.h
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
RTM_NEWLINK = 16
RTM_GETLINK = 18
NLA_TYPE_MASK = 0x3FFF  # drops NLA_F_NESTED and NLA_F_NET_BYTEORDER
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")
RECV_BYTES = 1 << 16  # one link's message without VF info is a few KiB
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class XdpState:
    """The XDP program attached to an interface.

    `mode` is "native", "generic" or "offload". When several modes are attached at once
    (offload together with native), `prog_id`/`mode` name the first of native, generic,
    offload, and `progs` lists them all.
    """

    ifindex: int
    prog_id: int
    mode: str
    progs: dict[str, int] = field(default_factory=dict)


def decode_xdp(index: int, attached: int | str | None, prog_id: int | None,
               progs: dict[str, int]) -> XdpState | None:
    """The state from IFLA_XDP's attributes (``progs``: the non-zero per-mode ids)."""
    if not attached:  # None (pyroute2's name for 0) or 0
        return None
    progs = dict(progs)
    single = ATTACHED.get(attached)
    if single is not None:
        prog_id = prog_id or progs.get(single, 0)
        progs.setdefault(single, prog_id)
        return XdpState(ifindex=index, prog_id=prog_id, mode=single, progs=progs)
    # XDP_ATTACHED_MULTI: no IFLA_XDP_PROG_ID, only the per-mode ids.
    for mode in MODE_PROG_ID:
        if mode in progs:
            return XdpState(ifindex=index, prog_id=progs[mode], mode=mode, progs=progs)
    return None


def _attrs(buf: bytes, offset: int, end: int) -> dict[int, bytes]:
    """Netlink attributes in ``buf[offset:end]`` by type (payloads only)."""
    out = {}
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(buf, offset)
        if length < _RTATTR.size:
            break
        out[kind & NLA_TYPE_MASK] = buf[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    return out


def _uint(payload: bytes | None) -> int:
    return int.from_bytes(payload, sys.byteorder) if payload else 0  # u8 or u32, host order


def _get_link(link: int | str) -> tuple[int, dict[int, bytes]]:
    """(ifindex, top-level attributes) of one RTM_GETLINK request for a name or an index."""
    ifname = b""
    if isinstance(link, str):
        name = link.encode() + b"\0"
        ifname = _RTATTR.pack(_RTATTR.size + len(name), IFLA_IFNAME) + name
        ifname += b"\0" * (-len(ifname) % 4)
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0 if ifname else int(link), 0, 0) + ifname
    seq = 1
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as s:
        s.settimeout(TIMEOUT_S)  # an answer never comes: OSError, not a hang
        s.bind((0, 0))
        s.send(msg)
        while True:
            buf = s.recv(RECV_BYTES)
            offset = 0
            while offset + _NLMSGHDR.size <= len(buf):
                length, kind, _, mseq, _ = _NLMSGHDR.unpack_from(buf, offset)
                start, end = offset + _NLMSGHDR.size, offset + length
                offset += max((length + 3) & ~3, _NLMSGHDR.size)
                if mseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -_ERRNO.unpack_from(buf, start)[0]
                    what = "no such interface" if code == errno.ENODEV else os.strerror(code)
                    raise OSError(code, f"interface {link!r}: {what}")
                if kind == RTM_NEWLINK:
                    index = _IFINFOMSG.unpack_from(buf, start)[2]
                    return index, _attrs(buf, start + _IFINFOMSG.size, end)


def xdp_state(link: int | str) -> XdpState | None:
    """The attached XDP program of ``link`` (name or index), or None. OSError (ENODEV) when
    there is no such interface in this network namespace."""
    index, attrs = _get_link(link)
    xdp = attrs.get(IFLA_XDP)
    if xdp is None:
        return None
    nested = _attrs(xdp, 0, len(xdp))
    progs = {mode: pid for mode, kind in MODE_PROG_ID.items()
             if (pid := _uint(nested.get(kind)))}
    return decode_xdp(index, _uint(nested.get(IFLA_XDP_ATTACHED)),
                      _uint(nested.get(IFLA_XDP_PROG_ID)), progs)
