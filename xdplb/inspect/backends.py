"""``xdplb backends``: per backend its VIP, health, weight, share of the VIP's Maglev ring
and flows, from the pins (health from the live agent's published results)."""

from __future__ import annotations

from typing import Any

import numpy as np

from xdplb.abi.layout import MAX_BACKENDS
from xdplb.inspect.catalog import read_rings
from xdplb.inspect.reader import Reader
from xdplb.instance import runfiles


def ring_slots(r: Reader) -> dict[int, np.ndarray]:
    """Slots per backend id in each VIP's ring (vip id -> counts by backend id)."""
    return {vid: np.bincount(ring[ring < MAX_BACKENDS], minlength=MAX_BACKENDS)
            for vid, ring in read_rings(r.maps, r.catalog).items()}


def collect(r: Reader) -> list[dict[str, Any]]:
    cat, t = r.catalog, r.flows
    flows = t.count_by("backend_id", MAX_BACKENDS)
    active = t.count_by("backend_id", MAX_BACKENDS, t.active())
    slots = ring_slots(r)
    health = runfiles.health(r.group)
    rows = []
    for b in sorted(cat.backends.values(), key=lambda b: (b.vip_id, b.id)):
        n = int(slots[b.vip_id][b.id]) if b.vip_id in slots else 0
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
            "maglev_share": round(100.0 * n / cat.ring_size, 3) if cat.ring_size else 0.0,
            "flows": int(flows[b.id]),
            "active_flows": int(active[b.id]),
        })
    return rows
