"""``xdplb backends``: per backend its VIP, health, weight, share of the VIP's Maglev ring
and flows, from the pins (health from the live agent's published results)."""

from __future__ import annotations

from typing import Any

import numpy as np

from xdplb.abi.layout import MAX_BACKENDS
from xdplb.inspect.catalog import BackendRef, Catalog, read_rings
from xdplb.inspect.reader import Reader
from xdplb.inspect.stats import flow_counts
from xdplb.instance import runfiles


def ring_slots(r: Reader) -> dict[int, int]:
    """Maglev slots per backend id: as the live agent published them, else counted in each
    VIP's ring (O(slots): one array per VIP)."""
    published = runfiles.ring_slots(r.group) if getattr(r, "group", None) else None
    if published is not None:
        return published
    out: dict[int, int] = {}
    for ring in read_rings(r.maps, r.catalog).values():
        ids, counts = np.unique(ring[ring < MAX_BACKENDS], return_counts=True)
        out.update(zip(ids.tolist(), counts.tolist(), strict=True))
    return out


def collect(r: Reader, sweep: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per backend. Flow counts from the flow table, or, given the agent's last
    ``sweep`` (metrics), from it and the data path's counters: no table read."""
    cat = r.catalog
    counts = flow_counts(r, "backend", MAX_BACKENDS, sweep)
    slots = ring_slots(r)
    health = runfiles.health(r.group)
    rows = []
    for b in sorted(cat.backends.values(), key=lambda b: (b.vip_id, b.id)):
        n = slots.get(b.id, 0)
        key = cat.health_key(b)
        h = health.get(key) if key else None
        rows.append({
            "backend_id": b.id, "address": b.address, "port": b.port,
            **cat.vip_json(b.vip_id),
            "weight": b.weight,
            "down": b.down,
            # backup: true (or a higher SRV priority); serving: the VIP's set in the ring
            "backup": b.id in cat.backups,
            "serving": cat.serving.get(b.vip_id),
            # Without the agent's results, the data path's flag is all there is to say.
            "health": h or {"state": "down" if b.down else "unknown", "since": None,
                            "last": None},
            "maglev_slots": n,
            "maglev_share": round(100.0 * n / size, 3) if (size := _ring_size(cat, b)) else 0.0,
            **counts(b.id),
        })
    return rows


def _ring_size(cat: Catalog, b: BackendRef) -> int:
    vip = cat.vips.get(b.vip_id)
    return vip.ring_size if vip is not None else 0
