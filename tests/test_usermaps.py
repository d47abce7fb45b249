"""UserMaps: the kernel maps' interface and semantics in Python, driven by the same MapSync."""

from __future__ import annotations

import ctypes
import errno
from dataclasses import replace

import pytest
from pools import BE1, DNS, WEB, pool_yaml

from xdplb.abi.codec import vip_key
from xdplb.abi.layout import (
    MAX_BACKENDS,
    MAX_REV_NAT,
    MAX_VIPS,
    Counter,
    Flow,
    FlowKey,
    Stat,
    addr4,
    addr16,
)
from xdplb.agent.mapsync import MapSync
from xdplb.config import parse_config
from xdplb.kernel.maps import read_counters
from xdplb.model.desired import desired_state
from xdplb.userspace.usermaps import UserMaps, key_bytes, map_sizes

CONFIG = pool_yaml(WEB, replace(DNS, backends=(BE1,)), table_size=251, seed=9,
                   flows={"max_entries": 1024})


def fkey(i: int) -> FlowKey:
    return FlowKey(addr4(bytes((10, 0, i >> 8, i & 255))), addr4(bytes(4)), i, 80, 6, 2)


def test_sizes_follow_the_program_constants():
    sizes = map_sizes(1024)
    assert sizes["maglev"] == MAX_VIPS  # rings: one map each
    assert sizes["flows"] == 1024
    assert sizes["rev_nat"] == MAX_REV_NAT
    assert sizes["counters"] == int(Counter.MAX)
    assert sizes["meta"] == 1


def test_arrays_hold_every_index():
    m = UserMaps(1024)
    assert m.lookup("backends", 17).flags == 0  # zero until written
    assert m.lookup("backends", MAX_BACKENDS) is None
    with pytest.raises(OSError) as e:
        m.update("backends", MAX_BACKENDS, m.lookup("backends", 0))
    assert e.value.errno == errno.E2BIG
    with pytest.raises(OSError) as e:
        m.delete("backends", 1)
    assert e.value.errno == errno.EINVAL
    assert len(list(m.items("meta"))) == 1
    assert sum(1 for _ in m.items("counters")) == int(Counter.MAX)


def test_hash_refuses_when_full_and_deletes():
    m = UserMaps(1024)
    for i in range(MAX_VIPS):
        m.update("vip_addrs", addr16(bytes((10, 0, i >> 8, i & 255))), 1)
    with pytest.raises(OSError) as e:
        m.update("vip_addrs", addr16(bytes((10, 1, 0, 0))), 1)
    assert e.value.errno == errno.E2BIG
    m.update("vip_addrs", addr16(bytes((10, 0, 0, 0))), 2)  # an existing key: fine
    assert m.delete("vip_addrs", addr16(bytes((10, 0, 0, 0))))
    assert not m.delete("vip_addrs", addr16(bytes((10, 0, 0, 0))))


def test_lru_evicts_the_least_recently_used():
    m = UserMaps(1024)
    flows = m.table("flows")
    for i in range(1024):
        m.update("flows", fkey(i), Flow(backend_id=i))
    flows.ref(bytes(fkey(0)))  # the data path touches flow 0: now the most recent
    m.lookup("flows", fkey(1))  # a control-plane read does not
    m.update("flows", fkey(5000), Flow(backend_id=5000))
    assert m.lookup("flows", fkey(1)) is None  # evicted
    assert m.lookup("flows", fkey(0)).backend_id == 0
    assert m.lookup("flows", fkey(5000)).backend_id == 5000
    assert len(list(m.items("flows"))) == 1024


def test_values_are_copies_and_percpu_has_one_cpu():
    m = UserMaps(1024)
    f = Flow(backend_id=3)
    m.update("flows", fkey(1), f)
    f.backend_id = 4
    got = m.lookup("flows", fkey(1))
    got.backend_id = 5
    assert m.lookup("flows", fkey(1)).backend_id == 3
    m.table("counters").ref(key_bytes(Counter.TX)).value += 2
    assert m.lookup("counters", int(Counter.TX)) == [2]
    assert read_counters(m)["tx"] == 2
    m.table("vip_stats").ref(key_bytes(1)).packets += 7
    assert m.percpu_sums("vip_stats")[1].packets == 7
    k, v = next((k, v) for k, v in m.raw_items("vip_stats") if k == key_bytes(1))
    assert len(v) == ctypes.sizeof(Stat) and Stat.from_buffer_copy(v).packets == 7
    assert len(dict(m.raw_items("counters"))[key_bytes(0)]) == 8  # per-CPU stride


def test_mapsync_drives_it_unchanged():
    cfg = parse_config(CONFIG, "t.yaml")
    m = UserMaps(1024)
    sync = MapSync(m)
    writes = m.writes
    desired = desired_state(cfg, sync.read_current())
    sync.apply(desired, sync.read_current())
    assert m.writes > writes
    cur = sync.read_current()
    assert cur.vip_ids == {v.key: v.vip_id for v in desired.vips}
    assert set(cur.backend_ids.values()) == desired.backend_ids()
    web = next(v for v in desired.vips if v.name == "web")
    assert m.ring(web.vip_id, 251).tolist() == web.ring.tolist()
    assert m.lookup("vips", vip_key(*web.key)).ring_size == 251
    # A second apply of the same state writes nothing new to the ring.
    rep = MapSync(m).apply(desired_state(cfg, cur), cur)
    assert rep.slots_written == 0 and rep.backends_written == 0


@pytest.mark.root
def test_same_content_as_kernel_maps():
    """MapSync fills the BPF program's maps and UserMaps alike, entry for entry."""
    from xdplb.offline.engines import BpfEngine, ScapyEngine

    cfg = parse_config(CONFIG, "t.yaml")
    with BpfEngine(cfg, [1, 2]) as k, ScapyEngine(cfg, [1, 2]) as u:
        for name in ("vips", "vip_addrs", "backends", "meta", "tx_ports", "tx_devs"):
            assert dict(k.maps.raw_items(name)) == dict(u.maps.raw_items(name)), name
        for v in k.state.vips:
            assert k.maps.ring(v.vip_id, 251).tolist() == u.maps.ring(v.vip_id).tolist() \
                == v.ring.tolist()
