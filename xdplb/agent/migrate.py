"""Carry state from the maps of an older xdplb build into the current layout.

Pins are versioned by layout, so a new build never reopens maps of another layout. To
replace an older build under traffic, the agent copies its VIPs, backends, reverse NAT
entries and tracked flows into the new maps, field by field by name, using the layout
description the older agent recorded (``layout.json`` next to its run state). Fields the new
layout added start at zero; fields it dropped are left behind, and so are maps it dropped
(an older build's per-flow reverse entries, ``rev_flows``: replies now find their flow by
``rev_nat``, which the new agent writes from its config; copied entries of backends that left
the config keep their late replies rewritten).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from xdplb.abi.layout import MAP_BY_NAME, MAPS
from xdplb.instance import pins, runfiles
from xdplb.kernel import bpfsys

log = logging.getLogger("xdplb")

LAYOUT_FILE = "layout.json"
# Maps whose content carries state worth keeping; rings are rebuilt, counters restart.
MIGRATED = ("vips", "vip_addrs", "backends", "rev_nat", "flows", "half_open", "fnat_ports",
            "fnat_cursor")

Fields = list[tuple[str, int, int]]  # (name, offset, size)


def _fields(t: type) -> Fields:
    if issubclass(t, ctypes.Structure):
        return [(name, getattr(t, name).offset, getattr(t, name).size) for name, _ in t._fields_]
    return [("", 0, ctypes.sizeof(t))]


def describe_layout() -> dict[str, Any]:
    """Field offsets of every map's key and value in this build."""
    return {m.name: {"key": _fields(m.key), "value": _fields(m.value)} for m in MAPS}


def record_layout(group: pins.PinGroup) -> None:
    runfiles.write_json(group, LAYOUT_FILE, describe_layout())


def convert(raw: bytes, old: Fields, new_type: type) -> bytes:
    """Re-pack ``raw`` (laid out as ``old``) into ``new_type`` by field name."""
    out = bytearray(ctypes.sizeof(new_type))
    where = {name: (off, size) for name, off, size in old}
    for name, off, size in _fields(new_type):
        if name in where:
            o_off, o_size = where[name]
            n = min(size, o_size)
            out[off:off + n] = raw[o_off:o_off + n]
    return bytes(out)


def migrate(old: pins.PinGroup, new_fds: dict[str, int], only_missing: bool = False) -> int:
    """Copy the migrated maps of ``old`` into the maps ``new_fds``; returns entries copied.
    With ``only_missing`` existing entries are kept (a catch-up pass after the switch)."""
    desc = runfiles.read_json(old, LAYOUT_FILE)
    if desc is None:
        raise LookupError(f"no layout description for {old.path}: cannot migrate its maps")
    copied = 0
    for name in MIGRATED:
        m = MAP_BY_NAME[name]
        path = old.map_path(name)
        if name not in desc or not path.exists():
            continue
        okey, oval = [[tuple(f) for f in desc[name][p]] for p in ("key", "value")]
        src = bpfsys.obj_get(path)
        try:
            info = bpfsys.map_info(src)
            for keys, values in bpfsys.map_lookup_batch(src, info.key_size, info.value_size,
                                                        8192):
                nk = [convert(k, okey, m.key) for k in keys]
                nv = [convert(v, oval, m.value) for v in values]
                if m.kind == "array":
                    # arrays hold every index: copy the used ones only
                    pairs = [(k, v) for k, v in zip(nk, nv, strict=True) if any(v)]
                else:
                    pairs = list(zip(nk, nv, strict=True))
                for k, v in pairs:
                    if only_missing and bpfsys.map_lookup(new_fds[name], k, len(v)) is not None:
                        continue
                    bpfsys.map_update(new_fds[name], k, v)
                    copied += 1
        finally:
            bpfsys.close(src)
    return copied
