"""A Maglev ring as the kernel holds it: backend ids as u16, four to a u64 word (an array
map's element is 8 bytes whatever its value size, so one u32 a slot would cost 8 bytes;
packed, a slot costs 2). Slot k is bits 16*(k%4) of word k//4 (little endian: the u16
array itself). Padding slots after the last are RING_NO_BACKEND."""

from __future__ import annotations

import numpy as np

from xdplb.abi.layout import NO_BACKEND, RING_NO_BACKEND, RING_SLOTS_PER_WORD


def words(size: int) -> int:
    """u64 words of a ring of ``size`` slots."""
    return -(-size // RING_SLOTS_PER_WORD)


def pack(ring: np.ndarray) -> bytes:
    """A ring of backend ids (NO_BACKEND for none) as the map's packed words."""
    ids = np.asarray(ring, dtype=np.uint32)
    slots = np.full(words(len(ids)) * RING_SLOTS_PER_WORD, RING_NO_BACKEND, dtype="<u2")
    slots[: len(ids)] = np.where(ids == NO_BACKEND, np.uint32(RING_NO_BACKEND), ids)
    return slots.tobytes()


def unpack(blob: bytes, size: int | None = None) -> np.ndarray:
    """Packed words back to backend ids (uint32, NO_BACKEND for none): ``size`` slots when
    the words are that ring's (``words(size)`` of them), else every slot they hold."""
    slots = np.frombuffer(blob, dtype="<u2")
    if size is not None and words(size) * RING_SLOTS_PER_WORD == len(slots):
        slots = slots[:size]
    ids = slots.astype(np.uint32)
    ids[slots == RING_NO_BACKEND] = NO_BACKEND
    return ids
