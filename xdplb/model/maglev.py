"""Weighted Maglev lookup table.

``build_table`` maps each of the M slots of the table (M prime) to one backend.

Permutation (as in Google's Maglev paper): backend ``key`` visits slots in the order
``(offset + j * skip) % M`` for j = 0, 1, ..., with ``offset = h1 % M`` and
``skip = h2 % (M - 1) + 1``, where ``h1 = murmur3_32(key, seed)`` and
``h2 = murmur3_32(key, seed ^ 0x9E3779B9)`` (xdplb.hashing, vectorised as
``murmur3_32_many``). M prime makes every sequence a permutation.

Quotas: backend i of weight w_i gets exactly ``q_i`` slots, the largest-remainder
apportionment of M by weight: ``floor(M * w_i / W)``, plus one for the backends with the
largest remainders ``(M * w_i) % W`` (ties: smaller key) until the quotas sum to M. So
``|q_i - M * w_i / W| < 1``. Weight 0 gives quota 0.

Fill rule ("weighted sweep"): backend i reaches position j of its permutation at the virtual
time ``j * (1.0 / w_i)`` (IEEE double), i.e. it walks at a speed proportional to its weight,
a continuous form of Katran's weight accumulators. Take all (backend, position) visits in
order of virtual time, ties to the smaller key: a visit claims its slot if the slot is still
free and the backend holds fewer than q_i slots. With equal weights this is Maglev's
round-robin walk, except that a backend advances one position per turn instead of skipping
to its next free slot. So when a backend reaches a position does not depend on the others,
and removing a backend leaves the order of all other visits alone: its slots go to their
next visitors, and only the end of the fill, where quotas run out, moves a few more. At
M = 65537, removing 1 of 100 equal backends moves 1.0% + 0.3% of the slots (the classic
fill: 1.0% + 0.6%).

Computation: every backend's preference (its permutation) and every slot's preference
(the earlier visit) come from one global order of visits, so the fill is the unique stable
matching between backends (capacity q_i) and slots, which backend-proposing deferred
acceptance finds whatever order the proposals come in. We run it in parallel rounds with
numpy: every backend short of its quota proposes to the next slots along its permutation
that it could win (free, or held by a later visit), as many as it is short; each slot keeps
its earliest proposal; rejected and displaced backends propose again in the next round.
About a dozen rounds fill M = 65537 for 10 to 1000 backends. How many positions a round
examines is only a speed heuristic: the table is the same whatever it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from xdplb.model.hashing import murmur3_32_many

__all__ = ["build_table", "owner_shares"]

_SKIP_SEED_XOR = 0x9E3779B9
# Over-scan factor for the per-round block of positions a backend examines. The fraction of
# winnable positions is roughly 1.3x the free fraction of the table; assuming a bit less
# over-scans a little, so most backends find what they need in one pass.
_WINNABLE_PER_FREE = 1.15
# log2 of the widest row of positions examined at once (see _sweep).
_MAX_WIDTH_LOG2 = 6


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
    Raises ValueError for a non-prime size, duplicate keys or a negative weight.
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
    seed &= 0xFFFFFFFF
    live_keys = [keys[i] for i in live]
    offset = murmur3_32_many(live_keys, seed).astype(np.int64) % size
    skip = murmur3_32_many(live_keys, seed ^ _SKIP_SEED_XOR).astype(np.int64) % (size - 1) + 1
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
        front = frontier[act]
        # Positions to examine per backend: enough to find `need` winnable ones on average.
        # In the first round everything is winnable; later they get sparse.
        if free == m:
            span = need
        else:
            ratio = min(1.0, _WINNABLE_PER_FREE * free / m)
            span = np.ceil(need * (1.0 / ratio)).astype(np.int64) + 1
        # Positions wrap around after M: a backend never needs to go that far.
        span = np.minimum(span, m - front)
        if not span.all():
            raise RuntimeError("maglev fill ran out of positions (is the size prime?)")

        # Examine positions in rows of `width` consecutive positions of one backend, a 2-D
        # array that numpy fills by broadcasting per-row values instead of gathering per
        # position. A backend's last row may run past its span: harmless, just extra work.
        shift = int(np.clip(np.log2(span.mean() / 4), 3, _MAX_WIDTH_LOG2))
        width = 1 << shift
        rows = (span + width - 1) >> shift
        row_end = np.cumsum(rows)
        row_a = np.repeat(np.arange(act.size), rows)  # index into `act`
        row_pos = front[row_a] + ((np.arange(int(row_end[-1])) - (row_end - rows)[row_a]) << shift)
        row_skip = skip[act][row_a]
        cols = np.arange(width, dtype=np.int64)
        slot = cols * row_skip[:, None]
        slot += ((offset[act][row_a] + row_pos * row_skip) % m)[:, None]
        # Reduce mod m by unsigned division (numpy divides by a scalar fast, unlike `%`).
        slot -= (slot.view(np.uint64) // np.uint64(m)).view(np.int64) * m
        key = row_pos.astype(np.float64)[:, None] + cols.astype(np.float64)
        key *= inv_weight[act][row_a][:, None]
        slot = slot.ravel()
        key = key.ravel()
        cur = hkey[slot]
        cand = np.flatnonzero(key <= cur)
        tie = key[cand] == cur[cand]
        if tie.any():  # equal virtual times: the smaller index wins
            t = cand[tie]
            keep = ~tie
            keep[tie] = act[row_a[t >> shift]] < holder[slot[t]]
            cand = cand[keep]
        if int((front + (rows << shift)).max()) > m:  # rows may run past position M-1
            cand = cand[row_pos[cand >> shift] + (cand & (width - 1)) < m]

        # Take the first `need` winnable positions of each backend.
        cseg = row_a[cand >> shift]
        found = np.bincount(cseg, minlength=act.size)
        first = np.cumsum(found) - found
        sel = (np.arange(cand.size) - first[cseg]) < need[cseg]
        take = cand[sel]
        met = found >= need
        new_front = np.minimum(front + (rows << shift), m)
        last = cand[first[met] + need[met] - 1]
        new_front[met] = row_pos[last >> shift] + (last & (width - 1)) + 1
        frontier[act] = new_front
        deficit[act] -= np.minimum(found, need)

        # Each slot keeps its earliest proposal; losers and displaced holders try again.
        p_slot = slot[take]
        p_key = key[take]
        p_backend = act[cseg[sel]]
        np.minimum.at(hkey, p_slot, p_key)
        best = p_key == hkey[p_slot]
        b_slot = p_slot[best]
        b_backend = p_backend[best]
        displaced = holder[b_slot]
        holder[b_slot] = b_backend
        won = holder[b_slot] == b_backend
        if not won.all():
            # Equal virtual times on one slot: the assignment above kept an arbitrary one.
            tied = np.zeros(m, dtype=bool)
            tied[b_slot[~won]] = True
            t = tied[b_slot]
            holder[b_slot[t]] = n
            np.minimum.at(holder, b_slot[t], b_backend[t])
            won = holder[b_slot] == b_backend
        displaced = displaced[won]  # one entry per slot that changed hands
        free -= int(np.count_nonzero(displaced == n))
        deficit += np.bincount(displaced, minlength=n + 1)[:n]
        deficit += np.bincount(p_backend[~best], minlength=n)
        deficit += np.bincount(b_backend[~won], minlength=n)
    return holder


def owner_shares(table: np.ndarray, n: int) -> np.ndarray:
    """Fraction of the table's slots owned by each of backends 0..n-1 (-1 entries own none)."""
    table = np.asarray(table)
    owned = table[table >= 0]
    if owned.size and int(owned.max()) >= n:
        raise ValueError(f"table refers to backend {int(owned.max())}, expected < {n}")
    counts = np.bincount(owned, minlength=n).astype(np.float64)
    return counts / table.size if table.size else counts
