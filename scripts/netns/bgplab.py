#!/usr/bin/env python3
"""The BGP lab: the routed lab with several balancer nodes that announce the VIPs to the
router over BGP, and the router spreading the VIP's traffic over them with ECMP.

::

    python scripts/netns/bgplab.py up [--prefix P] [--nodes 3] [--backends 2] [--agents]
    python scripts/netns/bgplab.py down [--prefix P]

```
 {P}-client         {P}-rt (BIRD, AS 65000)         {P}-sw
 eth0 10.10.0.2 -- eth0 10.10.0.1/24                  br0 --- p-lb1 -- {P}-lb1 eth0 10.20.0.1
                   eth1 10.20.0.254/24 ---- p-rt          --- p-lb2 -- {P}-lb2 eth0 10.20.0.2
                                                          --- p-lb3 -- {P}-lb3 eth0 10.20.0.3
                                            p-be1  p-be2 ...           (nodes: AS 65001)
                     {P}-be1 eth0 10.20.0.11, the VIPs on lo (dsr/l2), default via the router
```

The router runs BIRD 2 (its own files in the lab's run directory: ``bird -c CONF -s SOCK -P
PIDFILE``) with one eBGP session per node, ``merge paths`` in its kernel protocol (one route,
a next hop per announcing node) and an L4 multipath hash (policy 3, fields 0x37: on veth,
policy 1 reuses the sender's socket hash, which TCP re-rolls after a retransmission timeout,
so a flow would jump between nodes). The nodes have no xdplb agent: a test (or the user)
runs one per node, each with BGP to 10.20.0.254; ``up --agents`` starts them too, with
pools.py's fleet pool (``BgpLab.start_agents``), and ``down`` stops them. The backends are
DSR backends on the segment the nodes share (``encap: l2``), answering the client through
the router.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from agent_process import XDPLB
from lab import Lab, mac, teardown_prefix

ROUTER_ASN, NODE_ASN = 65000, 65001
NODE_NO = 0x20  # MACs of node i: 02:00:00:00:2i:00
MULTIPATH_SYSCTLS = ("net.ipv4.fib_multipath_hash_policy=3",
                     "net.ipv4.fib_multipath_hash_fields=0x37")


class BgpLab(Lab):
    """``nodes`` balancer namespaces ``{P}-lb1``... on the backends' segment, a BIRD router."""

    def __init__(self, nodes: int = 3, backends: int = 2, prefix: str = "xb",
                 vips: Sequence[str] = ("10.200.0.10",), hold_time: int = 3) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError(f"nodes must be 1..9, not {nodes}")
        self.node_names = [f"lb{i}" for i in range(1, nodes + 1)]
        self.node_ns = [f"{prefix}-{n}" for n in self.node_names]
        self.node_addrs = [f"10.20.0.{i}" for i in range(1, nodes + 1)]
        self.node_macs = [mac(NODE_NO + i, 0) for i in range(1, nodes + 1)]
        self.hold_time = hold_time
        super().__init__("routed", backends, prefix, backend_vips=vips)
        self.topology = "bgp"
        self.lb_ns = self.node_ns[0]  # what single-LB helpers (AgentProcess) default to
        self.xdp_peers = [(self.sw_ns, f"p-{n}") for n in self.node_names]
        self.bird_files = {k: self.runtime_dir / f"bird.{k}" for k in ("conf", "ctl", "pid",
                                                                       "log")}

    @property
    def namespaces(self) -> list[str]:
        return [self.client_ns, self.router_ns, *self.node_ns, self.sw_ns, *self.backend_ns]

    def _plan(self) -> list:
        veths = [v for v in super()._plan() if f"{self.prefix}-lb" not in (v.ns_a, v.ns_b)]
        for i, (ns, name, m) in enumerate(zip(self.node_ns, self.node_names, self.node_macs,
                                              strict=True), 1):
            veths.append(type(veths[0])(ns, "eth0", m, self.sw_ns, f"p-{name}",
                                        mac(0xFE, NODE_NO + i)))
        return veths

    def _configure(self, ns: str, lb_peers: set[tuple[str, str]]) -> list[list[str]]:
        if ns in self.node_ns:
            return self._configure_node(ns)
        cmds = super()._configure(ns, lb_peers)
        if ns == self.router_ns:
            # The VIP routes come from BGP, not from a static route to one LB; no counters.
            cmds = [c for c in cmds if c[:3] != ["ip", "route", "add"] and c[0] != "nft"]
            cmds.append(["sysctl", "-q", "-w", *MULTIPATH_SYSCTLS])
        return cmds

    def _configure_node(self, ns: str) -> list[list[str]]:
        sysctls = ["net.ipv4.ip_forward=1", "net.ipv6.conf.eth0.disable_ipv6=1"]
        for i in ("all", "default", "eth0"):
            # as the routed lab's LB: client sources arrive from the router, replies are not
            # ours; a one-armed node must not send ICMP redirects
            sysctls += [f"net.ipv4.conf.{i}.rp_filter=0", f"net.ipv4.conf.{i}.send_redirects=0"]
        addr = self.node_addrs[self.node_ns.index(ns)]
        return [["sysctl", "-q", "-w", *sysctls], ["ethtool", "-K", "eth0", "tx", "off"],
                ["ip", "addr", "add", f"{addr}/24", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "route", "add", "default", "via", self.router_backend_addr],
                # a VIP packet XDP passes up must not loop node -> router -> node
                ["ip", "route", "add", "unreachable", self.vip_net]]

    def _nft_script(self) -> str:
        return ""

    def _build(self) -> None:
        super()._build()
        self._start_bird()

    def bird_config(self) -> str:
        f = self.bird_files
        peers = "".join(
            f"protocol bgp {name} from node {{ neighbor {addr} as {NODE_ASN}; }}\n"
            for name, addr in zip(self.node_names, self.node_addrs, strict=True))
        return f"""log "{f['log']}" all;
router id {self.router_backend_addr};
protocol device {{ scan time 1; }}
protocol kernel {{
    ipv4 {{ import none; export all; }};
    merge paths on;  # one kernel route, one next hop per node announcing the VIP
}}
template bgp node {{
    local {self.router_backend_addr} as {ROUTER_ASN};
    hold time {self.hold_time}; keepalive time 1;
    connect delay time 1; connect retry time 1; error wait time 1, 2;
    ipv4 {{ import all; export none; }};
}}
{peers}"""

    def _start_bird(self) -> None:
        f = self.bird_files
        f["conf"].write_text(self.bird_config())
        self.bird = self.popen(self.router_ns, "bird", "-f", "-c", str(f["conf"]),
                               "-s", str(f["ctl"]), "-P", str(f["pid"]))
        deadline = time.monotonic() + 10
        while not f["ctl"].exists():
            if self.bird.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bird did not start: {f['log'].read_text(errors='replace')}"
                                   if f["log"].exists() else "bird did not start")
            time.sleep(0.05)

    def start_agents(self, pool_text: str, vip: str, timeout: float = 90) -> None:
        """An xdplb agent on every node with ``pool_text`` (written to the lab's run
        directory; logs there too), until ``vip`` has a next hop per node on the router.
        Tracked like the backends: ``down`` stops them."""
        cfg = self.runtime_dir / "pool.yaml"
        cfg.write_text(pool_text)
        for ns, name in zip(self.node_ns, self.node_names, strict=True):
            with open(self.runtime_dir / f"{name}.agent.log", "ab") as log:
                self.popen(None, str(XDPLB), "--netns", ns, "attach", "eth0", "--config",
                           str(cfg), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.wait_next_hops(vip, set(self.node_addrs), timeout=timeout)

    # -- what the router sees --------------------------------------------------------------

    def birdc(self, *args: str) -> str:
        return self.run(self.router_ns, "birdc", "-s", str(self.bird_files["ctl"]),
                        *args).stdout

    def sessions(self) -> dict[str, str]:
        """Node name -> BIRD's BGP state of its session (``Established``, ``Active``...)."""
        out = {}
        for line in self.birdc("show", "protocols").splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[0] in self.node_names and parts[1] == "BGP":
                out[parts[0]] = parts[5]
        return out

    def next_hops(self, vip: str) -> set[str]:
        """The next hops of the router's kernel route to ``vip``/32 (none: no route)."""
        out = self.run(self.router_ns, "ip", "-j", "route", "show", f"{vip}/32").stdout
        hops: set[str] = set()
        for r in json.loads(out or "[]"):
            hops |= {h["gateway"] for h in r.get("nexthops", [])}
            if "gateway" in r:
                hops.add(r["gateway"])
        return hops

    def wait_next_hops(self, vip: str, want: set[str], timeout: float = 20) -> float:
        """Wait until the router's route to ``vip`` has exactly ``want``; seconds it took."""
        start = time.monotonic()
        while (have := self.next_hops(vip)) != want:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"router next hops to {vip}: {sorted(have)}, not "
                                   f"{sorted(want)} after {timeout}s; sessions "
                                   f"{self.sessions()}")
            time.sleep(0.05)
        return time.monotonic() - start

    def ecmp_node(self, vip: str, sport: int, dport: int) -> str:
        """The node the router sends the client's TCP flow (sport -> vip:dport) to."""
        out = self.run(self.router_ns, "ip", "route", "get", vip, "from", self.client_addr,
                       "iif", "eth0", "ipproto", "tcp", "sport", str(sport), "dport",
                       str(dport)).stdout
        m = re.search(r"via (\S+)", out)
        if not m:
            raise LookupError(f"no route to {vip}: {out.strip()}")
        return self.node_names[self.node_addrs.index(m[1])]

    def describe(self) -> str:
        lines = [f"lab {self.prefix!r} (bgp, {len(self.node_ns)} nodes, "
                 f"{len(self.backend_names)} backends)",
                 f"  client  {self.client_ns} eth0 {self.client_addr}/24 default via "
                 f"{self.client_gw}",
                 f"  router  {self.router_ns} {self.router_client_addr}, "
                 f"{self.router_backend_addr} BIRD AS {ROUTER_ASN} (birdc -s "
                 f"{self.bird_files['ctl']})"]
        lines += [f"  node    {ns} eth0 {a}/24 AS {NODE_ASN}, peer {self.router_backend_addr}"
                  for ns, a in zip(self.node_ns, self.node_addrs, strict=True)]
        lines += [f"  backend {ns} eth0 {a}/24, lo {', '.join(self.backend_vips)}"
                  for ns, a in zip(self.backend_ns, self.backend_addrs, strict=True)]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="xdplb BGP/ECMP lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the lab (replacing one with the same prefix)")
    up.add_argument("--prefix", default="xb")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--backends", type=int, default=2)
    up.add_argument("--vips", default="10.200.0.10", metavar="VIP,...")
    up.add_argument("--agents", action="store_true",
                    help="also run an agent on every node (pools.py's fleet pool: web, stream)")
    down = sub.add_parser("down", help="remove the lab and its processes")
    down.add_argument("--prefix", default="xb")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bgplab: must run as root", file=sys.stderr)
        return 1
    if a.cmd == "down":
        teardown_prefix(a.prefix)
        return 0
    vips = [str(ipaddress.IPv4Address(v)) for v in a.vips.split(",") if v]
    lab = BgpLab(a.nodes, a.backends, a.prefix, vips)
    lab.up()
    if a.agents:
        from pools import FLEET_STREAM, FLEET_WEB, fleet_yaml

        fleet = [replace(v, address=vips[0]) for v in (FLEET_WEB, FLEET_STREAM)]
        lab.start_agents(fleet_yaml(lab.router_backend_addr, *fleet, router_asn=ROUTER_ASN,
                                    asn=NODE_ASN), vips[0])
    print(lab.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
