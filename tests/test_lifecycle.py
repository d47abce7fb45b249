"""Agent lifecycle in namespaces: generic mode, --keep, re-adopting pinned maps, detach."""

from __future__ import annotations

import re

import pytest
from agent_process import AgentProcess, status, xdplb
from lab import Lab
from pools import BE1, BE2, VIP, Vip, pool_yaml

pytestmark = pytest.mark.root

POOL = pool_yaml(Vip("web", 80, (BE1, BE2)))


def served(lab: Lab, n: int) -> list[str]:
    out = lab.run(lab.client_ns, "sh", "-c",
                  f"for i in $(seq {n}); do curl -s --noproxy '*' -m 2 http://{VIP}/;"
                  " done", timeout=60, check=False).stdout
    return re.findall(r"backend=(\S+)", out)


def test_keep_readopt_and_detach(tmp_path):
    with Lab(topology="one-armed", backends=2, prefix="xlt-lc") as lab:
        pool = tmp_path / "pool.yaml"
        pool.write_text(POOL)
        agent = AgentProcess(lab, pool, "--mode", "generic", "--keep")
        (g,) = status(lab)["groups"]
        assert g["interfaces"][0]["mode"] == "generic"
        assert len(served(lab, 10)) == 10
        assert agent.stop() == 0

        # --keep: the program goes on balancing without its agent; status reads the pins.
        (g,) = status(lab)["groups"]
        assert g["interfaces"][0]["attached"]
        flows_before = g["counters"]["new_flow"]
        assert len(served(lab, 10)) == 10
        assert status(lab)["groups"][0]["counters"]["new_flow"] == flows_before + 10

        # A new agent re-adopts the pinned maps (counters carry on) and replaces the program
        # in place, keeping the mode it runs in.
        agent2 = AgentProcess(lab, pool, "--keep")
        (g2,) = status(lab)["groups"]
        assert g2["prog_id"] != g["prog_id"]
        assert g2["interfaces"][0]["mode"] == "generic"
        assert g2["counters"]["new_flow"] >= flows_before + 10
        assert agent2.stop() == 0

        # detach removes program and pins; a second detach has nothing to do.
        r = xdplb(lab, "detach", "eth0")
        assert "detached program" in r.stdout and "removed pins" in r.stdout
        assert xdplb(lab, "status", check=False).returncode == 3
        assert xdplb(lab, "detach", "eth0", check=False).returncode == 3
        assert "prog/xdp" not in lab.run(lab.lb_ns, "ip", "-d", "link", "show", "eth0").stdout
        assert served(lab, 2) == []  # nothing balances the VIP any more
