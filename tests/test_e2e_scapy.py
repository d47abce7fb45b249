"""End to end with ``--datapath scapy``: the e2e checks of test_e2e.py (imported, so they run
here against this module's agent), one-armed and two-armed, with the agent unable to import
BCC; and what only the userspace path can get wrong: nothing duplicated, nothing leaked
with a backend's source address, no ICMP from the kernel, the nftables guard removed on exit
and by `xdplb detach` after a crash."""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from agent_process import AgentProcess, xdplb
from lab import Lab
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.utils import rdpcap
from test_e2e import (  # noqa: F401 (collected here, run against the scapy agent)
    POOL,
    VIP,
    curl,
    e2e_pool,
    prog_ids,
    test_bad_config_changes_nothing,
    test_long_transfers_intact,
    test_replies_come_from_the_vip,
    test_udp_through_vip,
)
from testkit.pktcheck import checksum_errors

from xdplb.instance import pins, runfiles
from xdplb.userspace.forwarder import STATS_FILE

pytestmark = pytest.mark.root

# The agent as `xdplb`, but in an interpreter where `import bcc` fails.
NO_BCC = [sys.executable, "-c",
          "import sys; sys.modules['bcc'] = None; from xdplb.cli.main import main; main()"]

UDP_BURST = """
import socket, sys, time
socks = []
for i in range(int(sys.argv[1])):  # a new flow per socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.sendto(b"req%d" % i, ("10.200.0.10", 5000))
    socks.append(s)
replies = [[] for _ in socks]
end = time.monotonic() + 2
while time.monotonic() < end:
    for i, s in enumerate(socks):
        try:
            data, peer = s.recvfrom(2048)
            replies[i].append("%s:%d" % peer)
        except BlockingIOError:
            pass
    time.sleep(0.01)
print(" ".join(str(len(r)) + "@" + ",".join(sorted(set(r))) for r in replies))
"""


def nft_ruleset(lab: Lab) -> str:
    return lab.run(lab.lb_ns, "nft", "list", "ruleset").stdout


def stats(lab: Lab) -> dict:
    """What the scapy forwarder publishes (counters, frames forwarded), read fresh."""
    path = runfiles.run_dir(pins.group_for(lab.lb_ifaces, ns=lab.lb_ns)) / STATS_FILE
    deadline = time.time() + 5
    while not path.exists() and time.time() < deadline:  # first published a second in
        time.sleep(0.1)
    first = json.loads(path.read_text())["time"]
    while time.time() < deadline:  # published every second: wait for a newer one
        data = json.loads(path.read_text())
        if data["time"] > first:
            return data
        time.sleep(0.1)
    raise TimeoutError(f"{path} not updated")


@pytest.fixture(scope="module", params=["one-armed", "two-armed"])
def running(request, tmp_path_factory):
    topo = request.param
    prefix = "xlt-s1" if topo == "one-armed" else "xlt-s2"
    tmp = tmp_path_factory.mktemp(f"scapy-{topo}")
    with Lab(topology=topo, backends=2, prefix=prefix) as lab:
        pool = tmp / "pool.yaml"
        pool.write_text(POOL)
        agent = AgentProcess(lab, pool, "--datapath", "scapy", exe=NO_BCC)
        try:
            yield lab, agent, tmp
        finally:
            rc = agent.stop()
            assert rc == 0, agent.log_text()
            # Gone without a trace: no guard, no published state, nothing attached.
            assert "xdplb" not in nft_ruleset(lab)
            assert not (runfiles.run_dir(pins.group_for(lab.lb_ifaces, ns=lab.lb_ns))
                        / STATS_FILE).exists()
            assert all(v is None for v in prog_ids(lab).values())


def test_no_xdp_program_and_a_guard_per_interface(running):
    lab, agent, _ = running
    assert all(v is None for v in prog_ids(lab).values())
    rules = nft_ruleset(lab)
    for dev in lab.lb_ifaces:
        assert f'hook ingress device "{dev}"' in rules
    assert "10.200.0.10 . tcp . 80" in rules and "10.20.0.12 . tcp . 8080" in rules
    assert "scapy" in agent.log_text() and "Traceback" not in agent.log_text()


def test_http_weighted_split_through_userspace(running):
    lab, _, _ = running
    before = stats(lab)
    lines = curl(lab, "/", 200)
    assert len(lines) == 200, lines[-5:]
    served = Counter(re.search(r"backend=(\S+)", line).group(1) for line in lines)
    assert 0.6 < served["be1"] / 200 < 0.9, served  # weights 3:1
    assert all("client=10.10.0.2:" in line for line in lines)
    after = stats(lab)
    c0, c1 = before["counters"], after["counters"]
    assert c1["new_flow"] - c0["new_flow"] >= 200
    fwd = "tx" if lab.topology == "one-armed" else "redirect"
    assert c1[fwd] - c0[fwd] > 1000  # every packet of 200 connections, both ways
    assert after["forwarder"]["errors"] == 0


def test_gro_aggregates_are_forwarded_as_wire_frames(running):
    """With GRO on the LB's interfaces (the default on most NICs), the tap receives 64 KB
    aggregates instead of the frames that were on the wire: they must be cut back into
    those, not dropped for being larger than the MTU."""
    lab, _, tmp = running
    def gro(state: str) -> None:
        lab.run(lab.lb_ns, "sh", "-c",
                " && ".join(f"ethtool -K {dev} gro {state}" for dev in lab.lb_ifaces))

    gro("on")
    try:
        before = stats(lab)
        test_long_transfers_intact(running)
        after = stats(lab)
    finally:
        gro("off")
    fwd = after["forwarder"]
    assert fwd["errors"] == 0, fwd
    assert fwd["aggregates"] > before["forwarder"]["aggregates"], fwd  # GRO did happen


def test_exactly_one_reply_per_request_and_no_leak(running):
    """tcpdump on the client: every UDP request answered once, every TCP connection gets one
    SYN-ACK, all from the VIP; not one frame from a backend address, no ICMP."""
    lab, _, tmp = running
    cap = Path("/tmp") / f"xlt-s-client-{lab.prefix}.pcap"  # visible to tcpdump's netns
    dump = lab.popen(lab.client_ns, "tcpdump", "-i", "eth0", "-n", "-U", "-w", str(cap),
                     "ip")
    try:
        time.sleep(1)
        out = lab.run(lab.client_ns, sys.executable, "-c", UDP_BURST, "40", timeout=60).stdout
        n = 30
        assert len(curl(lab, "/", n)) == n
        time.sleep(1)
    finally:
        dump.terminate()
        dump.wait(10)
    counts = out.split()
    assert counts == [f"1@{VIP}:5000"] * 40, counts
    pkts = [p for p in rdpcap(str(cap)) if IP in p and p[IP].dst == lab.client_addr]
    cap.unlink()
    assert not [p for p in pkts if p[IP].src in lab.backend_addrs], "backend address leaked"
    assert not [p for p in pkts if ICMP in p], "the kernel answered"
    synacks = Counter(p[TCP].dport for p in pkts if TCP in p and p[TCP].flags == "SA")
    assert len(synacks) == n and set(synacks.values()) == {1}, synacks
    assert all(p[IP].src == VIP for p in pkts if TCP in p or UDP in p)
    assert [checksum_errors(bytes(p)) for p in pkts] == [[]] * len(pkts)


def test_runs_without_bcc(running):
    """The agent under test cannot import BCC (and the wrapper really hides it)."""
    lab, agent, _ = running
    assert agent.proc.args[:2] == NO_BCC[:2]
    probe = lab.run(None, *NO_BCC[:2], "import sys; sys.modules['bcc'] = None\n"
                    "from xdplb.kernel.loader import CompileError, compile_program\n"
                    "try:\n    compile_program(1024)\nexcept CompileError as e:\n"
                    "    print(e)", check=True)
    assert "BCC is not importable" in probe.stdout


def test_detach_removes_the_guard_after_a_crash(tmp_path):
    with Lab(topology="one-armed", backends=1, prefix="xlt-sc") as lab:
        pool = tmp_path / "pool.yaml"
        pool.write_text(e2e_pool(backends=1))
        agent = AgentProcess(lab, pool, "--datapath", "scapy", exe=NO_BCC)
        assert len(curl(lab, "/", 3)) == 3
        agent.kill9()
        assert "xdplb_scapy" in nft_ruleset(lab)  # left behind: VIP traffic is dropped
        assert curl(lab, "/", 1, "-m", "2") == []
        r = xdplb(lab, "detach", "eth0")
        assert "removed nftables table" in r.stdout
        assert "xdplb" not in nft_ruleset(lab)
        assert xdplb(lab, "detach", "eth0", check=False).returncode == 3  # nothing left
        # The BPF path takes over the same interface afterwards.
        with AgentProcess(lab, pool, "--mode", "native"):
            assert len(curl(lab, "/", 3)) == 3
