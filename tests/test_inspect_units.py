"""The inspection commands' pieces without a kernel: flow-table filters, sorting and rates
on synthetic tables, the JSON and table renderings, endpoint parsing, stats rates, and the
metrics families read back with prometheus_client's parser."""

from __future__ import annotations

import ctypes
import io
import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xdplb.abi.layout import _STRUCTS, TcpState
from xdplb.agent import metrics
from xdplb.inspect import flowview, stats
from xdplb.inspect.catalog import BackendRef, Catalog, VipRef, split_endpoint
from xdplb.inspect.flowtable import FLOW_DTYPE, KEY_DTYPE, RAW_KEY, FlowFilter, FlowTable, order
from xdplb.inspect.render import fmt_seconds, fmt_si
from xdplb.kernel import bulk

S = 10**9
NOW = 1000 * S
CAT = Catalog(
    vips={0: VipRef(0, "10.200.0.10", 80, 6, "web"), 1: VipRef(1, "10.200.0.10", 53, 17, "dns")},
    backends={0: BackendRef(0, 0, "10.20.0.11", 80, 3, False),
              1: BackendRef(1, 0, "10.20.0.12", 8080, 1, False),
              2: BackendRef(2, 1, "10.20.0.11", 53, 1, False)},
    seed=0, ring_size=65537)


def ip(a: str) -> int:
    return int.from_bytes(bytes(int(x) for x in a.split(".")), "big")


# client, sport, vip port, proto, backend id, fwd bytes, rev bytes, age s, idle s, state
ROWS = [
    ("10.10.0.2", 40000, 80, 6, 0, 500, 9000, 30, 1, TcpState.ESTABLISHED),
    ("10.10.0.2", 40001, 80, 6, 1, 700, 100, 5, 4, TcpState.FIN),
    ("10.10.0.3", 40000, 80, 6, 0, 100, 100, 100, 90, TcpState.SYN_SEEN),
    ("10.10.0.3", 5353, 53, 17, 2, 60, 80, 10, 2, TcpState.NONE),
    ("10.10.0.4", 40002, 80, 6, 7, 10, 0, 2, 2, TcpState.RST),  # backend gone since
]


def table(rows=ROWS, now=NOW, fwd_extra: int = 0) -> FlowTable:
    keys = np.zeros(len(rows), dtype=KEY_DTYPE)
    flows = np.zeros(len(rows), dtype=FLOW_DTYPE)
    for i, (c, sp, dp, proto, bid, fb, rb, age, idle, st) in enumerate(rows):
        keys[i] = (ip(c), ip("10.200.0.10"), sp, dp, proto, 2, 0)
        flows[i]["backend_id"] = bid
        flows[i]["vip_id"] = 0 if dp == 80 else 1
        flows[i]["first_ns"] = NOW - age * S
        flows[i]["last_ns"] = NOW - idle * S
        flows[i]["fwd_packets"], flows[i]["fwd_bytes"] = 1 + fwd_extra, fb + fwd_extra
        flows[i]["rev_packets"], flows[i]["rev_bytes"] = 1, rb
        flows[i]["tcp_state"] = st
    return FlowTable(keys.view(RAW_KEY), flows, now, 1000)


def ports(t: FlowTable, mask=None) -> list[int]:
    k = t.keys if mask is None else t.keys[mask]
    return k["sport"].tolist()


def test_dtypes_have_the_ctypes_layout():
    for s in _STRUCTS:
        d = bulk.struct_dtype(s)
        assert d.itemsize == ctypes.sizeof(s)
        assert [d.fields[n][1] for n, _ in s._fields_] == [getattr(s, n).offset
                                                         for n, _ in s._fields_]
    # A key written as bytes reads back as numbers in network order.
    t = table()
    assert t.keys["src"][0] == ip("10.10.0.2") and t.keys["sport"][0] == 40000
    assert bytes(t.raw_keys[0])[:4] == bytes([10, 10, 0, 2])
    assert bytes(t.raw_keys[0])[8:10] == (40000).to_bytes(2, "big")
    with pytest.raises(KeyError, match="nosuch"):
        bulk.struct_dtype(_STRUCTS[0], {"nosuch": ">u4"})


@pytest.mark.parametrize("spec,want", [
    ({"vip": "web"}, [40000, 40001, 40000, 40002]),
    ({"vip": "dns"}, [5353]),
    ({"vip": "10.200.0.10:53"}, [5353]),
    ({"vip": "10.200.0.10"}, [40000, 40001, 40000, 5353, 40002]),
    ({"backend": "10.20.0.11"}, [40000, 40000, 5353]),
    ({"backend": "10.20.0.11:80"}, [40000, 40000]),
    ({"client": "10.10.0.3"}, [40000, 5353]),
    ({"client": "10.10.0.2:40001"}, [40001]),
    ({"proto": "udp"}, [5353]),
    ({"states": frozenset({int(TcpState.FIN), int(TcpState.RST)})}, [40001, 40002]),
    ({"vip": "web", "client": "10.10.0.3"}, [40000]),
])
def test_filters(spec, want):
    t = table()
    assert ports(t, FlowFilter.build(CAT, **spec).mask(t)) == want


def test_filter_errors_say_what_exists():
    with pytest.raises(ValueError, match=r"no VIP 'nosuch' here \(VIPs: dns, web\)"):
        FlowFilter.build(CAT, vip="nosuch")
    unnamed = Catalog({0: VipRef(0, "10.200.0.10", 80, 6)}, {}, 0, 65537)
    with pytest.raises(ValueError, match="ADDR:PORT"):
        FlowFilter.build(unnamed, vip="web")
    with pytest.raises(ValueError):
        FlowFilter.build(CAT, client="nohost")
    with pytest.raises(ValueError):
        FlowFilter.build(CAT, backend="10.20.0.11:99999")


def test_order_and_counts():
    t = table()
    assert ports(t.take(order(t, "bytes"))) == [40000, 40001, 40000, 5353, 40002]
    assert ports(t.take(order(t, "age")))[:2] == [40000, 40000]  # 100s, then 30s
    assert t.take(order(t, "client")).keys["src"].tolist() == sorted(t.keys["src"].tolist())
    assert order(t, "rate").tolist() == order(t, "bytes").tolist()  # no rates: bytes
    with pytest.raises(ValueError, match="sort key"):
        order(t, "nosuch")
    assert t.count_by("backend_id", 8).tolist() == [2, 1, 1, 0, 0, 0, 0, 1]
    # Active: not closed, seen within 60 s: the FIN, RST and 90 s idle flows are not.
    assert ports(t, t.active()) == [40000, 5353]


def test_rates_match_flows_by_key():
    prev = table()
    cur = table(ROWS[1:] + [("10.10.0.9", 1, 80, 6, 0, 0, 0, 0, 0, TcpState.NONE)],
                now=NOW + 2 * S, fwd_extra=100)
    pps, bps = cur.byte_rates(prev)
    # Known flows moved 100 bytes and 100 packets in 2 s; the new one counts from zero.
    assert bps.tolist() == [50.0] * 5
    assert pps.tolist() == [50.0] * 4 + [51.0]  # the new one: 101 + 1 packets
    assert cur.byte_rates(None) is None


def test_json_rows_and_table():
    t = table()
    cols = flowview.columns(t, CAT)
    buf = io.StringIO()
    flowview.write_jsonl(cols, buf)
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert rows[0] == {
        "proto": "tcp", "client": "10.10.0.2", "client_port": 40000, "vip": "web",
        "vip_address": "10.200.0.10", "vip_port": 80, "backend_id": 0,
        "backend": "10.20.0.11", "backend_port": 80, "tcp_state": "established",
        "fwd_packets": 1, "fwd_bytes": 500, "rev_packets": 1, "rev_bytes": 9000,
        "age_s": 30.0, "idle_s": 1.0,
    }
    assert rows[3]["vip"] == "dns" and rows[3]["proto"] == "udp"
    assert rows[4]["backend"] is None and rows[4]["backend_port"] is None
    text = flowview.table(cols).splitlines()
    assert text[0].split() == ["PROTO", "CLIENT", "VIP", "BACKEND", "STATE", "PKTS>",
                               "BYTES>", "<PKTS", "<BYTES", "AGE", "IDLE"]
    assert text[1].split()[:5] == ["tcp", "10.10.0.2:40000", "10.200.0.10:80",
                                   "10.20.0.11:80", "established"]
    assert "(gone)" in text[5] and text[4].split()[4] == "-"  # UDP: no TCP state
    # Watch rows add a timestamp and rates (null without a previous read).
    cols = flowview.columns(t, CAT, None, ts=12.5)
    buf = io.StringIO()
    flowview.write_jsonl(cols, buf)
    first = json.loads(buf.getvalue().splitlines()[0])
    assert (first["ts"], first["packets_per_s"], first["bytes_per_s"]) == (12.5, None, None)


def test_empty_table_prints_nothing():
    empty = FlowTable(np.empty(0, RAW_KEY), np.empty(0, FLOW_DTYPE), NOW, 10)
    buf = io.StringIO()
    flowview.write_jsonl(flowview.columns(empty, CAT), buf)
    assert buf.getvalue() == ""


@pytest.mark.parametrize("spec,required,want", [
    ("10.1.2.3:80", True, ("10.1.2.3", 80)),
    ("10.1.2.3", False, ("10.1.2.3", None)),
    ("web", False, (None, None)),
])
def test_split_endpoint(spec, required, want):
    assert split_endpoint(spec, port_required=required) == want


@pytest.mark.parametrize("spec", ["10.1.2.3", "web", "10.1.2.3:0", "10.1.2.3:x", "1.2.3:80"])
def test_split_endpoint_rejects(spec):
    with pytest.raises(ValueError):
        split_endpoint(spec)


def test_formatting():
    assert [fmt_seconds(s) for s in (0.25, 61, 7322, 3 * 86400 + 3600)] == \
        ["0.2s", "1m01s", "2h02m", "3d01h"]
    assert [fmt_si(x) for x in (None, 950, 1234, 5.6e6)] == ["-", "950", "1.2k", "5.6M"]


def _snapshot(ts: float, packets: int, counters: dict[str, int]) -> dict:
    vip = {"vip_id": 0, "vip": "web", "vip_address": "10.200.0.10", "vip_port": 80,
           "protocol": "tcp", "packets": packets, "bytes": packets * 100, "new_flows": 1,
           "flows": 1, "active_flows": 1, "packets_per_s": None, "bytes_per_s": None,
           "new_flows_per_s": None}
    be = {"backend_id": 0, "address": "10.20.0.11", "port": 80, **{k: v for k, v in vip.items()
                                                                  if k != "vip_id"},
          "vip_id": 0}
    return {"ts": ts, "interval_s": None, "vips": [vip], "backends": [be],
            "counters": counters, "counters_per_s": None,
            "flow_table": {"entries": 1, "capacity": 10, "fill": 0.1}}


def test_stats_rates():
    prev = _snapshot(100.0, 10, {"tx": 5})
    cur = stats.add_rates(_snapshot(102.0, 30, {"tx": 9}), prev)
    assert cur["interval_s"] == 2.0
    v = cur["vips"][0]
    assert (v["packets_per_s"], v["bytes_per_s"], v["new_flows_per_s"]) == (10.0, 1000.0, 0.0)
    assert cur["counters_per_s"] == {"tx": 2.0}
    # A counter that went backwards (an id reused by another backend) gets no rate.
    again = stats.add_rates(_snapshot(104.0, 3, {"tx": 9}), cur)
    assert again["vips"][0]["packets_per_s"] is None


def test_metrics_families_parse_back():
    st = _snapshot(1.0, 7, {"tx": 5, "pass_ttl": 2, "new_flow": 1})
    st["backends"][0]["packets"] = 4
    bes = [{"address": "10.20.0.11", "port": 80, "vip": None, "vip_address": "10.200.0.10",
            "vip_port": 80, "down": True, "weight": 3, "maglev_share": 75.0,
            "health": {"state": "down"}}]

    class Fixed:
        def collect(self):
            return metrics.families(st, bes)

    reg = CollectorRegistry()
    reg.register(Fixed())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(generate_latest(reg).decode())
               for s in fam.samples}
    web = (("address", "10.200.0.10"), ("port", "80"), ("protocol", "tcp"), ("vip", "web"))
    assert samples[("xdplb_vip_packets_total", web)] == 7
    assert samples[("xdplb_vip_bytes_total", web)] == 700
    be = (("backend", "10.20.0.11:80"), ("vip", "web"))
    assert samples[("xdplb_backend_packets_total", be)] == 4
    unnamed = (("backend", "10.20.0.11:80"), ("vip", "10.200.0.10:80"))
    assert samples[("xdplb_backend_up", unnamed)] == 0
    assert samples[("xdplb_backend_maglev_share_ratio", unnamed)] == 0.75
    assert samples[("xdplb_backend_health", (*unnamed[:1], ("state", "down"),
                                             *unnamed[1:]))] == 1
    assert samples[("xdplb_packets_total", (("outcome", "pass_ttl"),))] == 2
    assert samples[("xdplb_events_total", (("event", "new_flow"),))] == 1
    assert samples[("xdplb_flow_table_fill_ratio", ())] == 0.1


@pytest.mark.parametrize("spec,want", [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)), (":9477", ("0.0.0.0", 9477)),
    ("[::1]:9477", ("::1", 9477)),
])
def test_metrics_addr(spec, want):
    assert metrics.parse_addr(spec) == want


@pytest.mark.parametrize("spec", ["9477", "localhost:9477", "1.2.3.4:0", "1.2.3.4:x"])
def test_metrics_addr_rejects(spec):
    with pytest.raises(ValueError, match="metrics-addr"):
        metrics.parse_addr(spec)
