"""Several balancer nodes announcing the VIPs over BGP to an ECMP router (issue 14), end to end
in bgplab.py's namespaces: three nodes, each with its own xdplb agent and ExaBGP, peering with
BIRD on the router; DSR (encap l2) backends on the segment the nodes share.

One lab and one agent per node for the module; a test that stops or kills a node's agent
starts it again through ``Nodes.ensure_all``. Every process, namespace, program and pin the
module made goes at its end (the lab's teardown kills what runs in its namespaces and removes
the nodes' pins), also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from agent_process import XDPLB, AgentProcess
from bgplab import NODE_ASN, ROUTER_ASN, BgpLab
from lab import HERE, run_command
from pools import BE1, BE2, FLEET_CHECK, FLEET_STREAM, FLEET_WEB, Backend, Vip, fleet_yaml

pytestmark = pytest.mark.root

VIP, ALT = "10.200.0.10", "10.200.0.20"
DSR = {"forwarding": "dsr", "encap": "l2", "health_check": FLEET_CHECK}
WEB, STREAM = FLEET_WEB, FLEET_STREAM
ALT_VIP = Vip("alt", 8080, (BE2,), address=ALT, **DSR)  # one backend: easy to take down
METRICS = "127.0.0.1:9477"  # lb1's, inside its namespace
HOLD_TIME = 3


def pool(lab: BgpLab, *vips: Vip) -> str:
    """The same pool on every node: equal seed, equal backends, BGP to the router."""
    return fleet_yaml(lab.router_backend_addr, *(vips or (WEB, STREAM, ALT_VIP)),
                      router_asn=ROUTER_ASN, asn=NODE_ASN, hold_time=f"{HOLD_TIME}s")


def xdplb(ns: str, *args: str, check: bool = True, timeout: float = 60):
    return run_command([str(XDPLB), "--netns", ns, *args], check=check, timeout=timeout)


def status(ns: str) -> dict:
    (g,) = json.loads(xdplb(ns, "status", "--json").stdout)["groups"]
    return g


def counters(ns: str) -> dict[str, int]:
    return json.loads(xdplb(ns, "stats", "--json", "--interval", "0").stdout)["counters"]


def flows(ns: str) -> list[dict]:
    out = xdplb(ns, "flows", "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


class Nodes:
    """One agent per node of the lab, started (again) on demand."""

    def __init__(self, lab: BgpLab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.agents: dict[str, AgentProcess | None] = dict.fromkeys(lab.node_ns)
        for ns in lab.node_ns:
            (tmp / f"{ns}.yaml").write_text(pool(lab))

    def start(self, ns: str) -> AgentProcess:
        extra = ("--metrics-addr", METRICS) if ns == self.lab.node_ns[0] else ()
        self.agents[ns] = AgentProcess(self.lab, self.tmp / f"{ns}.yaml", *extra, ns=ns)
        return self.agents[ns]

    def running(self, ns: str) -> bool:
        a = self.agents[ns]
        return a is not None and a.proc.poll() is None

    def ensure_all(self) -> None:
        """Every node's agent running and its announcement on the router."""
        todo = [ns for ns in self.lab.node_ns if not self.running(ns)]
        for ns in todo:  # a node a test took dark: light it again, nothing of it left
            self.lab.run(ns, "ip", "link", "set", "eth0", "up")
            # the link going down took the node's default route with it
            self.lab.run(ns, "ip", "route", "replace", "default", "via",
                         self.lab.router_backend_addr)
            xdplb(ns, "detach", "eth0", check=False)
        with ThreadPoolExecutor(len(todo) or 1) as ex:
            list(ex.map(self.start, todo))
        self.lab.wait_next_hops(VIP, set(self.lab.node_addrs), timeout=30)

    def stop_all(self) -> None:
        for a in self.agents.values():
            if a is not None:
                a.stop()


@pytest.fixture(scope="module")
def lab() -> Iterator[BgpLab]:
    with BgpLab(nodes=3, backends=2, prefix="xbg", vips=(VIP, ALT), hold_time=HOLD_TIME) as lab:
        yield lab


@pytest.fixture(scope="module")
def nodes(lab: BgpLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    n = Nodes(lab, tmp_path_factory.mktemp("bgp"))
    try:
        n.ensure_all()
        yield n
    finally:
        n.stop_all()


@pytest.fixture
def all_up(nodes: Nodes) -> Nodes:
    nodes.ensure_all()
    return nodes


CONNECT = """
import json, socket
out = []
for i in range({n}):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect(({vip!r}, 80)); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); body = b''
        while c := s.recv(4096): body += c
        out.append([s.getsockname()[1], body.decode(errors='replace')])
    except OSError as e:
        out.append([s.getsockname()[1], 'error ' + str(e)])
    finally:
        s.close()
print(json.dumps(out))
"""


def connect_many(lab: BgpLab, n: int, vip: str = VIP) -> list[tuple[int, str]]:
    code = CONNECT.format(n=n, vip=vip)
    return json.loads(lab.run(lab.client_ns, sys.executable, "-c", code, timeout=120).stdout)


def test_every_node_announces_and_the_router_spreads_connections_over_them(
        lab: BgpLab, all_up: Nodes) -> None:
    """One session per node, one kernel route with a next hop per node; 300 connections from
    as many client ports all answered, every node carried some, backends saw the client."""
    assert lab.sessions() == dict.fromkeys(lab.node_names, "Established")
    assert lab.next_hops(VIP) == set(lab.node_addrs)
    before = {ns: counters(ns).get("new_flow", 0) for ns in lab.node_ns}
    got = connect_many(lab, 300)
    bad = [(p, body) for p, body in got if "backend=" not in body]
    assert not bad, bad[:5]
    for sport, body in got:  # DSR: the backend saw the real client, port included
        assert f"client={lab.client_addr}:{sport}" in body, body
    carried = {ns: counters(ns).get("new_flow", 0) - before[ns] for ns in lab.node_ns}
    assert all(c > 0 for c in carried.values()), carried
    assert sum(carried.values()) >= 300, carried
    assert {re.search(r"backend=(\S+)", b)[1] for _, b in got} == {"be1", "be2"}


def test_trace_names_the_same_backend_on_every_node(lab: BgpLab, all_up: Nodes) -> None:
    picks = set()
    for ns in lab.node_ns:
        out = json.loads(xdplb(ns, "trace", "tcp", f"{lab.client_addr}:40001", f"{VIP}:80",
                               "--json", timeout=120).stdout)
        picks.add(json.dumps(out["backend"], sort_keys=True))
    assert len(picks) == 1 and "null" not in picks, picks


def test_status_metrics_and_a_speaker_of_its_own_per_agent(lab: BgpLab, all_up: Nodes) -> None:
    speakers = {}
    for ns in lab.node_ns:
        b = status(ns)["bgp"]
        assert b["peers"] == [{"address": lab.router_backend_addr, "asn": ROUTER_ASN,
                               "state": "established"}], b
        ann = {a["prefix"]: a for a in b["announcements"]}
        assert set(ann) == {f"{VIP}/32", f"{ALT}/32"}
        assert all(a["state"] == "announced" and a["reason"] for a in ann.values()), ann
        speakers[ns] = b["speaker"]
    # Three agents on one host: three speakers, each with its own files in its instance's dir
    assert len({s["pid"] for s in speakers.values()}) == 3
    for ns, s in speakers.items():
        run_dir = Path(s["log"]).parent
        assert f"/{ns}/" in str(run_dir), s
        cmdline = Path(f"/proc/{s['pid']}/cmdline").read_bytes().split(b"\0")
        assert str(run_dir / "speaker.conf").encode() in cmdline, cmdline
        assert (run_dir / "speaker.pid").read_text().strip() == str(s["pid"])
    text = lab.run(lab.node_ns[0], "curl", "-sf", "--noproxy", "*",
                   f"http://{METRICS}/metrics").stdout
    peer = f'peer="{lab.router_backend_addr}"'
    assert re.search(rf'xdplb_bgp_peer_established{{asn="{ROUTER_ASN}",{peer}}} 1\.0', text)
    assert f'xdplb_bgp_announced{{prefix="{VIP}/32"}} 1.0' in text
    assert f'xdplb_bgp_peer_state{{{peer},state="established"}} 1.0' in text
    human = xdplb(lab.node_ns[0], "status").stdout
    assert "established" in human and f"{VIP}/32 ANNOUNCED" in human, human


@contextlib.contextmanager
def streaming(lab: BgpLab, name: str) -> Iterator[dict]:
    """12 long TCP streams to the VIP's echo port (and 5 new HTTP connections a second) for
    the block; afterwards the dict holds ``broken`` streams, ``new`` and ``failed_new``
    connections. Inside it, ``ports``: the streams' client ports."""
    log = lab.runtime_dir / f"{name}.log"
    log.unlink(missing_ok=True)
    traffic = lab.popen(lab.client_ns, sys.executable, str(HERE / "traffic.py"), "--vip", VIP,
                        "--log", str(log), "--streams", "12", "--rate", "5", "--duration", "90",
                        "--stall", "5")
    run: dict = {}
    try:
        deadline = time.monotonic() + 15
        while not log.exists() or log.read_text().count('"ev": "stream"') < 12:
            assert time.monotonic() < deadline and traffic.poll() is None, "streams not up"
            time.sleep(0.1)
        time.sleep(1)
        run["ports"] = {f["client_port"] for ns in lab.node_ns for f in flows(ns)
                        if f["vip_port"] == 7000 and f["idle_s"] < 2}  # not earlier tests'

        assert len(run["ports"]) == 12, run
        yield run
    finally:
        traffic.terminate()
        traffic.wait(30)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    (end,) = [e for e in events if e["ev"] == "end"]
    assert len(end["streams"]) == 12 and all(s["bytes"] > 0 for s in end["streams"].values())
    run["broken"] = {i: s for i, s in end["streams"].items() if s["broken"]}
    run["new"] = [e for e in events if e["ev"] == "new"]
    run["failed_new"] = [e for e in run["new"] if e.get("error")]


def _stream_nodes(lab: BgpLab, ports: set[int]) -> dict[str, int]:
    """How many of the streams (by client port) each running node tracks."""
    out = {}
    for ns in lab.node_ns:
        try:
            out[ns] = sum(1 for f in flows(ns) if f["vip_port"] == 7000
                          and f["client_port"] in ports and f["idle_s"] < 2)
        except Exception:  # noqa: BLE001 (a dark node has nothing to say)
            out[ns] = 0
    return out


def _wait_gone(lab: BgpLab, addr: str, timeout: float) -> float:
    start = time.monotonic()
    while addr in lab.next_hops(VIP):
        assert time.monotonic() - start < timeout, f"{addr} still a next hop after {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_streams_survive_a_node_stopping_coming_back_and_dying(lab: BgpLab,
                                                              all_up: Nodes) -> None:
    """12 long TCP streams while one node stops (SIGTERM: withdrawn before its program goes),
    comes back, and another dies (kill -9, then dark: program gone, link down). ECMP moves
    flows between nodes each time; the node they land on has no entry for them and balances
    their ACKs by the same table: 0 streams break."""
    with streaming(lab, "streams") as run:
        ports = run["ports"]
        first = _stream_nodes(lab, ports)
        # SIGTERM the node with the most streams: withdrawn first, detached --drain-time later
        victim = max(first, key=first.get)
        addr = lab.node_addrs[lab.node_ns.index(victim)]
        agent = all_up.agents[victim]
        assert agent is not None and first[victim] > 0, first
        agent.proc.send_signal(15)
        withdrawn = _wait_gone(lab, addr, 5)
        start = time.monotonic()
        agent.proc.wait(20)
        detached = withdrawn + time.monotonic() - start
        assert detached - withdrawn > 1.5, (withdrawn, detached)  # the default 2 s drain
        time.sleep(3)
        all_up.ensure_all()  # the node comes back; ECMP moves flows onto it
        time.sleep(3)
        after = _stream_nodes(lab, ports)
        # kill -9 the busiest other node, then take it dark
        victim2 = max((ns for ns in lab.node_ns if ns != victim), key=after.get)
        addr2 = lab.node_addrs[lab.node_ns.index(victim2)]
        a2 = all_up.agents[victim2]
        assert a2 is not None
        a2.kill9()
        died = _wait_gone(lab, addr2, HOLD_TIME + 1)
        xdplb(victim2, "detach", "eth0")
        lab.run(victim2, "ip", "link", "set", "eth0", "down")
        time.sleep(4)
    print(f"\nstreams: 12, broken {len(run['broken'])}; per node at start {first}, after "
          f"return {after}; SIGTERM: withdrawn after {withdrawn:.3f}s, detached after "
          f"{detached:.2f}s; kill -9: withdrawn after {died:.3f}s; new connections "
          f"{len(run['new'])}, failed {len(run['failed_new'])}")
    assert not run["broken"], run["broken"]
    assert after[victim] > 0, after  # the returning node took streams it had no entry for


def test_draining_a_backend_on_every_node_moves_no_other_stream(lab: BgpLab,
                                                                all_up: Nodes) -> None:
    """Drain be2 by reload on every node, one after the other: only be2's slots change,
    so no stream moves (be2's own continue where they are tracked), new flows go to be1."""
    drained = pool(lab, WEB, Vip("stream", 7000, (BE1, Backend(BE2, weight=0)), **DSR),
                   ALT_VIP)
    with streaming(lab, "drain") as run:
        _reload_all(lab, all_up, drained)
        time.sleep(2)
        code = ("import socket\nfor i in range(20):\n    s = socket.create_connection(("
                f"{VIP!r}, 7000), timeout=3)\n    print(s.makefile().readline().strip())\n"
                "    s.close()\n")
        banners = set(lab.run(lab.client_ns, sys.executable, "-c", code).stdout.split())
    _reload_all(lab, all_up, pool(lab))
    assert not run["broken"], run["broken"]
    assert not run["failed_new"], run["failed_new"][:3]
    assert banners == {"backend=be1"}, banners  # new streams: the drained be2 gets none


def _reload_all(lab: BgpLab, nodes: Nodes, text: str) -> None:
    for ns in lab.node_ns:
        (nodes.tmp / f"{ns}.yaml").write_text(text)
        assert "reloaded" in xdplb(ns, "reload").stdout


def test_dsr_ipip_backends_behind_every_node(lab: BgpLab, all_up: Nodes) -> None:
    """The same fleet in dsr/ipip (xdplb decap on the backends): every node carries some of
    the connections, each backend decapsulates, the backends see the client."""
    ipip = [replace(v, encap="ipip") for v in (WEB, STREAM, ALT_VIP)]
    for ns in lab.backend_ns:
        xdplb(ns, "decap", "attach", "eth0", timeout=120)
    try:
        _reload_all(lab, all_up, pool(lab, *ipip))
        before = {ns: counters(ns).get("ipip_encap", 0) for ns in lab.node_ns}
        got = connect_many(lab, 60)
        assert all(f"client={lab.client_addr}:{p}" in b for p, b in got), got[:3]
        wrapped = {ns: counters(ns).get("ipip_encap", 0) - before[ns] for ns in lab.node_ns}
        assert all(n > 0 for n in wrapped.values()), wrapped
        for ns in lab.backend_ns:
            st = json.loads(xdplb(ns, "decap", "status", "eth0", "--json").stdout)
            assert st["interfaces"][0]["counters"]["decap"] > 0, st
    finally:
        _reload_all(lab, all_up, pool(lab))
        for ns in lab.backend_ns:
            xdplb(ns, "decap", "detach", "eth0", check=False)


def test_a_dead_speaker_is_started_again(lab: BgpLab, all_up: Nodes) -> None:
    """The agent outlives its speaker: ExaBGP killed, its routes go (its sessions close), the
    agent starts it again and announces again."""
    ns, addr = lab.node_ns[2], lab.node_addrs[2]
    pid = status(ns)["bgp"]["speaker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    _wait_gone(lab, addr, 5)
    took = lab.wait_next_hops(VIP, set(lab.node_addrs), timeout=20)
    assert status(ns)["bgp"]["speaker"]["pid"] not in (None, pid)
    print(f"\nspeaker killed: announced again after {took:.1f}s")


def test_a_vip_address_goes_while_its_backends_fail_and_returns_with_them(
        lab: BgpLab, all_up: Nodes) -> None:
    """A node whose view says every backend of a VIP address is down withdraws that address
    (the others carry it); when the backend really fails every node withdraws it; it is
    announced again when the backend comes back. The other address stays throughout."""
    everyone = set(lab.node_addrs)
    lab.wait_next_hops(ALT, everyone)
    lb1 = lab.node_ns[0]
    # lb1 alone cannot reach alt's backend: its health checks fail, not the others'
    lab.run(lb1, "nft", "-f", "-", input="table ip xbg_hc { chain out { type filter hook "
            "output priority 0; tcp dport 8080 drop; }; }\n")
    try:
        lab.wait_next_hops(ALT, everyone - {lab.node_addrs[0]}, timeout=15)
        ann = {a["prefix"]: a for a in status(lb1)["bgp"]["announcements"]}
        assert ann[f"{ALT}/32"]["state"] == "withdrawn", ann
        assert "none of its 1 backends" in ann[f"{ALT}/32"]["reason"], ann
        assert lab.next_hops(VIP) == everyone
        assert "backend=be2" in lab.http_get(lab.client_ns, ALT, 8080)  # the others serve
    finally:
        lab.run(lb1, "nft", "delete", "table", "ip", "xbg_hc", check=False)
    lab.wait_next_hops(ALT, everyone, timeout=15)
    lab.stop_backend("be2")
    try:
        took = lab.wait_next_hops(ALT, set(), timeout=15)
        assert lab.next_hops(VIP) == everyone  # be1 still serves web
    finally:
        lab.start_backend("be2")
    back = lab.wait_next_hops(ALT, everyone, timeout=15)
    print(f"\nall backends down -> withdrawn after {took:.2f}s; back -> announced after "
          f"{back:.2f}s")


def test_drain_node_withdraws_without_stopping(lab: BgpLab, all_up: Nodes) -> None:
    ns, addr = lab.node_ns[1], lab.node_addrs[1]
    everyone = set(lab.node_addrs)
    out = xdplb(ns, "drain-node").stdout
    assert "drained" in out, out
    try:
        lab.wait_next_hops(VIP, everyone - {addr}, timeout=5)
        lab.wait_next_hops(ALT, everyone - {addr}, timeout=5)
        g = status(ns)
        assert all("drain-node" in a["reason"] for a in g["bgp"]["announcements"]), g["bgp"]
        assert g["interfaces"][0]["attached"] and all_up.running(ns)  # still balancing
        assert "backend=" in lab.http_get(lab.client_ns, VIP)
        # kept like the drains: a restarted agent stays drained
        agent = all_up.agents[ns]
        assert agent is not None and agent.stop() == 0
        all_up.start(ns)
        time.sleep(2)  # its checks have passed: only the drain keeps it out
        assert addr not in lab.next_hops(VIP)
        assert all("drain-node" in a["reason"] for a in status(ns)["bgp"]["announcements"])
    finally:
        xdplb(ns, "undrain-node")
    lab.wait_next_hops(VIP, everyone, timeout=5)


def test_what_the_agent_refuses(lab: BgpLab, all_up: Nodes, tmp_path: Path) -> None:
    """Bad input: exit 2 with the reason, nothing changed."""
    cfg = tmp_path / "pool.yaml"
    # no route to the peer (the router's namespace has no default route)
    cfg.write_text(pool(lab).replace(lab.router_backend_addr, "192.0.2.1"))
    p = xdplb(lab.router_ns, "attach", "eth0", "--config", str(cfg), check=False)
    assert p.returncode == 2 and "no route to peer 192.0.2.1" in p.stderr, p.stderr
    assert "xdp" not in lab.run(lab.router_ns, "ip", "link", "show", "eth0").stdout
    # dsr/l2 toward a backend behind a gateway (the client, via the router)
    cfg.write_text(pool(lab, Vip("far", 80, (lab.client_addr,), **DSR)))
    p = xdplb(lab.node_ns[0], "attach", "eth0", "--config", str(cfg), check=False)
    assert p.returncode == 2 and "directly connected" in p.stderr, p.stderr
    assert "via gateway 10.20.0.254" in p.stderr, p.stderr
    # dsr cannot rewrite ports
    cfg.write_text(pool(lab, Vip("web", 80, (BE1, Backend(BE2, port=8080)), **DSR)))
    p = xdplb(lab.node_ns[0], "check-config", str(cfg), check=False)
    assert p.returncode == 2 and "pool.yaml:" in p.stderr, p.stderr
    p = xdplb(lab.node_ns[0], "attach", "eth0", "--config", str(cfg), "--drain-time", "soon",
              check=False)
    assert p.returncode == 2 and "--drain-time" in p.stderr, p.stderr
