"""fullnat's reply table, swept. The data path writes an fnat_ports entry with each fullnat
flow but never removes one: the flows table is an LRU that evicts without telling, and a
flow that moves to another port leaves its old entry behind. Such a stale entry is taken
over by the next flow that picks its port; this sweep removes the rest, so that a table
full of them never refuses a new flow its port (drop_source_ports)."""

from __future__ import annotations

from typing import Any

from xdplb.abi.layout import FlowKey, FnatKey, Forwarding

SWEEP_INTERVAL = 30.0  # seconds: the table holds as many entries as flows, so it seldom fills


def _stale(maps: Any, k: FnatKey, flow_key: FlowKey) -> bool:
    """Is the flow an entry names gone, or no longer holding the entry's address and port?"""
    f = maps.tracked_flow(flow_key)
    return f is None or f.mode != Forwarding.FULLNAT or f.nat_port != k.lb_port \
        or bytes(f.nat_addr) != bytes(k.lb_addr)


def stale_entries(maps: Any) -> list[FnatKey]:
    return [k for raw, v in maps.raw_items("fnat_ports")
            if _stale(maps, k := FnatKey.from_buffer_copy(raw), FlowKey.from_buffer_copy(v))]


def sweep(maps: Any) -> int:
    """Remove the stale entries; how many went."""
    gone = 0
    for k in stale_entries(maps):
        # a new flow may have taken the port over since: look again right before
        v = maps.lookup("fnat_ports", k)
        if v is not None and _stale(maps, k, v) and maps.delete("fnat_ports", k):
            gone += 1
    return gone
