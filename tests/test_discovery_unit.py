"""backends_from and backup: the keys and their errors, DNS answers -> backends (priorities,
weights), the backup rule in the desired state, and the agent's discovery bookkeeping
(schedules, failures, stale answers) with a stand-in for the DNS. Against a real DNS server:
tests/test_discovery.py; with real connections: tests/test_backup.py."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.rcode
import numpy as np
import pytest

from xdplb.agent import discovery as agent_dns
from xdplb.agent.discovery import Answer, Discovery, DnsFailure, lookup, next_query_in
from xdplb.config import ConfigError, parse_config
from xdplb.config.discovery import (
    DiscoveryError,
    DnsDiscovery,
    Record,
    effective_config,
    to_backends,
)
from xdplb.model.desired import desired_state

HEAD = """vips:
  - name: web
    address: 10.200.0.10
    port: 80
    protocol: tcp
"""


def cfg(body: str, tail: str = "maglev: {table_size: 251}\n"):
    return parse_config(HEAD + body + tail, "pool.yaml")


def errors(body: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        cfg(body)
    return str(e.value).splitlines()


SRV = "    backends_from:\n      dns: {name: _http._tcp.web.lab, type: SRV, resolver: 10.0.0.53}\n"


# --- keys ------------------------------------------------------------------------------------


def test_backends_from_keys():
    src = cfg(SRV).vips[0].backends_from.dns
    assert (src.name, src.type, str(src.resolver), src.port, src.refresh) == \
        ("_http._tcp.web.lab.", "SRV", "10.0.0.53", None, 30.0)  # the name made absolute
    a = cfg("    backends_from:\n      dns: {name: web.lab., type: A, port: 8080, "
            "refresh: 5s}\n").vips[0]
    assert (a.backends, a.backends_from.dns.port, a.backends_from.dns.refresh) == ((), 8080, 5.0)
    assert a.backends_from.dns.resolver is None  # the system's resolvers


@pytest.mark.parametrize(("body", "want"), [
    (SRV + "    backends:\n      - address: 10.20.0.11\n",
     "pool.yaml:6: vips[0].backends_from: backends_from replaces backends: give one of them, "
     "not both"),
    ("", "pool.yaml:2: vips[0].backends: missing required key 'backends' (or 'backends_from', "
         "to find them in DNS)"),
    ("    backends_from:\n      dns: {name: a.lab., type: SRV, port: 80}\n",
     "pool.yaml:7: vips[0].backends_from.dns.port: port is only used with type: A (SRV records "
     "carry their port)"),
    ("    backends_from:\n      dns: {name: a.lab., type: AAAA}\n",
     "pool.yaml:7: vips[0].backends_from.dns.type: 'AAAA' is not valid (expected 'SRV' or 'A')"),
    ("    backends_from:\n      dns: {name: 'a..lab', type: A}\n",
     "pool.yaml:7: vips[0].backends_from.dns.name: 'a..lab' is not a DNS name (labels of "
     "letters, digits, '-' and '_', separated by dots)"),
    ("    backends_from:\n      dns: {name: a.lab., type: A, resolver: ns1.lab}\n",
     "pool.yaml:7: vips[0].backends_from.dns.resolver: 'ns1.lab' is not a unicast IP "
     "address (the resolver is named by address)"),
    ("    backends_from:\n      dns: {name: a.lab., type: A, refresh: 500ms}\n",
     "pool.yaml:7: vips[0].backends_from.dns.refresh: refresh must be at least 1s"),
    ("    backends_from:\n      dns: {name: a.lab., type: A, refesh: 5s}\n",
     "pool.yaml:7: vips[0].backends_from.dns.refesh: unknown key 'refesh' (did you mean "
     "'refresh'?)"),
    ("    backends_from:\n      srv: {name: a.lab., type: A}\n",
     ["pool.yaml:7: vips[0].backends_from.dns: missing required key 'dns'",
      "pool.yaml:7: vips[0].backends_from.srv: unknown key 'srv' (expected one of: dns)"]),
    ("    forwarding: dsr\n    backends_from:\n      dns: {name: a.lab., type: A, port: 8080}\n",
     "pool.yaml:8: vips[0].backends_from.dns.port: port 8080 differs from the VIP's port 80: dsr "
     "cannot rewrite ports (the backend answers the client directly)"),
    ("    backends:\n      - address: 10.20.0.11\n        backup: yes\n",
     "pool.yaml:8: vips[0].backends[0].backup: expected true or false, got a string ('yes')"),
])
def test_config_errors(body, want):
    assert errors(body) == (want if isinstance(want, list) else [want])


def test_backup_key():
    vip = cfg("    backends:\n      - address: 10.20.0.11\n      - address: 10.20.0.12\n"
              "        backup: true\n").vips[0]
    assert [b.backup for b in vip.backends] == [False, True]


# --- answers -> backends ---------------------------------------------------------------------


def test_srv_priorities_and_weights():
    vip = cfg(SRV).vips[0]
    bes, skipped = to_backends([
        Record(20, "10.20.0.13", 80, 5),  # a higher priority value: backup
        Record(10, "10.20.0.11", 80, 3), Record(10, "10.20.0.12", 8080, 0),  # 0: smallest
        Record(10, "10.20.0.11", 80, 3),  # listed twice: once
        Record(30, "10.20.0.11", 80, 1),  # and again at a worse priority: the best counts
        Record(10, "127.0.0.1", 80, 1),  # not a backend address: left out, said why
    ], vip)
    got = [(str(b.address), b.port, b.weight, b.backup) for b in bes]
    assert got == [("10.20.0.11", 80, 300, False), ("10.20.0.12", 8080, 1, False),
                   ("10.20.0.13", 80, 5, True)]
    assert skipped == ["127.0.0.1:80: 127.0.0.1 is a loopback address (127.0.0.0/8): packets "
                       "to it never leave a host"]


@pytest.mark.parametrize(("weights", "want"), [
    ([0, 0], [1, 1]),  # all 0: equal chances
    ([1, 2], [1, 2]),
    ([0, 65535], [1, 65535]),  # no room to scale: 0 is still the smallest, not a drain
    ([0, 700], [1, 65100]),  # scaled by 65535 // 700 = 93
])
def test_zero_weight_is_the_smallest(weights, want):
    vip = cfg(SRV).vips[0]
    bes, _ = to_backends([Record(1, f"10.20.0.{11 + i}", 80, w) for i, w in enumerate(weights)],
                         vip)
    assert [b.weight for b in bes] == want


def test_dsr_keeps_the_vip_port():
    vip = cfg("    forwarding: dsr\n" + SRV).vips[0]
    bes, skipped = to_backends([Record(1, "10.20.0.11", 80), Record(1, "10.20.0.12", 81)], vip)
    assert [str(b.address) for b in bes] == ["10.20.0.11"]
    assert "dsr cannot rewrite ports" in skipped[0]


def test_effective_config_puts_in_the_discovered_backends():
    c = parse_config(HEAD + SRV + """  - name: other
    address: 10.200.0.11
    port: 80
    protocol: tcp
    backends:
      - address: 10.20.0.11
maglev: {table_size: 5}
""", "pool.yaml")
    vip = c.vips[0]
    found, _ = to_backends([Record(1, "10.20.0.12", 80), Record(1, "10.200.0.11", 80)], vip)
    eff, dropped = effective_config(c, {"web": found})
    assert [str(b.address) for b in eff.vips[0].backends] == ["10.20.0.12"]
    assert dropped == ["web: 10.200.0.11 is the address of a VIP: packets sent to it would be "
                       "balanced again"]
    assert eff.vips[1] == c.vips[1] and c.vips[0].backends == ()  # the file's own: as they were
    assert effective_config(c, {})[0].vips[0].backends == ()  # nothing known yet: none
    many, _ = to_backends([Record(1, f"10.20.1.{i}", 80) for i in range(1, 7)], vip)
    with pytest.raises(DiscoveryError, match="must be greater than the number of backends"):
        effective_config(c, {"web": many})


# --- backups in the desired state -----------------------------------------------------------

BACKUPS = """    backends:
      - address: 10.20.0.11
      - address: 10.20.0.12
        weight: 2
      - address: 10.20.0.13
        backup: true
      - address: 10.20.0.14
        backup: true
"""
P1, P2, B1, B2 = (f"web/10.20.0.{i}:80" for i in (11, 12, 13, 14))


@pytest.mark.parametrize(("down", "drained", "serving", "in_ring"), [
    ((), (), "primary", {0, 1}),
    ((P1,), (), "primary", {1}),  # one primary up is enough
    ((P1,), (P2,), "backup", {2, 3}),  # a drained primary is not up
    ((P1, P2), (), "backup", {2, 3}),
    ((P1, P2, B1), (), "backup", {3}),
    ((P1, P2), (B1, B2), "none", set()),
])
def test_backups_serve_only_while_no_primary_is_up(down, drained, serving, in_ring):
    c = cfg(BACKUPS)
    v = desired_state(c, down=frozenset(down), drained=frozenset(drained)).vips[0]
    assert v.serving == serving
    ids = [b.backend_id for b in v.backends]
    assert {ids.index(i) for i in np.unique(v.ring) if i in ids} == in_ring
    assert [b.backup for b in v.backends] == [False, False, True, True]


def test_weight_zero_primary_is_not_up():
    v = desired_state(cfg(BACKUPS.replace("weight: 2", "weight: 0").replace(
        "      - address: 10.20.0.11\n", "      - address: 10.20.0.11\n        weight: 0\n",
        1))).vips[0]
    assert v.serving == "backup"


def test_backup_switch_keeps_the_primaries_ring():
    """A backup stands in with the ring it would have; the primaries come back to theirs."""
    c = cfg(BACKUPS)
    before = desired_state(c).vips[0].ring
    during = desired_state(c, down=frozenset({P1, P2})).vips[0].ring
    after = desired_state(c).vips[0].ring
    assert np.array_equal(before, after) and not np.array_equal(before, during)


# --- the agent's bookkeeping -----------------------------------------------------------------


def test_next_query_at_min_of_ttl_and_refresh():
    src = DnsDiscovery(name="a.lab.", type="A", refresh=10)
    assert next_query_in(src, Answer((), 3.0, "")) == 3.0
    assert next_query_in(src, Answer((), 60.0, "")) == 10.0
    assert next_query_in(src, Answer((), 0.0, "")) == agent_dns.TTL_MIN  # TTL 0: no loop
    assert next_query_in(src, Answer((), None, "")) == 10.0  # empty answers: refresh
    assert next_query_in(src, DnsFailure("x")) == agent_dns.FAILURE_RETRY


class FakeDns:
    def __init__(self) -> None:
        self.answers: dict[str, Answer | DnsFailure] = {}
        self.asked: list[str] = []

    def __call__(self, src: DnsDiscovery, port: int) -> Answer:
        self.asked.append(src.name)
        got = self.answers[src.name]
        if isinstance(got, DnsFailure):
            raise got
        return got


def test_first_answers_and_results():
    fake = FakeDns()
    posted: list = []
    d = Discovery(lambda *a: posted.append(a), query=fake)
    c = cfg(SRV)
    fake.answers["_http._tcp.web.lab."] = DnsFailure("no answer within 2s")
    with pytest.raises(DnsFailure, match=r"VIP web: backends_from _http._tcp.web.lab. SRV from "
                                         r"10.0.0.53 failed: no answer within 2s"):
        d.first_answers(c)
    assert d.sources == {}  # nothing changed
    one = Answer((Record(1, "10.20.0.11", 80),), 5.0, "1 record")
    fake.answers["_http._tcp.web.lab."] = one
    sources = d.first_answers(c)
    assert [str(b.address) for b in sources["web"].backends] == ["10.20.0.11"]
    d.sources = sources  # as use() would, without starting the thread
    assert d.first_answers(c)["web"] is sources["web"] and len(fake.asked) == 2  # kept
    vip, src = c.vips[0], c.vips[0].backends_from.dns
    assert d.result("web", src, one, vip) is None  # the same set: nothing to apply
    d.result("web", src, DnsFailure("REFUSED"), vip)
    assert (sources["web"].failures, sources["web"].failing) == (1, "REFUSED")
    two = Answer((Record(1, "10.20.0.11", 80), Record(1, "10.20.0.12", 80)), 5.0, "2")
    other = DnsDiscovery(name="other.lab.", type="A")
    assert d.result("web", other, two, vip) is None  # a source no longer configured
    new = d.result("web", src, two, vip)
    assert new is not None and len(new) == 2 and sources["web"].failing is None
    assert len(d.found()["web"]) == 1  # until committed
    d.commit("web", new)
    assert len(d.found()["web"]) == 2
    assert d.snapshot()["web"]["dns_failures"] == 1


def test_thread_asks_again_and_posts():
    fake = FakeDns()
    fake.answers["_http._tcp.web.lab."] = Answer((), None, "none")
    posted = threading.Event()
    d = Discovery(lambda *a: posted.set(), query=fake)
    sources = d.first_answers(cfg(SRV))
    sources["web"].next_query = None  # due at once
    d.use(sources)
    try:
        assert posted.wait(5)
    finally:
        d.stop()
    assert len(fake.asked) == 2


# --- dnspython against a server that answers SERVFAIL (the lab's dnsmasq cannot) -----------

@pytest.fixture
def servfail_server() -> Iterator[str]:
    """A UDP DNS responder on 127.0.9.53:53 answering SERVFAIL to everything."""
    addr = "127.0.9.53"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((addr, 53))
    except PermissionError:
        pytest.skip("needs root (port 53)")
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.set_rcode(dns.rcode.SERVFAIL)
            reply.flags &= ~dns.flags.AA
            sock.sendto(reply.to_wire(), peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield addr
    finally:
        stop.set()
        t.join(2)
        sock.close()


def test_servfail_is_a_failure(servfail_server):
    src = DnsDiscovery(name="web.lab.", type="A", resolver=servfail_server)
    with pytest.raises(DnsFailure, match=f"^{servfail_server} answered SERVFAIL$"):
        lookup(src, 80)


def test_metrics_of_backups_and_discovery():
    from xdplb.agent.metrics import families

    row = {"vip": "web", "vip_address": "10.200.0.10", "vip_port": 80, "address": "10.20.0.12",
           "port": 80, "down": False, "weight": 1, "maglev_share": 100.0, "backup": True,
           "serving": "backup", "health": {"state": "up"}}
    st = {"vips": [], "backends": [], "counters": {}, "discovery": [
        {"vip": "web", "dns_failures": 3, "backends": 2}],
        "flow_table": {"entries": 0, "capacity": 1, "fill": 0.0}}
    got = {(s.name, tuple(s.labels.values())): s.value
           for fam in families(st, [row]) for s in fam.samples}
    assert got[("xdplb_backend_backup", ("web", "10.20.0.12:80"))] == 1
    assert got[("xdplb_vip_serving_backups", ("web",))] == 1
    assert got[("xdplb_dns_failures_total", ("web",))] == 3
    assert got[("xdplb_dns_backends", ("web",))] == 2
