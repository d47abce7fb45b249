"""The flow sweep: what the data path's per-connection counts cannot see, read from the flow
tables once every SWEEP_INTERVAL instead of at every metrics scrape.

The data path counts each VIP's and backend's flows as they open (confirmed into ``flows``)
and close (FIN or RST of an established flow, an entry it replaces): see ``layout.Stat``.
Flows that end unseen are not counted closed: an LRU eviction, a UDP flow that never sends
again, a client that vanished. The sweep counts the open entries that are really there,
and what the counters claim beyond them becomes that VIP's or backend's ``unseen`` offset:
open flows = opened - closed - unseen. It also records the table's fill and the flows
active lately. A scrape then reads counters (O(VIPs + backends)) and this file.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from xdplb.abi.layout import MAX_BACKENDS, MAX_VIPS, Stat, coarse_ns
from xdplb.inspect.flowtable import CLOSED, FLOW_DTYPE, RAW_KEY, FlowTable
from xdplb.instance import pins, runfiles
from xdplb.kernel.maps import KernelMaps

SWEEP_INTERVAL = 30.0  # seconds; the data path's counts are exact in between but for unseen ends
FILE = "flowsweep.json"
SIZES = {"vip": MAX_VIPS, "backend": MAX_BACKENDS}


def read_table(maps: Any) -> FlowTable:
    """Both flow tables (kernel maps in bulk, or the scapy data path's), as one FlowTable."""
    if isinstance(getattr(maps, "fds", None), dict) and maps.fds:
        return FlowTable.read(maps)
    # The scapy data path's maps: entries one by one (its tables are small)
    rows = {}
    for name in ("flows", "half_open"):
        items = list(maps.raw_items(name))
        rows[name] = (np.frombuffer(b"".join(k for k, _ in items), RAW_KEY),
                      np.frombuffer(b"".join(v for _, v in items), FLOW_DTYPE))
    (fk, ff), (hk, hf) = rows["flows"], rows["half_open"]
    in_flows = np.concatenate((np.ones(len(ff), bool), np.zeros(len(hf), bool)))
    return FlowTable(np.concatenate((fk, hk)), np.concatenate((ff, hf)), coarse_ns(),
                     maps.max_entries("flows"), in_flows)


def open_counts(stats: np.ndarray) -> dict[int, int]:
    """Open flows by the data path's counts alone (opened - closed), non-zero ones, from
    ``KernelMaps.percpu_array`` of a Stat map."""
    names = [name for name, _ in Stat._fields_]
    diff = stats[:, names.index("opened")].astype(np.int64) \
        - stats[:, names.index("closed")].astype(np.int64)
    return {int(i): int(diff[i]) for i in np.nonzero(diff)[0]}


def sweep(maps: KernelMaps) -> dict[str, Any]:
    """One reading: per VIP and backend, the open entries really there, the active ones,
    and the unseen ends (counters first, then the tables: a flow opening in between counts
    in the table only, so unseen errs low, never hides a flow)."""
    claimed = {kind: open_counts(maps.percpu_array(f"{kind}_stats")) for kind in SIZES}
    t = read_table(maps)
    open_mask = t.confirmed() & ~np.isin(t.flows["tcp_state"], CLOSED)
    active = t.active()
    out: dict[str, Any] = {"ts": round(time.time(), 3), "entries": int(np.count_nonzero(
        t.confirmed())), "half_open": int(len(t) - np.count_nonzero(t.confirmed())),
        "capacity": t.capacity}
    for kind, size in SIZES.items():
        col = f"{kind}_id"
        there = t.count_by(col, size, open_mask)
        tracked, act = t.count_by(col, size), t.count_by(col, size, active)
        rows = {}
        for i in sorted({*np.nonzero(tracked)[0].tolist(), *claimed[kind]}):
            unseen = max(0, claimed[kind].get(i, 0) - int(there[i]))
            rows[str(i)] = {"flows": int(tracked[i]), "active_flows": int(act[i]),
                            "unseen": unseen}
        out[f"{kind}s"] = rows
    return out


def publish(group: pins.PinGroup, maps: KernelMaps) -> dict[str, Any]:
    data = sweep(maps)
    runfiles.write_json(group, FILE, data)
    return data


def read(group: pins.PinGroup) -> dict[str, Any] | None:
    """The last sweep's result, if the agent published one."""
    return runfiles.read_json(group, FILE)
