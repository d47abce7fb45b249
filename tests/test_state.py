"""Config -> desired state: stable ids, no silent id reuse, drains and down backends."""

from __future__ import annotations

import numpy as np
import pytest
from pools import Vip, pool_yaml

from xdplb.abi.layout import NO_BACKEND
from xdplb.config import parse_config
from xdplb.model.desired import Current, desired_state


def cfg(*addrs: str):
    return parse_config(pool_yaml(Vip("web", 80, addrs), table_size=251), "t.yaml")


def current_of(state) -> Current:
    cur = Current()
    for v in state.vips:
        cur.vip_ids[v.key] = v.vip_id
        for b in v.backends:
            cur.backend_ids[(v.vip_id, b.address, b.port)] = b.backend_id
    return cur


def ids(state) -> dict[str, int]:
    return {b.address: b.backend_id for v in state.vips for b in v.backends}


def test_ids_stable_and_not_reused_at_once():
    s1 = desired_state(cfg("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    assert ids(s1) == {"10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 2}
    # Remove .2, add .4: the others keep their ids, .4 does not inherit .2's id.
    s2 = desired_state(cfg("10.0.0.1", "10.0.0.3", "10.0.0.4"), current_of(s1))
    assert ids(s2) == {"10.0.0.1": 0, "10.0.0.3": 2, "10.0.0.4": 3}
    assert s2.vips[0].vip_id == s1.vips[0].vip_id


def test_ring_holds_backend_ids_and_respects_down_and_drain():
    s = desired_state(cfg("10.0.0.1", "10.0.0.2"))
    ring = s.vips[0].ring
    assert set(np.unique(ring)) == {0, 1} and len(ring) == 251
    down = desired_state(cfg("10.0.0.1", "10.0.0.2"), current_of(s),
                         down=frozenset({"web/10.0.0.2:80"}))
    assert set(np.unique(down.vips[0].ring)) == {0}
    assert [b.down for b in down.vips[0].backends] == [False, True]
    drained = desired_state(cfg("10.0.0.1", "10.0.0.2"), current_of(s),
                            drained=frozenset({"web/10.0.0.1:80"}))
    assert set(np.unique(drained.vips[0].ring)) == {1}
    assert [b.weight for b in drained.vips[0].backends] == [0, 1]
    # Only the down backend's slots moved.
    moved = np.nonzero(down.vips[0].ring != ring)[0]
    assert set(ring[moved]) == {1}
    everyone = desired_state(cfg("10.0.0.1"), drained=frozenset({"web/10.0.0.1:80"}))
    assert set(np.unique(everyone.vips[0].ring)) == {NO_BACKEND}


def test_capacity():
    from xdplb.model import desired as state

    with pytest.raises(state.CapacityError):
        state._allocate(list(range(5)), {}, 4, "backends")
