"""Weighted Maglev lookup table.

``build_table`` maps each of the M slots of the table (M prime) to one backend.

Permutation (as in Google's Maglev paper): backend ``key`` visits slots in the order
``(offset + j * skip) % M`` for j = 0, 1, ..., with ``offset = h1 % M`` and
``skip = h2 % (M - 1) + 1``, where ``h1 = murmur3_32(key, seed)`` and
``h2 = murmur3_32(key, seed ^ 0x9E3779B9)``. M prime makes every sequence a permutation.

Quotas: backend i of weight w_i gets exactly ``q_i`` slots, the largest-remainder
apportionment of M by weight: ``floor(M * w_i / W)``, plus one for the backends with the
largest remainders ``(M * w_i) % W`` (ties: smaller key) until the quotas sum to M. So
``|q_i - M * w_i / W| < 1``. Weight 0 gives quota 0.

Fill rule ("weighted sweep"): backend i reaches position j of its permutation at the virtual
time ``j * (1.0 / w_i)`` (IEEE double; so it walks at a speed proportional to its weight).
Take all (backend, position) visits in order of virtual time, ties to the smaller key: a
visit claims its slot if the slot is still free and the backend holds fewer than q_i slots.
With equal weights this is Maglev's round-robin walk, except that a backend advances one
position per tick instead of jumping to its next free slot. That keeps each backend's
claims tied to its own permutation rather than to the whole fill order, which moves fewer
slots when backends come and go: removing 1 of 100 equal backends at M = 65537 moves
1.0% + 0.3% of the slots, against 1.0% + 0.6% for the classic fill.

Computation: since every backend's preference (its permutation) and every slot's preference
(earlier visit) come from one global order of visits, the fill is the unique stable
matching between backends (capacity q_i) and slots, and backend-proposing deferred
acceptance finds it whatever order the proposals come in. We run it in parallel rounds
with numpy: every backend short of its quota proposes to the next slots along its
permutation that it could win (free, or held by a later visit), as many as it is short;
each slot keeps its earliest proposal; rejected and displaced backends propose again in
the next round. About a dozen rounds fill M = 65537, whatever the number of backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from xdplb.hashing import murmur3_32

__all__ = ["build_table", "owner_shares"]

_SKIP_SEED_XOR = 0x9E3779B9
# Over-scan factor for the per-round block of positions a backend examines. The fraction of
# winnable positions is roughly 1.3x the free fraction of the table; assuming a bit less
# over-scans a little, so most backends find what they need in one pass.
_WINNABLE_PER_FREE = 1.15


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _quotas(weights: Sequence[int], size: int) -> list[int]:
    """Largest-remainder apportionment of ``size`` slots (Python ints: weights may be big)."""
    total = sum(weights)
    quotas = [size * w // total for w in weights]
    remainders = [(size * w) % total for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in order[: size - sum(quotas)]:
        quotas[i] += 1
    return quotas


def build_table(backends: Sequence[tuple[bytes, int]], size: int, seed: int) -> np.ndarray:
    """Weighted Maglev table: int32 array of ``size`` input indices of backends (-1 if none).

    ``backends`` is a list of (unique key, weight >= 0); ``size`` must be prime. The result
    depends only on the set of (key, weight) pairs, ``size`` and ``seed``, not on list order.
    """
    if not _is_prime(size):
        raise ValueError(f"table size must be prime, got {size}")
    keys = [bytes(k) for k, _ in backends]
    weights = [int(w) for _, w in backends]
    if len(set(keys)) != len(keys):
        raise ValueError("backend keys must be unique")
    if any(w < 0 for w in weights):
        raise ValueError("backend weights must be >= 0")

    # Work in key order so the input order cannot matter; `live` maps back to input indices.
    live = sorted((i for i in range(len(keys)) if weights[i] > 0), key=keys.__getitem__)
    if not live:
        return np.full(size, -1, dtype=np.int32)
    len(live)
    seed &= 0xFFFFFFFF
    offset = np.array([murmur3_32(keys[i], seed) % size for i in live], dtype=np.int64)
    skip = np.array(
        [murmur3_32(keys[i], seed ^ _SKIP_SEED_XOR) % (size - 1) + 1 for i in live],
        dtype=np.int64,
    )
    inv_weight = 1.0 / np.array([float(weights[i]) for i in live])
    quota = np.array(_quotas([weights[i] for i in live], size), dtype=np.int64)

    holder = _sweep(offset, skip, inv_weight, quota, size)
    return np.array(live + [-1], dtype=np.int32)[holder]


def _sweep(
    offset: np.ndarray, skip: np.ndarray, inv_weight: np.ndarray, quota: np.ndarray, m: int
) -> np.ndarray:
    """Deferred acceptance in parallel rounds; returns each slot's backend (key order)."""
    n = offset.size
    hkey = np.full(m, np.inf)  # virtual time of the visit holding each slot
    holder = np.full(m, n, dtype=np.int64)  # n = free
    frontier = np.zeros(n, dtype=np.int64)  # next position each backend will examine
    deficit = quota.copy()
    free = m
    while free:
        act = np.flatnonzero(deficit)
        need = deficit[act]
        # Block of positions to examine per backend: enough to find `need` winnable ones
        # on average. In the first round everything is winnable, later it gets sparse.
        if free == m:
            span = need.copy()
        else:
            ratio = min(1.0, _WINNABLE_PER_FREE * free / m)
            span = np.ceil(need * (1.0 / ratio)).astype(np.int64) + 1
        # Positions wrap around after M: a backend never needs to go that far.
        np.minimum(span, m - frontier[act], out=span)
        if not span.all():
            raise RuntimeError("maglev fill ran out of positions (is the size prime?)")

        # Ragged expansion: one entry per (backend, position) examined this round.
        ends = np.cumsum(span)
        total = int(ends[-1])
        seg = np.repeat(np.arange(act.size), span)
        pos = np.arange(total, dtype=np.int64) + (frontier[act] - (ends - span))[seg]
        slot = (offset[act][seg] + pos * skip[act][seg]) % m
        key = pos * inv_weight[act][seg]
        cur = hkey[slot]
        win = key < cur
        tie = np.flatnonzero(key == cur)
        if tie.size:  # equal virtual times: the smaller key (index) wins
            win[tie] = act[seg[tie]] < holder[slot[tie]]

        # Take the first `need` winnable positions of each backend's block.
        cand = np.flatnonzero(win)
        cseg = seg[cand]
        found = np.bincount(cseg, minlength=act.size)
        first = np.cumsum(found) - found
        take = cand[(np.arange(cand.size) - first[cseg]) < need[cseg]]
        met = found >= need
        new_frontier = frontier[act] + span
        new_frontier[met] = pos[cand[first[met] + need[met] - 1]] + 1
        frontier[act] = new_frontier
        deficit[act] -= np.minimum(found, need)

        # Each slot keeps its earliest proposal; losers and displaced holders try again.
        p_slot = slot[take]
        p_key = key[take]
        p_backend = act[seg[take]]
        old = holder[p_slot]
        np.minimum.at(hkey, p_slot, p_key)
        best = p_key == hkey[p_slot]
        holder[p_slot] = n
        np.minimum.at(holder, p_slot[best], p_backend[best])
        won = holder[p_slot] == p_backend
        displaced = old[won]
        free -= int(np.count_nonzero(displaced == n))
        deficit += np.bincount(displaced, minlength=n + 1)[:n]
        deficit += np.bincount(p_backend[~won], minlength=n)
    return holder


def owner_shares(table: np.ndarray, n: int) -> np.ndarray:
    """Fraction of the table's slots owned by each of backends 0..n-1 (-1 entries own none)."""
    table = np.asarray(table)
    owned = table[table >= 0]
    if owned.size and int(owned.max()) >= n:
        raise ValueError(f"table refers to backend {int(owned.max())}, expected < {n}")
    counts = np.bincount(owned, minlength=n).astype(np.float64)
    return counts / table.size if table.size else counts
