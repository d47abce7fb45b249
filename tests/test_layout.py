"""The one source of truth for map layouts: C (as BCC compiled it) agrees with Python."""

from __future__ import annotations

import ctypes
import os

import pytest

from xdplb.abi.layout import MAPS, MAX_VIPS, layout_version, render_maps, render_structs
from xdplb.kernel import bpfsys
from xdplb.model.hashing import flow_hash, flow_hash_bytes, murmur3_32


def test_murmur3_matches_independent_implementation():
    mmh3 = pytest.importorskip("mmh3")
    rnd = os.urandom
    for n in range(0, 48):
        data = rnd(n)
        for seed in (0, 1, 0x9E3779B9, 0xFFFFFFFF):
            assert murmur3_32(data, seed) == mmh3.hash(data, seed, signed=False)


def test_flow_hash_input_is_sixteen_wire_order_bytes():
    b = flow_hash_bytes(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 0x1234, 80, 6)
    assert b == bytes([10, 0, 0, 1, 10, 0, 0, 2, 0x12, 0x34, 0, 80, 6, 0, 0, 0])
    assert flow_hash(b[:4], b[4:8], 0x1234, 80, 6, 5) == murmur3_32(b, 5)


def test_layout_version_tracks_structs():
    v = layout_version()
    assert len(v) == 12 and int(v, 16) >= 0
    assert "struct xl_flow_key" in render_structs()
    assert all(m.name in render_maps(None) for m in MAPS)


@pytest.mark.root
def test_bcc_sees_the_same_layouts():
    """Compile the program and compare every map's key/value size with the ctypes types."""
    from xdplb.kernel.loader import compile_program

    prog = compile_program(4096)
    try:
        for m in MAPS:
            info = bpfsys.map_info(prog.map_fds[m.name])
            assert info.key_size == ctypes.sizeof(m.key), m.name
            want_value = ctypes.sizeof(m.value)
            assert info.value_size == want_value, m.name
            table = prog.bpf.get_table(m.name.encode())
            assert ctypes.sizeof(table.Key) == ctypes.sizeof(m.key), m.name
            if m.kind != "devmap":
                leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: one CPU's leaf
                assert ctypes.sizeof(leaf) == want_value, m.name
                if hasattr(m.value, "_fields_"):
                    assert [f[0] for f in leaf._fields_] == [
                        f[0] for f in m.value._fields_], m.name
        assert bpfsys.map_info(prog.map_fds["maglev"]).max_entries == MAX_VIPS  # of rings
    finally:
        prog.close()


def test_ring_packing_round_trip():
    """A ring's u16 slots, four to a word: padding slots read as no backend, ids as they were;
    words of another ring's size come back whole."""
    import numpy as np

    from xdplb.abi import ring
    from xdplb.abi.layout import MAX_BACKENDS, NO_BACKEND

    for size in (3, 5, 251, 65537):
        ids = np.arange(size, dtype=np.uint32) % MAX_BACKENDS
        ids[::7] = NO_BACKEND
        blob = ring.pack(ids)
        assert len(blob) == 8 * ring.words(size) and ring.words(size) == -(-size // 4)
        assert (ring.unpack(blob, size) == ids).all()
        whole = ring.unpack(blob)
        assert len(whole) == 4 * ring.words(size) and (whole[size:] == NO_BACKEND).all()
        # slot k is bits 16 * (k % 4) of word k // 4, as bpf/xdplb.c reads it
        last = ring.words(size) - 1
        word = int.from_bytes(blob[8 * last : 8 * last + 8], "little")
        want = [int(ids[k]) if k < size else NO_BACKEND for k in range(4 * last, 4 * last + 4)]
        assert [(word >> (16 * j)) & 0xFFFF for j in range(4)] == \
            [0xFFFF if i == NO_BACKEND else i for i in want]
