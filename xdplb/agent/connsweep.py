"""least-conn's counts, kept right for the ends the data path cannot see.

The data path counts each backend's open connections in ``conns`` as they open (confirmed
into ``flows``) and close (an established TCP flow's FIN or RST, an entry replaced while
open: a new connection on the 5-tuple, a UDP flow's next datagram after the idle timeout),
per connection, atomically. Two ends it never sees:

- an LRU eviction (the entry goes without a packet), and
- a UDP flow that never sends again after its idle timeout (its entry stays, idle).

Every SWEEP_INTERVAL while a VIP uses least-conn, the agent reads ``conns`` and then the
flow table, counts per backend the connections really open (entries of ``flows`` not closed
and, for UDP, not idle past ``flows.udp_idle_timeout``) and writes the difference to
``conns_unseen``: the pick uses conns - conns_unseen. Read in that order, a flow opening
in between counts in the table only (the difference errs low, clamped at 0). A UDP flow
counted unseen that does send again is counted closed by the data path too, so for up to one
interval its backend looks one connection lighter than it is; the next sweep corrects it.
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np

from xdplb.abi.layout import MAX_BACKENDS
from xdplb.agent.flowsweep import read_table
from xdplb.inspect.flowtable import CLOSED

SWEEP_INTERVAL = 2.0  # seconds: how long an unseen end may weigh on the pick


def _array(maps: Any, name: str) -> np.ndarray:
    """A u64 array map as int64 (the counts' differences are signed)."""
    return np.frombuffer(b"".join(maps.raw_values(name)), "<u8").astype(np.int64)


def unseen(maps: Any, udp_idle_ns: int) -> np.ndarray:
    """Per backend id: connections ``conns`` counts open that are not (see the module)."""
    conns = _array(maps, "conns")  # first: see the module
    t = read_table(maps)
    f, keys = t.flows[t.confirmed()], t.keys[t.confirmed()]
    is_open = ~np.isin(f["tcp_state"], CLOSED)
    if udp_idle_ns:
        idle_ns = t.now_ns - f["last_ns"].astype(np.int64)
        is_open &= ~((keys["proto"] == socket.IPPROTO_UDP) & (idle_ns >= udp_idle_ns))
    ids = f["backend_id"][is_open]
    there = np.bincount(ids[ids < MAX_BACKENDS], minlength=MAX_BACKENDS)[:MAX_BACKENDS]
    return np.maximum(0, conns[:MAX_BACKENDS] - there)


def sweep(maps: Any, udp_idle_ns: int) -> int:
    """Write ``conns_unseen`` where it changed; how many entries were written."""
    want = unseen(maps, udp_idle_ns)
    have = _array(maps, "conns_unseen")[:MAX_BACKENDS]
    changed = np.nonzero(want != have)[0]
    for i in changed.tolist():
        maps.update("conns_unseen", i, int(want[i]))
    return len(changed)
