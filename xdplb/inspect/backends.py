"""``xdplb backends``: per backend its VIP, health, weight, share of the VIP's Maglev ring
and flows, from the pins (health from the live agent's published results); and, sampled
over an interval, its share of the VIP's new flows next to its weight's share, a backend
far above its share flagged as a hot spot."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from xdplb.abi.layout import MAX_BACKENDS, Scheduler, Stat
from xdplb.inspect.catalog import BackendRef, Catalog, read_rings, scheduler_name
from xdplb.inspect.reader import Reader
from xdplb.inspect.stats import flow_counts
from xdplb.instance import runfiles

# A hot spot: a backend's share of its VIP's new flows at least HOT_RATIO times its weight's
# share and HOT_POINTS percentage points above it, over at least HOT_MIN_FLOWS new flows of
# the VIP in the interval (fewer say nothing: 3 flows of 4 on one backend is chance).
HOT_RATIO, HOT_POINTS, HOT_MIN_FLOWS = 1.5, 10.0, 20
_NEW_FLOWS = [name for name, _ in Stat._fields_].index("flows")


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
            "scheduler": scheduler_name(v.scheduler) if (v := cat.vips.get(b.vip_id)) else None,
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


def sample_shares(r: Reader, rows: list[dict[str, Any]], interval: float,
                  sleep=time.sleep) -> None:
    """Add to each row (from :func:`collect` on ``r``, just before) its new flows over the
    next ``interval`` seconds, its share of its VIP's (``new_flow_share``, %), what its
    weight entitles it to (``weight_share``, %: of the VIP's serving set, equal turns for
    rr) and ``hot``. Shares are None when the VIP had no new flow."""
    sleep(interval)
    now = r.maps.percpu_array("backend_stats")[:, _NEW_FLOWS]
    by_vip: dict[int | None, list[dict[str, Any]]] = {}
    for row in rows:
        row["new_flows_interval"] = int(now[row["backend_id"]]) - row["new_flows"]
        by_vip.setdefault(row["vip_id"], []).append(row)
    for vip_rows in by_vip.values():
        total = sum(row["new_flows_interval"] for row in vip_rows)
        want = _weight_shares(vip_rows)
        for row, ws in zip(vip_rows, want, strict=True):
            share = 100.0 * row["new_flows_interval"] / total if total else None
            row["new_flow_share"] = None if share is None else round(share, 1)
            row["weight_share"] = round(ws, 1)
            row["hot"] = share is not None and total >= HOT_MIN_FLOWS \
                and share >= HOT_RATIO * ws and share - ws >= HOT_POINTS
        for row in vip_rows:
            row["interval_s"] = interval


def _weight_shares(rows: list[dict[str, Any]]) -> list[float]:
    """Each backend's share (%) of its VIP's new flows by weight: of the serving set (up,
    weight above 0, in the role the VIP serves), equal for rr."""
    serving = [not row["down"] and row["weight"] > 0
               and row["backup"] == (row["serving"] == "backup") for row in rows]
    rr = rows[0].get("scheduler") == scheduler_name(Scheduler.RR)
    w = [(1 if rr else row["weight"]) if on else 0 for row, on in zip(rows, serving, strict=True)]
    total = sum(w)
    return [100.0 * x / total if total else 0.0 for x in w]
