"""Backup servers (``backup: true``), with real connections, on both data paths: while the
primary is up the backup takes no new flow; when the primary's health check fails new
connections go to the backup; when it is back, new connections go to the primary again while
the streams that started on the backup go on there (the flow table wins).

The choice is the agent's (the VIP's ring holds the serving set only), so both data paths
follow it by reading the same maps; the test holds each to it.
"""

from __future__ import annotations

import json
import time

import pytest
from agent_process import AgentProcess, xdplb
from lab import Lab
from pools import BACKUP_STREAM, BACKUP_WEB, BE2, VIP, pool_yaml
from testkit.streams import Traffic

from xdplb.instance import pins, runfiles

pytestmark = pytest.mark.root


def serving(lab: Lab) -> str | None:
    """web's serving set as the agent publishes it (the readers need pins, which the scapy
    data path has none of)."""
    return runfiles.pool(pins.group_for(lab.lb_ifaces, ns=lab.lb_ns)).get("web", {}).get(
        "serving")


def wait_serving(lab: Lab, role: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while serving(lab) != role:
        assert time.time() < deadline, serving(lab)
        time.sleep(0.2)


def answered_by(lab: Lab, n: int = 12) -> set[str]:
    return {lab.http_get(lab.client_ns, VIP).split("backend=", 1)[1].split()[0]
            for _ in range(n)}


@pytest.mark.parametrize("datapath", ["bpf", "scapy"])
def test_backup_takes_over_and_hands_back(datapath, tmp_path):
    with Lab(topology="one-armed", backends=2, prefix=f"xlt-bk{datapath[0]}") as lab:
        config = tmp_path / "pool.yaml"
        config.write_text(pool_yaml(BACKUP_WEB, BACKUP_STREAM, table_size=251))
        extra = ("--datapath", "scapy") if datapath == "scapy" else ()
        bpf = datapath == "bpf"  # the readers (backends, status, flows) read its pins
        with AgentProcess(lab, config, *extra) as agent:
            wait_serving(lab, "primary")
            if bpf:
                rows = json.loads(xdplb(lab, "backends", "--json").stdout)["backends"]
                backup = next(r for r in rows if r["vip"] == "web" and r["address"] == BE2)
                assert (backup["backup"], backup["maglev_slots"]) == (True, 0)
            assert answered_by(lab) == {"be1"}

            lab.stop_backend("be1")  # its health check fails: no primary is up
            wait_serving(lab, "backup")
            assert answered_by(lab) == {"be2"}
            assert not bpf or "backup, serving" in xdplb(lab, "status").stdout
            assert "no primary backend is up" in agent.log_text()
            traffic = Traffic(lab, VIP, tmp_path / "traffic.jsonl", streams=4, rate=5)
            try:
                streams = traffic.wait_streams()
                assert set(streams.values()) == {"be2"}

                lab.start_backend("be1")  # back: new flows to it, the backup's streams stay
                wait_serving(lab, "primary")
                since = time.time()
                assert answered_by(lab) == {"be1"}
                time.sleep(2)
                assert not traffic.breaks(), traffic.breaks()
                assert traffic.wait_streams() == streams
                assert {e["id"] for e in traffic.events("beat", since)} == set(streams)
                if bpf:
                    flows = [json.loads(line) for line in xdplb(
                        lab, "flows", "--json", "--vip", "stream").stdout.splitlines()]
                    assert flows and {(f["backend"], f["backup"]) for f in flows} == {(BE2, True)}
                    assert "(backup)" in xdplb(lab, "flows", "--vip", "stream").stdout
            finally:
                traffic.stop()
            assert "a primary backend is up again" in agent.log_text()
