"""Hostile or careless config files (issue: a balancer that runs as a service).

`xdplb check-config` refuses each one with exit 2 and a FILE:LINE message (FILE: for limits
on the whole file), in bounded time and memory and never with a traceback. Then, in a lab,
an agent balancing long TCP streams is handed each file by `xdplb reload` and by SIGHUP: every
reload is refused, the agent keeps running, no stream breaks and the maps stay as they were.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_process import XDPLB, AgentProcess, status, xdplb
from lab import HERE, Lab
from pools import BE1, BE2, VIP, Backend, Vip, pool_yaml

from xdplb.abi.layout import MAX_BACKENDS, MAX_RING_SLOTS, MAX_VIPS

MEMORY_LIMIT = 1 << 30  # address space of each check-config run
TIME_LIMIT = 20.0
GOOD = pool_yaml(Vip("web", 80, (BE1, BE2)), Vip("stream", 7000, (BE1, BE2)))


def _many_vips(n: int, table_size: int | None = None) -> list[Vip]:
    """n VIPs of the lab's (in Lab.vip_net: 250 addresses, a port range each), on BE1:80.
    fullnat: the replies of one backend endpoint serving them all are found by their own
    ports (a nat endpoint serves at most REV_TARGETS VIPs)."""
    return [Vip(f"v{i}", 10000 + i // 250, (Backend(BE1, port=80),),
                address=f"10.200.0.{i % 250 + 1}", table_size=table_size, forwarding="fullnat")
            for i in range(n)]


# VIPs at the default table size over MAX_RING_SLOTS: refused for the rings' memory
OVER_RINGS = MAX_RING_SLOTS // 65537 + 1


def _many_backends(n: int, per_vip: int = 1000) -> str:
    return pool_yaml(*(Vip(f"v{v}", 80, tuple(Backend(f"10.{21 + v}.{b // 250}.{b % 250 + 1}")
                                              for b in range(min(per_vip, n - v * per_vip))),
                           address=f"10.200.0.{v + 1}")
                       for v in range(-(-n // per_vip))))


def _alias_bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
              for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    return "\n".join([*lines, "vips: *i"]) + "\n"


def _backend_at(address: str) -> str:
    # The first backend of "web" (its line is the first "- address:").
    return GOOD.replace(f"address: {BE1}", f"address: {address}", 1)


# name -> (file contents, a fragment of the message). The VIPs and backends are the lab's, so
# the same files serve the lab test below.
HOSTILE: dict[str, tuple[Callable[[], str | bytes], str]] = {
    "deep-nesting": (lambda: "vips: " + "[\n" * 10_000 + "]\n" * 10_000, "nested more than"),
    "alias-bomb": (_alias_bomb, "values once aliases are expanded"),
    "5mb": (lambda: GOOD + "# padding\n" * ((5 << 20) // 10), "the file is larger than"),
    "nul-bytes": (lambda: GOOD.replace("name: web", "name: w\0eb").encode(),
                  "control character U+0000"),
    f"{OVER_RINGS}-vips": (lambda: pool_yaml(*_many_vips(OVER_RINGS)),
                           f"slots in all ({OVER_RINGS * 65537 * 2 >> 20} MiB of kernel memory)"),
    f"{MAX_VIPS + 1}-vips": (lambda: pool_yaml(*_many_vips(MAX_VIPS + 1, 13)),
                             f"{MAX_VIPS + 1} VIPs: the data path holds at most {MAX_VIPS}"),
    f"{MAX_BACKENDS + 1}-backends": (
        lambda: _many_backends(MAX_BACKENDS + 1),
        f"{MAX_BACKENDS + 1} backends over all VIPs: the data path holds at most {MAX_BACKENDS}"),
    "backend-is-its-vip": (lambda: _backend_at(VIP), "is this VIP's own address"),
    "backend-is-another-vip": (
        lambda: GOOD.replace("address: 10.200.0.10", "address: 10.200.0.11", 1)
        .replace(f"address: {BE1}", "address: 10.200.0.10", 1), "is the address of vips[1]"),
    "backend-loopback": (lambda: _backend_at("127.0.0.1"), "is a loopback address"),
}


def write_hostile(path: Path, name: str) -> str:
    """Write hostile file ``name`` to ``path``; return the fragment its message must hold."""
    make, fragment = HOSTILE[name]
    content = make()
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return fragment


def assert_refused(stderr: str, path: Path, fragment: str) -> None:
    assert "Traceback" not in stderr, stderr
    # FILE:LINE: for a problem at a place, FILE: for a limit on the whole file.
    where = rf"^{re.escape(str(path))}(:\d+)?: .*{re.escape(fragment)}"
    assert re.search(where, stderr, re.MULTILINE), stderr[-2000:]


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_check_config_refuses(tmp_path: Path, name: str) -> None:
    path = tmp_path / "pool.yaml"
    fragment = write_hostile(path, name)
    t0 = time.monotonic()
    p = subprocess.run([str(XDPLB), "check-config", str(path)], capture_output=True,
                       text=True, timeout=TIME_LIMIT, preexec_fn=_limits)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert_refused(p.stderr, path, fragment)
    assert time.monotonic() - t0 < TIME_LIMIT / 2


# --- in a lab, while traffic flows ----------------------------------------------------------

STREAMS = 6


class Running:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.config = tmp / "pool.yaml"
        self.config.write_text(GOOD)
        self.agent = AgentProcess(lab, self.config)
        self.log = tmp / "traffic.jsonl"
        self.traffic = lab.popen(
            lab.client_ns, sys.executable, str(HERE / "traffic.py"), "--vip", VIP,
            "--log", str(self.log), "--streams", str(STREAMS), "--rate", "5",
            "--duration", "150")

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.traffic.terminate()
        self.traffic.wait(30)
        self.agent.stop()

    def events(self, kind: str) -> list[dict]:
        text = self.log.read_text() if self.log.exists() else ""
        return [e for line in text.splitlines() if (e := json.loads(line))["ev"] == kind]

    def wait_for_streams(self, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while len(self.events("stream")) < STREAMS and time.time() < deadline:
            time.sleep(0.2)
        assert len(self.events("stream")) == STREAMS, self.events("break")

    def maps(self) -> list[dict]:
        """What status shows of the maps, without the counters (traffic moves those)."""
        return [{k: v for k, v in g.items() if k != "counters"}
                for g in status(self.lab)["groups"]]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with Lab(topology="one-armed", backends=2, prefix="xlt-hc") as lab, Running(lab, tmp) as r:
        r.wait_for_streams()
        yield r


@pytest.mark.root
def test_reload_refuses_hostile_files_while_traffic_flows(running: Running) -> None:
    before = running.maps()
    rejected = running.agent.log_text().count("reload rejected")
    for name in HOSTILE:
        fragment = write_hostile(running.config, name)
        try:
            r = xdplb(running.lab, "reload", check=False)
            assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
            assert_refused(r.stderr, running.config, fragment)
            # The agent itself, told by SIGHUP (no check by the CLI first).
            running.agent.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 15
            while (running.agent.log_text().count("reload rejected") <= rejected
                   and time.time() < deadline):
                time.sleep(0.1)
            rejected += 1
            assert running.agent.log_text().count("reload rejected") == rejected, name
            assert running.agent.proc.poll() is None, running.agent.log_text()[-3000:]
            assert running.maps() == before, name
        finally:
            running.config.write_text(GOOD)
    assert "Traceback" not in running.agent.log_text()
    assert running.events("break") == []
    beating = {e["id"] for e in running.events("beat") if e["t"] > time.time() - 2}
    assert len(beating) == STREAMS  # every stream still moves data
    assert "reloaded" in xdplb(running.lab, "reload").stdout  # and a good file still applies


@pytest.mark.root
def test_1024_vips_balanced_while_traffic_flows(running: Running) -> None:
    """A reload to 1,024 VIPs (the lab's two and 1,022 more, at the default table size:
    128 MiB of rings) applies, and the last VIP balances; then back to two, the rings freed.
    The streams never break."""
    many = _many_vips(1022)
    running.config.write_text(pool_yaml(Vip("web", 80, (BE1, BE2)),
                                        Vip("stream", 7000, (BE1, BE2)), *many))
    try:
        t0 = time.monotonic()
        xdplb(running.lab, "reload", timeout=120)
        applied_s = time.monotonic() - t0
        vips = status(running.lab)["groups"][0]["vips"]
        assert len(vips) == 1024
        last = many[-1]
        for v in (last, many[0], many[511]):
            body = running.lab.http_get(running.lab.client_ns, v.address, v.port)
            assert BE1 in body, (v, body[-300:])
    finally:
        running.config.write_text(GOOD)
    xdplb(running.lab, "reload", timeout=120)
    assert len(status(running.lab)["groups"][0]["vips"]) == 2
    assert running.events("break") == []
    assert running.agent.proc.poll() is None
    assert applied_s < 60, applied_s


@pytest.mark.root
def test_reload_refuses_a_backend_at_the_balancers_address(running: Running) -> None:
    before = running.maps()
    good = running.config.read_text()
    running.config.write_text(_backend_at(running.lab.lb_backend_addr))
    r = None
    try:
        r = xdplb(running.lab, "reload", check=False)
    finally:
        running.config.write_text(good)
        if r is not None and r.returncode == 0:  # applied: put the good one back
            xdplb(running.lab, "reload")
    assert r is not None and r.returncode == 2, r
    assert_refused(r.stderr, running.config, "is an address of this balancer")
    assert running.maps() == before
