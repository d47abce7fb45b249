"""``xdplb stats`` (and the metrics endpoint): packets, bytes and flows per VIP and per
backend, the global counters, and the flow table's fill, with rates between two reads.

The per-VIP and per-backend counters are per-CPU arrays the data path bumps; the flow
counts come from one bulk read of the flow table.
"""

from __future__ import annotations

import time
from typing import Any

from xdplb.abi.layout import MAX_BACKENDS, MAX_VIPS
from xdplb.inspect.reader import Reader
from xdplb.kernel.maps import read_counters

RATED = ("packets", "bytes", "new_flows")


def collect(r: Reader) -> dict[str, Any]:
    """One reading of an instance's counters (rate fields null: see ``add_rates``)."""
    cat, t = r.catalog, r.flows
    active = t.active()
    per = {
        col: (t.count_by(col, size), t.count_by(col, size, active))
        for col, size in (("vip_id", MAX_VIPS), ("backend_id", MAX_BACKENDS))
    }
    vip_stats = r.maps.percpu_sums("vip_stats")
    backend_stats = r.maps.percpu_sums("backend_stats")

    def row(ident: dict[str, Any], stat: Any, col: str, i: int) -> dict[str, Any]:
        flows, act = per[col]
        return {**ident, "packets": stat.packets, "bytes": stat.bytes, "new_flows": stat.flows,
                "flows": int(flows[i]), "active_flows": int(act[i]),
                **{f"{k}_per_s": None for k in RATED}}

    vips = [row(cat.vip_json(v), vip_stats[v], "vip_id", v) for v in sorted(cat.vips)]
    backends = [
        row({"backend_id": b.id, "address": b.address, "port": b.port,
             **cat.vip_json(b.vip_id)}, backend_stats[b.id], "backend_id", b.id)
        for b in sorted(cat.backends.values(), key=lambda b: b.id)
    ]
    return {
        "ts": round(time.time(), 3),
        "interval_s": None,
        "vips": vips,
        "backends": backends,
        "counters": read_counters(r.maps),
        "counters_per_s": None,
        "flow_table": {"entries": len(t), "capacity": t.capacity,
                       "fill": round(len(t) / t.capacity, 6) if t.capacity else 0.0},
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
