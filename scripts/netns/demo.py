#!/usr/bin/env python3
"""The xdplb demo: nginx's classic weighted upstream, balanced in the NIC driver.

Builds the one-armed namespace lab (client, load balancer, two backends on one L2 segment),
attaches xdplb to the LB's eth0 with weights 3 and 1, makes 400 new HTTP connections with
curl through the VIP, prints how many each backend served and the balancer's counters, and
tears everything down (also on Ctrl-C or failure).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_process import AgentProcess, xdplb  # noqa: E402
from lab import Lab  # noqa: E402
from pools import BE1, BE2, VIP, Backend, Vip, pool_yaml  # noqa: E402

POOL = pool_yaml(Vip("web", 80, (Backend(BE1, weight=3), Backend(BE2, weight=1))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=400)
    ap.add_argument("--mode", choices=("native", "generic", "auto"), default="native")
    args = ap.parse_args()
    n = max(1, min(args.connections, 10000))  # bounded: this is a demo, not a load test

    with tempfile.TemporaryDirectory(prefix="xdplb-demo-") as tmp, \
            Lab(topology="one-armed", backends=2, prefix="xldemo") as lab:
        pool = Path(tmp) / "pool.yaml"
        pool.write_text(POOL)
        print(f"lab up: client {lab.client_addr} -> VIP {VIP}:80 -> "
              f"backends {', '.join(lab.backend_addrs)} (weights 3:1)")
        with AgentProcess(lab, pool, "--mode", args.mode) as agent:
            print(f"xdplb attached to {lab.lb_ns}/eth0 ({args.mode} XDP)")
            script = (f"for i in $(seq {n}); do curl -s --noproxy '*' -m 5 "
                      f"http://{VIP}/; done")
            out = lab.run(lab.client_ns, "sh", "-c", script, timeout=30 + n).stdout
            served = Counter(re.findall(r"backend=(\S+) addr=(\S+)", out))
            total = sum(served.values())
            print(f"\n{total}/{n} connections answered:")
            for (name, addr), count in sorted(served.items()):
                print(f"  {name} {addr:<12} {count:4d}  ({100 * count / max(total, 1):.1f}%)")
            print("\nxdplb status:")
            print(xdplb(lab, "status").stdout)
            rc = agent.stop()
            print(f"agent stopped (exit {rc}); tearing the lab down")
        return 0 if total == n and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
