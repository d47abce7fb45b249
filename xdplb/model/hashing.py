"""The flow hash shared by the BPF program (bpf/hash.h) and Python.

MurmurHash3 x86_32 over a fixed 16-byte string, seeded:

    saddr (4 bytes, wire order) | daddr (4) | sport (2, wire order) | dport (2) | proto (1) | 0 0 0

The C side loads the same bytes as little-endian 32-bit words, so the function is
the standard MurmurHash3 of that byte string on little-endian hosts (x86_64,
arm64), which is what lets tests check it against an independent implementation.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

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


def addr_slot(addr: bytes, bits: int = 16) -> int:
    """Prefilter slot of an IPv4 address (``xl_addr_slot`` in bpf/hash.h): Fibonacci
    hashing of the address loaded as a little-endian u32, top ``bits`` bits."""
    return ((int.from_bytes(addr[:4], "little") * 0x9E3779B1) & _M32) >> (32 - bits)


def flow_hash(saddr: bytes, daddr: bytes, sport: int, dport: int, proto: int, seed: int) -> int:
    """Hash of an IPv4 5-tuple, identical to ``xl_flow_hash`` in bpf/hash.h."""
    return murmur3_32(flow_hash_bytes(saddr, daddr, sport, dport, proto), seed)


def source_hash(saddr: bytes, seed: int) -> int:
    """Hash of the client address alone (scheduler source-hash), identical to
    ``xl_source_hash`` in bpf/hash.h."""
    return murmur3_32(saddr[:4], seed)


def _rotl32_np(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def murmur3_32_many(keys: Sequence[bytes], seed: int) -> np.ndarray:
    """``murmur3_32(key, seed)`` of every key, as uint32, vectorised over keys of equal length.

    Same function as :func:`murmur3_32` (tests check it), which costs ~2 us a call:
    4 ms of hashing alone for the 1000 backend keys of a Maglev build.
    """
    out = np.empty(len(keys), dtype=np.uint32)
    by_length: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_length.setdefault(len(k), []).append(i)
    c1, c2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)
    for length, idx in by_length.items():
        data = np.frombuffer(b"".join(keys[i] for i in idx), dtype=np.uint8)
        data = data.reshape(len(idx), length)
        nblocks = length // 4
        blocks = np.ascontiguousarray(data[:, : nblocks * 4]).view("<u4").astype(np.uint32)
        h = np.full(len(idx), seed & 0xFFFFFFFF, dtype=np.uint32)
        for j in range(nblocks):
            h ^= _rotl32_np(blocks[:, j] * c1, 15) * c2
            h = _rotl32_np(h, 13) * np.uint32(5) + np.uint32(0xE6546B64)
        if length % 4:
            k = np.zeros(len(idx), dtype=np.uint32)
            for j, byte in enumerate(data[:, nblocks * 4 :].T):
                k |= byte.astype(np.uint32) << np.uint32(8 * j)
            h ^= _rotl32_np(k * c1, 15) * c2
        h ^= np.uint32(length & 0xFFFFFFFF)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
        out[idx] = h
    return out
