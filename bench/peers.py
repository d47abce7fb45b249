"""The load balancers compared end to end, each started on the LB of a fresh lab with a
config written here from the same service list (workload.SERVICES), and stopped after."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401 (first: puts the lab modules on sys.path)

# isort: split
from agent_process import XDPLB, AgentProcess
from lab import Lab, run_command
from pools import Vip, pool_yaml
from workload import SERVICES, VIP, Service, wait_listening

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def _backends(lab: Lab, s: Service) -> list[str]:
    return [lab.backend_addrs[i] for i in s.backends]


@dataclass
class Peer:
    """A load balancer under test. ``start`` may raise; ``stop`` must always work."""

    name: str
    label: str
    udp: bool = True  # balances UDP at all
    # the lab it runs in: "two-armed", or "routed" (replies may bypass the LB)
    topology: str = "two-armed"
    # why its TCP tests cannot work in its lab (None: they can)
    no_tcp: str | None = None

    def unavailable(self) -> str | None:
        """Why this peer cannot run on this machine, or None."""
        return None

    def start(self, lab: Lab, tmp: Path) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Processes in the lab are also killed with the lab; this is the orderly way."""


@dataclass
class Xdplb(Peer):
    mode: str | None = "native"
    datapath: str | None = None
    forwarding: str | None = None  # None: nat (the default)
    encap: str | None = None  # dsr only
    agent: AgentProcess | None = None
    decap: list[str] | None = None  # backends where `xdplb decap` was attached

    def unavailable(self) -> str | None:
        if self.datapath is None:
            return None
        helptext = subprocess.run([str(XDPLB), "attach", "--help"], capture_output=True,
                                  text=True, timeout=30).stdout
        return None if "--datapath" in helptext else "`xdplb attach` has no --datapath option"

    def start(self, lab: Lab, tmp: Path) -> None:
        pool = tmp / f"{self.name}.yaml"
        pool.write_text(xdplb_config(lab, self.forwarding, self.encap))
        extra = (["--mode", self.mode] if self.mode else []) + (
            ["--datapath", self.datapath] if self.datapath else [])
        if self.encap == "ipip":
            # Backends strip the outer header themselves (this kernel has no ipip module).
            self.decap = []
            for ns in lab.backend_ns:
                self.decap.append(ns)
                run_command([str(XDPLB), "--netns", ns, "decap", "attach", "eth0"], timeout=120)
        self.agent = AgentProcess(lab, pool, *extra)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        for ns in self.decap or ():
            run_command([str(XDPLB), "--netns", ns, "decap", "detach", "eth0"], check=False)
        self.decap = None


def xdplb_config(lab: Lab, forwarding: str | None = None, encap: str | None = None) -> str:
    return pool_yaml(*(Vip(s.name, s.port, tuple(_backends(lab, s)), protocol=s.protocol,
                           address=VIP, forwarding=forwarding, encap=encap) for s in SERVICES))


@dataclass
class IptablesDnat(Peer):
    """kube-proxy's iptables data path: per service a chain that picks an endpoint with
    ``-m statistic --mode random`` and DNATs to it; conntrack handles replies."""

    def unavailable(self) -> str | None:
        return None if shutil.which("iptables-restore") else "iptables is not installed"

    def start(self, lab: Lab, tmp: Path) -> None:
        lab.run(lab.lb_ns, "iptables-restore", input=iptables_rules(lab))


def iptables_rules(lab: Lab) -> str:
    chains, rules = ["XLB-SERVICES"], ["-A PREROUTING -j XLB-SERVICES"]
    for s in SERVICES:
        svc = f"XLB-SVC-{s.name.upper()}"
        chains.append(svc)
        rules.append(f"-A XLB-SERVICES -d {VIP}/32 -p {s.protocol} --dport {s.port} -j {svc}")
        addrs = _backends(lab, s)
        for i, addr in enumerate(addrs):
            sep = f"XLB-SEP-{s.name.upper()}-{i}"
            chains.append(sep)
            left = len(addrs) - i
            pick = f"-m statistic --mode random --probability {1 / left:.5f} " if left > 1 else ""
            rules.append(f"-A {svc} {pick}-j {sep}")
            rules.append(f"-A {sep} -p {s.protocol} -j DNAT --to-destination {addr}:{s.port}")
    return "\n".join(["*nat", *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT", ""])


class _Proxy(Peer):
    """A user-space proxy: the VIP is a local address of the LB, where it listens."""

    proc: subprocess.Popen | None = None

    def command(self, conf: Path, tmp: Path) -> list[str]:
        raise NotImplementedError

    def config(self, lab: Lab, tmp: Path) -> str:
        raise NotImplementedError

    def start(self, lab: Lab, tmp: Path) -> None:
        lab.run(lab.lb_ns, "ip", "addr", "add", f"{VIP}/32", "dev", "lo")
        conf = tmp / f"{self.name}.conf"
        conf.write_text(self.config(lab, tmp))
        log = (tmp / f"{self.name}.log").open("w")
        self.proc = lab.popen(lab.lb_ns, *self.command(conf, tmp), stdout=log, stderr=log)
        try:
            for s in SERVICES:
                if s.protocol == "tcp":
                    wait_listening(lab, lab.lb_ns, s.port, self.label)
        except TimeoutError as e:
            raise RuntimeError(f"{e}: {(tmp / f'{self.name}.log').read_text()[-500:]}") from e

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


@dataclass
class NginxStream(_Proxy):
    def unavailable(self) -> str | None:
        if not shutil.which("nginx") or not NGINX_STREAM_MODULE.exists():
            return "nginx or libnginx-mod-stream is not installed"
        return None

    def command(self, conf: Path, tmp: Path) -> list[str]:
        return ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-lb.err"), "-c", str(conf)]

    def config(self, lab: Lab, tmp: Path) -> str:
        blocks = []
        for s in SERVICES:
            servers = " ".join(f"server {a}:{s.port};" for a in _backends(lab, s))
            blocks.append(f"  upstream {s.name} {{ {servers} }}")
            if s.protocol == "udp":
                # No replies expected: a session ends when its datagram is sent on.
                listen = (f"listen {VIP}:{s.port} udp reuseport; proxy_responses 0; "
                          f"proxy_timeout 2s;")
            else:
                listen = f"listen {VIP}:{s.port} reuseport backlog=4096;"
            blocks.append(f"  server {{ {listen} proxy_pass {s.name}; }}")
        body = "\n".join(blocks)
        return (f"load_module {NGINX_STREAM_MODULE};\nworker_processes auto;\ndaemon off;\n"
                f"pid {tmp}/nginx-lb.pid;\nevents {{ worker_connections 16384; }}\n"
                f"stream {{\n{body}\n}}\n")


@dataclass
class Haproxy(_Proxy):
    udp: bool = False  # HAProxy balances TCP (and HTTP) only

    def unavailable(self) -> str | None:
        return None if shutil.which("haproxy") else "haproxy is not installed"

    def command(self, conf: Path, tmp: Path) -> list[str]:
        return ["haproxy", "-db", "-f", str(conf)]

    def config(self, lab: Lab, tmp: Path) -> str:
        out = ["global", "  maxconn 8000", f"  pidfile {tmp}/haproxy.pid",
               "defaults", "  mode tcp", "  timeout connect 2s", "  timeout client 30s",
               "  timeout server 30s"]
        for s in SERVICES:
            if s.protocol != "tcp":
                continue
            out += [f"listen {s.name}", f"  bind {VIP}:{s.port}", "  balance roundrobin"]
            out += [f"  server be{i} {a}:{s.port}" for i, a in enumerate(_backends(lab, s))]
        return "\n".join(out) + "\n"


def all_peers() -> list[Peer]:
    """Every peer, in the order they run (back to back)."""
    return [
        Xdplb("xdplb-native", "xdplb, native XDP", mode="native"),
        Xdplb("xdplb-generic", "xdplb, generic XDP", mode="generic"),
        IptablesDnat("iptables", "iptables DNAT (kube-proxy)"),
        NginxStream("nginx", "nginx stream"),
        Haproxy("haproxy", "HAProxy (TCP mode)"),
        Xdplb("xdplb-scapy", "xdplb, scapy data path", mode=None, datapath="scapy"),
        # The forwarding modes, in the routed lab (docs/performance.md, section 2), with nat
        # there too for the UDP rows: the same router in front of every mode.
        Xdplb("xdplb-nat-routed", "xdplb nat, routed lab", topology="routed",
              no_tcp="nat's replies bypass the LB in the routed lab: TCP cannot work"),
        Xdplb("xdplb-fullnat", "xdplb fullnat, routed lab", topology="routed",
              forwarding="fullnat"),
        Xdplb("xdplb-dsr-l2", "xdplb dsr/l2, routed lab", topology="routed", forwarding="dsr",
              encap="l2"),
        Xdplb("xdplb-dsr-ipip", "xdplb dsr/ipip, routed lab", topology="routed",
              forwarding="dsr", encap="ipip"),
    ]
