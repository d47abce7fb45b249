"""The data path's maps as Python objects, for the scapy data path and its tests.

``UserMaps`` has the interface of ``maps.KernelMaps`` (so ``sync.MapSync`` and every reader
drive it unchanged) and holds the same ctypes keys and values from ``layout.py``, keyed by
their bytes, with the kernel's map semantics: arrays always hold every index (zeroes until
written), hash maps refuse new keys when full, ``lru_hash`` maps evict the least recently
used entry instead. Per-CPU maps hold one CPU.

The engine (``pydatapath.py``) works on the ``Table`` objects directly: ``ref`` returns the
stored value itself, which it updates in place like the BPF program does through the pointer
``lookup`` returns; control-plane ``lookup`` returns a copy, like the bpf(2) syscall.
"""

from __future__ import annotations

import ctypes
import errno
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from xdplb.abi.codec import decode, encode  # one encoding for both kinds of maps
from xdplb.abi.layout import (
    ADDR_FILTER_BITS,
    IF_MACS,
    MAPS,
    MAX_BACKENDS,
    MAX_REV_NAT,
    MAX_TX_PORTS,
    MAX_VIPS,
    U32,
    Counter,
    MapSpec,
    half_open_max,
)
from xdplb.kernel import bpfsys
from xdplb.kernel.maps import KernelMaps


def map_sizes(flow_max: int) -> dict[str, int]:
    """max_entries of every map, from the same constants the BPF program is compiled with."""
    consts = {
        "XL_MAX_VIPS": MAX_VIPS,
        "XL_MAX_BACKENDS": MAX_BACKENDS,
        "XL_MAX_TX_PORTS": MAX_TX_PORTS,
        "XL_IF_MACS": IF_MACS,
        "XL_MAX_REV_NAT": MAX_REV_NAT,
        "XL_FLOW_MAX": flow_max,
        "XL_HALF_OPEN_MAX": half_open_max(flow_max),
        "XL_COUNTER_MAX": int(Counter.MAX),
        "XL_ADDR_FILTER_SIZE": 1 << ADDR_FILTER_BITS,
    }
    # "XL_MAX_VIPS" and friends: products of named constants or numbers
    return {m.name: _product(m.max_entries, consts) for m in MAPS}


def _product(expr: str, consts: dict[str, int]) -> int:
    n = 1
    for term in expr.split("*"):
        term = term.strip()
        n *= consts[term] if term in consts else int(term)
    return n


class Table:
    """One map: key bytes -> stored ctypes value."""

    def __init__(self, spec: MapSpec, max_entries: int) -> None:
        self.spec = spec
        self.max_entries = max_entries
        self.key_size = ctypes.sizeof(spec.key)
        self.data: dict[bytes, Any] = {}

    def ref(self, key: bytes) -> Any:
        """The stored value (mutable in place), or None: the data path's lookup."""
        return self.data.get(key)

    def get(self, key: bytes) -> Any:
        """The stored value without side effects (no LRU refresh): the bpf(2) lookup."""
        return self.data.get(key)

    def put(self, key: bytes, value: Any) -> None:
        """Store ``value`` itself under ``key`` (BPF_ANY)."""
        if key not in self.data and len(self.data) >= self.max_entries:
            raise OSError(errno.E2BIG, f"map {self.spec.name} is full")
        self.data[key] = value

    def remove(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def entries(self) -> Iterator[tuple[bytes, Any]]:
        return iter(list(self.data.items()))  # a copy: the data path may write meanwhile


class ArrayTable(Table):
    """An array: every index below max_entries exists, zero until written; no deletes."""

    def _index(self, key: bytes) -> int:
        return int.from_bytes(key, "little")

    def ref(self, key: bytes) -> Any:
        v = self.data.get(key)
        if v is None and self._index(key) < self.max_entries:
            v = self.data[key] = self.spec.value()  # materialised on first use, then stable
        return v

    def get(self, key: bytes) -> Any:
        v = self.data.get(key)
        if v is None and self._index(key) < self.max_entries:
            return self.spec.value()
        return v

    def put(self, key: bytes, value: Any) -> None:
        if self._index(key) >= self.max_entries:
            raise OSError(errno.E2BIG, f"index {self._index(key)} out of map {self.spec.name}")
        self.data[key] = value

    def remove(self, key: bytes) -> bool:
        raise OSError(errno.EINVAL, f"cannot delete from array map {self.spec.name}")

    def entries(self) -> Iterator[tuple[bytes, Any]]:
        zero = self.spec.value()
        data = dict(self.data)
        for i in range(self.max_entries):
            k = i.to_bytes(self.key_size, "little")
            yield k, data.get(k, zero)


class LruTable(Table):
    """An LRU hash: data-path lookups and updates refresh an entry; a full map evicts the
    least recently used one. (The kernel's LRU is approximate: only tables that never fill
    up behave exactly alike.)"""

    def __init__(self, spec: MapSpec, max_entries: int) -> None:
        super().__init__(spec, max_entries)
        self.data: OrderedDict[bytes, Any] = OrderedDict()

    def ref(self, key: bytes) -> Any:
        v = self.data.get(key)
        if v is not None:
            self.data.move_to_end(key)
        return v

    def put(self, key: bytes, value: Any) -> None:
        if key not in self.data and len(self.data) >= self.max_entries:
            self.data.popitem(last=False)
        self.data[key] = value
        self.data.move_to_end(key)


class RingsTable(Table):
    """The array of maps ``maglev``: slot (VIP id) -> the map id of that VIP's ring, and the
    rings themselves (uint32 arrays the engine indexes), as the kernel holds inner maps."""

    def __init__(self, spec: MapSpec, max_entries: int) -> None:
        super().__init__(spec, max_entries)
        self.rings: dict[int, np.ndarray] = {}
        self.next_id = 1

    def ring(self, vip_id: int) -> np.ndarray | None:
        return self.rings.get(vip_id)

    def put_ring(self, vip_id: int, values: np.ndarray) -> None:
        if vip_id >= self.max_entries:
            raise OSError(errno.E2BIG, f"index {vip_id} out of map {self.spec.name}")
        self.rings[vip_id] = values
        self.data[key_bytes(vip_id)] = U32(self.next_id)
        self.next_id += 1

    def remove(self, key: bytes) -> bool:
        self.rings.pop(int.from_bytes(key, "little"), None)
        return super().remove(key)


_TABLES = {"array": ArrayTable, "percpu_array": ArrayTable, "lru_hash": LruTable,
           "array_of_maps": RingsTable}


class UserMaps(KernelMaps):
    """Every map of the data path, in this process: a ``KernelMaps`` (``items``,
    ``percpu_sums`` and the context manager are inherited) whose entries live in Tables."""

    def __init__(self, flow_max: int) -> None:
        # KernelMaps.__init__ is not called: it opens map fds, and there are none here.
        sizes = map_sizes(flow_max)
        self.tables = {m.name: _TABLES.get(m.kind, Table)(m, sizes[m.name]) for m in MAPS}
        self.writes = 0  # control-plane updates and deletes so far: readers notice changes

    def table(self, name: str) -> Table:
        return self.tables[name]

    def close(self) -> None:
        """Nothing to release."""

    def cpus(self) -> int:
        # The kernel's count, so that both engines get the same meta (per-CPU shares of a
        # rate): this one CPU then admits one share of it.
        return bpfsys.possible_cpus()

    def max_entries(self, name: str) -> int:
        return self.tables[name].max_entries

    # --- Maglev rings (KernelMaps' interface) ----------------------------------------------

    @property
    def _rings(self) -> RingsTable:
        t = self.tables["maglev"]
        assert isinstance(t, RingsTable)
        return t

    def put_ring(self, vip_id: int, values: Sequence[int]) -> None:
        self._rings.put_ring(vip_id, np.array(values, dtype=np.uint32))
        self.writes += 1

    def ring(self, vip_id: int, size: int | None = None) -> np.ndarray | None:
        r = self._rings.ring(vip_id)
        return None if r is None else r.copy()

    def ring_update(self, vip_id: int, values: np.ndarray, changed: np.ndarray) -> None:
        r = self._rings.ring(vip_id)
        if r is None:
            raise KeyError(f"VIP {vip_id} has no ring")
        r[changed] = values[changed]
        self.writes += 1

    def drop_ring(self, vip_id: int) -> bool:
        return self.delete("maglev", vip_id)

    def ring_memory(self) -> tuple[int, int]:
        rings = self._rings.rings
        return len(rings), sum(4 * len(r) for r in rings.values())

    # --- single entries --------------------------------------------------------------------

    def lookup(self, name: str, key: Any) -> Any:
        t = self.tables[name]
        m = t.spec
        v = t.get(encode(m.key, key))
        if v is None:
            return None
        out = decode(m.value, bytes(v))
        return [out] if m.percpu else out

    def update(self, name: str, key: Any, value: Any) -> None:
        t = self.tables[name]
        m = t.spec
        t.put(encode(m.key, key), m.value.from_buffer_copy(encode(m.value, value)))
        self.writes += 1

    def delete(self, name: str, key: Any) -> bool:
        t = self.tables[name]
        self.writes += 1
        return t.remove(encode(t.spec.key, key))

    # --- many entries ----------------------------------------------------------------------

    def update_many(self, name: str, items: Iterable[tuple[Any, Any]]) -> None:
        for k, v in items:
            self.update(name, k, v)

    def raw_values(self, name: str) -> Iterator[bytes]:
        for _, v in self.raw_items(name):
            yield v

    def raw_items(self, name: str, batch: int = 8192) -> Iterator[tuple[bytes, bytes]]:
        """Entries as raw bytes (per-CPU values as a one-CPU per-CPU buffer)."""
        t = self.tables[name]
        size = ctypes.sizeof(t.spec.value)
        pad = bytes(bpfsys.percpu_stride(size) - size) if t.spec.percpu else b""
        for k, v in t.entries():
            yield k, bytes(v) + pad



def key_bytes(index: int) -> bytes:
    """An array index (or other u32 key) as the map key bytes."""
    return bytes(U32(index))
