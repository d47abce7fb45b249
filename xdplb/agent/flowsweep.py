"""The flow sweep: what the data path's per-connection counts cannot see, read from the flow
tables once every ``--flow-sweep`` (default 30 s) instead of at every metrics scrape.

The data path counts each VIP's and backend's flows as they open (confirmed into ``flows``)
and close (FIN or RST of an established flow, an entry it replaces): see ``layout.Stat``.
Flows that end unseen are not counted closed: an LRU eviction, a UDP flow that never sends
again, a client that vanished. The sweep counts the open entries that are really there,
and what the counters claim beyond them becomes that VIP's or backend's ``unseen`` offset:
open flows = opened - closed - unseen. It also records the table's fill and the flows
active lately. A scrape then reads counters (O(VIPs + backends)) and this file. The
agent sweeps only when it serves metrics (nothing else reads the result), a batch at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from xdplb.abi.layout import MAX_BACKENDS, MAX_VIPS, Stat, coarse_ns
from xdplb.inspect.flowtable import ACTIVE_IDLE_S, CLOSED, FLOW_DTYPE, RAW_KEY, FlowTable
from xdplb.instance import pins, runfiles
from xdplb.kernel.maps import KernelMaps

FILE = "flowsweep.json"
SIZES = {"vip": MAX_VIPS, "backend": MAX_BACKENDS}
CHUNK_BYTES = 16 << 20  # flow values per step of the sweep


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


def _chunks(maps: Any, name: str) -> Iterator[np.ndarray]:
    """A flow table's values a batch at a time: the sweep's memory is one batch, not the
    table (a million flows are 150 MB)."""
    pending: list[bytes] = []
    for blob in maps.raw_values(name):
        pending.append(blob)
        if sum(map(len, pending)) >= CHUNK_BYTES:
            yield np.frombuffer(b"".join(pending), FLOW_DTYPE)
            pending = []
    if pending:
        yield np.frombuffer(b"".join(pending), FLOW_DTYPE)


def sweep(maps: KernelMaps) -> dict[str, Any]:
    """One reading: per VIP and backend, the open entries really there, the tracked and the
    active ones, and the unseen ends (counters first, then the tables: a flow opening in
    between counts in the table only, so unseen errs low, never hides a flow)."""
    claimed = {kind: open_counts(maps.percpu_array(f"{kind}_stats")) for kind in SIZES}
    counts = {(kind, what): np.zeros(size, np.int64) for kind, size in SIZES.items()
              for what in ("there", "tracked", "active")}
    entries = {"flows": 0, "half_open": 0}
    for name in entries:
        for f in _chunks(maps, name):
            now = coarse_ns()  # after the batch was read: its stamps are not in the future
            entries[name] += len(f)
            closed = np.isin(f["tcp_state"], CLOSED)
            idle = (now - f["last_ns"].astype(np.int64)) / 1e9
            masks = {"tracked": None, "active": (idle < ACTIVE_IDLE_S) & ~closed,
                     "there": ~closed if name == "flows" else None}
            for kind, size in SIZES.items():
                ids = f[f"{kind}_id"]
                for what, mask in masks.items():
                    if what == "there" and name != "flows":
                        continue
                    sel = ids if mask is None else ids[mask]
                    sel = sel[sel < size]
                    counts[(kind, what)] += np.bincount(sel, minlength=size)[:size]
    out: dict[str, Any] = {"ts": round(time.time(), 3), "entries": entries["flows"],
                           "half_open": entries["half_open"],
                           "capacity": maps.max_entries("flows")}
    for kind in SIZES:
        there, tracked, act = (counts[(kind, w)] for w in ("there", "tracked", "active"))
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
