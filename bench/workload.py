"""Traffic and measurement for the end-to-end benchmark, the same for every peer.

The lab is the two-armed namespace lab (client -- LB eth0 | LB eth1 -- bridge -- backends),
with GRO (and so NAPI) on the LB's interfaces and on the interfaces facing them. CPU is read
from /proc: "kernel CPU" is the softirq time of the whole machine, where every data path in
the kernel runs (the LB's, and the bridge's and backends' receive work, which is the same for
every peer), "LB process CPU" that of the processes in the LB's namespace (agent, nginx,
haproxy). Giving the LB threaded NAPI to isolate its share was tried and dropped: veth then
lost up to half of the frames to wake-up latency, even in front of a bare XDP_DROP. Tests:

- UDP packets/s: 64-byte frames over 16,384 flows to the VIP, from bench/bpf/gen.c run in
  BPF_PROG_TEST_RUN's live-frames mode on the client's interface (about 15 Mpps here, ten
  times trafgen, which also made every frame a socket buffer that veth must copy before
  native XDP sees it: a NIC does not). An XDP program on every backend counts and drops
  them (bench/bpf/sink.c).
- TCP throughput: one iperf3 stream through the VIP to one backend, and one the other way
  (a download: the backend sends, iperf3 -R), where DSR leaves the balancer only the ACKs.
- New TCP connections/s: wrk with ``Connection: close`` (one connection per request) against
  nginx on both backends.

The forwarding modes fullnat and dsr run in the routed lab instead (a router between client
and switch, the LB one-armed behind it, backends answering through the router; DSR backends
have the VIP on lo and, for ipip, `xdplb decap` on eth0): the generator then sends to the
router, which forwards in its kernel, and the LB transmits out of the interface it received
on (XDP_TX), so its switch-side peer keeps an XDP program.

Every run is bounded in time (``seconds``) and packets, and stops by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import busy_seconds, compile_bcc, cpu_seconds, softirq_seconds, xdp_fd
from lab import Lab, netns_pids, xdp_attach_pass
from pyroute2 import netns as pr_netns
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from xdplb.kernel import bpfsys, xdp_link

VIP = "10.200.0.10"
UDP_PORT, IPERF_PORT, HTTP_PORT = 9, 5201, 8081
FRAME_LEN = 64
UDP_FLOWS = 16384
MAX_PPS = 20_000_000  # packet budget per second of a UDP run: above what the generator reaches
GEN_CHUNK = 200_000  # frames per test run of the generator: a stop request waits for at most one
WARMUP = 1.0
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


@dataclass(frozen=True)
class Service:
    """One VIP port every peer balances: the same services for all."""

    name: str
    port: int
    protocol: str
    backends: tuple[int, ...]  # lab backend indexes


SERVICES = (
    Service("udp-sink", UDP_PORT, "udp", (0, 1)),
    Service("iperf", IPERF_PORT, "tcp", (0,)),  # iperf3 needs all its streams on one server
    Service("http", HTTP_PORT, "tcp", (0, 1)),
)

BACKEND_NGINX = """\
worker_processes 1;
daemon off;
pid {run}/nginx-{name}.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {run}/nginx-{name}-body;
  server {{
    listen {addr}:{port} reuseport backlog=4096;{vip_listen}
    location / {{ return 200 "{name}\\n"; }}
  }}
}}
"""


class BenchLab:
    """A lab prepared for the benchmark: NAPI where the LB sends and receives, HTTP backends."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        # The routed lab runs xdplb alone, whose fullnat source ports must stay clear of the
        # LB's own ephemeral range: that keeps its default. The proxies need many ports.
        cmds = [] if lab.routed else ["sysctl -qw net.ipv4.ip_local_port_range='1024 65535'"]
        cmds += [f"ethtool -K {dev} gro on" for dev in lab.lb_ifaces]
        lab.run(lab.lb_ns, "sh", "-c", " && ".join(cmds))
        lab.run(lab.client_ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        if lab.routed:
            # The generator's XDP_TX out of the client's eth0 arrives only where the peer (the
            # router's eth0) has NAPI; the LB's XDP_TX likewise needs its peer's XDP_PASS,
            # which stays.
            xdp_attach_pass([(lab.router_ns, "eth0")])
        else:
            # Two-armed, the LB only redirects, and GRO on its neighbours (set by the lab)
            # gives them the NAPI that takes redirected frames. Their XDP_PASS programs go:
            # with them, veth copies every socket buffer the kernel peers forward into an XDP
            # buffer.
            for ns, dev in lab.xdp_peers:
                xdp_link.xdp_detach(dev, netns=ns)
        # DSR backends take the VIP's packets as their own: nginx listens there too.
        vip_listen = "".join(f"\n    listen {v}:{HTTP_PORT} reuseport backlog=4096;"
                             for v in lab.backend_vips)
        for i, (name, ns, addr) in enumerate(zip(lab.backend_names, lab.backend_ns,
                                                 lab.backend_addrs, strict=True)):
            conf = tmp / f"nginx-{name}.conf"
            conf.write_text(BACKEND_NGINX.format(run=tmp, name=name, addr=addr, port=HTTP_PORT,
                                                 vip_listen=vip_listen))
            lab.popen(ns, "nginx", "-p", str(tmp), "-e", str(tmp / f"nginx-{name}.err"),
                      "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(lab, ns, HTTP_PORT, what=f"nginx on backend {i + 1}")

    def lb_process_cpu(self) -> float:
        """CPU seconds so far of the processes in the LB's namespace."""
        return cpu_seconds(netns_pids([self.lab.lb_ns])[self.lab.lb_ns])

    def counter(self, ns: str, dev: str, name: str) -> int:
        path = f"/sys/class/net/{dev}/statistics/{name}"
        return int(self.lab.run(ns, "cat", path).stdout)


def wait_listening(lab: Lab, ns: str, port: int, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.run(ns, "ss", "-Hltn", f"sport = :{port}").stdout
        if out.strip():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not listening on port {port} after {timeout}s")


@dataclass
class Window:
    """CPU and wall time of a measurement window."""

    t: float
    kernel: float
    procs: float
    busy: float

    @classmethod
    def now(cls, bl: BenchLab) -> Window:
        return cls(time.monotonic(), softirq_seconds(), bl.lb_process_cpu(), busy_seconds())

    def until(self, end: Window) -> dict[str, float]:
        wall = end.t - self.t
        kernel, procs = (end.kernel - self.kernel) / wall, (end.procs - self.procs) / wall
        return {"seconds": wall, "kernel_cpu_cores": kernel, "lb_process_cpu_cores": procs,
                "lb_cpu_cores": kernel + procs,
                "machine_cpu_cores": (end.busy - self.busy) / wall}


# --- UDP packets/s ---------------------------------------------------------------------------


class Sink:
    """bench/bpf/sink.c, counting and dropping the benchmark's datagrams where they are
    measured: on every backend's eth0 (delivered through the bridge), or on the wire right
    behind the LB, the peer of its backend-side interface (what the LB puts out, the way a
    hardware tester measures a device: generator -> device under test -> receiver)."""

    def __init__(self) -> None:
        self.bpf = compile_bcc("sink.c", [f"-DSINK_PORT={UDP_PORT}"])
        self.fd = xdp_fd(self.bpf, "bench_sink")

    def count(self) -> int:
        return int(self.bpf["sunk"].sum(ctypes.c_int(0)).value)

    @contextlib.contextmanager
    def attached(self, lab: Lab) -> Iterator[Sink]:
        done = []
        try:
            for ns in lab.backend_ns:
                xdp_link.xdp_attach("eth0", self.fd, "native", netns=ns)
                done.append(ns)
            yield self
        finally:
            for ns in done:
                with contextlib.suppress(OSError):
                    xdp_link.xdp_detach("eth0", netns=ns)

    @contextlib.contextmanager
    def at_lb_egress(self, lab: Lab) -> Iterator[Sink]:
        """In place of the lab's XDP_PASS on the switch-side peer of the LB's backend
        interface (the sink passes all else, as XDP_PASS did); XDP_PASS again afterwards."""
        (ns, ifname), = [p for p in lab.xdp_peers if p[0] == lab.sw_ns]
        xdp_link.xdp_attach(ifname, self.fd, "native", netns=ns)
        try:
            yield self
        finally:
            xdp_attach_pass([(ns, ifname)])

    def close(self) -> None:
        self.bpf.cleanup()


def live_frames(prog_fd: int, frame: bytes, repeat: int, ifindex: int) -> None:
    """BPF_PROG_TEST_RUN in live-frames mode: XDP_TX sends the frame out of ``ifindex``
    (of this thread's netns). bpfsys.prog_test_run always asks for the output frame, which
    this mode refuses, hence the direct call."""
    din = ctypes.create_string_buffer(frame, len(frame))
    ctx = ctypes.create_string_buffer(bpfsys.xdp_md(len(frame), ifindex), bpfsys.XDP_MD_SIZE)
    attr = bpfsys._BpfAttr()
    t = attr.test
    t.prog_fd, t.repeat, t.flags = prog_fd, repeat, BPF_F_TEST_XDP_LIVE_FRAMES
    t.data_in, t.data_size_in = ctypes.addressof(din), len(frame)
    t.ctx_in, t.ctx_size_in = ctypes.addressof(ctx), bpfsys.XDP_MD_SIZE
    _, err = bpfsys._bpf(bpfsys.BPF_PROG_TEST_RUN, attr)
    if err:
        raise bpfsys.BpfError(err, "prog_test_run (live frames)")


class Generator:
    """bench/bpf/gen.c sending from the client's eth0 in a thread, for a bounded time."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.bpf = compile_bcc("gen.c", [f"-DGEN_FLOWS={UDP_FLOWS}"])
        self.fd = xdp_fd(self.bpf, "bench_gen")
        # to the client's next hop: the LB, or in the routed lab the router
        hop = lab.router_macs["eth0"] if lab.routed else lab.lb_macs[lab.lb_client_iface]
        self.frame = bytes(Ether(src=lab.client_mac, dst=hop)
                           / IP(src=lab.client_addr, dst=VIP)
                           / UDP(sport=10000, dport=UDP_PORT, chksum=0))
        self.frame += bytes(FRAME_LEN - len(self.frame))
        tmpl = self.bpf["gen_tmpl"]
        leaf = tmpl.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), self.frame, FRAME_LEN)
        tmpl[ctypes.c_uint32(0)] = leaf
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def _send(self, deadline: float, budget: int) -> None:
        try:
            pr_netns.setns(self.lab.client_ns)  # this thread only: ifindex and XDP_TX there
            ifindex = xdp_link.ifindex("eth0")
            while not self._stop.is_set() and time.monotonic() < deadline and budget > 0:
                n = min(GEN_CHUNK, budget)
                live_frames(self.fd, self.frame, n, ifindex)
                self.sent += n
                budget -= n
        except BaseException as e:  # noqa: BLE001 (reported by the caller)
            self.error = e

    @contextlib.contextmanager
    def running(self, seconds: float) -> Iterator[Generator]:
        thread = threading.Thread(target=self._send, daemon=True,
                                  args=(time.monotonic() + seconds, int(MAX_PPS * seconds)))
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(30)
            self._stop.clear()

    def close(self) -> None:
        self.bpf.cleanup()


def udp_pps(bl: BenchLab, gen: Generator, sink: Sink | None, seconds: int) -> dict[str, Any]:
    """Packets/s the backends receive while the generator sends as fast as it can
    (``sink=None``: what it offered, for its own ceiling)."""
    with gen.running(WARMUP + seconds + 1):
        time.sleep(WARMUP)
        sent0, got0 = gen.sent, sink.count() if sink else 0
        w0 = Window.now(bl)
        time.sleep(seconds)
        w1 = Window.now(bl)
        sent1, got1 = gen.sent, sink.count() if sink else 0
    if gen.error:
        raise RuntimeError(f"generator failed: {gen.error}")
    out = w0.until(w1)
    # Chunks finish between samples: the offered rate is right on average, not per window.
    out["offered_pps"] = (sent1 - sent0) / out["seconds"]
    if sink:
        pps = (got1 - got0) / out["seconds"]
        out["pps"] = pps
        out["lb_ns_per_packet"] = out["lb_cpu_cores"] * 1e9 / pps if pps else None
    return out


# --- TCP throughput and connections/s ---------------------------------------------------------


def tcp_throughput(bl: BenchLab, seconds: int, download: bool = False,
                   probe: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One iperf3 TCP stream, client -> VIP -> backend 1, for ``seconds``; ``download``: the
    backend sends (iperf3 -R). ``probe``: called before and after, its numbers' differences
    go into the result as ``probe`` (what the LB handled, per direction)."""
    lab = bl.lab
    ns = lab.backend_ns[0]
    # DSR backends accept the connection on the VIP (on their lo), the others on their own
    addr = VIP if VIP in lab.backend_vips else lab.backend_addrs[0]
    lab.popen(ns, "timeout", str(int(seconds + 30)), "iperf3", "-s", "-1", "-B", addr,
              "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(lab, ns, IPERF_PORT, "iperf3")
    before = probe() if probe else None
    w0 = Window.now(bl)
    p = lab.run(lab.client_ns, "iperf3", "-c", VIP, "-p", str(IPERF_PORT), "-t", str(seconds),
                "-J", "--connect-timeout", "3000", *(["-R"] if download else []), check=False,
                timeout=seconds + 30)
    w1 = Window.now(bl)
    after = probe() if probe else None
    try:
        res = json.loads(p.stdout)
    except ValueError:
        res = {"error": (p.stdout + p.stderr).strip()[-300:] or f"exit {p.returncode}"}
    if "error" in res:
        return {"error": res["error"]}
    end = res["end"]
    out = w0.until(w1)
    out["gbit_per_s"] = end["sum_received"]["bits_per_second"] / 1e9
    out["retransmits"] = end["sum_sent"].get("retransmits")
    if before is not None and after is not None:
        out["probe"] = _delta(before, after)
    return out


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after - before, for the numbers of two nested dicts of the same shape."""
    out: dict[str, Any] = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = _delta(before.get(k, {}), v)
        elif isinstance(v, int | float) and isinstance(before.get(k, 0), int | float):
            out[k] = v - before.get(k, 0)
        elif isinstance(v, str) or isinstance(before.get(k), str):  # a probe's error
            out[k] = v if isinstance(v, str) else before[k]
    return out


_WRK_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in")


def conn_rate(bl: BenchLab, seconds: int, connections: int = 32) -> dict[str, Any]:
    """New TCP connections/s: wrk, one request per connection, through the VIP."""
    lab = bl.lab
    w0 = Window.now(bl)
    p = lab.run(lab.client_ns, "wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s",
                "--timeout", "2s", "-H", "Connection: close", f"http://{VIP}:{HTTP_PORT}/",
                check=False, timeout=seconds + 30)
    w1 = Window.now(bl)
    rate = _WRK_RATE.search(p.stdout)
    if p.returncode != 0 or not rate:
        return {"error": (p.stdout + p.stderr).strip()[-300:] or f"exit {p.returncode}"}
    errors = _WRK_ERRORS.search(p.stdout)
    non2xx = _WRK_NON2XX.search(p.stdout)
    out = w0.until(w1)
    cps = float(rate.group(1))
    out["conn_per_s"] = cps
    out["requests"] = int(_WRK_TOTAL.search(p.stdout).group(1))
    out["errors"] = sum(map(int, errors.groups())) if errors else 0
    out["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    out["lb_us_per_conn"] = out["lb_cpu_cores"] * 1e6 / cps if cps else None
    return out
