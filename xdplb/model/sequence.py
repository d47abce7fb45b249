"""Turn sequences of the wrr, rr and random schedulers: the VIP's ring holds one period of
turns, the data path takes ``ring[counter % len]`` (wrr, rr: one shared counter a VIP) or
``ring[hash % len]`` (random) per new flow.

wrr is nginx's smooth weighted round robin: each turn every backend's current weight grows
by its weight, the largest (the first of equals) is chosen and loses the total. One period
is sum(weights) / gcd(weights) turns, each backend appearing weight / gcd times, spread out
(3:1 gives a a b a, not a a a b). Periods over MAX_SEQUENCE turns are scaled down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from xdplb.abi.layout import MAX_SEQUENCE


def reduced(weights: Sequence[int], limit: int = MAX_SEQUENCE) -> list[int]:
    """Weights divided by their gcd; scaled down (each kept at 1 or more) while their sum
    exceeds ``limit`` (fewer backends than ``limit``). Zero weights stay zero."""
    g = math.gcd(*weights) if any(weights) else 1
    out = [w // g for w in weights]
    while sum(out) > limit:
        scale = limit / sum(out)
        # floors of 1 may keep it over: again (ends, as MAX_BACKENDS < MAX_SEQUENCE)
        out = [max(1, int(w * scale)) if w else 0 for w in out]
    return out


def smooth_wrr(weights: Sequence[int]) -> list[int]:
    """One period of nginx's smooth weighted round robin over ``weights``: the index chosen
    at each turn. Weight 0 never gets a turn; all zero gives an empty sequence."""
    w = reduced(weights)
    total = sum(w)
    current = [0] * len(w)
    out = []
    for _ in range(total):
        best = -1
        for i, wi in enumerate(w):
            if not wi:
                continue
            current[i] += wi
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return out


def round_robin(weights: Sequence[int]) -> list[int]:
    """rr: one equal turn for every index whose weight is above 0 (IPVS rr ignores
    weights, but weight 0 still takes no flow)."""
    return [i for i, w in enumerate(weights) if w]
