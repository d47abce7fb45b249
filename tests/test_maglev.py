"""Tests for xdplb.maglev: balance, weights, minimal disruption, determinism."""

from __future__ import annotations

import hashlib
import heapq
import os
import random
import subprocess
import sys
from functools import cache

import numpy as np
import pytest

from xdplb.model.hashing import murmur3_32, murmur3_32_many
from xdplb.model.maglev import build_table, owner_shares

M = 65537
SEED = 0x5EED


def key(i: int) -> bytes:
    return f"10.20.{i // 250}.{i % 250 + 1}:8080".encode()


def equal(n: int, weight: int = 1) -> list[tuple[bytes, int]]:
    return [(key(i), weight) for i in range(n)]


@cache
def cached_table(backends: tuple[tuple[bytes, int], ...], size: int = M, seed: int = SEED):
    table = build_table(list(backends), size, seed)
    table.setflags(write=False)
    return table


def owners_by_key(backends, table: np.ndarray) -> np.ndarray:
    """The table with input indices replaced by keys, to compare tables of different lists."""
    keys = np.array([k for k, _ in backends] + [b""], dtype=object)
    return keys[table]


def counts(table: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(table[table >= 0], minlength=n)


def assert_weighted(backends, table: np.ndarray) -> None:
    """Each backend within max(1 slot, 1%) of round(M * w / W)."""
    weights = np.array([w for _, w in backends])
    got = counts(table, len(backends))
    want = np.round(table.size * weights / weights.sum())
    slack = np.maximum(1, 0.01 * want)
    bad = np.flatnonzero(np.abs(got - want) > slack)
    assert bad.size == 0, [(int(i), int(weights[i]), int(got[i]), want[i]) for i in bad[:10]]
    assert got.sum() == table.size  # no slot left empty


def moved(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a != b))


def reference_table(backends, size: int, seed: int) -> np.ndarray:
    """The fill rule of the module docstring, run one visit at a time (slow, small M only)."""
    live = sorted((i for i, (_, w) in enumerate(backends) if w > 0), key=lambda i: backends[i][0])
    table = np.full(size, -1, dtype=np.int32)
    if not live:
        return table
    weights = [backends[i][1] for i in live]
    total = sum(weights)
    quota = [size * w // total for w in weights]
    by_remainder = sorted(range(len(live)), key=lambda r: (-(size * weights[r] % total), r))
    for r in by_remainder[: size - sum(quota)]:
        quota[r] += 1
    visits = []  # (virtual time, rank in key order, position)
    perm = []
    for r, i in enumerate(live):
        k = backends[i][0]
        perm.append((murmur3_32(k, seed) % size, murmur3_32(k, seed ^ 0x9E3779B9) % (size - 1) + 1))
        if quota[r]:
            visits.append((0.0, r, 0))
    held = [0] * len(live)
    while visits:
        _, r, j = heapq.heappop(visits)
        offset, skip = perm[r]
        slot = (offset + j * skip) % size
        if table[slot] < 0:
            table[slot] = live[r]
            held[r] += 1
        if held[r] < quota[r]:
            heapq.heappush(visits, ((j + 1) * (1.0 / weights[r]), r, j + 1))
    return table


# --- shape, validation, small sizes --------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 13, 251, 4093])
def test_size_respected_with_small_primes(size):
    backends = equal(min(5, size))
    table = build_table(backends, size, SEED)
    assert table.dtype == np.int32 and table.shape == (size,)
    assert table.min() >= 0 and table.max() < len(backends)
    got = counts(table, len(backends))
    assert got.max() - got.min() <= 1
    assert_weighted(backends, table)


def test_more_backends_than_slots():
    backends = [(key(i), 1 + i % 3) for i in range(40)]
    table = build_table(backends, 13, SEED)
    assert table.min() >= 0
    assert counts(table, 40).max() == 1  # 13 slots for 40 backends: nobody gets two
    assert_weighted(backends, table)


def test_validation():
    with pytest.raises(ValueError, match="prime"):
        build_table(equal(3), 65536, SEED)
    with pytest.raises(ValueError, match="prime"):
        build_table(equal(3), 1, SEED)
    with pytest.raises(ValueError, match="unique"):
        build_table([(b"a", 1), (b"a", 2)], 13, SEED)
    with pytest.raises(ValueError, match=">= 0"):
        build_table([(b"a", 1), (b"b", -1)], 13, SEED)


@pytest.mark.parametrize("seed", [0, 1, 0xFFFFFFFF])
@pytest.mark.parametrize("size", [2, 13, 101, 1009])
def test_matches_reference_fill(size, seed):
    """The numpy rounds compute exactly the documented one-visit-at-a-time rule."""
    rng = random.Random(size * 7 + seed)
    for _ in range(8):
        n = rng.randint(1, 40)
        backends = [
            (
                rng.randbytes(rng.randint(0, 20)),
                rng.choice([0, 1, 1, 2, 3, 10, rng.randint(1, 999)]),
            )
            for _ in range(n)
        ]
        backends = list(dict(backends).items())  # unique keys
        np.testing.assert_array_equal(
            build_table(backends, size, seed), reference_table(backends, size, seed)
        )


def test_matches_reference_fill_full_size():
    backends = [(key(i), 1 + i % 4) for i in range(30)]
    np.testing.assert_array_equal(
        build_table(backends, M, SEED), reference_table(backends, M, SEED)
    )


def test_vectorised_murmur_matches_hashing():
    rng = random.Random(3)
    keys = [rng.randbytes(rng.randint(0, 40)) for _ in range(2000)] + [key(i) for i in range(300)]
    for seed in (0, 1, 0x9E3779B9, 0xFFFFFFFF, SEED ^ 0x9E3779B9):
        assert murmur3_32_many(keys, seed).tolist() == [murmur3_32(k, seed) for k in keys]


# --- balance and weights ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000])
def test_balance_equal_weights(n):
    table = cached_table(tuple(equal(n)))
    got = counts(table, n)
    assert got.max() - got.min() <= 1
    shares = owner_shares(table, n)
    assert shares.shape == (n,) and shares.sum() == pytest.approx(1.0)
    assert np.allclose(shares, 1 / n, atol=1 / M)


@pytest.mark.parametrize(
    "weights", [(3, 1), (1, 3), (1, 2, 7), (1, 1000), (5, 5, 5, 1), (1_000_000_007, 3, 2**40)]
)
def test_weights(weights):
    backends = [(key(i), w) for i, w in enumerate(weights)]
    assert_weighted(backends, build_table(backends, M, SEED))


@pytest.mark.parametrize("n,size", [(20, 251), (200, M), (1000, M)])
def test_many_random_weights(n, size):
    rng = random.Random(n)
    backends = [(key(i), rng.randint(1, 100)) for i in range(n)]
    assert_weighted(backends, build_table(backends, size, SEED))


def test_weight_zero_gets_nothing():
    backends = [(key(0), 2), (key(1), 0), (key(2), 1), (key(3), 0)]
    table = build_table(backends, M, SEED)
    got = counts(table, 4)
    assert got[1] == 0 and got[3] == 0
    assert_weighted(backends, table)
    # A weight-0 backend is the same as an absent one.
    live = [backends[0], backends[2]]
    assert (owners_by_key(backends, table) == owners_by_key(live, build_table(live, M, SEED))).all()


@pytest.mark.parametrize("backends", [[], [(b"a", 0)], [(key(i), 0) for i in range(5)]])
def test_no_weight_means_no_backend(backends):
    table = build_table(backends, 251, SEED)
    assert table.dtype == np.int32 and table.shape == (251,)
    assert (table == -1).all()
    assert owner_shares(table, len(backends)).sum() == 0


def test_owner_shares():
    table = np.array([0, 0, 1, -1, 2, 0, 1, 1, 1, -1], dtype=np.int32)
    assert owner_shares(table, 4).tolist() == [0.3, 0.4, 0.1, 0.0]
    with pytest.raises(ValueError):
        owner_shares(table, 2)


# --- minimal disruption ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5, 10, 50, 100])
def test_removing_a_backend_moves_few_slots(n):
    backends = equal(n)
    before = owners_by_key(backends, cached_table(tuple(backends)))
    for gone in sorted({0, 1, n // 2, n - 1}):
        rest = backends[:gone] + backends[gone + 1 :]
        after = owners_by_key(rest, cached_table(tuple(rest)))
        assert (after != key(gone)).all()
        assert moved(before, after) <= 1 / n + 0.01, (n, gone, moved(before, after))


@pytest.mark.parametrize("n", [3, 5, 10, 50, 100])
def test_adding_a_backend_moves_few_slots(n):
    backends = equal(n)
    before = owners_by_key(backends, cached_table(tuple(backends)))
    grown = [*backends, (b"10.99.0.1:8080", 1)]
    after = owners_by_key(grown, cached_table(tuple(grown)))
    assert np.mean(after == b"10.99.0.1:8080") == pytest.approx(1 / (n + 1), abs=1 / M)
    assert moved(before, after) <= 1 / (n + 1) + 0.01, (n, moved(before, after))


@pytest.mark.parametrize("n", [3, 10, 100])
@pytest.mark.parametrize("new_weight", [0, 5, 9, 11, 20, 100])
def test_changing_a_weight_moves_few_slots(n, new_weight):
    backends = equal(n, weight=10)
    before = owners_by_key(backends, cached_table(tuple(backends)))
    changed = list(backends)
    changed[n // 2] = (key(n // 2), new_weight)
    after = owners_by_key(changed, cached_table(tuple(changed)))
    share_change = abs(new_weight / (10 * (n - 1) + new_weight) - 1 / n)
    assert moved(before, after) <= share_change + 0.025, (moved(before, after), share_change)


# --- determinism -----------------------------------------------------------------------------


def test_input_order_does_not_matter():
    rng = random.Random(1)
    backends = [(key(i), rng.randint(0, 5)) for i in range(60)]
    table = build_table(backends, 4093, SEED)
    for _ in range(3):
        shuffled = backends[:]
        rng.shuffle(shuffled)
        other = build_table(shuffled, 4093, SEED)
        assert (owners_by_key(shuffled, other) == owners_by_key(backends, table)).all()


def test_seeds_give_different_tables():
    backends = equal(10)
    tables = [cached_table(tuple(backends), M, seed) for seed in (0, 1, SEED, 0xFFFFFFFF)]
    for i in range(len(tables)):
        for j in range(i):
            assert moved(tables[i], tables[j]) > 0.5


def test_same_in_another_process():
    code = (
        "import hashlib; from xdplb.model.maglev import build_table; "
        "b = [(f'10.20.0.{i}:8080'.encode(), 1 + i % 7) for i in range(1, 60)]; "
        f"print(hashlib.sha256(build_table(b, {M}, {SEED}).tobytes()).hexdigest())"
    )
    backends = [(f"10.20.0.{i}:8080".encode(), 1 + i % 7) for i in range(1, 60)]
    here = hashlib.sha256(build_table(backends, M, SEED).tobytes()).hexdigest()
    for hash_seed in ("0", "12345"):  # Python's str/bytes hash() must play no part
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        assert out.stdout.strip() == here
