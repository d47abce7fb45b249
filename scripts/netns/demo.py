#!/usr/bin/env python3
"""The xdplb demo: nginx's classic weighted upstream, balanced in the NIC driver.

Builds a namespace lab, attaches xdplb to the LB's eth0 with weights 3 and 1, makes 400 new
HTTP connections with curl through the VIP, prints how many each backend served, the client
address the backends saw and the balancer's counters, and tears everything down (also on
Ctrl-C or failure).

``--scheduler`` picks the VIP's scheduler (default maglev; ``wrr`` is nginx's smooth weighted
round robin: exactly 300 and 100 of 400 connections).

``--forwarding`` picks the forwarding mode (pool.yaml's ``forwarding``/``encap``):

- ``nat`` (default): the one-armed lab; backends answer through the LB (their gateway).
- ``fullnat``, ``dsr-l2``, ``dsr-ipip``: the routed lab, where backends answer through a
  router, past the LB. fullnat: the backends see the LB's address. dsr: the VIP on the
  backends' lo, they see the client's address and answer it directly (the router's counters
  show who sent the replies); dsr-ipip also attaches `xdplb decap` to every backend's eth0.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_process import XDPLB, AgentProcess, xdplb  # noqa: E402
from lab import Lab, run_command  # noqa: E402
from pools import BE1, BE2, VIP, Backend, Vip, pool_yaml  # noqa: E402

FORWARDING = ("nat", "fullnat", "dsr-l2", "dsr-ipip")
SCHEDULERS = ("maglev", "wrr", "rr", "random", "source-hash", "least-conn")


def demo_pool(forwarding: str, scheduler: str = "maglev") -> str:
    mode: dict[str, str] = {"scheduler": scheduler}
    if forwarding != "nat":
        mode["forwarding"] = forwarding.split("-")[0]
    if forwarding.startswith("dsr-"):
        mode["encap"] = forwarding.removeprefix("dsr-")
    return pool_yaml(Vip("web", 80, (Backend(BE1, weight=3), Backend(BE2, weight=1)), **mode))


def decap(lab: Lab, ns: str, *args: str) -> str:
    return run_command([str(XDPLB), "--netns", ns, "decap", *args], timeout=120).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=400)
    ap.add_argument("--mode", choices=("native", "generic", "auto"), default="native",
                    help="XDP attach mode")
    ap.add_argument("--forwarding", choices=FORWARDING, default="nat",
                    help="forwarding mode of the VIP (non-nat: the routed lab)")
    ap.add_argument("--scheduler", choices=SCHEDULERS, default="maglev",
                    help="the VIP's scheduler (wrr: nginx's order, exactly 300/100 of 400)")
    args = ap.parse_args()
    n = max(1, min(args.connections, 10000))  # bounded: this is a demo, not a load test
    fw = args.forwarding
    routed = fw != "nat"
    lab_kw = {"backend_vips": (VIP,)} if fw.startswith("dsr-") else {}

    with tempfile.TemporaryDirectory(prefix="xdplb-demo-") as tmp, \
            Lab(topology="routed" if routed else "one-armed", backends=2, prefix="xldemo",
                **lab_kw) as lab:  # fmt: skip
        pool = Path(tmp) / "pool.yaml"
        pool.write_text(demo_pool(fw, args.scheduler))
        print(f"lab up ({lab.topology}): client {lab.client_addr} -> VIP {VIP}:80 -> "
              f"backends {', '.join(lab.backend_addrs)} (weights 3:1), forwarding {fw}, "
              f"scheduler {args.scheduler}")
        decapped = []
        try:
            if fw == "dsr-ipip":
                for ns in lab.backend_ns:
                    decap(lab, ns, "attach", "eth0")
                    decapped.append(ns)
                print(f"xdplb decap attached to eth0 of {', '.join(lab.backend_ns)}")
            with AgentProcess(lab, pool, "--mode", args.mode) as agent:
                print(f"xdplb attached to {lab.lb_ns}/eth0 ({args.mode} XDP)")
                if routed:
                    lab.reset_router_counts()
                script = (f"for i in $(seq {n}); do curl -s --noproxy '*' -m 5 "
                          f"http://{VIP}/; done")
                out = lab.run(lab.client_ns, "sh", "-c", script, timeout=30 + n).stdout
                found = re.findall(r"backend=(\S+) addr=(\S+) client=([\d.]+):", out)
                served = Counter((name, addr) for name, addr, _ in found)
                clients = Counter(c for _, _, c in found)
                total = sum(served.values())
                print(f"\n{total}/{n} connections answered:")
                for (name, addr), count in sorted(served.items()):
                    print(f"  {name} {addr:<12} {count:4d}  ({100 * count / max(total, 1):.1f}%)")
                seen = ", ".join(f"{c} ({k})" for c, k in clients.most_common())
                print(f"client address the backends saw: {seen or '-'}")
                if routed:
                    counts = lab.router_counts()
                    print("replies the router forwarded to the client: "
                          f"{counts['via_lb']['packets']} from the LB, "
                          f"{counts['from_backends']['packets']} straight from backends")
                print("\nxdplb status:")
                print(xdplb(lab, "status").stdout)
                rc = agent.stop()
                print(f"agent stopped (exit {rc}); tearing the lab down")
        finally:
            for ns in decapped:
                decap(lab, ns, "detach", "eth0")
        return 0 if total == n and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
