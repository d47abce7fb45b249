"""One owner per interface (issue: a balancer that runs as a service): a second attach is
refused, simultaneous attaches cannot both win, `detach` of a running agent's interface stops
it, the agent notices its program vanishing, and `detach --all` removes what a killed agent
left in a deleted namespace."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from agent_process import XDPLB, AgentProcess, status, xdplb
from lab import Lab, run_command
from pools import BE1, BE2, Vip, pool_yaml

from xdplb.instance import pins
from xdplb.kernel import bpfsys

pytestmark = pytest.mark.root

POOL = pool_yaml(Vip("web", 80, (BE1, BE2)))


def attach_cmd(lab: Lab, config: Path) -> list[str]:
    return [str(XDPLB), "--netns", lab.lb_ns, "attach", "eth0", "--config", str(config)]


def memlock_mb(group: Path) -> float:
    """Kernel memory the pinned maps hold (fdinfo's memlock), MB."""
    total = 0
    for p in group.iterdir():
        if p.name == pins.PROG_PIN:
            continue
        fd = bpfsys.obj_get(p)
        try:
            text = Path(f"/proc/self/fdinfo/{int(fd)}").read_text()
            total += int(re.search(r"memlock:\s+(\d+)", text)[1])
        finally:
            bpfsys.close(fd)
    return total / 1e6


def test_one_owner_per_interface(tmp_path):
    config = tmp_path / "pool.yaml"
    config.write_text(POOL)
    with Lab(topology="one-armed", backends=2, prefix="xlt-svco") as lab:
        # Two attaches at once: exactly one wins, the other is refused without harm.
        logs = [tmp_path / f"race{i}.log" for i in range(2)]
        procs = [subprocess.Popen(attach_cmd(lab, config), stdout=subprocess.DEVNULL,
                                  stderr=log.open("w")) for log in logs]
        try:
            deadline = time.time() + 60
            while time.time() < deadline and not any("attached to" in log.read_text()
                                                     for log in logs):
                time.sleep(0.2)
            time.sleep(1)
            codes = [p.poll() for p in procs]
            assert sorted(codes, key=str) == [2, None], (codes, [x.read_text() for x in logs])
            loser = logs[codes.index(2)].read_text()
            assert "eth0 is in use by" in loser and "Traceback" not in loser, loser
            (g,) = status(lab)["groups"]
            winner = procs[codes.index(None)]
            assert g["agent"]["pid"] == winner.pid and g["interfaces"][0]["attached"]

            # A second attach while it runs: refused, exit 2, naming the agent.
            r = run_command(attach_cmd(lab, config), check=False, timeout=60)
            assert r.returncode == 2 and f"agent pid {winner.pid}" in r.stderr, r.stderr

            # Its program vanishes: the agent says so, in its log and in status.
            lab.run(lab.lb_ns, "ip", "link", "set", "dev", "eth0", "xdp", "off")
            time.sleep(2.5)
            (g,) = status(lab)["groups"]
            assert "no XDP program" in g["agent"]["program_lost"]["eth0"], g["agent"]
            log = logs[codes.index(None)].read_text()
            assert "eth0: xdplb's program is no longer attached" in log

            # `detach` of its interface stops it cleanly, then removes what is left.
            r = xdplb(lab, "detach", "eth0")
            assert f"stopped the running agent pid {winner.pid}" in r.stdout, r.stdout
            assert winner.wait(5) == 0
            assert xdplb(lab, "status", check=False).returncode == 3
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def test_detach_all_after_kill9_and_namespace_deleted(tmp_path):
    config = tmp_path / "pool.yaml"
    config.write_text(POOL)  # default sizes: a million flows
    with Lab(topology="one-armed", backends=2, prefix="xlt-svck") as lab:
        agent = AgentProcess(lab, config)
        (g,) = status(lab)["groups"]
        group = Path(g["pin_dir"])
        agent.kill9()
        lab.run(None, "ip", "netns", "del", lab.lb_ns)
        assert group.is_dir()
        held = memlock_mb(group)
        # No namespace: nothing can be named there any more; --all finds it from anywhere.
        r = run_command([str(XDPLB), "detach", "--all"], timeout=60)
        assert f"removed pins {group} (namespace {lab.lb_ns} is gone)" in r.stdout, r.stdout
        assert not group.exists()
        r = run_command([str(XDPLB), "detach", "--all"], check=False, timeout=60)
        assert str(group) not in r.stdout
        print(f"pins of a killed agent in a deleted namespace held {held:.0f} MB; removed")
        assert held > 100
