"""Units of issue 14 without namespaces: the ``bgp`` config section, what a node announces
(``agent.bgp.decide``), the speaker's config, and a ring that every node builds alike."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pools import BE1, BE2, BE3, Backend, HealthCheck, Vip, pool_data, pool_yaml

from xdplb.agent.bgp import (
    ANNOUNCED,
    WITHDRAWN,
    Announcer,
    ExaBGP,
    NodeView,
    decide,
    exabgp_config,
)
from xdplb.agent.errors import UsageError
from xdplb.config import Config, ConfigError, load_config
from xdplb.instance import pins
from xdplb.model.desired import Current, backend_label, desired_state

BGP = """\
bgp:
  asn: 65001
  router_id: 10.0.0.2
  hold_time: 3s
  peers:
    - {address: 10.0.0.1, asn: 65000}
"""
WEB = Vip("web", 80, (BE1, BE2), forwarding="dsr", encap="l2",
          health_check=HealthCheck("tcp", interval="1s", timeout="500ms"))
DNS = Vip("dns", 53, (BE3,), protocol="udp", address="10.200.0.11")


def load(tmp_path: Path, bgp: str) -> Config:
    f = tmp_path / "pool.yaml"
    f.write_text(pool_yaml(WEB, DNS) + textwrap.dedent(bgp))
    return load_config(f)


def error(tmp_path: Path, bgp: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, bgp)
    return str(e.value)


def test_the_issues_section_parses(tmp_path: Path) -> None:
    b = load(tmp_path, BGP).bgp
    assert b is not None and (b.asn, str(b.router_id), b.hold_time) == (65001, "10.0.0.2", 3.0)
    (p,) = b.peers
    assert (str(p.address), p.asn, p.local_address, p.next_hop) == ("10.0.0.1", 65000, None, None)
    assert load(tmp_path, "").bgp is None  # no section: no BGP


def test_optional_keys_and_defaults(tmp_path: Path) -> None:
    b = load(tmp_path, """\
        bgp:
          asn: 4200000000
          peers:
            - {address: 10.0.0.1, asn: 65000, local_address: 10.0.0.2, next_hop: 10.0.1.2}
        """).bgp
    assert b is not None and b.router_id is None and b.hold_time == 9.0
    assert (str(b.peers[0].local_address), str(b.peers[0].next_hop)) == ("10.0.0.2", "10.0.1.2")


@pytest.mark.parametrize(("bgp", "where", "fragment"), [
    ("bgp:\n  asn: 65001\n  peers: []\n", "bgp.peers", "at least one peer"),
    ("bgp:\n  peers:\n    - {address: 10.0.0.1, asn: 1}\n", "bgp.asn", "required"),
    ("bgp:\n  asn: 0\n  peers:\n    - {address: 10.0.0.1, asn: 1}\n", "bgp.asn", "out of range"),
    ("bgp:\n  asn: 1\n  hold_time: 2s\n  peers:\n    - {address: 10.0.0.1, asn: 1}\n",
     "bgp.hold_time", "not a BGP hold time"),
    ("bgp:\n  asn: 1\n  hold_time: 3.5s\n  peers:\n    - {address: 10.0.0.1, asn: 1}\n",
     "bgp.hold_time", "whole seconds"),
    ("bgp:\n  asn: 1\n  peers:\n    - {address: 10.0.0.1, asn: 1, nexthop: 10.0.0.9}\n",
     "bgp.peers[0].nexthop", "unknown key"),
    ("bgp:\n  asn: 1\n  router_id: 300.1.1.1\n  peers:\n    - {address: 10.0.0.1, asn: 1}\n",
     "bgp.router_id", "not an IP address"),
    ("bgp:\n  asn: 1\n  peers:\n    - {address: 10.0.0.1, asn: 1}\n    - {address: 10.0.0.1, "
     "asn: 2}\n", "bgp.peers[1].address", "duplicate peer 10.0.0.1"),
    ("bgp:\n  asn: \"65001\"\n  peers:\n    - {address: 10.0.0.1, asn: 1}\n", "bgp.asn",
     "integer"),
])
def test_errors_name_file_line_and_field(tmp_path: Path, bgp: str, where: str,
                                         fragment: str) -> None:
    msg = error(tmp_path, bgp)
    start = len(pool_yaml(WEB, DNS).splitlines())  # the section's first line is start + 1
    hits = [m for m in msg.splitlines() if f": {where}: " in m and fragment in m]
    assert hits, msg
    line = int(hits[0].split("pool.yaml:")[1].split(":")[0])
    assert line > start, msg


def _view(cfg: Config, **kw: object) -> NodeView:
    passed = {backend_label("web", b, 80): {"state": "up", "passed": True} for b in (BE1, BE2)}
    return NodeView(**{"attached": True, "health": passed, **kw})  # type: ignore[arg-type]


def _states(cfg: Config, view: NodeView) -> dict[str, str]:
    return {a.prefix: a.state for a in decide(cfg, view)}


def test_an_address_is_announced_while_one_backend_can_take_new_flows(tmp_path: Path) -> None:
    cfg = load(tmp_path, BGP)
    web, dns = "10.200.0.10/32", "10.200.0.11/32"
    assert _states(cfg, _view(cfg)) == {web: ANNOUNCED, dns: ANNOUNCED}
    one_down = _view(cfg, down=frozenset({backend_label("web", BE1, 80)}))
    assert _states(cfg, one_down)[web] == ANNOUNCED
    both = frozenset({backend_label("web", BE1, 80), backend_label("web", BE2, 80)})
    out = {a.prefix: a for a in decide(cfg, _view(cfg, down=both))}
    assert out[web].state == WITHDRAWN and "none of its 2 backends" in out[web].reason
    assert out[dns].state == ANNOUNCED  # per address: the other VIP's address stays
    # down one, drained the other: withdrawn as well
    mixed = _view(cfg, down=frozenset({backend_label("web", BE1, 80)}),
                  drained=frozenset({backend_label("web", BE2, 80)}))
    assert _states(cfg, mixed)[web] == WITHDRAWN


def test_nothing_before_a_first_passed_check_or_while_detached_drained_stopping(
        tmp_path: Path) -> None:
    cfg = load(tmp_path, BGP)
    web = "10.200.0.10/32"
    first = {a.prefix: a for a in decide(cfg, _view(cfg, health={}))}[web]  # not checked yet
    assert first.state == WITHDRAWN and "first passed health check" in first.reason
    # dns has no health check: nothing to wait for
    assert _states(cfg, _view(cfg, health={}))["10.200.0.11/32"] == ANNOUNCED
    for kw, why in (({"attached": False}, "not attached"), ({"node_drained": True}, "drain-node"),
                    ({"stopping": True}, "stopping")):
        out = decide(cfg, _view(cfg, **kw))
        assert all(a.state == WITHDRAWN and why in a.reason for a in out), out


def test_the_speakers_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, """\
        bgp:
          asn: 65001
          hold_time: 3s
          peers:
            - {address: 10.0.0.1, asn: 65000}
            - {address: 10.0.1.1, asn: 65002, local_address: 10.0.1.2}
        """)
    assert cfg.bgp is not None
    text = exabgp_config(cfg.bgp, "/run/x/speaker.relay", {"10.0.0.1": "10.0.0.2",
                                                            "10.0.1.1": "10.0.1.2"})
    assert "run /bin/sh /run/x/speaker.relay;" in text and "encoder json;" in text
    # the router id defaults to the address facing the first peer
    assert text.count("router-id 10.0.0.2;") == 2
    for peer, local, asn in (("10.0.0.1", "10.0.0.2", 65000), ("10.0.1.1", "10.0.1.2", 65002)):
        block = text.split(f"neighbor {peer} {{")[1].split("\n}")[0]
        assert f"local-address {local};" in block and f"peer-as {asn};" in block
        assert "local-as 65001;" in block and "hold-time 3;" in block
        assert "neighbor-changes;" in block


def _ring_by_identity(cfg: Config) -> list[str]:
    st = desired_state(cfg, Current())
    (v,) = st.vips
    who = {b.backend_id: f"{b.address}:{b.port}" for b in v.backends}
    return [who.get(int(i), "-") for i in v.ring]


def test_every_node_builds_the_same_ring_whatever_the_order_and_ids() -> None:
    """The ring depends on backend identity (address, port) and weight only: the same config
    with its backends permuted, on a node whose ids differ, gives the same backend per slot."""
    bes = (Backend(BE1, weight=3), Backend(BE2, port=8080), Backend(BE3, weight=2))
    a = Config.model_validate(pool_data(Vip("web", 80, bes), table_size=251, seed=7))
    b = Config.model_validate(pool_data(Vip("web", 80, bes[::-1]), table_size=251, seed=7))
    ring_a = _ring_by_identity(a)
    assert ring_a == _ring_by_identity(b)
    # Another node's ids (it saw backends come and go in another order): same ring.
    st = desired_state(a, Current())
    other = Current(vip_ids={st.vips[0].key: 5}, backend_ids={
        (5, BE1, 80): 40, (5, BE2, 8080): 7, (5, BE3, 80): 1000})
    st2 = desired_state(b, other)
    who = {x.backend_id: f"{x.address}:{x.port}" for x in st2.vips[0].backends}
    assert [who.get(int(i), "-") for i in st2.vips[0].ring] == ring_a
    assert set(np.unique(st2.vips[0].ring)) == {40, 7, 1000}


class FakeSpeaker:
    """ExaBGP's place in an Announcer: records commands, reports peers coming up."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.up: list[str] = []
        self.proc = SimpleNamespace(pid=4250)
        self.path = {"log": Path("/run/x/speaker.log")}
        self.peers: dict[str, str] = {}

    def alive(self) -> bool:
        return True

    def send(self, line: str) -> None:
        self.sent.append(line)

    def poll(self) -> list[str]:
        up, self.up = self.up, []
        return up


def test_the_announcer_sends_changes_and_everything_again_to_a_peer_that_came_up(
        tmp_path: Path) -> None:
    cfg = load(tmp_path, """\
        bgp:
          asn: 65001
          peers:
            - {address: 10.0.0.1, asn: 65000}
            - {address: 10.0.1.1, asn: 65000, next_hop: 10.0.1.2}
        """)
    assert cfg.bgp is not None
    a = Announcer(cfg.bgp, pins.group_for(["eth0"]))
    a.speaker = sp = FakeSpeaker()  # type: ignore[assignment]
    assert a.update(decide(cfg, _view(cfg)))
    assert sorted(sp.sent) == [
        "neighbor 10.0.0.1 announce route 10.200.0.10/32 next-hop self",
        "neighbor 10.0.0.1 announce route 10.200.0.11/32 next-hop self",
        "neighbor 10.0.1.1 announce route 10.200.0.10/32 next-hop 10.0.1.2",
        "neighbor 10.0.1.1 announce route 10.200.0.11/32 next-hop 10.0.1.2"]
    sp.sent.clear()
    assert not a.update(decide(cfg, _view(cfg))) and sp.sent == []  # nothing changed
    sp.up = ["10.0.1.1"]  # a session came (back) up: all it should carry, to it alone
    assert a.update(decide(cfg, _view(cfg)))
    assert sorted(sp.sent) == [
        "neighbor 10.0.1.1 announce route 10.200.0.10/32 next-hop 10.0.1.2",
        "neighbor 10.0.1.1 announce route 10.200.0.11/32 next-hop 10.0.1.2"]
    sp.sent.clear()
    a.update(decide(cfg, _view(cfg, node_drained=True)))
    assert sorted(sp.sent) == [f"neighbor {p} withdraw route 10.200.0.{n}/32"
                               for p in ("10.0.0.1", "10.0.1.1") for n in (10, 11)]
    st = a.state()
    assert [x["state"] for x in st["announcements"]] == [WITHDRAWN, WITHDRAWN]
    assert st["peers"] == [{"address": "10.0.0.1", "asn": 65000, "state": "idle"},
                           {"address": "10.0.1.1", "asn": 65000, "state": "idle"}]


def test_the_speakers_messages_give_the_peers_state(tmp_path: Path) -> None:
    cfg = load(tmp_path, BGP)
    assert cfg.bgp is not None
    sp = ExaBGP(cfg.bgp, pins.group_for(["eth0"]))
    r, w = os.pipe()
    os.set_blocking(r, False)
    sp._evt = r
    msg = {"type": "state", "neighbor": {"address": {"peer": "10.0.0.1"}, "state": "up"}}
    os.write(w, b"done\n" + json.dumps(msg).encode() + b"\n" + b'{"type": "sta')
    assert sp.poll() == ["10.0.0.1"] and sp.peers == {"10.0.0.1": "established"}
    down = {"type": "state", "neighbor": {"address": {"peer": "10.0.0.1"}, "state": "down",
                                          "reason": "peer reset"}}
    os.write(w, json.dumps(down).encode()[len('{"type": "sta'):] + b"\n")
    assert sp.poll() == [] and sp.peers == {"10.0.0.1": "down"}
    os.close(w)
    os.close(r)
    sp._evt = None


def test_a_speaker_that_cannot_start_is_tried_again_later_not_every_second(
        tmp_path: Path) -> None:
    cfg = load(tmp_path, BGP)
    assert cfg.bgp is not None
    a = Announcer(cfg.bgp, pins.group_for(["eth0"]))
    starts = []

    def start() -> None:
        starts.append(1)
        raise UsageError("bgp: no route to peer 10.0.0.1")

    a.speaker.start = start  # type: ignore[method-assign]
    a.speaker.started = 0.0  # long ago
    with pytest.raises(UsageError):
        a.update(decide(cfg, _view(cfg)))
    assert not a.update(decide(cfg, _view(cfg))) and len(starts) == 1  # within RESTART_DELAY
