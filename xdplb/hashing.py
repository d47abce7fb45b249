"""The flow hash shared by the BPF program (bpf/hash.h) and Python.

MurmurHash3 x86_32 over a fixed 16-byte string, seeded:

    saddr (4 bytes, wire order) | daddr (4) | sport (2, wire order) | dport (2) | proto (1) | 0 0 0

The C side loads the same bytes as little-endian 32-bit words, so the function is
the standard MurmurHash3 of that byte string on little-endian hosts (x86_64,
arm64), which is what lets tests check it against an independent implementation.
"""

from __future__ import annotations

import struct

_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_M32 = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser (avalanche)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86_32 of ``data`` (any length) with a 32-bit ``seed``."""
    h = seed & _M32
    n = len(data)
    nblocks = n // 4
    for (k,) in struct.iter_unpack("<I", data[: nblocks * 4]):
        k = (k * _C1) & _M32
        k = _rotl32(k, 15)
        k = (k * _C2) & _M32
        h ^= k
        h = _rotl32(h, 13)
        h = (h * 5 + 0xE6546B64) & _M32
    tail = data[nblocks * 4 :]
    if tail:
        k = int.from_bytes(tail, "little")
        k = (k * _C1) & _M32
        k = _rotl32(k, 15)
        k = (k * _C2) & _M32
        h ^= k
    h ^= n
    return fmix32(h)


def flow_hash_bytes(saddr: bytes, daddr: bytes, sport: int, dport: int, proto: int) -> bytes:
    """The 16-byte string the flow hash covers (IPv4 addresses, host-order ports)."""
    return saddr + daddr + struct.pack("!HHB3x", sport, dport, proto)


def flow_hash(saddr: bytes, daddr: bytes, sport: int, dport: int, proto: int, seed: int) -> int:
    """Hash of an IPv4 5-tuple, identical to ``xl_flow_hash`` in bpf/hash.h."""
    return murmur3_32(flow_hash_bytes(saddr, daddr, sport, dport, proto), seed)
