"""The network-namespace lab (scripts/netns): the three topologies with plain kernel forwarding
(no xdplb data path, except to show why the routed lab needs more than NAT), the backend
services, the router's counters, DSR backends, and teardown in every way a lab can end."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "netns"))

import backend_server  # noqa: E402
import lab as labmod  # noqa: E402
from lab import Lab, teardown_prefix  # noqa: E402

pytestmark = pytest.mark.root

LAB_PY = ROOT / "scripts" / "netns" / "lab.py"
BE_LINE = re.compile(r"backend=(be\d+) addr=([\d.]+) client=([\d.]+):(\d+)\n")


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def assert_gone(prefix: str, pids: list[int], prog_ids: list[int] = ()) -> None:
    """Nothing of the lab is left: namespaces, processes, runtime dir, XDP programs."""
    assert not [n for n in _netns_list() if n.startswith(f"{prefix}-")]
    assert not (labmod.RUN_ROOT / prefix).exists()
    assert not [p for p in pids if labmod._alive(p)], "lab processes survived teardown"
    # Namespaces are dismantled asynchronously; their veths and XDP programs go with them.
    deadline = time.monotonic() + 15
    left = list(prog_ids)
    while left and time.monotonic() < deadline:
        left = [i for i in left if labmod.bpf_prog_exists(i)]
        time.sleep(0.1)
    assert not left, f"XDP programs {left} still loaded after teardown"


def ethtool_features(lab: Lab, ns: str, dev: str) -> dict[str, str]:
    out = lab.run(ns, "ethtool", "-k", dev).stdout
    return dict(
        (k.strip(), v.strip().split()[0])
        for k, _, v in (line.partition(":") for line in out.splitlines()[1:])
        if v.strip()
    )


def sysctl(lab: Lab, ns: str, key: str) -> str:
    return lab.run(ns, "sysctl", "-n", key).stdout.strip()


def check_every_end(lab: Lab) -> None:
    """TX checksum offload off on every veth end; no IPv6 anywhere in the lab."""
    for ns in lab.namespaces:
        for dev in lab._ifaces(ns):
            assert ethtool_features(lab, ns, dev)["tx-checksumming"] == "off", (ns, dev)
            assert sysctl(lab, ns, f"net.ipv6.conf.{dev}.disable_ipv6") == "1", (ns, dev)
        assert "inet6" not in lab.run(ns, "ip", "-6", "addr", "show", "scope", "link").stdout


def lab_addrs(lab: Lab, ns: str, dev: str) -> list[str]:
    return re.findall(r"inet ([\d.]+/\d+)", lab.run(ns, "ip", "-4", "addr", "show", dev).stdout)


def lab_link_mac(lab: Lab, ns: str, dev: str) -> str:
    return re.search(r"link/ether (\S+)", lab.run(ns, "ip", "link", "show", dev).stdout)[1]


def check_plumbing(lab: Lab) -> None:
    """Addresses, routes, MACs, sysctls, offloads and XDP_PASS programs as documented."""
    check_every_end(lab)
    addrs, link_mac = partial(lab_addrs, lab), partial(lab_link_mac, lab)

    assert addrs(lab.client_ns, "eth0") == ["10.10.0.2/24"]
    assert link_mac(lab.client_ns, "eth0") == lab.client_mac == "02:00:00:00:01:00"
    if lab.topology == "one-armed":
        assert lab.lb_ifaces == ["eth0"]
        assert addrs(lab.lb_ns, "eth0") == ["10.10.0.1/24", "10.20.0.1/24"]
    else:
        assert lab.lb_ifaces == ["eth0", "eth1"]
        assert addrs(lab.lb_ns, "eth0") == ["10.10.0.1/24"]
        assert addrs(lab.lb_ns, "eth1") == ["10.20.0.1/24"]
    for dev in lab.lb_ifaces:
        assert link_mac(lab.lb_ns, dev) == lab.lb_macs[dev]
    for i, ns in enumerate(lab.backend_ns):
        assert addrs(ns, "eth0") == [f"10.20.0.{11 + i}/24"] == [f"{lab.backend_addrs[i]}/24"]
        assert link_mac(ns, "eth0") == lab.backend_macs[i] == f"02:00:00:00:{0x11 + i:02x}:00"
        # Replies to clients go through the LB.
        route = lab.run(ns, "ip", "route", "get", lab.client_addr).stdout
        assert "via 10.20.0.1 dev eth0" in route
    assert (
        "via 10.10.0.1 dev eth0"
        in lab.run(lab.client_ns, "ip", "route", "get", "10.200.0.7").stdout
    )
    # The LB has no route to the VIP net, and the client none to the backends.
    assert lab.run(lab.lb_ns, "ip", "route", "get", "10.200.0.7", check=False).returncode != 0
    assert lab.run(lab.client_ns, "ip", "route", "get", "10.20.0.11", check=False).returncode != 0

    assert sysctl(lab, lab.lb_ns, "net.ipv4.ip_forward") == "1"
    for conf in ("all", "default", *lab.lb_ifaces):
        assert sysctl(lab, lab.lb_ns, f"net.ipv4.conf.{conf}.rp_filter") == "0"
        assert sysctl(lab, lab.lb_ns, f"net.ipv4.conf.{conf}.send_redirects") == "0"

    # XDP_PASS (native) and GRO on exactly the peers of the LB's interfaces.
    expected = {(lab.sw_ns, "p-lb")}
    if lab.topology == "two-armed":
        expected.add((lab.client_ns, "eth0"))
    assert set(lab.xdp_peers) == expected
    for ns in lab.namespaces:
        for dev in lab._ifaces(ns):
            st = labmod.xdp_state(ns, dev)
            if (ns, dev) in expected:
                assert st is not None and st.mode == "native", (ns, dev, st)
                assert st.prog_id == lab.xdp_prog_ids[(ns, dev)]
                assert ethtool_features(lab, ns, dev)["generic-receive-offload"] == "on"
            elif ns != lab.lb_ns:
                assert st is None, (ns, dev, st)


@pytest.mark.parametrize("topology", ["one-armed", "two-armed"])
def test_topology_connectivity_and_teardown(topology: str) -> None:
    prefix = f"xlt-lab-{topology[:3]}"
    with Lab(topology, backends=3, prefix=prefix) as lab:
        assert sorted(labmod.lab_namespaces(prefix)) == sorted(lab.namespaces)
        assert lab.namespaces == [
            f"{prefix}-{r}" for r in ("client", "lb", "sw", "be1", "be2", "be3")
        ]
        check_plumbing(lab)

        assert lab.ping(lab.client_ns, lab.lb_client_addr)
        for ns in lab.backend_ns:
            assert lab.ping(ns, lab.lb_backend_addr)
        for addr in lab.backend_addrs:
            assert lab.ping(lab.lb_ns, addr)
        assert not lab.ping(lab.client_ns, lab.backend_addrs[0], timeout=0.5)  # only via a VIP

        for i, addr in enumerate(lab.backend_addrs):
            for port in lab.http_ports:
                body = lab.curl(lab.lb_ns, f"http://{addr}:{port}/")
                m = BE_LINE.fullmatch(body)
                assert m and m.group(1, 2, 3) == (f"be{i + 1}", addr, lab.lb_backend_addr), body
                log = lab.backend_log(i)[-1]
                assert (log["client"], log["cport"], log["lport"]) == (
                    lab.lb_backend_addr,
                    int(m[4]),
                    port,
                )
                assert log["request"] == "GET / HTTP/1.1" and log["status"] == 200
            assert lab.curl(lab.lb_ns, f"http://{addr}/healthz") == "ok\n"
            for port in lab.udp_ports:
                reply = lab.udp_request(lab.lb_ns, addr, port, b"ping\x00\xff", sport=4000 + port)
                assert reply == f"be{i + 1} 10.20.0.1:{4000 + port} ".encode() + b"ping\x00\xff"
                log = lab.backend_log(lab.backend_names[i])[-1]
                assert log["proto"] == "udp" and log["cport"] == 4000 + port
                assert (log["local"], log["lport"], log["len"]) == (addr, port, 6)

        pids = list(lab.backend_pids.values())
        prog_ids = list(lab.xdp_prog_ids.values())
        assert len(pids) == 3 and all(labmod._alive(p) for p in pids)
        assert labmod.netns_pids(lab.backend_ns) == {
            ns: {lab.backend_pids[n]}
            for ns, n in zip(lab.backend_ns, lab.backend_names, strict=True)
        }
    assert_gone(prefix, pids, prog_ids)


def test_transfer_integrity() -> None:
    """Several MiB both ways through the backends' HTTP service, checked end to end."""
    with Lab("one-armed", backends=1, prefix="xlt-lab-xfer") as lab:
        n = 5 * 1024 * 1024 + 7
        out = lab.run(
            lab.lb_ns, "curl", "-sS", "-f", "--noproxy", "*", "-D", "/dev/stderr",
            f"http://10.20.0.11:8080/bytes?n={n}", text=False, timeout=60,
        )  # fmt: skip
        body, headers = out.stdout, out.stderr.decode()
        sha = hashlib.sha256(body).hexdigest()
        assert len(body) == n
        assert f"x-sha256: {sha}" in headers.lower()
        assert body == backend_server.pattern(n)
        assert sha == backend_server.pattern_sha256(n)
        assert backend_server.pattern(70000)[65521:65530] == backend_server.pattern(9)

        upload = os.urandom(3 * 1024 * 1024)
        out = lab.run(
            lab.lb_ns, "curl", "-sS", "-f", "--noproxy", "*", "--data-binary", "@-",
            "-H", "Content-Type: application/octet-stream", "-D", "/dev/stderr",
            "http://10.20.0.11/echo", input=upload, text=False, timeout=60,
        )  # fmt: skip
        assert out.stdout == upload
        assert f"x-sha256: {hashlib.sha256(upload).hexdigest()}" in out.stderr.decode().lower()
        assert "x-backend: be1" in out.stderr.decode().lower()
        code = lab.run(lab.lb_ns, "curl", "-s", "--noproxy", "*", "-o", "/dev/null",
                       "-w", "%{http_code}", "http://10.20.0.11/nope").stdout  # fmt: skip
        assert code == "404"


def test_nsenter_keeps_bpffs_ip_netns_exec_hides_it() -> None:
    with Lab("one-armed", backends=1, prefix="xlt-lab-nse") as lab:
        cmd = lab.nsenter_cmd("lb", "stat", "-f", "-c", "%T", "/sys/fs/bpf")
        assert cmd[:3] == ["nsenter", f"--net=/run/netns/{lab.lb_ns}", "--"]
        assert subprocess.run(cmd, capture_output=True, text=True, check=True).stdout == "bpf_fs\n"
        hidden = lab.run(lab.lb_ns, "stat", "-f", "-c", "%T", "/sys/fs/bpf", check=False)
        assert hidden.stdout != "bpf_fs\n"
        # Both really are in the LB's network namespace.
        for nsenter in (False, True):
            out = lab.run("lb", "ip", "-br", "addr", "show", "eth0", nsenter=nsenter).stdout
            assert "10.10.0.1/24" in out


def test_teardown_on_exception_and_tracked_processes() -> None:
    prefix = "xlt-lab-exc"
    with pytest.raises(RuntimeError, match="boom"), Lab("two-armed", 2, prefix) as lab:
        sleeper = lab.popen(lab.client_ns, "sh", "-c", "sleep 300 & sleep 300")
        agentish = lab.popen(lab.lb_ns, "sleep", "300", nsenter=True)
        pids = [*lab.backend_pids.values(), sleeper.pid, agentish.pid]
        prog_ids = list(lab.xdp_prog_ids.values())
        raise RuntimeError("boom")
    assert sleeper.returncode is not None and agentish.returncode is not None
    assert_gone(prefix, pids, prog_ids)
    lab.down()  # idempotent


def test_interrupted_build_tears_down(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "xlt-lab-int"
    started: list[int] = []
    real = Lab._start_backends

    def interrupted(self: Lab, timeout: float = 20) -> None:
        real(self, timeout)
        started.extend(self.backend_pids.values())
        raise KeyboardInterrupt

    monkeypatch.setattr(Lab, "_start_backends", interrupted)
    with pytest.raises(KeyboardInterrupt), Lab("one-armed", 2, prefix):
        pytest.fail("__enter__ must not return")
    assert len(started) == 2
    assert_gone(prefix, started)


def test_teardown_prefix_partial_state_and_isolation() -> None:
    """A half-built or crashed lab goes; a namespace that only shares the prefix stays."""
    prefix = "xlt-lab-part"
    foreign = f"{prefix}-x-client"  # another lab's namespace, with prefix "xlt-lab-part-x"
    made = [f"{prefix}-lb", f"{prefix}-rt", f"{prefix}-be7", foreign]
    proc = None
    try:
        for n in made:
            subprocess.run(["ip", "netns", "add", n], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-lb", "sleep", "300"])
        deadline = time.monotonic() + 5
        while not labmod.netns_pids([f"{prefix}-lb"])[f"{prefix}-lb"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        teardown_prefix(prefix)
        assert proc.wait(5) is not None
        assert [n for n in _netns_list() if n.startswith(prefix)] == [foreign]
        teardown_prefix(prefix)  # nothing left: still fine
        Lab(prefix=prefix).down()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for n in made:
            subprocess.run(["ip", "netns", "delete", n], capture_output=True)
    with pytest.raises(ValueError):
        teardown_prefix("../etc")


def test_cli_up_status_replace_down() -> None:
    prefix = "xlt-lab-cli"
    py = sys.executable

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([py, str(LAB_PY), *args], capture_output=True, text=True,
                              check=check, timeout=120)  # fmt: skip

    pids: list[int] = []
    try:
        out = cli("up", "two-armed", "--prefix", prefix, "--backends", "2").stdout
        assert f"{prefix}-lb" in out and "10.20.0.12/24" in out
        probe = Lab("two-armed", 2, prefix)  # same names; not built by this object
        old = labmod.netns_pids(probe.backend_ns)
        pids += [p for s in old.values() for p in s]
        assert len(pids) == 2  # the backends outlive the CLI process
        assert BE_LINE.fullmatch(probe.curl("lb", "http://10.20.0.12/"))
        st = cli("status", "--prefix", prefix).stdout
        assert "two-armed, 2 backends" in st and "native prog" in st and "DOWN" not in st

        # `up` again replaces the leftover lab.
        cli("up", "one-armed", "--prefix", prefix, "--backends", "1")
        assert not [p for p in pids if labmod._alive(p)]
        assert sorted(labmod.lab_namespaces(prefix)) == sorted(
            f"{prefix}-{r}" for r in ("client", "lb", "sw", "be1")
        )
        new = labmod.netns_pids([f"{prefix}-be1"])[f"{prefix}-be1"]
        pids += list(new)
        assert "one-armed, 1 backends" in cli("status").stdout
    finally:
        cli("down", "--prefix", prefix, check=False)
    assert_gone(prefix, pids)
    assert cli("down", "--prefix", prefix).returncode == 0
    assert cli("status", "--prefix", prefix, check=False).returncode == 1


# Bounces UDP to port 9999 back to its sender with XDP_TX (swapping addresses and ports leaves
# the UDP checksum valid). Not a load balancer: it checks the lab setting the data path relies
# on, an XDP program on the LB interfaces' peers, without which XDP_TX frames vanish.
BOUNCE = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
int lab_bounce(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP)) return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != 17) return XDP_PASS;
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end || udp->dest != htons(9999)) return XDP_PASS;
    unsigned char m[ETH_ALEN];
    __builtin_memcpy(m, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, m, ETH_ALEN);
    __be32 a = ip->saddr; ip->saddr = ip->daddr; ip->daddr = a;
    __be16 p = udp->source; udp->source = udp->dest; udp->dest = p;
    return XDP_TX;
}
"""


@pytest.mark.parametrize("topology", ["one-armed", "two-armed"])
def test_xdp_tx_on_lb_interface_reaches_client(topology: str) -> None:
    bcc = pytest.importorskip("bcc")
    sys.path.insert(0, str(ROOT))
    from xdplb.kernel import xdp_link

    bpf = bcc.BPF(text=BOUNCE.encode())
    try:
        fn = bpf.load_func(b"lab_bounce", bcc.BPF.XDP)
        with Lab(topology, backends=1, prefix=f"xlt-lab-tx{topology[:3]}") as lab:
            xdp_link.xdp_attach("eth0", fn.fd, "native", netns=lab.lb_ns)
            try:
                reply = lab.udp_request(lab.client_ns, "10.10.0.1", 9999, b"bounce", sport=7777)
                assert reply == b"bounce"
            finally:
                xdp_link.xdp_detach("eth0", netns=lab.lb_ns)
    finally:
        bpf.cleanup()


# --- the routed lab: a router between client and switch, backends answer past the LB ----------

ZERO = {"packets": 0, "bytes": 0}


def check_routed_plumbing(lab: Lab) -> None:
    """Addresses, routes, MACs, sysctls, offloads, XDP_PASS and counters of the routed lab."""
    rt = lab.router_ns
    assert rt == f"{lab.prefix}-rt"
    check_every_end(lab)
    addrs, link_mac = partial(lab_addrs, lab), partial(lab_link_mac, lab)

    def route(ns: str, dst: str) -> str:
        return lab.run(ns, "ip", "route", "get", dst).stdout

    assert addrs(rt, "eth0") == ["10.10.0.1/24"] and addrs(rt, "eth1") == ["10.20.0.254/24"]
    assert link_mac(rt, "eth0") == lab.router_macs["eth0"] == "02:00:00:00:03:00"
    assert link_mac(rt, "eth1") == lab.router_macs["eth1"] == "02:00:00:00:03:01"
    assert link_mac(lab.sw_ns, "p-rt") == "02:00:00:00:fe:03"
    assert lab.lb_ifaces == ["eth0"] and addrs(lab.lb_ns, "eth0") == ["10.20.0.1/24"]
    assert link_mac(lab.lb_ns, "eth0") == lab.lb_macs["eth0"] == "02:00:00:00:02:00"
    assert addrs(lab.client_ns, "eth0") == ["10.10.0.2/24"]

    assert "via 10.10.0.1 dev eth0" in route(lab.client_ns, "10.200.0.7")
    assert "via 10.10.0.1 dev eth0" in route(lab.client_ns, "10.20.0.11")  # default route
    assert "via 10.20.0.1 dev eth1" in route(rt, "10.200.0.7")  # the VIP net: to the LB
    assert "via 10.20.0.254 dev eth0" in route(lab.lb_ns, lab.client_addr)
    # The LB itself has no route to the VIP net (no loop back through the router).
    assert lab.run(lab.lb_ns, "ip", "route", "get", "10.200.0.7", check=False).returncode != 0
    for ns in lab.backend_ns:
        # Replies to the client go to the router, not the LB.
        assert "via 10.20.0.254 dev eth0" in route(ns, lab.client_addr)

    for ns in (rt, lab.lb_ns):
        assert sysctl(lab, ns, "net.ipv4.ip_forward") == "1"
        for conf in ("all", "default", *lab._ifaces(ns)):
            assert sysctl(lab, ns, f"net.ipv4.conf.{conf}.rp_filter") == "0", (ns, conf)
            assert sysctl(lab, ns, f"net.ipv4.conf.{conf}.send_redirects") == "0", (ns, conf)

    # XDP_PASS (native) and GRO on the switch port facing the LB only.
    assert lab.xdp_peers == [(lab.sw_ns, "p-lb")]
    for ns in lab.namespaces:
        for dev in lab._ifaces(ns):
            st = labmod.xdp_state(ns, dev)
            if (ns, dev) in lab.xdp_peers:
                assert st is not None and st.mode == "native" and st.prog_id == (
                    lab.xdp_prog_ids[(ns, dev)]
                )
                assert ethtool_features(lab, ns, dev)["generic-receive-offload"] == "on"
            else:
                assert st is None, (ns, dev, st)
    assert lab.router_counts() == {"via_lb": ZERO, "from_backends": ZERO, "other": ZERO}


def test_routed_topology_paths_counters_and_teardown() -> None:
    prefix = "xlt-lab-rtd"
    with Lab("routed", backends=2, prefix=prefix) as lab:
        assert lab.namespaces == [
            f"{prefix}-{r}" for r in ("client", "rt", "lb", "sw", "be1", "be2")
        ]
        assert sorted(labmod.lab_namespaces(prefix)) == sorted(lab.namespaces)
        check_routed_plumbing(lab)
        assert "router  xlt-lab-rtd-rt" in lab.describe()

        assert lab.ping(lab.client_ns, lab.router_client_addr)
        for ns in lab.backend_ns:
            assert lab.ping(ns, lab.router_backend_addr)
        for i, addr in enumerate(lab.backend_addrs):
            assert BE_LINE.fullmatch(body := lab.curl(lab.lb_ns, f"http://{addr}/"))
            assert body.startswith(f"backend=be{i + 1} ")
        # None of that was forwarded toward the client.
        assert lab.router_counts() == {"via_lb": ZERO, "from_backends": ZERO, "other": ZERO}

        # The LB answers the client's ping through the router: one 44-byte IP packet.
        one_ping = {"packets": 1, "bytes": 44}
        assert lab.ping(lab.client_ns, lab.lb_backend_addr)
        assert lab.router_counts() == {"via_lb": one_ping, "from_backends": ZERO, "other": ZERO}
        # A backend's echo request to the client, from a backend MAC.
        lab.reset_router_counts()
        assert lab.ping(lab.backend_ns[1], lab.client_addr)
        assert lab.router_counts() == {"via_lb": ZERO, "from_backends": one_ping, "other": ZERO}
        # A UDP answer from a backend: counted with its IP length.
        lab.reset_router_counts()
        reply = lab.udp_request(lab.client_ns, lab.backend_addrs[0], 5000, b"hi", sport=4242)
        assert reply == b"be1 10.10.0.2:4242 hi"
        udp = {"packets": 1, "bytes": 20 + 8 + len(reply)}
        assert lab.router_counts() == {"via_lb": ZERO, "from_backends": udp, "other": ZERO}
        # What the LB namespace itself sends to the client counts as via_lb.
        lab.reset_router_counts()
        assert lab.ping(lab.lb_ns, lab.client_addr)
        assert lab.router_counts() == {"via_lb": one_ping, "from_backends": ZERO, "other": ZERO}
        lab.reset_router_counts()
        assert lab.router_counts()["via_lb"] == ZERO

        pids = list(lab.backend_pids.values())
        prog_ids = list(lab.xdp_prog_ids.values())
        assert len(pids) == 2 and all(labmod._alive(p) for p in pids)
    assert_gone(prefix, pids, prog_ids)
    with pytest.raises(ValueError, match="no router"):
        Lab("one-armed", prefix=prefix).router_counts()


UDP_FROM = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.bind(("0.0.0.0", 4343))
s.sendto(b"dsr", (sys.argv[1], 5000))
data, peer = s.recvfrom(2048)
print(peer[0], data.decode())
"""


def test_routed_dsr_backend_vips() -> None:
    """A backend with the VIP on lo takes packets to the VIP, answers from the VIP straight to
    the sender (past the LB), and does not answer ARP for it."""
    vip = "10.200.0.10"
    with Lab("routed", backends=2, prefix="xlt-lab-dsr", backend_vips=(vip,)) as lab:
        be1, be2 = lab.backend_ns
        for ns in lab.backend_ns:
            assert f"inet {vip}/32 scope global lo" in lab.run(ns, "ip", "-4", "addr", "show",
                                                                "lo").stdout  # fmt: skip
            for conf in ("all", "eth0"):
                assert sysctl(lab, ns, f"net.ipv4.conf.{conf}.arp_ignore") == "1"
                assert sysctl(lab, ns, f"net.ipv4.conf.{conf}.arp_announce") == "2"
                assert sysctl(lab, ns, f"net.ipv4.conf.{conf}.rp_filter") == "0"
        assert "lo 10.200.0.10 (no ARP)" in lab.describe()

        # The LB sends to the VIP with be1 as the next hop (what a DSR balancer does in XDP).
        lab.run(lab.lb_ns, "ip", "route", "add", f"{vip}/32", "via", lab.backend_addrs[0])
        out = lab.run(lab.lb_ns, sys.executable, "-c", UDP_FROM, vip).stdout
        assert out == f"{vip} be1 10.20.0.1:4343 dsr\n"  # answered from the VIP
        log = lab.backend_log(0)[-1]
        assert (log["local"], log["lport"], log["client"]) == (vip, 5000, lab.lb_backend_addr)
        # TCP too: the HTTP service listens on every address, the VIP included.
        assert lab.curl(lab.lb_ns, f"http://{vip}:8080/").startswith("backend=be1 ")
        log = lab.backend_log(0)[-1]
        assert (log["local"], log["lport"], log["status"]) == (vip, 8080, 200)

        # The client's datagram to the VIP: router -> LB (kernel-forwarded to be1 here) -> be1,
        # whose answer from the VIP goes to the router directly, never through the LB.
        lab.reset_router_counts()
        out = lab.run(lab.client_ns, sys.executable, "-c", UDP_FROM, vip).stdout
        assert out == f"{vip} be1 10.10.0.2:4343 dsr\n"
        counts = lab.router_counts()
        assert counts["from_backends"]["packets"] == 1 and counts["via_lb"] == ZERO, counts

        # Nobody answers ARP for the VIP; the same probe does get the backends' own addresses,
        # and be2 answers for the VIP once arp_ignore is off (the setting is what hides it).
        assert lab.arp_who_has(lab.lb_ns, vip, timeout=0.5) is None
        assert lab.arp_who_has(lab.lb_ns, lab.backend_addrs[1]) == lab.backend_macs[1]
        lab.run(be2, "sysctl", "-q", "-w", "net.ipv4.conf.all.arp_ignore=0",
                "net.ipv4.conf.eth0.arp_ignore=0")  # fmt: skip
        assert lab.arp_who_has(lab.lb_ns, vip) == lab.backend_macs[1]
        assert be1 != be2


def test_cli_up_routed_status_down() -> None:
    prefix = "xlt-lab-rcli"

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(LAB_PY), *args], capture_output=True,
                              text=True, check=check, timeout=120)  # fmt: skip

    pids: list[int] = []
    try:
        out = cli("up", "routed", "--prefix", prefix, "--backends", "1",
                  "--backend-vips", "10.200.0.10").stdout  # fmt: skip
        assert f"{prefix}-rt" in out and "10.20.0.254/24" in out and "(no ARP)" in out
        pids += list(labmod.netns_pids([f"{prefix}-be1"])[f"{prefix}-be1"])
        assert len(pids) == 1
        st = cli("status", "--prefix", prefix).stdout
        assert "routed, 1 backends" in st and f"netns {prefix}-rt" in st and "DOWN" not in st
    finally:
        cli("down", "--prefix", prefix, check=False)
    assert_gone(prefix, pids)


def test_routed_nat_mode_replies_bypass_the_balancer(tmp_path: Path) -> None:
    """Why fullnat and DSR are needed: with xdplb in NAT mode, the routed lab's backends answer
    the client from their own address straight through the router, and the client, which
    talked to the VIP, drops the answer. The same lab with the backend's default route back on
    the LB works: the data path is fine, the return path is what NAT needs."""
    pytest.importorskip("bcc")
    from agent_process import AgentProcess, status
    from pools import VIP, WEB, pool_yaml

    pool = tmp_path / "pool.yaml"
    pool.write_text(pool_yaml(WEB, table_size=65537, seed=0))
    with Lab("routed", backends=2, prefix="xlt-lab-rnat") as lab, AgentProcess(
        lab, pool, "--mode", "native"
    ) as agent:
        lab.reset_router_counts()
        cmd = ["curl", "-sS", "--noproxy", "*", "-m", "2", f"http://{VIP}/"]
        failed = lab.run(lab.client_ns, *cmd, check=False)
        assert failed.returncode != 0 and "backend=" not in failed.stdout, failed
        counts = lab.router_counts()
        # The balancer did steer the SYN; the SYN-ACK came back past it, from a backend.
        assert status(lab)["groups"][0]["counters"]["new_flow"] >= 1
        assert counts["from_backends"]["packets"] >= 1 and counts["via_lb"] == ZERO, counts
        assert not any(lab.backend_log(i) for i in range(2))  # no request ever arrived

        # Control: replies routed through the LB again, as in the other labs.
        for ns in lab.backend_ns:
            lab.run(ns, "ip", "route", "replace", "default", "via", lab.lb_backend_addr)
        lab.reset_router_counts()
        body = lab.run(lab.client_ns, *cmd).stdout
        assert BE_LINE.fullmatch(body) and "client=10.10.0.2:" in body, body
        counts = lab.router_counts()
        assert counts["via_lb"]["packets"] >= 2 and counts["from_backends"] == ZERO, counts
        assert agent.stop() == 0, agent.log_text()
