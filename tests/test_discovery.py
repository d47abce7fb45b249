"""Backends from DNS (``backends_from``), against a real DNS server: dnsmasq in a lab
namespace on an address of its own (scripts/netns/dnsserver.py), its records changed, stopped
and made to refuse while streams and new connections run through the VIPs.

One lab, agent and server for the module; the tests run in order, each starting from the
zone the previous one left (``world.dns.serve`` restarts the server with new records).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from agent_process import AgentProcess, status, xdplb
from dnsserver import DnsServer, Srv, Zone
from lab import Lab
from pools import BE1, BE2, BE3, DNS_ALT, DNS_STREAM, DNS_WEB, RESOLVER, VIP, pool_yaml
from testkit.streams import Traffic

pytestmark = pytest.mark.root

TTL = 2  # the zone's TTL: web (refresh 30s) is asked again after it, stream (1s) sooner

NAMES = {"be1.web.lab": [BE1], "be2.web.lab": [BE2], "be3.web.lab": [BE3]}
# be1 and be2 primary (weights 3:1), be3 a backup (a higher priority value)
SRV_START = [Srv("be1.web.lab", 80, 10, 3), Srv("be2.web.lab", 80, 10, 1),
             Srv("be3.web.lab", 80, 20, 1)]
START = Zone(srv={"_http._tcp.web.lab": SRV_START},
             a={**NAMES, "stream.web.lab": [BE1, BE2], "alt.web.lab": [BE1]}, ttl=TTL)
# be1 removed, be2's weight changed, be3 now a primary; stream gains be3
CHANGED = Zone(srv={"_http._tcp.web.lab": [Srv("be2.web.lab", 80, 10, 3),
                                           Srv("be3.web.lab", 80, 10, 1)]},
               a={**NAMES, "stream.web.lab": [BE1, BE2, BE3], "alt.web.lab": [BE1]}, ttl=TTL)
NAME_OF = {BE1: "be1", BE2: "be2", BE3: "be3"}


class World:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.dns = DnsServer(lab, lab.backend_ns[2], RESOLVER, tmp)
        self.dns.serve(START)
        self.config = tmp / "pool.yaml"
        self.config.write_text(pool_yaml(DNS_WEB, DNS_STREAM, DNS_ALT, table_size=251))
        self.agent = AgentProcess(lab, self.config)
        self.traffic = Traffic(lab, VIP, tmp / "traffic.jsonl", streams=6, rate=10)
        self.traffic.wait_streams()

    def backends(self, vip: str) -> dict[str, dict]:
        rows = json.loads(xdplb(self.lab, "backends", "--json").stdout)["backends"]
        return {f"{r['address']}:{r['port']}": r for r in rows if r["vip"] == vip}

    def discovery(self) -> dict[str, dict]:
        st = json.loads(xdplb(self.lab, "stats", "--json").stdout)
        return {d["vip"]: d for d in st["discovery"]}

    def wait_for(self, what, timeout: float = 10.0):
        deadline = time.time() + timeout
        while not (got := what()) and time.time() < deadline:
            time.sleep(0.2)
        return got


    def close(self) -> None:
        self.traffic.stop()
        self.agent.stop()
        self.dns.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with Lab(topology="one-armed", backends=3, prefix="xlt-dns") as lab:
        w = World(lab, tmp_path_factory.mktemp("discovery"))
        try:
            yield w
        finally:
            w.close()


def new_backends(world: World, since: float) -> set[str]:
    return {e["backend"] for e in world.traffic.events("new", since) if e.get("backend")}


def test_srv_and_a_records_become_backends(world):
    web = world.backends("web")
    assert set(web) == {f"{BE1}:80", f"{BE2}:80", f"{BE3}:80"}
    assert [web[f"{a}:80"]["weight"] for a in (BE1, BE2, BE3)] == [3, 1, 1]
    assert [web[f"{a}:80"]["backup"] for a in (BE1, BE2, BE3)] == [False, False, True]
    assert web[f"{BE3}:80"]["maglev_slots"] == 0  # a backup: not in the ring
    assert 70 < web[f"{BE1}:80"]["maglev_share"] < 80  # 3:1
    assert {r["serving"] for r in web.values()} == {"primary"}
    assert set(world.backends("stream")) == {f"{BE1}:7000", f"{BE2}:7000"}  # the VIP's port
    assert set(world.backends("alt")) == {f"{BE1}:8080"}  # port: 8080
    assert world.lab.http_get(world.lab.client_ns, VIP, 81).split("backend=")[1][:3] == "be1"
    since = time.time()
    time.sleep(3)
    assert new_backends(world, since) == {"be1", "be2"}  # never the backup
    assert set(world.traffic.wait_streams().values()) <= {"be1", "be2"}
    # health checks apply to discovered backends: every one of web's is checked
    assert {r["health"]["state"] for r in web.values()} <= {"up"}
    (group,) = status(world.lab)["groups"]
    web_status = next(v for v in group["vips"] if v["name"] == "web")
    assert web_status["dns"]["name"] == "_http._tcp.web.lab."
    assert [b["backup"] for b in web_status["backends"]] == [False, False, True]


def test_drain_a_discovered_backend(world):
    xdplb(world.lab, "drain", "web", f"{BE2}:80")
    try:
        assert world.backends("web")[f"{BE2}:80"]["weight"] == 0
    finally:
        xdplb(world.lab, "undrain", "web", BE2)
    assert world.backends("web")[f"{BE2}:80"]["weight"] == 1
    r = xdplb(world.lab, "drain", "web", "10.20.0.99", check=False)
    assert r.returncode == 2 and "no backend '10.20.0.99' in VIP web" in r.stderr, r


def test_asked_again_at_min_of_ttl_and_refresh(world):
    d = world.discovery()
    # web: refresh 30s, TTL 2s -> every 2s; stream: refresh 1s, TTL 2s -> every second
    assert TTL - 0.5 < d["web"]["next_query"] - d["web"]["last_ok"] < TTL + 0.5, d["web"]
    assert 0.5 < d["stream"]["next_query"] - d["stream"]["last_ok"] < 1.5, d["stream"]
    before = d["stream"]["last_ok"]
    time.sleep(2.5)
    assert world.discovery()["stream"]["last_ok"] >= before + 1.5
    assert all(v["dns_failures"] == 0 for v in d.values()), d


def test_zone_change_applied_as_a_diff_streams_continue(world):
    streams = world.traffic.wait_streams()
    since = time.time()
    world.dns.serve(CHANGED)
    # new flows on the new primary: within the TTL (the agent asks every 2s)
    first = None
    deadline = since + 3 * TTL + 3
    while first is None and time.time() < deadline:
        hits = [e["t"] for e in world.traffic.events("new", since) if e.get("backend") == "be3"]
        first = min(hits) if hits else None
        time.sleep(0.1)
    assert first is not None, world.agent.log_text()[-3000:]
    print(f"DNS change -> first new connection on the added backend: {first - since:.2f}s")
    web = world.backends("web")
    assert set(web) == {f"{BE2}:80", f"{BE3}:80"}
    assert (web[f"{BE2}:80"]["weight"], web[f"{BE3}:80"]["backup"]) == (3, False)
    assert world.wait_for(lambda: len(world.backends("stream")) == 3)
    settled = time.time() + 1
    time.sleep(3)
    assert new_backends(world, settled) == {"be2", "be3"}  # be1 left web
    # tracked flows untouched: every stream (on be1, be2: both still stream's) goes on
    assert not world.traffic.breaks(since), world.traffic.breaks(since)
    assert world.traffic.wait_streams() == streams
    assert "dns web (+0 -1 ~2): maps updated" in world.agent.log_text()


def test_server_stopped_or_refusing_keeps_the_last_set(world):
    since = time.time()
    before = world.discovery()
    sets = {v: set(world.backends(v)) for v in ("web", "stream", "alt")}
    world.dns.stop()
    time.sleep(10)  # stream is asked every second: timeouts, retried
    stopped = world.discovery()
    assert stopped["stream"]["dns_failures"] >= before["stream"]["dns_failures"] + 2, stopped
    assert "no answer within" in stopped["stream"]["failing"]
    assert {v: set(world.backends(v)) for v in sets} == sets
    world.dns.refuse()
    assert world.wait_for(lambda: "REFUSED" in (world.discovery()["stream"]["failing"] or ""))
    assert {v: set(world.backends(v)) for v in sets} == sets
    metrics = world.discovery()
    world.dns.serve(CHANGED)
    assert world.wait_for(lambda: world.discovery()["stream"]["failing"] is None)
    assert not world.traffic.breaks(since)
    n, failed = world.traffic.failed_new(since)
    assert n > 100 and len(failed) <= max(1, n // 50), failed[:5]
    text = xdplb(world.lab, "stats").stdout
    assert f"dns_failures={metrics['stream']['dns_failures']}" in text or "dns_failures=" in text
    assert "keeping the last 3 backends" in world.agent.log_text()


def test_priority_backups_take_over_when_primaries_fail(world):
    world.dns.serve(START)  # be3 a backup again
    assert world.wait_for(lambda: world.backends("web").get(f"{BE3}:80", {}).get("backup"))
    for be in ("be1", "be2"):
        world.lab.stop_backend(be)
    try:
        assert world.wait_for(lambda: {r["serving"] for r in world.backends("web").values()}
                              == {"backup"})
        since = time.time() + 0.5
        time.sleep(2.5)
        assert new_backends(world, since) == {"be3"}
    finally:
        for be in ("be1", "be2"):
            world.lab.start_backend(be)
    assert world.wait_for(lambda: {r["serving"] for r in world.backends("web").values()}
                          == {"primary"})


def test_authoritative_empty_answer_empties_the_pool(world):
    # stream: NXDOMAIN; alt: the name exists, with no address (NOERROR, no records)
    world.dns.serve(Zone(srv=START.srv, a=NAMES, no_address=["alt.web.lab"], ttl=TTL))
    assert world.wait_for(lambda: not world.backends("stream") and not world.backends("alt"))
    d = world.discovery()
    assert (d["stream"]["backends"], d["alt"]["backends"]) == (0, 0)
    assert "no records" in d["stream"]["last_answer"]
    assert set(world.backends("web")) == {f"{BE1}:80", f"{BE2}:80", f"{BE3}:80"}
    assert "VIP stream (10.200.0.10:7000): it has no backends" in world.agent.log_text()


def test_reload_asks_a_new_source_first(world):
    good = world.config.read_text()
    alt = replace(DNS_ALT, backends_from=replace(DNS_ALT.backends_from, refresh="2s"))
    world.dns.stop()
    world.config.write_text(pool_yaml(DNS_WEB, DNS_STREAM, alt, table_size=251))
    try:
        r = xdplb(world.lab, "reload", check=False)
        assert r.returncode == 2, r
        assert "VIP alt: backends_from alt.web.lab. A from 10.20.0.53 failed" in r.stderr
        assert world.backends("alt") == {}  # nothing changed (the pool was empty)
        world.dns.serve(START)
        r = xdplb(world.lab, "reload", check=False)
        assert r.returncode == 0, r
        assert set(world.backends("alt")) == {f"{BE1}:8080"}  # asked during the reload
        assert world.discovery()["alt"]["refresh"] == 2.0
    finally:
        world.config.write_text(good)
    assert xdplb(world.lab, "reload").returncode == 0


def test_unanswered_first_query_refuses_attach(world, tmp_path):
    world.dns.stop()
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(pool_yaml(DNS_WEB, table_size=251))
    start = time.monotonic()
    p = xdplb(world.lab, "attach", "eth0", "--config", str(cfg), check=False, timeout=30)
    took = time.monotonic() - start
    assert p.returncode == 2, p.stderr
    assert f"_http._tcp.web.lab. SRV from {RESOLVER} failed: no answer within 2s" in p.stderr
    assert "nothing changed" in p.stderr and "Traceback" not in p.stderr
    assert took < 10
    assert world.agent.proc.poll() is None  # the running agent is untouched
