"""Looking inside a running balancer, in namespaces with real traffic: `flows`, `stats`,
`backends`, `trace` and the metrics endpoint, checked against what the backends logged,
what was sent, and each other."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import replace

import pytest
from agent_process import XDPLB, AgentProcess, xdplb
from lab import Lab
from pools import ECHO, VIP, WEB, Backend, HealthCheck, Vip, pool_yaml
from prometheus_client.parser import text_string_to_metric_families

from xdplb.abi.layout import OUTCOMES
from xdplb.instance import pins

pytestmark = pytest.mark.root

PREFIX = "xlt-i1"
METRICS = "127.0.0.1:9477"
UDP_IDLE = 4.0  # long enough for a trace to read the tables after a datagram
HTTP_CHECK = HealthCheck("http", path="/healthz", interval="500ms", timeout="400ms")
# fullnat, its source found by the route toward each backend (no `source:`); no traffic
# until test_fullnat_flows_show_their_source, so the tests before it see nat flows only.
FNAT = Vip("fnat", 81, (Backend("10.20.0.11", port=80), Backend("10.20.0.12", port=80)),
           forwarding="fullnat")
POOL = pool_yaml(replace(WEB, health_check=HTTP_CHECK), ECHO, FNAT, table_size=65537,
                 flows={"max_entries": 100_000, "udp_idle_timeout": f"{UDP_IDLE:g}s"})
ETH_IP_UDP = 14 + 20 + 8  # what a UDP frame adds to its payload (the data path counts frames)


def _lab_pin_dirs(lab: Lab) -> list:
    root = pins.BPFFS / pins.ROOT_NAME
    return sorted(root.glob(f"*/{lab.lb_ns}")) if root.is_dir() else []


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A one-armed lab whose agent runs with --keep (so the last test can stop it and read
    what only the pins hold) and serves metrics."""
    tmp = tmp_path_factory.mktemp("inspect")
    with Lab(topology="one-armed", backends=2, prefix=PREFIX) as lab:
        pool = tmp / "pool.yaml"
        pool.write_text(POOL)
        agent = AgentProcess(lab, pool, "--mode", "native", "--keep", "--metrics-addr", METRICS,
                             "--flow-sweep", "1s")
        try:
            yield lab, agent
        finally:
            agent.stop()
            xdplb(lab, "detach", "eth0", check=False)
            for d in _lab_pin_dirs(lab):  # never leave pins behind, whatever failed
                shutil.rmtree(d, ignore_errors=True)


def flows(lab: Lab, *args: str) -> list[dict]:
    out = xdplb(lab, "flows", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def timeless(rows: list[dict]) -> list[dict]:
    """Rows without the fields that move with the clock, to compare two reads."""
    return [{k: v for k, v in r.items() if k not in ("age_s", "idle_s")} for r in rows]


def stats(lab: Lab) -> dict:
    return json.loads(xdplb(lab, "stats", "--json", "--interval", "0").stdout)


def curl_from(lab: Lab, sport: int, port: int = 80) -> str:
    """One HTTP request to the web VIP (or the VIP's ``port``) from a given client port;
    the body names the backend."""
    return lab.run(lab.client_ns, "curl", "-sS", "--noproxy", "*", "-m", "5",
                   "--local-port", str(sport), f"http://{VIP}:{port}/").stdout


def logged(lab: Lab, service: str) -> set[tuple[int, str, int]]:
    """(client port, backend address, backend port) of every request the backends logged
    (the agent's own health checks aside)."""
    out = set()
    for i in range(len(lab.backend_names)):
        for rec in lab.backend_log(i):
            if rec.get("service") == service and "error" not in rec \
                    and "/healthz" not in rec.get("request", ""):
                assert rec["client"] == lab.client_addr  # DNAT only: the real client
                out.add((rec["cport"], rec["local"], rec["lport"]))
    return out


def test_flows_show_exactly_the_connections_made(running):
    lab, _ = running
    for sport in range(41000, 41012):
        assert "backend=" in curl_from(lab, sport)
    for sport in range(42000, 42004):
        lab.udp_request(lab.client_ns, VIP, 5000, b"x" * 10, sport=sport)
    rows = flows(lab)
    got_tcp = {(r["client_port"], r["backend"], r["backend_port"]) for r in rows
               if r["proto"] == "tcp"}
    got_udp = {(r["client_port"], r["backend"], r["backend_port"]) for r in rows
               if r["proto"] == "udp"}
    assert got_tcp == logged(lab, "http")
    assert got_udp == logged(lab, "udp-echo")
    assert all(r["client"] == lab.client_addr and r["vip_address"] == VIP for r in rows)
    assert {r["vip"] for r in rows} == {"web", "echo"}  # named from the agent's config
    # TCP: handshake, request, response and close were all seen, both ways.
    for r in rows:
        if r["proto"] == "tcp":
            assert r["tcp_state"] in ("fin", "rst"), r
            assert r["fwd_packets"] >= 4 and r["rev_packets"] >= 3, r
        assert 0 <= r["idle_s"] <= r["age_s"] < 120, r


def test_counters_match_the_bytes_sent(running):
    lab, _ = running
    before = stats(lab)
    payloads = [b"a" * 7, b"b" * 300, b"c" * 1200]
    replies = [lab.udp_request(lab.client_ns, VIP, 5000, p, sport=43000) for p in payloads]
    (row,) = flows(lab, "--client", f"{lab.client_addr}:43000")
    assert row["proto"] == "udp" and row["tcp_state"] == "none"
    assert row["fwd_packets"] == len(payloads)
    assert row["fwd_bytes"] == sum(ETH_IP_UDP + len(p) for p in payloads)
    assert row["rev_packets"] == len(replies)
    assert row["rev_bytes"] == sum(ETH_IP_UDP + len(r) for r in replies)
    # The reply names the backend that answered: the one the flow table says.
    name = replies[0].split()[0].decode()
    assert lab.backend_addrs[lab.backend_names.index(name)] == row["backend"]

    after = stats(lab)
    vip = {v["vip"]: v for v in after["vips"]}["echo"]
    vip0 = {v["vip"]: v for v in before["vips"]}["echo"]
    assert vip["packets"] - vip0["packets"] == len(payloads)
    assert vip["bytes"] - vip0["bytes"] == row["fwd_bytes"]
    assert vip["new_flows"] - vip0["new_flows"] == 1
    be = next(b for b in after["backends"] if b["backend_id"] == row["backend_id"])
    be0 = next(b for b in before["backends"] if b["backend_id"] == row["backend_id"])
    assert be["bytes"] - be0["bytes"] == row["fwd_bytes"]
    assert after["flow_table"]["entries"] == before["flow_table"]["entries"] + 1
    assert after["counters"]["new_flow"] - before["counters"]["new_flow"] == 1


def test_trace_agrees_with_real_packets(running):
    lab, _ = running
    # A flow the table tracks: trace names the backend that served it.
    body = curl_from(lab, 44000)
    served = body.split("addr=")[1].split()[0]
    t = json.loads(xdplb(lab, "trace", "tcp", f"{lab.client_addr}:44000", f"{VIP}:80",
                         "--json").stdout)
    assert t["decision"] == "tracked" and t["agree"], t
    assert t["backend"]["address"] == served and t["out"].startswith(served + ":")
    assert t["tracked_flow"]["tcp_state"] in ("fin", "rst")

    # A new flow: trace first (which must not create it), then send real packets.
    t = json.loads(xdplb(lab, "trace", "tcp", f"{lab.client_addr}:44001", f"{VIP}:80",
                         "--json").stdout)
    assert t["decision"] == "new" and t["agree"] and t["verdict"] == "tx", t
    assert t["maglev"]["owner"] == t["backend"]["backend_id"]
    assert {m["engine"] for m in t["models"]} >= {"hash+ring"}
    assert flows(lab, "--client", f"{lab.client_addr}:44001") == []  # live table untouched
    body = curl_from(lab, 44001)
    assert f"addr={t['backend']['address']} " in body, (t, body)

    # Human output explains the slot; a reply is recognised as one.
    lab.udp_request(lab.client_ns, VIP, 5000, b"x", sport=43000)  # active: within the timeout
    text = xdplb(lab, "trace", "udp", f"{lab.client_addr}:43000", f"{VIP}:5000").stdout
    assert "tracked flow to backend" in text and "agree: yes" in text
    (row,) = flows(lab, "--client", f"{lab.client_addr}:44001")
    r = json.loads(xdplb(lab, "trace", "tcp", f"{row['backend']}:{row['backend_port']}",
                         f"{lab.client_addr}:44001", "--json").stdout)
    assert r["decision"] == "reply" and r["out"] == f"{VIP}:80" and r["agree"], r


def test_trace_of_an_idle_udp_flow(running):
    """A UDP flow idle past flows.udp_idle_timeout: its next datagram is a new flow, and
    trace (program and models alike) says so."""
    lab, _ = running
    lab.udp_request(lab.client_ns, VIP, 5000, b"x", sport=43100)
    time.sleep(UDP_IDLE + 0.5)
    t = json.loads(xdplb(lab, "trace", "udp", f"{lab.client_addr}:43100", f"{VIP}:5000",
                         "--json").stdout)
    assert t["decision"] == "rebalanced" and t["agree"], t
    assert t["tracked_flow"]["udp_idle_over"] and t["tracked_flow"]["idle_s"] >= UDP_IDLE
    text = xdplb(lab, "trace", "udp", f"{lab.client_addr}:43100", f"{VIP}:5000").stdout
    assert "over flows.udp_idle_timeout: a new flow" in text and "agree: yes" in text


def test_filters_return_only_matching_rows(running):
    lab, _ = running
    everything = flows(lab)
    assert len(everything) >= 10
    by = Counter((r["proto"], r["backend"]) for r in everything)
    assert all(r["proto"] == "udp" for r in flows(lab, "--vip", "echo"))
    assert timeless(flows(lab, "--vip", "echo")) == timeless(flows(lab, "--vip", f"{VIP}:5000"))
    assert len(flows(lab, "--vip", "echo")) == by[("udp", "10.20.0.11")] + by[
        ("udp", "10.20.0.12")]
    be = flows(lab, "--backend", "10.20.0.12")
    assert be and all(r["backend"] == "10.20.0.12" for r in be)
    assert len(be) == sum(n for (_, b), n in by.items() if b == "10.20.0.12")
    web_be = flows(lab, "--vip", "web", "--backend", "10.20.0.12:8080")
    assert timeless(web_be) == timeless([r for r in be if r["proto"] == "tcp"])
    assert [r["client_port"] for r in flows(lab, "--client", f"{lab.client_addr}:41003")] \
        == [41003]
    assert flows(lab, "--client", "10.99.0.1") == []
    assert all(r["tcp_state"] == "none" for r in flows(lab, "--state", "none"))
    top = flows(lab, "--sort", "bytes", "--limit", "3")
    assert len(top) == 3
    total = sorted((r["fwd_bytes"] + r["rev_bytes"] for r in everything), reverse=True)
    assert [r["fwd_bytes"] + r["rev_bytes"] for r in top] == total[:3]
    # The table: a header line, column titles, one line per row.
    text = xdplb(lab, "flows", "--vip", "echo").stdout.splitlines()
    assert text[1].split()[:3] == ["PROTO", "CLIENT", "VIP"]
    assert len(text) == 2 + len(flows(lab, "--vip", "echo"))
    r = xdplb(lab, "flows", "--vip", "nosuch", check=False)
    assert r.returncode == 2 and "no VIP 'nosuch'" in r.stderr and "web" in r.stderr


def test_watch_streams_rates(running):
    lab, _ = running
    out = xdplb(lab, "flows", "--json", "--watch", "--count", "2", "--interval", "0.3",
                "--vip", "echo").stdout.splitlines()
    rows = [json.loads(line) for line in out]
    n = len(flows(lab, "--vip", "echo"))
    assert len(rows) == 2 * n
    first, second = rows[:n], rows[n:]
    assert all(r["bytes_per_s"] is None for r in first)
    assert all(r["bytes_per_s"] == 0.0 and r["ts"] > first[0]["ts"] for r in second)
    lines = xdplb(lab, "stats", "--json", "--watch", "--count", "2", "--interval",
                  "0.3").stdout.splitlines()
    snaps = [json.loads(line) for line in lines]
    assert len(snaps) == 2 and all(s["interval_s"] for s in snaps)
    assert all(v["packets_per_s"] is not None for s in snaps for v in s["vips"])


def test_backends_and_metrics_agree_with_stats(running):
    lab, _ = running
    rows = json.loads(xdplb(lab, "backends", "--json").stdout)["backends"]
    by = {(b["vip"], b["address"]): b for b in rows}
    assert by[("web", "10.20.0.11")]["maglev_share"] == pytest.approx(75.0, abs=0.01)
    assert by[("web", "10.20.0.12")]["maglev_share"] == pytest.approx(25.0, abs=0.01)
    assert sum(b["maglev_slots"] for b in rows if b["vip"] == "web") == 65537
    assert [by[("web", a)]["weight"] for a in ("10.20.0.11", "10.20.0.12")] == [3, 1]
    for a in ("10.20.0.11", "10.20.0.12"):
        h = by[("web", a)]["health"]
        assert h["state"] == "up" and h["last"]["ok"], h  # http checks of the agent
        assert by[("echo", a)]["health"]["state"] == "unknown"  # echo has no checks
    per_backend = Counter(r["backend_id"] for r in flows(lab))
    assert {b["backend_id"]: b["flows"] for b in rows if b["flows"]} == dict(per_backend)

    def scrape() -> dict:
        text = lab.run(lab.lb_ns, "curl", "-sS", "--noproxy", "*", "-m", "10",
                       f"http://{METRICS}/metrics").stdout
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    # The scrape reads counters live and the flow counts of the agent's last flow sweep
    # (--flow-sweep 1s here): within a sweep or two they agree with a reading of the table.
    deadline = time.monotonic() + 10
    while True:
        samples = scrape()
        st = stats(lab)
        swept = {v["vip"]: samples[("xdplb_vip_flows", (("address", v["vip_address"]),
                                                        ("port", str(v["vip_port"])),
                                                        ("protocol", v["protocol"]),
                                                        ("vip", v["vip"])))]
                 for v in st["vips"]}
        if swept == {v["vip"]: v["flows"] for v in st["vips"]} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert samples[("xdplb_flow_sweep_timestamp_seconds", ())] > time.time() - 10
    for v in st["vips"]:
        lab_ = (("address", v["vip_address"]), ("port", str(v["vip_port"])),
                ("protocol", v["protocol"]), ("vip", v["vip"]))
        for key, metric in (("packets", "xdplb_vip_packets_total"),
                            ("bytes", "xdplb_vip_bytes_total"),
                            ("new_flows", "xdplb_vip_new_flows_total"),
                            ("flows", "xdplb_vip_flows"),
                            ("open_flows", "xdplb_vip_open_flows")):
            assert samples[(metric, lab_)] == v[key], (metric, v)
    for b in st["backends"]:
        lab_ = (("backend", f"{b['address']}:{b['port']}"), ("vip", b["vip"]))
        assert samples[("xdplb_backend_bytes_total", lab_)] == b["bytes"]
        assert samples[("xdplb_backend_flows", lab_)] == b["flows"]
        assert samples[("xdplb_backend_up", lab_)] == 1
    web1 = (("backend", "10.20.0.11:80"), ("state", "up"), ("vip", "web"))
    assert samples[("xdplb_backend_health", web1)] == 1
    assert samples[("xdplb_flow_table_entries", ())] == st["flow_table"]["entries"]
    assert samples[("xdplb_flow_table_capacity", ())] == 100000
    # Health checks keep moving the global counters (their packets pass through XDP): the
    # scrape came first, so it can only be behind.
    outcomes = {c.name.lower() for c in OUTCOMES}
    for name, v in st["counters"].items():
        key = (("xdplb_packets_total", (("outcome", name),)) if name in outcomes
               else ("xdplb_events_total", (("event", name),)))
        assert samples[key] <= v, name


def test_fullnat_flows_show_their_source(running):
    """A fullnat flow's row names the source address and port the balancer gave it, which
    is what the backend saw; status, stats and the metrics say each VIP's mode."""
    lab, _ = running
    assert "backend=" in curl_from(lab, 46000, port=81)
    (row,) = flows(lab, "--client", f"{lab.client_addr}:46000")
    assert (row["forwarding"], row["encap"], row["vip_port"]) == ("fullnat", None, 81), row
    addr, port = row["source"].rsplit(":", 1)
    i = lab.backend_addrs.index(row["backend"])
    seen = [(r["client"], r["cport"]) for r in lab.backend_log(i)
            if r.get("service") == "http" and r.get("lport") == 80]
    assert (addr, int(port)) in seen and 1024 <= int(port) <= 32767, (row, seen)
    assert row["tcp_state"] in ("fin", "rst") and row["rev_packets"] >= 3, row
    assert all((r["forwarding"], r["encap"], r["source"]) == ("nat", None, None)
               for r in flows(lab, "--vip", "web"))
    text = xdplb(lab, "flows", "--client", f"{lab.client_addr}:46000").stdout
    assert text.splitlines()[2].split()[4:6] == ["fullnat", row["source"]]

    (g,) = json.loads(xdplb(lab, "status", "--json").stdout)["groups"]
    vips = {v["port"]: v for v in g["vips"]}
    assert [(vips[p]["forwarding"], vips[p]["encap"]) for p in (80, 5000, 81)] == \
        [("nat", None)] * 2 + [("fullnat", None)]
    assert vips[81]["source_ports"] == [1024, 32767]
    assert addr in {b["source"] for b in vips[81]["backends"]}
    assert {b["source"] for b in vips[80]["backends"]} == {None}
    assert "fullnat 1024-32767" in xdplb(lab, "status").stdout
    st = stats(lab)
    assert {v["vip"]: v["forwarding"] for v in st["vips"]} == \
        {"web": "nat", "echo": "nat", "fnat": "fullnat"}
    text = lab.run(lab.lb_ns, "curl", "-sS", "--noproxy", "*", "-m", "10",
                   f"http://{METRICS}/metrics").stdout
    info = {s.labels["vip"]: (s.labels["forwarding"], s.labels["encap"])
            for fam in text_string_to_metric_families(text) if fam.name == "xdplb_vip_info"
            for s in fam.samples}
    assert info == {"web": ("nat", ""), "echo": ("nat", ""), "fnat": ("fullnat", "")}


def test_readers_work_from_the_pins_alone(running):
    lab, agent = running
    before = flows(lab)
    assert agent.stop() == 0  # --keep: program attached, maps pinned, no agent
    rows = flows(lab)
    assert {(r["proto"], r["client_port"], r["backend"]) for r in rows} == \
        {(r["proto"], r["client_port"], r["backend"]) for r in before}
    assert all(r["vip"] is None for r in rows)  # no agent, no names: address:port only
    r = xdplb(lab, "flows", "--vip", "web", check=False)
    assert r.returncode == 2 and "ADDR:PORT" in r.stderr
    assert timeless(flows(lab, "--vip", f"{VIP}:80")) == \
        timeless([x for x in rows if x["vip_port"] == 80])
    st = stats(lab)
    assert st["flow_table"]["entries"] == len(rows)
    bes = json.loads(xdplb(lab, "backends", "--json").stdout)["backends"]
    assert {b["health"]["state"] for b in bes} == {"unknown"}
    t = json.loads(xdplb(lab, "trace", "tcp", f"{lab.client_addr}:41000", f"{VIP}:80",
                         "--json").stdout)
    assert t["decision"] == "tracked" and t["agree"]
    # The balancer still balances; the new flow shows up.
    assert "backend=" in curl_from(lab, 45000)
    assert len(flows(lab, "--client", f"{lab.client_addr}:45000")) == 1


def test_exit_codes_and_hints(running):
    lab, _ = running
    r = xdplb(lab, "flows", "nosuch0", check=False)
    assert r.returncode == 3 and "xdplb attach nosuch0" in r.stderr
    r = subprocess.run([str(XDPLB), "--netns", lab.client_ns, "stats"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3 and "no xdplb program in this network namespace" in r.stderr
    for args in (["attach", "eth0", "--config", "/nonexistent", "--metrics-addr", "nohost:1"],
                 ["trace", "icmp", "1.2.3.4:1", f"{VIP}:80"],
                 ["trace", "tcp", "1.2.3.4", f"{VIP}:80"],
                 ["flows", "--client", "nohost"],
                 ["flows", "--sort", "nosuch"]):
        r = xdplb(lab, *args, check=False)
        assert r.returncode == 2, (args, r.stderr)

