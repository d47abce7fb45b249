"""The agent survives its own errors (issue: a balancer that runs as a service): an error in
each kind of event (a map write, a health result, a reload, a control command, a full state
directory) is logged and counted, the data path keeps forwarding with the last state, and the
agent recovers and serves the next event. Map, health, reload and control faults are injected
with XDPLB_FAULTS (xdplb/agent/faults.py); the full state directory is a real one: /run on a
small tmpfs, filled up."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_process import AgentProcess, status, xdplb
from lab import Lab
from pools import BE1, BE2, BE3, VIP, Backend, HealthCheck, Vip, pool_yaml
from testkit.streams import Traffic

pytestmark = pytest.mark.root

HC = HealthCheck("tcp", interval="500ms", timeout="400ms", rise=2, fall=2)


def pool(be2_weight: int = 1) -> str:
    bes = (BE1, Backend(BE2, weight=be2_weight))
    # "spare" is on be3 alone: stopping be3 gives health events without touching the streams.
    return pool_yaml(Vip("web", 80, bes), Vip("stream", 7000, bes),
                     Vip("spare", 8080, (BE3,), health_check=HC))


def until(what: Callable[[], object], timeout: float = 10, msg: str = "") -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if got := what():
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {msg}")


class Faults:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("{}")

    def arm(self, point: str) -> None:
        self.path.write_text(json.dumps({point: 1}))

    def spent(self) -> bool:
        return not any(json.loads(self.path.read_text()).values())


@pytest.fixture
def world(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=755", "tmpfs", str(run)],
                   check=True)
    saved = {k: os.environ.get(k) for k in ("XDPLB_RUN_DIR", "XDPLB_FAULTS")}
    os.environ["XDPLB_RUN_DIR"] = str(run)
    os.environ["XDPLB_FAULTS"] = str(tmp_path / "faults.json")
    try:
        with Lab(topology="one-armed", backends=3, prefix="xlt-svcf") as lab:
            config = tmp_path / "pool.yaml"
            config.write_text(pool())
            faults = Faults(tmp_path / "faults.json")
            agent = AgentProcess(lab, config, "--keep")
            traffic = Traffic(lab, VIP, tmp_path / "traffic.jsonl")
            try:
                traffic.wait_streams()
                yield lab, agent, faults, traffic, config, run
            finally:
                traffic.stop()
                agent.stop()
                xdplb(lab, "detach", "eth0", check=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run(["umount", "-l", str(run)], check=False)


def weight(lab: Lab, port: int, addr: str) -> int:
    (g,) = status(lab)["groups"]
    return {(v["port"], b["address"]): b["weight"] for v in g["vips"]
            for b in v["backends"]}[(port, addr)]


def down(lab: Lab, addr: str) -> bool:
    (g,) = status(lab)["groups"]
    return next(b["down"] for v in g["vips"] for b in v["backends"] if b["address"] == addr)


def agent_errors(lab: Lab) -> dict:
    (g,) = status(lab)["groups"]
    return g["agent"]["errors_by_kind"] if g["agent"] else {}


def test_an_error_in_each_kind_of_event(world):
    lab, agent, faults, traffic, config, run = world
    t0 = time.time()

    # A map write fails (ENOMEM) in the middle of applying a drain: the command says so,
    # the loop writes the maps again a moment later, and the drain is in place.
    faults.arm("map_write")
    r = xdplb(lab, "drain", "web", BE1, check=False)
    assert r.returncode == 1 and "injected" in r.stderr and "Traceback" not in r.stderr, r
    until(lambda: weight(lab, 80, BE1) == 0, msg="the retry applies the drain")
    assert faults.spent() and "drains failed: [Errno 12]" in agent.log_text()

    # A control command fails (reading the drain list): same, then the next one is served.
    faults.arm("drains")
    r = xdplb(lab, "undrain", "web", BE1, check=False)
    assert r.returncode == 1 and "injected" in r.stderr, r
    until(lambda: weight(lab, 80, BE1) == 1, msg="the retry applies the undrain")
    assert "undrained" in xdplb(lab, "undrain", "web", BE1).stdout

    # A reload fails (reading the file): exit 1 (the agent failed, not the file); the next
    # reload is served.
    faults.arm("reload")
    r = xdplb(lab, "reload", check=False)
    assert r.returncode == 1 and "injected" in r.stderr, r
    assert "reloaded" in xdplb(lab, "reload").stdout

    # Handling a health result fails: the result is kept and applied by the retry.
    faults.arm("health")
    lab.stop_backend("be3")
    until(lambda: down(lab, BE3), msg="be3 marked down despite the failed event")
    assert "health failed" in agent.log_text()
    lab.start_backend("be3")
    until(lambda: not down(lab, BE3), msg="be3 up again, the next health event served")

    # The state directory is full (ENOSPC on /run): the maps are still written, the error is
    # counted once, and the run files come back once there is room.
    filler = run / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    config.write_text(pool(be2_weight=2))
    agent.proc.send_signal(1)  # SIGHUP: `xdplb reload` could not write its lock's answer
    until(lambda: weight(lab, 80, BE2) == 2, msg="reload applied with /run full")
    until(lambda: "state_dir failed" in agent.log_text(), msg="the full /run logged")
    filler.unlink()
    until(lambda: agent_errors(lab).get("state_dir") == 1, msg="agent.json written again")
    assert "reloaded" in xdplb(lab, "reload").stdout
    assert "writable again" in agent.log_text()

    errors = agent_errors(lab)
    assert errors == {"drains": 2, "reload": 1, "health": 1, "state_dir": 1}, errors
    (g,) = status(lab)["groups"]
    assert g["agent"]["errors"] == 5 and g["interfaces"][0]["attached"]
    assert agent.proc.poll() is None  # still serving
    assert traffic.breaks(t0) == []
    n, failed = traffic.failed_new(t0)
    assert n > 0 and len(failed) <= max(1, n // 50), failed[:5]
    print(f"{n} new connections ({len(failed)} failed), 0 streams broken, errors {errors}")
