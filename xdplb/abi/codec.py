"""Encodings of values the maps carry: addresses, ports in network order, IP protocol
numbers, and ctypes keys/values as bytes. One encoding for kernel maps, the Python data
path's maps and the readers."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from typing import Any

from xdplb.abi.layout import FAMILY_IPV4, VipKey, addr16

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}


def be16(port: int) -> int:
    """A port as the u16 that holds it in network order on this (little-endian) host."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def from_be16(raw: int) -> int:
    return int.from_bytes(raw.to_bytes(2, "little"), "big")


def packed_ipv4(address: str) -> bytes:
    return ipaddress.IPv4Address(address).packed


def ipv4_of(addr: object) -> str:
    return str(ipaddress.IPv4Address(bytes(addr)[:4]))


def vip_key(address: str, port: int, proto: int) -> VipKey:
    """The ``vips`` map key of a service (address, port, protocol)."""
    return VipKey(addr16(packed_ipv4(address)), be16(port), proto, FAMILY_IPV4)


def encode(t: type, v: Any) -> bytes:
    """A map key or value as bytes: ctypes objects as they are, ints as ``t``."""
    if isinstance(v, int | bool):
        return bytes(t(int(v)))
    return bytes(v)


def decode(t: type, raw: bytes) -> Any:
    """Bytes as ``t``: a ctypes object, or an int for scalar types."""
    obj = t.from_buffer_copy(raw[: ctypes.sizeof(t)])
    return obj.value if isinstance(obj, ctypes._SimpleCData) else obj
