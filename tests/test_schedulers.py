"""Schedulers per VIP (issue 16): the turn sequences the agent writes (model/sequence.py,
desired.py) and, in the lab, real HTTP connections through each data path: the seed's nginx
demo with ``scheduler: wrr`` (400 sequential connections at 3:1: exactly 300/100), rr's
equal turns, and source-hash's affinity per client address. The parity of each scheduler's
rule between the two data paths is tests/test_parity.py's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from itertools import islice

import numpy as np
import pytest
from agent_process import XDPLB, AgentProcess, xdplb
from lab import Lab
from pools import BE1, BE2, ECHO, VIP, WEB, Backend, Vip, pool_yaml

from xdplb.abi.layout import MAX_SEQUENCE, NO_BACKEND, Scheduler, Stat
from xdplb.agent import connsweep
from xdplb.config import parse_config
from xdplb.inspect.backends import sample_shares
from xdplb.inspect.render import render_backends
from xdplb.model.desired import backend_label, desired_state
from xdplb.model.sequence import reduced, round_robin, smooth_wrr


def nginx(weights: list[int]):
    """nginx's smooth weighted round robin, written as nginx writes it (no gcd)."""
    current = [0] * len(weights)
    while True:
        best = None
        for i, w in enumerate(weights):
            if w:
                current[i] += w
                if best is None or current[i] > current[best]:
                    best = i
        current[best] -= sum(weights)
        yield best


@pytest.mark.parametrize("weights", [[3, 1], [5, 1, 1], [6, 2], [0, 4, 2, 0, 1], [1, 1, 1],
                                     [7, 3, 0, 9]])
def test_smooth_wrr_is_one_period_of_nginx(weights: list[int]) -> None:
    seq = smooth_wrr(weights)
    assert seq == list(islice(nginx(weights), len(seq)))
    assert seq == list(islice(nginx(weights), len(seq), 2 * len(seq)))  # it is a period
    g = np.gcd.reduce([w for w in weights if w])
    assert Counter(seq) == {i: w // g for i, w in enumerate(weights) if w}


def test_sequences_without_weights_and_too_long() -> None:
    assert smooth_wrr([0, 0]) == [] and round_robin([0, 0]) == []
    assert round_robin([3, 0, 1]) == [0, 2]
    big = reduced([65535, 65534, 1])
    assert sum(big) <= MAX_SEQUENCE and min(big) >= 1 and big[0] >= big[1] > big[2]


def _vip(scheduler: str, *backends: Backend) -> str:
    return pool_yaml(Vip("web", 80, backends, scheduler=scheduler), table_size=251)


def test_the_ring_is_the_serving_sets_sequence() -> None:
    """wrr / random: the smooth sequence of the serving backends; rr: one turn each;
    drained, down and (while a primary is up) backup backends take none; no serving
    backend: one empty slot. maglev and source-hash: the Maglev table."""
    text = _vip("wrr", Backend(BE1, weight=3), Backend(BE2, port=8080),
                Backend("10.20.0.13", weight=2), Backend("10.20.0.14", backup=True))
    cfg = parse_config(text)
    ids = {b.address: b.backend_id for b in desired_state(cfg).vips[0].backends}
    a, b, c, d = ids[BE1], ids[BE2], ids["10.20.0.13"], ids["10.20.0.14"]
    assert desired_state(cfg).vips[0].ring.tolist() == [a, c, a, b, c, a]
    assert desired_state(cfg).vips[0].scheduler == Scheduler.WRR
    drained = frozenset({backend_label("web", "10.20.0.13", 80)})
    assert desired_state(cfg, drained=drained).vips[0].ring.tolist() == [a, a, b, a]
    down = frozenset({backend_label("web", BE1, 80)})
    assert desired_state(cfg, down=down).vips[0].ring.tolist() == [c, b, c]
    everyone = frozenset(backend_label("web", x, p) for x, p in
                         ((BE1, 80), (BE2, 8080), ("10.20.0.13", 80)))
    assert desired_state(cfg, down=everyone).vips[0].ring.tolist() == [d]  # the backup
    none = everyone | {backend_label("web", "10.20.0.14", 80)}
    assert desired_state(cfg, down=none).vips[0].ring.tolist() == [NO_BACKEND]
    rr = desired_state(parse_config(text.replace("scheduler: wrr", "scheduler: rr")))
    assert rr.vips[0].ring.tolist() == [a, b, c]
    lc = desired_state(parse_config(text.replace("scheduler: wrr", "scheduler: least-conn")),
                       drained=drained)
    assert lc.vips[0].ring.tolist() == [a, b]  # the serving set, one slot each
    for name in ("maglev", "source-hash"):
        v = desired_state(parse_config(text.replace("scheduler: wrr", f"scheduler: {name}")))
        assert v.vips[0].ring_size == 251


# --- the lab: real connections ----------------------------------------------------------------

# n sequential HTTP/1.0 connections from one process (one per connection: a new source port
# each), printing the backend name of each answer.
_CONNECTIONS = """\
import socket, sys
n, vip, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for _ in range(n):
    s = socket.create_connection((vip, port), timeout=5)
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    out = b""
    while c := s.recv(4096):
        out += c
    s.close()
    print(out.decode().split("backend=", 1)[1].split()[0])
"""


def backends_of(lab, n: int, port: int = 80) -> Counter:
    out = lab.run(lab.client_ns, sys.executable, "-c", _CONNECTIONS, str(n), VIP, str(port),
                  timeout=120).stdout
    return Counter(out.split())


@pytest.mark.root
@pytest.mark.parametrize("datapath", ["bpf", "scapy"])
def test_wrr_demo_400_connections_split_300_100(datapath, tmp_path):
    """The seed's nginx demo: weights 3:1, 400 sequential connections, exactly 300/100
    (one shared sequence, one turn per connection); then rr 1:1 and source-hash's one
    backend for the client's address. ``xdplb trace`` names the next flow's backend."""
    extra = ("--datapath", "scapy") if datapath == "scapy" else ()
    config = tmp_path / "pool.yaml"
    web = replace(WEB, backends=(Backend(BE1, weight=3), Backend(BE2, port=8080)))
    with Lab(topology="one-armed", backends=2, prefix=f"xlt-sc{datapath[0]}") as lab:
        for name, n, want in (("wrr", 400, {"be1": 300, "be2": 100}),
                              ("rr", 80, {"be1": 40, "be2": 40}), ("source-hash", 400, None)):
            config.write_text(pool_yaml(replace(web, scheduler=name), table_size=251))
            with AgentProcess(lab, config, *extra):
                sample = None
                if datapath == "bpf" and name != "rr":  # sampled around all the connections
                    sample = subprocess.Popen(
                        [str(XDPLB), "--netns", lab.lb_ns, "backends", "--json", "--interval",
                         "8"], stdout=subprocess.PIPE, text=True)
                    time.sleep(3)  # the command's start, before its first reading
                got = backends_of(lab, n)
                if sample is not None:
                    out, _ = sample.communicate(timeout=30)
                    share = {b["address"]: (b["new_flows_interval"], b["new_flow_share"],
                                            b["weight_share"], b["hot"])
                             for b in json.loads(out)["backends"]}
                    if name == "wrr":  # all 400 in the interval: exactly the weights' split
                        assert share == {BE1: (300, 75.0, 75.0, False),
                                         BE2: (100, 25.0, 25.0, False)}, share
                    else:  # one client: one backend takes 100%, HOT if far above its weight
                        (one,) = [s for s in share.values() if s[1] == 100.0]
                        assert one[0] == n, share
                        assert one[3] == (1.5 * one[2] <= 100 and 100 - one[2] >= 10), share
                if datapath == "bpf":
                    # trace predicts the next new flow's backend, taking no live turn
                    t = json.loads(xdplb(lab, "trace", "tcp", f"{lab.client_addr}:44001",
                                         f"{VIP}:80", "--json").stdout)
                    assert t["decision"] == "new" and t["agree"], t
                    assert t["maglev"]["scheduler"] == name, t
                    body = lab.http_get(lab.client_ns, VIP, sport=44001)
                    assert f"addr={t['backend']['address']} " in body, (name, t, body)
            if want is None:  # one client address: one backend
                assert len(got) == 1 and sum(got.values()) == n, got
            else:
                assert got == want, name


# --- xdplb backends: share of new flows, hot spots --------------------------------------------


class _Maps:
    def __init__(self, new_flows: dict[int, int]) -> None:
        self.stats = np.zeros((8, len(Stat._fields_)), np.uint64)
        for i, n in new_flows.items():
            self.stats[i, [f for f, _ in Stat._fields_].index("flows")] = n

    def percpu_array(self, name: str) -> np.ndarray:
        assert name == "backend_stats"
        return self.stats


class _Reader:
    def __init__(self, new_flows: dict[int, int]) -> None:
        self.maps = _Maps(new_flows)


def _row(bid: int, vip: int, weight: int, new_flows: int = 0, down: bool = False,
         backup: bool = False, scheduler: str = "wrr") -> dict:
    return {"backend_id": bid, "vip_id": vip, "weight": weight, "down": down,
            "backup": backup, "serving": "primary", "scheduler": scheduler,
            "new_flows": new_flows}


def test_new_flow_shares_and_hot_spots() -> None:
    """Each backend's share of its VIP's new flows in the interval next to its weight's
    share of the serving set; HOT when far above it, over enough flows."""
    rows = [_row(0, 0, 3, new_flows=10), _row(1, 0, 1), _row(2, 0, 2, down=True),
            _row(3, 1, 1, scheduler="source-hash"), _row(4, 1, 1, scheduler="source-hash"),
            _row(5, 2, 5, scheduler="rr"), _row(6, 2, 1, scheduler="rr"),
            _row(7, 3, 1, scheduler="maglev")]
    r = _Reader({0: 10 + 75, 1: 25, 3: 40, 4: 0, 5: 3, 6: 2})
    sample_shares(r, rows, 2.0, sleep=lambda s: None)
    got = {row["backend_id"]: (row["new_flows_interval"], row["new_flow_share"],
                               row["weight_share"], row["hot"]) for row in rows}
    assert got == {0: (75, 75.0, 75.0, False), 1: (25, 25.0, 25.0, False),
                   2: (0, 0.0, 0.0, False),  # down: entitled to nothing
                   3: (40, 100.0, 50.0, True), 4: (0, 0.0, 50.0, False),  # affinity: HOT
                   5: (3, 60.0, 50.0, False), 6: (2, 40.0, 50.0, False),  # rr: equal shares
                   7: (0, None, 100.0, False)}  # no new flow: no share
    text = render_backends([{**row, "address": "10.20.0.11", "port": 80, "vip": "web",
                             "health": {"state": "up", "since": None, "last": None},
                             "maglev_share": 50.0, "flows": 0, "active_flows": 0}
                            for row in rows])
    head, *lines = text.splitlines()
    assert head.split()[7:10] == ["NEW/2s", "BY", "WEIGHT"], head
    assert "40 (100.0%) HOT" in lines[3] and "50.0%" in lines[3]
    assert "HOT" not in "".join(lines[:3] + lines[4:])


# One connection held open (its request unfinished), n short ones meanwhile, then the held one
# finished: the backend of each, the held one's last.
_HELD = """\
import socket, sys
n, vip = int(sys.argv[1]), sys.argv[2]

def name(s):
    out = b""
    while c := s.recv(4096):
        out += c
    s.close()
    return out.decode().split("backend=", 1)[1].split()[0]

held = socket.create_connection((vip, 80), timeout=10)
held.sendall(b"GET / HTTP/1.0\\r\\n")
for _ in range(n):
    s = socket.create_connection((vip, 80), timeout=5)
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    print(name(s))
held.sendall(b"\\r\\n")
print(name(held))
"""


@pytest.mark.root
@pytest.mark.parametrize("datapath", ["bpf", "scapy"])
def test_least_conn_follows_a_long_lived_connection(datapath, tmp_path):
    """least-conn at 1:1: while one connection stays open on a backend, every short
    connection meanwhile (each over, FIN seen, before the next starts) goes to the other;
    wrr would alternate."""
    extra = ("--datapath", "scapy") if datapath == "scapy" else ()
    config = tmp_path / "pool.yaml"
    web = replace(WEB, backends=(Backend(BE1), Backend(BE2, port=8080)), scheduler="least-conn")
    with Lab(topology="one-armed", backends=2, prefix=f"xlt-lc{datapath[0]}") as lab:
        echo = replace(ECHO, scheduler="least-conn")
        config.write_text(pool_yaml(web, echo, table_size=251,
                                    flows={"udp_idle_timeout": "1s"}))
        with AgentProcess(lab, config, *extra):
            for _ in range(2):  # and again, once the held one is over
                out = lab.run(lab.client_ns, sys.executable, "-c", _HELD, "10", VIP,
                              timeout=60).stdout.split()
                *short, held = out
                assert held == "be1" and short == ["be2"] * 10, out

            # UDP has no end the data path sees: a flow idle past the timeout is over when
            # the agent's sweep finds it so (within connsweep.SWEEP_INTERVAL), and weighs
            # nothing: the next new flow goes to the first of equals again, not the other.
            def udp(sport: int) -> str:
                return lab.udp_request(lab.client_ns, VIP, 5000, b"x", sport=sport).split()[0]

            assert [udp(41000), udp(41000)] == [b"be1", b"be1"]  # confirmed: be1 has one
            assert udp(41001) == b"be2"  # half-open: counts nothing
            time.sleep(1 + connsweep.SWEEP_INTERVAL + 1)
            assert udp(41002) == b"be1"
