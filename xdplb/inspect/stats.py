"""``xdplb stats`` (and the metrics endpoint): packets, bytes and flows per VIP and per
backend, the global counters, and the flow table's fill, with rates between two reads.

The per-VIP and per-backend counters are per-CPU arrays the data path bumps, open flows
among them (counted per connection); the tracked and active flow counts come from one bulk
read of the flow table, or, for metrics, from the agent's last flow sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from xdplb.abi.layout import MAX_BACKENDS, MAX_VIPS, Stat
from xdplb.inspect.reader import Reader
from xdplb.kernel.maps import read_counters

RATED = ("packets", "bytes", "new_flows")
_STAT = {name: i for i, (name, _) in enumerate(Stat._fields_)}  # columns of stat_sums


def stat_sums(r: Reader, kind: str) -> np.ndarray:
    """``vip_stats`` or ``backend_stats`` summed over CPUs (row per id, column per Stat
    field), read once per Reader: every row of a reading shares it."""
    cache = r.__dict__.setdefault("_stat_sums", {})
    if kind not in cache:
        cache[kind] = r.maps.percpu_array(f"{kind}_stats")
    return cache[kind]


def flow_counts(r: Reader, kind: str, size: int, sweep: dict[str, Any] | None
                ) -> Callable[[int], dict[str, int]]:
    """Flow counts of VIP or backend ``i`` (``kind`` "vip" or "backend"): ``flows`` (tracked
    entries) and ``active_flows`` from the flow table, or from the agent's last ``sweep``
    without reading the table; ``open_flows`` from the data path's per-connection counts
    less the ends the sweep found unseen."""
    stat = stat_sums(r, kind)
    flows_, opened, closed = _STAT["flows"], _STAT["opened"], _STAT["closed"]
    if sweep is None:
        t = r.flows
        col = f"{kind}_id"
        flows, active = t.count_by(col, size), t.count_by(col, size, t.active())
        table = {i: {"flows": int(flows[i]), "active_flows": int(active[i])}
                 for i in np.nonzero(flows)[0].tolist()}
    else:
        table = {int(i): row for i, row in sweep.get(f"{kind}s", {}).items()}

    def counts(i: int) -> dict[str, int]:
        s, row = stat[i].tolist(), table.get(i, {})  # Python ints
        unseen = row.get("unseen", 0) if sweep is not None else 0
        return {"new_flows": s[flows_], "flows": row.get("flows", 0),
                "active_flows": row.get("active_flows", 0),
                "open_flows": max(0, s[opened] - s[closed] - unseen),
                "opened_flows": s[opened], "closed_flows": s[closed]}

    return counts


def collect(r: Reader, sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """One reading of an instance's counters (rate fields null: see ``add_rates``). Given
    the agent's last ``sweep`` (metrics), the flow table is not read: O(VIPs + backends)."""
    cat = r.catalog
    stats = {kind: stat_sums(r, kind) for kind in ("vip", "backend")}
    packets, bytes_ = _STAT["packets"], _STAT["bytes"]
    counts = {kind: flow_counts(r, kind, size, sweep)
              for kind, size in (("vip", MAX_VIPS), ("backend", MAX_BACKENDS))}

    def row(ident: dict[str, Any], kind: str, i: int) -> dict[str, Any]:
        stat = stats[kind][i].tolist()
        return {**ident, "packets": stat[packets], "bytes": stat[bytes_], **counts[kind](i),
                **{f"{k}_per_s": None for k in RATED}}

    vips = [row(cat.vip_json(v), "vip", v) for v in sorted(cat.vips)]
    backends = [
        row({"backend_id": b.id, "address": b.address, "port": b.port,
             **cat.vip_json(b.vip_id)}, "backend", b.id)
        for b in sorted(cat.backends.values(), key=lambda b: b.id)
    ]
    if sweep is None:
        t = r.flows
        entries, capacity = len(t), t.capacity
    else:
        entries = sweep.get("entries", 0) + sweep.get("half_open", 0)
        capacity = sweep.get("capacity", 0)
    return {
        "ts": round(time.time(), 3),
        "interval_s": None,
        "vips": vips,
        "backends": backends,
        "counters": read_counters(r.maps),
        "counters_per_s": None,
        "flow_table": {"entries": entries, "capacity": capacity,
                       "fill": round(entries / capacity, 6) if capacity else 0.0,
                       "swept_at": None if sweep is None else sweep.get("ts")},
        # backends_from VIPs: their DNS discovery as the agent publishes it (dns_failures)
        "discovery": [{"vip": p["name"], **p["dns"]}
                      for _, p in sorted(cat.published.items()) if p.get("dns")],
    }


def add_rates(cur: dict[str, Any], prev: dict[str, Any]) -> dict[str, Any]:
    """Fill ``cur``'s rate fields from the counters moved since ``prev``."""
    dt = cur["ts"] - prev["ts"]
    if dt <= 0:
        return cur
    cur["interval_s"] = round(dt, 3)
    for section, ident in (("vips", "vip_id"), ("backends", "backend_id")):
        before = {row[ident]: row for row in prev[section]}
        for row in cur[section]:
            old = before.get(row[ident])
            for k in RATED:
                # A counter that went backwards belongs to a recycled id: no rate.
                if old is not None and row[k] >= old[k]:
                    row[f"{k}_per_s"] = round((row[k] - old[k]) / dt, 3)
    cur["counters_per_s"] = {
        k: round(max(v - prev["counters"].get(k, 0), 0) / dt, 3)
        for k, v in cur["counters"].items()
    }
    return cur
