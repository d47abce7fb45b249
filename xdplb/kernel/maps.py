"""Typed access to the data path's maps, by name, with the ctypes types of ``layout.py``.

``KernelMaps`` works on BPF map fds (from a freshly loaded program or from pins), through
``bpfsys`` and not BCC, so the CLI can read a running balancer from another process.
Keys and values are ctypes objects, or ints for scalar types.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xdplb.abi.codec import decode, encode
from xdplb.abi.layout import MAP_BY_NAME, MAPS, RING_SLOTS_PER_WORD, U32, Counter, MapSpec, Stat
from xdplb.kernel import bpfsys

if TYPE_CHECKING:
    import numpy as np


class KernelMaps:
    """The data path's maps in the kernel, opened by fd. Owns the fds it is given."""

    def __init__(self, fds: dict[str, int], own: bool = True) -> None:
        missing = [m.name for m in MAPS if m.name not in fds]
        if missing:
            raise KeyError(f"maps missing: {', '.join(missing)}")
        # bpfsys checks every key and value against the map's sizes; on an Fd it asks the
        # kernel once per map instead of once per operation.
        self.fds = {n: fd if isinstance(fd, bpfsys.Fd) else bpfsys.Fd(fd) for n, fd in fds.items()}
        self.own = own
        self._info = {name: bpfsys.map_info(fd) for name, fd in self.fds.items()}
        self._rings: dict[int, tuple[int, bpfsys.Fd]] = {}  # vip id -> (ring map id, fd)

    @classmethod
    def open_pinned(cls, pin_dir: Path) -> KernelMaps:
        """Open every map pinned in ``pin_dir``."""
        fds: dict[str, int] = {}
        try:
            for m in MAPS:
                fds[m.name] = bpfsys.obj_get(pin_dir / m.name)
        except OSError:
            for fd in fds.values():
                bpfsys.close(fd)
            raise
        return cls(fds)

    def close(self) -> None:
        if self.own:
            for fd in self.fds.values():
                bpfsys.close(fd)
        self.fds = {}
        for _, fd in self._rings.values():
            fd.close()
        self._rings = {}

    def __enter__(self) -> KernelMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cpus(self) -> int:
        """CPUs that per-CPU maps hold a copy for (and that count rates apart)."""
        return bpfsys.possible_cpus()

    def max_entries(self, name: str) -> int:
        return self._info[name].max_entries

    # --- single entries --------------------------------------------------------------------

    def lookup(self, name: str, key: Any) -> Any:
        m = MAP_BY_NAME[name]
        raw = bpfsys.map_lookup(self.fds[name], encode(m.key, key), ctypes.sizeof(m.value))
        if raw is None:
            return None
        if m.percpu:
            return [decode(m.value, v) for v in
                    bpfsys.percpu_values(raw, ctypes.sizeof(m.value))]
        return decode(m.value, raw)

    def tracked_flow(self, key: Any) -> Any:
        """The flow entry of ``key``, as the data path finds it (xl_flow_find): in flows,
        or, not confirmed by a second packet yet, in half_open. None if neither has it."""
        f = self.lookup("flows", key)
        return f if f is not None else self.lookup("half_open", key)

    def update(self, name: str, key: Any, value: Any) -> None:
        m = MAP_BY_NAME[name]
        bpfsys.map_update(self.fds[name], encode(m.key, key), encode(m.value, value))

    def delete(self, name: str, key: Any) -> bool:
        m = MAP_BY_NAME[name]
        return bpfsys.map_delete(self.fds[name], encode(m.key, key))

    # --- many entries ----------------------------------------------------------------------

    def update_many(self, name: str, items: Iterable[tuple[Any, Any]]) -> None:
        m = MAP_BY_NAME[name]
        pairs = list(items)
        if not pairs:
            return
        bpfsys.map_update_batch(
            self.fds[name],
            [encode(m.key, k) for k, _ in pairs],
            [encode(m.value, v) for _, v in pairs],
        )

    def _ring_fd(self, vip_id: int) -> bpfsys.Fd | None:
        """An fd of VIP ``vip_id``'s ring (the outer slot gives its map id), or None."""
        map_id = self.lookup("maglev", vip_id)
        if map_id is None:
            return None
        cached = self._rings.get(vip_id)
        if cached and cached[0] == map_id:
            return cached[1]
        if cached:
            cached[1].close()
        fd = bpfsys.map_get_fd_by_id(map_id)
        self._rings[vip_id] = (map_id, fd)
        return fd

    def ring(self, vip_id: int, size: int | None = None) -> np.ndarray | None:
        """VIP ``vip_id``'s ring (backend id per slot, NO_BACKEND for none), or None when it
        has none: ``size`` slots when the ring is of that size (abi/ring.py: its words hold
        a few padding slots), else every slot its words hold."""
        from xdplb.abi import ring

        fd = self._ring_fd(vip_id)
        if fd is None:
            return None
        n = bpfsys.map_info(fd).max_entries
        blob = b"".join(v for _, v, _ in bpfsys.map_lookup_batch_raw(fd, 4, 8, max(n, 1)))
        return ring.unpack(blob, size)

    def put_ring(self, vip_id: int, values: Sequence[int]) -> None:
        """Give VIP ``vip_id`` a new ring holding ``values``: created and filled, then
        swapped into the outer slot in one update (the data path sees the old ring or the
        new one, whole)."""
        import numpy as np

        from xdplb.abi import ring

        packed = ring.pack(np.asarray(values))
        # The template's flags too (layout.render_maps): the kernel compares them
        fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, 4, 8, len(packed) // 8,
                               flags=bpfsys.BPF_F_INNER_MAP, name=f"xl_ring_{vip_id}")
        try:
            bpfsys.array_fill(fd, packed, 8)
            self.update("maglev", vip_id, int(fd))
        except BaseException:
            fd.close()
            raise
        old = self._rings.pop(vip_id, None)
        if old:
            old[1].close()
        self._rings[vip_id] = (bpfsys.map_info(fd).id, fd)

    def ring_update(self, vip_id: int, values: np.ndarray, changed: np.ndarray) -> None:
        """Make slots ``changed`` of VIP ``vip_id``'s existing ring those of ``values`` (the
        whole new ring, of the ring's size): the words holding them are written."""
        import numpy as np

        from xdplb.abi import ring

        fd = self._ring_fd(vip_id)
        if fd is None:
            raise KeyError(f"VIP {vip_id} has no ring")
        if not len(changed):
            return
        packed = ring.pack(values)
        touched = np.unique(np.asarray(changed) // RING_SLOTS_PER_WORD).tolist()
        bpfsys.map_update_batch(fd, [bytes(U32(w)) for w in touched],
                                [packed[w * 8 : (w + 1) * 8] for w in touched])

    def drop_ring(self, vip_id: int) -> bool:
        """Take VIP ``vip_id``'s ring out (the kernel frees it with its last reference)."""
        old = self._rings.pop(vip_id, None)
        if old:
            old[1].close()
        return self.delete("maglev", vip_id)

    def ring_memory(self) -> tuple[int, int]:
        """(rings, bytes of kernel memory they hold): memlock of every VIP's ring map."""
        n = total = 0
        for vip_id in range(self.max_entries("maglev")):
            fd = self._ring_fd(vip_id)
            if fd is not None:
                n += 1
                total += bpfsys.map_memlock(fd)
        return n, total

    def raw_items(self, name: str, batch: int = 8192) -> Iterator[tuple[bytes, bytes]]:
        """Entries as raw bytes (per-CPU values as whole per-CPU buffers)."""
        m = MAP_BY_NAME[name]
        for keys, values in bpfsys.map_lookup_batch(
            self.fds[name], ctypes.sizeof(m.key), ctypes.sizeof(m.value), batch
        ):
            yield from zip(keys, values, strict=True)

    def items(self, name: str) -> Iterator[tuple[Any, Any]]:
        m = MAP_BY_NAME[name]
        for k, v in self.raw_items(name):
            yield decode(m.key, k), decode(m.value, v)

    def percpu_array(self, name: str) -> np.ndarray:
        """A per-CPU array of u64 fields (counters, Stat) summed over CPUs, as a numpy
        array: one row per index, one column per field. No object per entry: 16,384
        backends' stats cost one batch read and one sum."""
        import numpy as np

        m = MAP_BY_NAME[name]
        size = ctypes.sizeof(m.value)
        stride = bpfsys.percpu_stride(size)
        blob = b"".join(self.raw_values(name))
        n = self.max_entries(name)  # an array dumps every index
        per_cpu = np.frombuffer(blob, dtype="<u8").reshape(n, -1, stride // 8)
        return per_cpu[:, :, : size // 8].sum(axis=1, dtype=np.uint64)

    def raw_values(self, name: str) -> Iterator[bytes]:
        """The values of a map as packed chunks (an array's in index order)."""
        m = MAP_BY_NAME[name]
        for _, values, _ in bpfsys.map_lookup_batch_raw(
                self.fds[name], ctypes.sizeof(m.key), ctypes.sizeof(m.value), 65536):
            yield values

    def percpu_sums(self, name: str) -> dict[int, Any]:
        """A per-CPU array summed over CPUs: index -> int or Stat."""
        m = MAP_BY_NAME[name]
        return {decode(m.key, k): sum_percpu(m, v) for k, v in self.raw_items(name)}


def sum_percpu(m: MapSpec, blob: bytes) -> Any:
    """One per-CPU value (a blob of every CPU's copy) summed."""
    size = ctypes.sizeof(m.value)
    vals = [decode(m.value, v) for v in bpfsys.percpu_values(blob, size)]
    if m.value is Stat:
        total = Stat()
        for v in vals:
            for f, _ in Stat._fields_:
                setattr(total, f, getattr(total, f) + getattr(v, f))
        return total
    return sum(vals)


def read_counters(maps: KernelMaps) -> dict[str, int]:
    """Global counters by name, summed over CPUs."""
    sums = maps.percpu_sums("counters")
    return {c.name.lower(): int(sums.get(int(c), 0)) for c in Counter if c != Counter.MAX}
