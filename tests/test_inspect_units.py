"""The inspection commands' pieces without a kernel: flow-table filters, sorting and rates
on synthetic tables, the JSON and table renderings, endpoint parsing, stats rates, and the
metrics families read back with prometheus_client's parser. The forwarding modes as every
reader shows them, on maps filled by MapSync and flows the Python data path made from real
frames of each mode."""

from __future__ import annotations

import ctypes
import io
import json
import socket
from dataclasses import dataclass

import numpy as np
import pytest
from pools import Backend, Vip, pool_yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from testkit.fuzz import build

from xdplb.abi.layout import _STRUCTS, TcpState
from xdplb.agent import flowsweep, metrics
from xdplb.agent.mapsync import MapSync
from xdplb.config import parse_config
from xdplb.inspect import flowview, render, stats, status, trace
from xdplb.inspect.catalog import FORWARDING, BackendRef, Catalog, VipRef, split_endpoint
from xdplb.inspect.flowtable import FLOW_DTYPE, KEY_DTYPE, RAW_KEY, FlowFilter, FlowTable, order
from xdplb.inspect.render import fmt_seconds, fmt_si
from xdplb.inspect.trace import flow_key
from xdplb.kernel import bulk
from xdplb.kernel.maps import read_counters
from xdplb.model.desired import MODES, desired_state
from xdplb.userspace.datapath import XDP_DROP, XDP_TX, PyDatapath
from xdplb.userspace.fib import NO_NEIGH, SUCCESS, FibResult
from xdplb.userspace.usermaps import UserMaps

S = 10**9
NOW = 1000 * S
CAT = Catalog(
    vips={0: VipRef(0, "10.200.0.10", 80, 6, "web", ring_size=65537),
          1: VipRef(1, "10.200.0.10", 53, 17, "dns", ring_size=65537)},
    backends={0: BackendRef(0, 0, "10.20.0.11", 80, 3, False),
              1: BackendRef(1, 0, "10.20.0.12", 8080, 1, False),
              2: BackendRef(2, 1, "10.20.0.11", 53, 1, False)},
    seed=0)


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
    unnamed = Catalog({0: VipRef(0, "10.200.0.10", 80, 6, ring_size=65537)}, {}, 0)
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
        "backend": "10.20.0.11", "backend_port": 80, "backup": False, "forwarding": "nat",
        "encap": None,
        "source": None, "tcp_state": "established", "fwd_packets": 1, "fwd_bytes": 500,
        "rev_packets": 1, "rev_bytes": 9000,
        "age_s": 30.0, "idle_s": 1.0,
    }
    assert rows[3]["vip"] == "dns" and rows[3]["proto"] == "udp"
    assert rows[4]["backend"] is None and rows[4]["backend_port"] is None
    text = flowview.table(cols).splitlines()
    assert text[0].split() == ["PROTO", "CLIENT", "VIP", "BACKEND", "MODE", "SOURCE", "STATE",
                               "PKTS>", "BYTES>", "<PKTS", "<BYTES", "AGE", "IDLE"]
    assert text[1].split()[:7] == ["tcp", "10.10.0.2:40000", "10.200.0.10:80",
                                   "10.20.0.11:80", "nat", "-", "established"]
    assert "(gone)" in text[5] and text[4].split()[6] == "-"  # UDP: no TCP state
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
           "protocol": "tcp", "forwarding": "nat", "encap": None, "packets": packets,
           "bytes": packets * 100, "new_flows": 1,
           "flows": 1, "active_flows": 1, "open_flows": 1, "opened_flows": 2,
           "closed_flows": 1, "packets_per_s": None, "bytes_per_s": None,
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
    assert samples[("xdplb_vip_info", (*web[:1], ("encap", ""), ("forwarding", "nat"),
                                       *web[1:]))] == 1
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
    assert samples[("xdplb_vip_open_flows", web)] == 1
    assert samples[("xdplb_backend_opened_flows_total", be)] == 2
    assert samples[("xdplb_backend_closed_flows_total", be)] == 1


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


# --- forwarding modes: maps filled by MapSync, flows made by the Python data path ----------

MODE_VIP = "10.200.0.40"
CLIENT = "10.10.0.2"
FNAT_SRC = "10.20.0.100"  # fullnat's `source:` (the route's answer would be ROUTED_SRC)
ROUTED_SRC = "10.20.0.1"  # what the "route lookup" (MapSync's source_of) says, for ipip
GATEWAY, BEHIND_GW, NO_NEIGHBOUR = "10.20.0.254", "10.70.0.5", "10.20.0.99"
INGRESS = 2
MODES_POOL = pool_yaml(
    Vip("plain", 80, ("10.20.0.11",), address=MODE_VIP),
    # Two source ports: the third flow to the one backend finds none.
    Vip("fnat", 81, (Backend("10.20.0.12", port=8080),), address=MODE_VIP,
        forwarding="fullnat", source=FNAT_SRC, source_ports="20000-20001"),
    Vip("l2", 82, ("10.20.0.11",), address=MODE_VIP, forwarding="dsr", encap="l2"),
    Vip("ipip", 83, ("10.20.0.12",), address=MODE_VIP, forwarding="dsr"),  # encap: ipip
    Vip("l2-routed", 84, (BEHIND_GW,), address=MODE_VIP, forwarding="dsr", encap="l2"),
    Vip("fnat-noneigh", 85, (NO_NEIGHBOUR,), address=MODE_VIP, forwarding="fullnat",
        source=FNAT_SRC),
    table_size=251, seed=3, flows={"max_entries": 4096})
# What each VIP port's flows and VIP show: (forwarding, encap)
WANT_MODE = {80: ("nat", None), 81: ("fullnat", None), 82: ("dsr", "l2"), 83: ("dsr", "ipip"),
             84: ("dsr", "l2"), 85: ("fullnat", None)}


class OneSegmentFib:
    """bpf_fib_lookup's answers for a balancer whose every destination is on the ingress
    segment, but BEHIND_GW (behind GATEWAY) and NO_NEIGHBOUR (no neighbour entry)."""

    def lookup(self, daddr: bytes, saddr: bytes, tos: int, proto: int, tot_len: int,
               ifindex: int) -> FibResult:
        if daddr == socket.inet_aton(NO_NEIGHBOUR):
            return FibResult(NO_NEIGH)
        hop = GATEWAY if daddr == socket.inet_aton(BEHIND_GW) else socket.inet_ntoa(daddr)
        return FibResult(SUCCESS, ifindex, b"\x02\0\0\0\0\x01", b"\x02\0\0\0\0\x02",
                         nexthop=socket.inet_aton(hop))


@dataclass
class ModesLab:
    maps: UserMaps
    datapath: PyDatapath
    out: dict[str, bytes]  # what the data path sent, by case

    def run(self, frame: bytes) -> tuple[int, bytes]:
        res = self.datapath.run(frame, INGRESS)
        return res.action, res.data

    def catalog(self) -> Catalog:
        return Catalog.read(self.maps)

    def table(self) -> FlowTable:
        return flowsweep.read_table(self.maps)  # as FlowTable.read does the kernel's


@dataclass
class MapsReader:
    """What stats.collect reads of a Reader, on UserMaps."""

    maps: UserMaps
    catalog: Catalog
    flows: FlowTable


def syn(sport: int, dport: int, flags: str = "S", **kw) -> bytes:
    return build(CLIENT, MODE_VIP, 6, sport, dport, flags=flags, **kw)


@pytest.fixture
def modes() -> ModesLab:
    """Every mode's flows: nat, fullnat (two flows, the third out of ports, a backend's
    reply), dsr/l2, dsr/ipip, and the drops of dsr/l2 behind a gateway and fullnat without
    a neighbour."""
    cfg = parse_config(MODES_POOL, "modes.yaml")
    um = UserMaps(cfg.flows.max_entries)
    sync = MapSync(um, source_of=lambda _: ROUTED_SRC)
    sync.apply(desired_state(cfg, sync.read_current()), sync.read_current())
    lab = ModesLab(um, PyDatapath(um, OneSegmentFib()), {})
    for name, frame, verdict in (
        ("nat", syn(40000, 80), XDP_TX),
        ("fnat", syn(40001, 81), XDP_TX),
        ("fnat2", syn(40002, 81), XDP_TX),
        ("fnat-none", syn(40003, 81), XDP_DROP),
        ("l2", syn(40004, 82), XDP_TX),
        ("ipip", syn(40005, 83), XDP_TX),
        ("ipip-ack", syn(40005, 83, "A", payload=b"x" * 10), XDP_TX),
        ("l2-routed", syn(40006, 84), XDP_DROP),
        ("fnat-noneigh", syn(40007, 85), XDP_DROP),
    ):
        action, lab.out[name] = lab.run(frame)
        assert action == verdict, name
    sent = Ether(lab.out["fnat"])
    reply = build("10.20.0.12", sent[IP].src, 6, 8080, sent[TCP].sport, flags="SA",
                  smac="02:00:00:00:00:03")
    action, lab.out["fnat-reply"] = lab.run(reply)
    assert action == XDP_TX
    return lab


def _rows(t: FlowTable, cat: Catalog) -> list[dict]:
    buf = io.StringIO()
    flowview.write_jsonl(flowview.columns(t.take(order(t, "client")), cat), buf)
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_reader_mode_names_are_the_configs():
    """What readers print for a mode is what pool.yaml says (encap defaulting to ipip) and
    what the agent's model maps it to."""
    for name, mode in MODES.items():
        fwd, encap = FORWARDING[mode]
        assert name == (f"{fwd}-{encap}" if encap else fwd)
    assert set(FORWARDING) == set(MODES.values())


def test_flows_rows_carry_each_flows_mode(modes: ModesLab):
    rows = _rows(modes.table(), modes.catalog())
    by_port = {r["client_port"]: r for r in rows}
    # The dropped fullnat flow (no source port) is not tracked; dsr/l2 behind a gateway and
    # fullnat without a neighbour are (the data path creates them before the next hop).
    assert sorted(by_port) == [40000, 40001, 40002, 40004, 40005, 40006, 40007]
    for r in rows:
        assert (r["forwarding"], r["encap"]) == WANT_MODE[r["vip_port"]], r
        if r["forwarding"] != "fullnat":
            assert r["source"] is None, r
    # fullnat: the pair the data path sent from, and the reply's translation came back
    for case, sport in (("fnat", 40001), ("fnat2", 40002)):
        sent = Ether(modes.out[case])
        assert sent[IP].src == FNAT_SRC  # the config's source, not the route's
        assert by_port[sport]["source"] == f"{FNAT_SRC}:{sent[TCP].sport}"
        assert 20000 <= sent[TCP].sport <= 20001
    assert by_port[40001]["source"] != by_port[40002]["source"]
    assert by_port[40007]["source"].startswith(f"{FNAT_SRC}:")
    back = Ether(modes.out["fnat-reply"])
    assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == \
        (MODE_VIP, 81, CLIENT, 40001)
    assert by_port[40001]["rev_packets"] == 1
    # The table: MODE and SOURCE columns
    t = modes.table()
    lines = flowview.table(flowview.columns(t.take(order(t, "client")), modes.catalog()))
    lines = lines.splitlines()
    assert lines[0].split()[:7] == ["PROTO", "CLIENT", "VIP", "BACKEND", "MODE", "SOURCE",
                                    "STATE"]
    cells = {int(line.split()[1].split(":")[1]): line.split()[4:6] for line in lines[1:]}
    assert cells[40000] == ["nat", "-"] and cells[40004] == ["dsr/l2", "-"]
    assert cells[40005] == ["dsr/ipip", "-"]
    assert cells[40001] == ["fullnat", by_port[40001]["source"]]


def test_flows_keep_the_mode_they_started_in(modes: ModesLab):
    """A flow's row says the mode it was created in, not its VIP's mode now."""
    cfg = parse_config(MODES_POOL.replace("    forwarding: dsr\n    encap: l2\n", "", 1),
                       "modes.yaml")
    sync = MapSync(modes.maps, source_of=lambda _: ROUTED_SRC)
    sync.apply(desired_state(cfg, sync.read_current()), sync.read_current())
    cat = modes.catalog()
    assert next(v for v in cat.vips.values() if v.port == 82).forwarding == ("nat", None)
    (row,) = [r for r in _rows(modes.table(), cat) if r["vip_port"] == 82]
    assert (row["forwarding"], row["encap"]) == ("dsr", "l2")


def test_status_shows_each_vips_mode(modes: ModesLab):
    vips = {v["port"]: v for v in status._vips(modes.maps)}
    for port, (fwd, encap) in WANT_MODE.items():
        assert (vips[port]["forwarding"], vips[port]["encap"]) == (fwd, encap), port
    assert vips[81]["source_ports"] == [20000, 20001]
    assert vips[85]["source_ports"] == [1024, 32767]  # the default range
    assert all(vips[p]["source_ports"] is None for p in (80, 82, 83, 84))
    # The balancer's address toward each backend, where the mode sends from one
    src = {p: [b["source"] for b in v["backends"]] for p, v in vips.items()}
    assert src == {80: [None], 81: [FNAT_SRC], 82: [None], 83: [ROUTED_SRC], 84: [None],
                   85: [FNAT_SRC]}
    group = {"interfaces": [{"name": "eth0", "attached": True, "mode": "native"}],
             "prog_id": 7, "pin_dir": "/sys/fs/bpf/x", "current_layout": True, "agent": None,
             "vips": list(vips.values()), "counters": read_counters(modes.maps)}
    lines = status.render([group]).splitlines()
    assert lines[1].split() == ["VIP", "MODE", "SCHEDULER", "BACKEND", "SOURCE", "WEIGHT",
                                "STATE"]
    by_vip = {line.split()[1]: line for line in lines[2:-1]}
    assert by_vip[f"{MODE_VIP}:80"].split()[2:5] == ["nat", "maglev", "10.20.0.11:80"]
    assert by_vip[f"{MODE_VIP}:81"].split()[2:7] == ["fullnat", "20000-20001", "maglev",
                                                      "10.20.0.12:8080", FNAT_SRC]
    assert by_vip[f"{MODE_VIP}:82"].split()[2] == "dsr/l2"
    assert by_vip[f"{MODE_VIP}:83"].split()[2:6] == ["dsr/ipip", "maglev", "10.20.0.12:83",
                                                      ROUTED_SRC]
    assert all(v["scheduler"] == "maglev" for v in vips.values())
    assert "drop_source_ports=1" in lines[-1] and "ipip_encap=2" in lines[-1]


def _counted(modes: ModesLab) -> dict:
    return stats.collect(MapsReader(modes.maps, modes.catalog(), modes.table()))


@dataclass
class TablelessReader:
    """A Reader whose flow table must not be read (what a metrics scrape gets)."""

    maps: UserMaps
    catalog: Catalog

    @property
    def flows(self) -> FlowTable:
        raise AssertionError("the flow table was read")


def test_flow_sweep_finds_the_ends_the_counters_cannot_see(modes: ModesLab):
    """Open flows per backend are counted per connection; an entry that vanishes unseen (an
    LRU eviction) is found by the agent's sweep, and a scrape with the sweep reads counters
    only, never the table."""
    for sport, dport in ((40000, 80), (40001, 81)):  # confirm nat's and fullnat's flows
        modes.run(syn(sport, dport, "A"))
    cat = modes.catalog()
    by_port = {b.port: b.id for b in cat.backends.values()}
    nat_key = flow_key(CLIENT, 40000, MODE_VIP, 80, 6)
    assert modes.maps.delete("flows", nat_key)  # evicted, unseen by the data path
    sweep = flowsweep.sweep(modes.maps)
    st = stats.collect(TablelessReader(modes.maps, cat), sweep)
    rows = {r["backend_id"]: r for r in st["backends"]}
    nat = rows[by_port[80]]
    assert (nat["opened_flows"], nat["closed_flows"], nat["open_flows"]) == (1, 0, 0)
    assert sweep["backends"][str(by_port[80])]["unseen"] == 1
    fnat = rows[by_port[8080]]
    assert (fnat["opened_flows"], fnat["open_flows"], fnat["flows"]) == (1, 1, 2)
    assert st["flow_table"]["entries"] == len(modes.table())
    assert st["flow_table"]["swept_at"] == sweep["ts"]
    with pytest.raises(AssertionError, match="flow table was read"):
        stats.collect(TablelessReader(modes.maps, cat))  # the CLI's reading does read it


def test_stats_and_counters_of_the_modes(modes: ModesLab):
    st = _counted(modes)
    for row in (*st["vips"], *st["backends"]):
        assert (row["forwarding"], row["encap"]) == WANT_MODE[row["vip_port"]], row
    c = st["counters"]
    assert c["drop_source_ports"] == 1  # the third fullnat flow
    assert c["fnat_port_taken"] >= 2  # its two tries, at least
    assert c["ipip_encap"] == 2  # the SYN and the ACK
    assert c["drop_not_on_link"] == 1 and c["drop_next_hop"] == 1
    text = render.render_stats(st)
    head, *vip_lines = text.split("\n\n")[0].splitlines()[1:]
    assert head.split()[:3] == ["VIP", "ADDRESS", "MODE"]
    modes_shown = {line.split()[3]: line.split()[4] for line in vip_lines}
    assert modes_shown == {f"{MODE_VIP}:80": "nat", f"{MODE_VIP}:81": "fullnat",
                           f"{MODE_VIP}:82": "dsr/l2", f"{MODE_VIP}:83": "dsr/ipip",
                           f"{MODE_VIP}:84": "dsr/l2", f"{MODE_VIP}:85": "fullnat"}
    drops = next(line for line in text.splitlines() if line.startswith("drops:"))
    assert "source_ports=1" in drops and "not_on_link=1" in drops and "next_hop=1" in drops


def test_metrics_of_the_modes(modes: ModesLab):
    st = _counted(modes)

    class Fixed:
        def collect(self):
            return metrics.families(st, [])

    reg = CollectorRegistry()
    reg.register(Fixed())
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    info = {s.labels["port"]: (s.labels["forwarding"], s.labels["encap"], s.value)
            for s in fams["xdplb_vip_info"].samples}
    assert info == {str(p): (f, e or "", 1.0) for p, (f, e) in WANT_MODE.items()}
    (one,) = [s for s in fams["xdplb_vip_info"].samples if s.labels["port"] == "83"]
    assert one.labels == {"vip": f"{MODE_VIP}:83", "address": MODE_VIP, "port": "83",
                          "protocol": "tcp", "forwarding": "dsr", "encap": "ipip"}
    # The per-VIP series keep their labels: the info metric is what carries the mode.
    assert {tuple(sorted(s.labels)) for s in fams["xdplb_vip_packets"].samples} == \
        {("address", "port", "protocol", "vip")}
    packets = {s.labels["outcome"]: s.value for s in fams["xdplb_packets"].samples}
    events = {s.labels["event"]: s.value for s in fams["xdplb_events"].samples}
    assert (packets["drop_source_ports"], packets["drop_not_on_link"],
            packets["drop_next_hop"]) == (1, 1, 1)
    assert events["ipip_encap"] == 2 and events["fnat_port_taken"] >= 2
    assert "ipip_encap" not in packets and "drop_next_hop" not in events


@pytest.mark.parametrize("case,sport,dport", [
    ("nat", 40000, 80), ("fullnat", 40001, 81), ("dsr/l2", 40004, 82),
    ("dsr/ipip", 40005, 83),
])
def test_trace_model_follows_each_mode(modes: ModesLab, case: str, sport: int, dport: int):
    """The trace's Python model predicts where a tracked flow's packet and a new flow's
    first packet leave addressed, in every mode, as the data path then sends them; its
    tracked flow carries the flow's mode."""
    cat = modes.catalog()
    probe = trace.Probe(6, CLIENT, sport, MODE_VIP, dport)
    live = trace._live_state(modes.maps, probe)
    predicted = trace.model(modes.maps, cat, probe, live)
    assert predicted["decision"] == "tracked"
    action, data = modes.run(syn(sport, dport, "A"))
    assert action == XDP_TX and predicted["out"] == trace._out_endpoint(data, 6, False)
    flow = trace._flow_json(live, cat, probe)
    fwd, encap = WANT_MODE[dport]
    assert (flow["forwarding"], flow["encap"]) == (fwd, encap)
    rows = {r["client_port"]: r for r in _rows(modes.table(), cat)}
    assert flow["source"] == rows[sport]["source"]
    # a new flow of the same VIP
    probe = trace.Probe(6, CLIENT, sport + 100, MODE_VIP, dport)
    predicted = trace.model(modes.maps, cat, probe, trace._live_state(modes.maps, probe))
    action, data = modes.run(syn(sport + 100, dport))
    if case == "fullnat":  # out of source ports: the data path drops it
        assert action == XDP_DROP and predicted["decision"] == "new"
    else:
        assert predicted["decision"] == "new" and action == XDP_TX
        assert predicted["out"] == trace._out_endpoint(data, 6, False)


def test_trace_knows_a_fullnat_reply(modes: ModesLab):
    cat = modes.catalog()
    sent = Ether(modes.out["fnat"])
    probe = trace.Probe(6, "10.20.0.12", 8080, sent[IP].src, sent[TCP].sport)
    live = trace._live_state(modes.maps, probe)
    assert live.reply and live.fnat_key is not None
    predicted = trace.model(modes.maps, cat, probe, live)
    assert predicted == {"decision": "reply", "out": f"{MODE_VIP}:81"}
    flow = trace._flow_json(live, cat, probe)
    assert flow["source"] == f"{sent[IP].src}:{sent[TCP].sport}"
    # The trace's private tables get the flow and its port entry, so the reply is found there
    um = UserMaps(4096)
    trace._seed(um, live)
    assert um.lookup("fnat_ports", live.fnat_key) is not None
    text = render.render_trace({
        "proto": "tcp", "src": "10.20.0.12:8080", "dst": f"{sent[IP].src}:{sent[TCP].sport}",
        "vip": None, "verdict": "tx", "ingress": "eth0", "out": f"{MODE_VIP}:81",
        "decision": "reply", "tracked_flow": flow, "maglev": None, "backend": None,
        "counters": {"reply": 1, "tx": 1}, "models": [], "agree": True})
    assert f"fullnat flow (source {flow['source']})" in text
    # a port no flow holds is no reply
    probe = trace.Probe(6, "10.20.0.12", 8080, sent[IP].src, 1)
    assert not trace._live_state(modes.maps, probe).reply
