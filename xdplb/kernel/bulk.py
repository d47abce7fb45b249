"""Bulk map reads into numpy structured arrays: a million flows without a million objects.

``bpfsys.map_lookup_batch`` copies entries out of the kernel a chunk at a time, taking each
hash bucket's lock only while that bucket is copied, so a reader never holds up the data
path. Every chunk becomes one numpy array whose dtype has the offsets of the ctypes struct
in ``layout.py``; nothing is decoded per entry.
"""

from __future__ import annotations

import numpy as np

from xdplb.kernel import bpfsys

BATCH = 65536  # entries per syscall: ~7 MiB of flows, few syscalls per million


def struct_dtype(ctype: type, formats: dict[str, str] | None = None) -> np.dtype:
    """A numpy dtype with the offsets and size of ``ctype``. ``formats`` re-types fields,
    e.g. ``{"sport": ">u2"}`` for a port in network order, or ``{"src": ">u4"}`` for the
    IPv4 address in the first 4 bytes of a 16-byte address."""
    base = np.dtype(ctype)
    formats = formats or {}
    unknown = set(formats) - set(base.names)
    if unknown:
        raise KeyError(f"{ctype.__name__} has no field {', '.join(sorted(unknown))}")
    return np.dtype({
        "names": list(base.names),
        "formats": [formats.get(n, base.fields[n][0]) for n in base.names],
        "offsets": [base.fields[n][1] for n in base.names],
        "itemsize": base.itemsize,
    })


def read_map(
    fd: int, key_dtype: np.dtype, value_dtype: np.dtype, batch: int = BATCH,
    stop_after: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All entries of a (non per-CPU) map as (keys, values) arrays, in the map's order.

    ``stop_after`` ends the dump once that many entries are in (arrays are dumped in index
    order, so a prefix of an array map costs only what it holds)."""
    if bpfsys.map_info(fd).type in bpfsys.PERCPU_MAP_TYPES:
        raise ValueError("read_map: per-CPU maps carry one value per CPU; use maps.percpu_sums")
    keys: list[np.ndarray] = []
    values: list[np.ndarray] = []
    n = 0
    for ks, vs in bpfsys.map_lookup_batch(fd, key_dtype.itemsize, value_dtype.itemsize, batch):
        keys.append(np.frombuffer(b"".join(ks), dtype=key_dtype))
        values.append(np.frombuffer(b"".join(vs), dtype=value_dtype))
        n += len(ks)
        if stop_after is not None and n >= stop_after:
            break
    if not keys:
        return np.empty(0, dtype=key_dtype), np.empty(0, dtype=value_dtype)
    return np.concatenate(keys), np.concatenate(values)
