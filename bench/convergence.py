#!/usr/bin/env python3
"""Route convergence of a BGP fleet: how long the router takes to move a node's share away.

In the BGP lab (scripts/netns/bgplab.py: three balancer nodes, each with its own xdplb agent
and ExaBGP, peering with BIRD on the router; hold time 3 s, keepalive 1 s), for one node at a
time, ``--runs`` times each, the time from the event to the router's kernel route to the VIP
losing (or regaining) that node's next hop, polled every 10 ms:

- **graceful**: SIGTERM of the agent, which withdraws before it detaches (``--drain-time``);
- **killed**: ``kill -9`` of the agent (its speaker dies with it and the kernel closes the
  BGP session: the router sees the FIN);
- **silent**: the node's BGP packets dropped at the router (a node that hangs or loses its
  link without a word): only the hold timer tells;
- **back**: the agent started again, until its next hop is back (attach, a health check
  passed, the session up, the announcement).

Writes bench/out/convergence.json; the lab, the agents and their pins are removed on any exit.

    sudo .venv/bin/python bench/convergence.py [--runs K]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401 (first: puts the lab modules on sys.path)

# isort: split
from agent_process import AgentProcess
from bgplab import NODE_ASN, ROUTER_ASN, BgpLab
from common import save
from pools import fleet_yaml

VIP = "10.200.0.10"
HOLD_TIME = 3
POLL_S = 0.01
TIMEOUT_S = 30.0
NFT_TABLE = "xlt_conv"


def _until(lab: BgpLab, vip: str, test: Any, t0: float) -> float:
    """Seconds from ``t0`` until the router's next hops to ``vip`` pass ``test``."""
    while not test(lab.next_hops(vip)):
        if time.monotonic() - t0 > TIMEOUT_S:
            raise TimeoutError(f"router next hops {lab.next_hops(vip)} after {TIMEOUT_S}s")
        time.sleep(POLL_S)
    return time.monotonic() - t0


def _silence(lab: BgpLab, addr: str, on: bool) -> None:
    """Drop (or stop dropping) the node's BGP packets at the router, both ways."""
    if not on:
        lab.run(lab.router_ns, "nft", "delete", "table", "inet", NFT_TABLE, check=False)
        return
    rules = (f"table inet {NFT_TABLE} {{\n"
             "  chain in { type filter hook input priority -10; "
             f"ip saddr {addr} tcp dport 179 drop; ip saddr {addr} tcp sport 179 drop; }}\n"
             "  chain out { type filter hook output priority -10; "
             f"ip daddr {addr} tcp dport 179 drop; ip daddr {addr} tcp sport 179 drop; }}\n"
             "}\n")
    lab.run(lab.router_ns, "nft", "-f", "-", input=rules)


def measure(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="xlt-conv-") as tmp, \
            BgpLab(nodes=3, backends=2, prefix="xlb-cv", vips=(VIP,),
                   hold_time=HOLD_TIME) as lab:
        config = Path(tmp) / "pool.yaml"
        config.write_text(fleet_yaml(lab.router_backend_addr, router_asn=ROUTER_ASN,
                                     asn=NODE_ASN, hold_time=f"{HOLD_TIME}s"))
        agents = {ns: AgentProcess(lab, config, ns=ns) for ns in lab.node_ns}
        every = set(lab.node_addrs)
        lab.wait_next_hops(VIP, every, timeout=60)
        results: dict[str, list[float]] = {"graceful": [], "killed": [], "silent": [],
                                           "back": []}
        try:
            for i in range(runs):
                ns = lab.node_ns[i % len(lab.node_ns)]
                addr = lab.node_addrs[lab.node_ns.index(ns)]

                def gone(hops: set[str], addr: str = addr) -> bool:
                    return addr not in hops and bool(hops)

                for how in ("graceful", "killed", "silent"):
                    t0 = time.monotonic()
                    if how == "graceful":
                        agents[ns].proc.send_signal(15)
                    elif how == "killed":
                        agents[ns].kill9()
                    else:
                        _silence(lab, addr, True)
                    results[how].append(_until(lab, VIP, gone, t0))
                    if how == "silent":
                        _silence(lab, addr, False)
                    else:
                        agents[ns].stop()
                        t0 = time.monotonic()
                        agents[ns] = AgentProcess(lab, config, ns=ns)
                        results["back"].append(_until(lab, VIP, lambda h: h == every, t0))
                    lab.wait_next_hops(VIP, every, timeout=60)
        finally:
            _silence(lab, lab.node_addrs[0], False)
            for a in agents.values():
                a.stop()
    out = {k: {"median_s": round(statistics.median(v), 3), "max_s": round(max(v), 3),
               "runs": len(v)} for k, v in results.items()}
    return {"hold_time_s": HOLD_TIME, "keepalive_s": 1, "poll_s": POLL_S, "events": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    res = measure(args.runs)
    for k, v in res["events"].items():
        print(f"{k:9s} median {v['median_s'] * 1e3:7.0f} ms, max {v['max_s'] * 1e3:7.0f} ms "
              f"({v['runs']} runs)")
    save("convergence", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
