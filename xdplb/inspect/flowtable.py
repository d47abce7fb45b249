"""The flow table of a running balancer as numpy columns: read, filter, sort, rates.

One bulk read (``bulk.read_map``) gives every tracked flow; filters and sorting are
vectorised, so only the rows that are printed ever become Python objects.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

import numpy as np

from xdplb.abi.codec import PROTOCOLS
from xdplb.abi.layout import Flow, FlowKey, TcpState, coarse_ns
from xdplb.inspect.catalog import Catalog
from xdplb.kernel import bulk
from xdplb.kernel.maps import KernelMaps

# Addresses as the IPv4 in their first 4 bytes, ports in network order: compare as numbers.
KEY_DTYPE = bulk.struct_dtype(FlowKey, {"src": ">u4", "dst": ">u4", "sport": ">u2",
                                        "dport": ">u2"})
# fullnat's source address and port (network order) as numbers, like the key's
FLOW_DTYPE = bulk.struct_dtype(Flow, {"nat_addr": ">u4", "nat_port": ">u2"})
RAW_KEY = np.dtype((np.void, ctypes.sizeof(FlowKey)))  # whole keys: identity for rates

STATE_NAMES = {int(s): s.name.lower() for s in TcpState}
CLOSED = (int(TcpState.FIN), int(TcpState.RST))
# A flow counts as active when it is not closed and saw a packet this recently. Entries
# themselves never expire: the LRU table evicts the least recently used when full.
ACTIVE_IDLE_S = 60.0

SORT_KEYS = ("bytes", "packets", "rate", "age", "idle", "client")



@dataclass(frozen=True)
class FlowTable:
    raw_keys: np.ndarray  # RAW_KEY
    flows: np.ndarray  # FLOW_DTYPE
    now_ns: int
    capacity: int  # max_entries of the map
    in_flows: np.ndarray | None = None  # per row: in flows (confirmed), not half_open

    @classmethod
    def read(cls, maps: KernelMaps, batch: int = bulk.BATCH) -> FlowTable:
        keys, flows = bulk.read_map(maps.fds["flows"], RAW_KEY, FLOW_DTYPE, batch)
        hk, hf = bulk.read_map(maps.fds["half_open"], RAW_KEY, FLOW_DTYPE, batch)
        # Read the clock after the map: the coarse stamps then never lie in the future.
        in_flows = np.concatenate((np.ones(len(flows), bool), np.zeros(len(hf), bool)))
        return cls(np.concatenate((keys, hk)), np.concatenate((flows, hf)), coarse_ns(),
                   maps.max_entries("flows"), in_flows)

    def confirmed(self) -> np.ndarray:
        """Mask of the flows confirmed by their next packet (entries of ``flows``)."""
        return np.ones(len(self.flows), bool) if self.in_flows is None else self.in_flows

    @property
    def keys(self) -> np.ndarray:
        return self.raw_keys.view(KEY_DTYPE)

    def __len__(self) -> int:
        return len(self.flows)

    def take(self, index: np.ndarray) -> FlowTable:
        """The flows selected by a boolean mask or an index array, in that order."""
        return FlowTable(self.raw_keys[index], self.flows[index], self.now_ns, self.capacity,
                         self.confirmed()[index])

    def age_s(self) -> np.ndarray:
        return _seconds_since(self.now_ns, self.flows["first_ns"])

    def idle_s(self) -> np.ndarray:
        return _seconds_since(self.now_ns, self.flows["last_ns"])

    def packets(self) -> np.ndarray:
        return self.flows["fwd_packets"] + self.flows["rev_packets"]

    def bytes(self) -> np.ndarray:
        return self.flows["fwd_bytes"] + self.flows["rev_bytes"]

    def active(self, idle_s: float = ACTIVE_IDLE_S) -> np.ndarray:
        """Mask of flows that are not closed and saw a packet within ``idle_s``."""
        return (self.idle_s() < idle_s) & ~np.isin(self.flows["tcp_state"], CLOSED)

    def count_by(self, column: str, size: int, mask: np.ndarray | None = None) -> np.ndarray:
        """Number of flows per value of ``vip_id`` or ``backend_id`` (index 0..size-1)."""
        ids = self.flows[column] if mask is None else self.flows[column][mask]
        ids = ids[ids < size]
        return np.bincount(ids, minlength=size)[:size]

    def byte_rates(self, prev: FlowTable | None) -> tuple[np.ndarray, np.ndarray] | None:
        """(packets/s, bytes/s) of every flow since ``prev`` (both directions); a flow new
        since then counts from zero. None without a previous read."""
        if prev is None or self.now_ns <= prev.now_ns:
            return None
        dt = (self.now_ns - prev.now_ns) / 1e9
        before_p = np.zeros(len(self), dtype=np.float64)
        before_b = np.zeros(len(self), dtype=np.float64)
        _, mine, theirs = np.intersect1d(self.raw_keys, prev.raw_keys, assume_unique=True,
                                         return_indices=True)
        before_p[mine] = prev.packets()[theirs]
        before_b[mine] = prev.bytes()[theirs]
        # A flow evicted and created again restarts its counters: no negative rates.
        pps = np.maximum(self.packets() - before_p, 0) / dt
        bps = np.maximum(self.bytes() - before_b, 0) / dt
        return pps, bps


def _seconds_since(now_ns: int, stamps: np.ndarray) -> np.ndarray:
    return np.maximum(now_ns - stamps.astype(np.int64), 0) / 1e9


def ipv4_u32(address: str) -> int:
    return int(ipaddress.IPv4Address(address))


@dataclass(frozen=True)
class FlowFilter:
    """Which flows to show; every given criterion must hold."""

    vips: tuple[tuple[int, int | None, int | None], ...] | None = None  # (addr, port, proto)
    backend_ids: frozenset[int] | None = None
    client: tuple[int, int | None] | None = None  # (addr, port)
    proto: int | None = None
    states: frozenset[int] | None = None

    @classmethod
    def build(cls, cat: Catalog, vip: str | None = None, backend: str | None = None,
              client: str | None = None, proto: str | None = None,
              states: frozenset[int] | None = None) -> FlowFilter:
        """From command-line specs; ValueError (saying what exists) for a bad one."""
        from xdplb.inspect.catalog import split_endpoint

        vips = None
        if vip is not None:
            addr, port = split_endpoint(vip, port_required=False)
            if addr is None:  # a name: the config must know it
                vips = tuple((ipv4_u32(v.address), v.port, v.proto) for v in cat.find_vips(vip))
            else:  # by address: also matches flows of VIPs removed since
                vips = ((ipv4_u32(addr), port, None),)
        backend_ids = None
        if backend is not None:
            addr, port = split_endpoint(backend, port_required=False)
            if addr is None:
                raise ValueError(f"--backend wants ADDR or ADDR:PORT, not {backend!r}")
            backend_ids = frozenset(b.id for b in cat.backends.values()
                                    if b.address == addr and port in (None, b.port))
        client_t = None
        if client is not None:
            addr, port = split_endpoint(client, port_required=False)
            if addr is None:
                raise ValueError(f"--client wants ADDR or ADDR:PORT, not {client!r}")
            client_t = (ipv4_u32(addr), port)
        return cls(vips, backend_ids, client_t, PROTOCOLS[proto] if proto else None, states)

    def mask(self, t: FlowTable) -> np.ndarray:
        k, f = t.keys, t.flows
        m = np.ones(len(t), dtype=bool)
        if self.vips is not None:
            any_vip = np.zeros(len(t), dtype=bool)
            for addr, port, proto in self.vips:
                one = k["dst"] == addr
                if port is not None:
                    one &= k["dport"] == port
                if proto is not None:
                    one &= k["proto"] == proto
                any_vip |= one
            m &= any_vip
        if self.backend_ids is not None:
            m &= np.isin(f["backend_id"], np.fromiter(self.backend_ids, dtype=np.uint32))
        if self.client is not None:
            m &= k["src"] == self.client[0]
            if self.client[1] is not None:
                m &= k["sport"] == self.client[1]
        if self.proto is not None:
            m &= k["proto"] == self.proto
        if self.states is not None:
            m &= np.isin(f["tcp_state"], np.fromiter(self.states, dtype=np.uint8))
        return m


def order(t: FlowTable, key: str, rates: tuple[np.ndarray, np.ndarray] | None = None
          ) -> np.ndarray:
    """Row order for ``key``: counters, rate, age and idle time largest first; client by
    address and port. ``rate`` falls back to ``bytes`` without rates."""
    if key not in SORT_KEYS:
        raise ValueError(f"sort key must be one of {', '.join(SORT_KEYS)}")
    if key == "client":
        return np.lexsort((t.keys["sport"], t.keys["src"]))
    if key == "rate" and rates is not None:
        col = rates[1]
    else:
        col = {"bytes": t.bytes, "packets": t.packets, "rate": t.bytes, "age": t.age_s,
               "idle": t.idle_s}[key]()
    return np.argsort(col, kind="stable")[::-1]
