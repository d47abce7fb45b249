"""End to end in network namespaces, native XDP: real TCP (HTTP) and UDP through the VIP,
one-armed and two-armed, with the agent run as a user runs it."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import replace

import pytest
from agent_process import AgentProcess, status, xdplb
from lab import Lab
from pools import ECHO, VIP, WEB, pool_yaml

pytestmark = pytest.mark.root


def e2e_pool(backends: int = 2) -> str:
    """The pool of these tests over the lab's first ``backends`` backends."""
    return pool_yaml(*(replace(v, backends=v.backends[:backends]) for v in (WEB, ECHO)),
                     table_size=65537, seed=0, flows={"max_entries": 100_000})


POOL = e2e_pool()
UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
out = []
for i in range(int(sys.argv[1])):
    s2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a new flow each time
    s2.settimeout(2)
    s2.sendto(b"ping%d" % i, ("10.200.0.10", 5000))
    data, peer = s2.recvfrom(2048)
    out.append("%s:%d %s" % (peer[0], peer[1], data.decode()))
    s2.close()
print("\\n".join(out))
"""


def prog_ids(lab: Lab) -> dict[str, str | None]:
    out = {}
    for dev in lab.lb_ifaces:
        text = lab.run(lab.lb_ns, "ip", "-d", "link", "show", "dev", dev).stdout
        m = re.search(r"prog/xdp id (\d+)", text)
        out[dev] = m.group(1) if m else None
    return out


@pytest.fixture(scope="module", params=["one-armed", "two-armed"])
def running(request, tmp_path_factory):
    topo = request.param
    prefix = "xlt-e1" if topo == "one-armed" else "xlt-e2"
    tmp = tmp_path_factory.mktemp(topo)
    with Lab(topology=topo, backends=2, prefix=prefix) as lab:
        pool = tmp / "pool.yaml"
        pool.write_text(POOL)
        agent = AgentProcess(lab, pool, "--mode", "native")
        try:
            yield lab, agent, tmp
        finally:
            rc = agent.stop()
            assert rc == 0, agent.log_text()
            # Detached cleanly: no program left on the interfaces, no pins.
            assert all(v is None for v in prog_ids(lab).values())
            assert xdplb(lab, "status", check=False).returncode == 3


def curl(lab: Lab, path: str = "/", n: int = 1, *opts: str) -> list[str]:
    script = (f'for i in $(seq {n}); do curl -s -m 5 {" ".join(opts)} '
              f'http://{VIP}{path}; echo; done')
    out = lab.run(lab.client_ns, "sh", "-c", script, timeout=300).stdout
    return [line for line in out.splitlines() if line]


def test_status_shows_native_attach(running):
    lab, _, _ = running
    st = status(lab)
    (g,) = st["groups"]
    assert [i["name"] for i in g["interfaces"]] == lab.lb_ifaces
    assert all(i["attached"] and i["mode"] == "native" for i in g["interfaces"])
    vips = {(v["protocol"], v["port"]): v for v in g["vips"]}
    assert {b["address"] for b in vips[("tcp", 80)]["backends"]} == {"10.20.0.11", "10.20.0.12"}


def test_http_weighted_split_real_client(running):
    lab, _, _ = running
    before = status(lab)["groups"][0]["counters"]
    lines = curl(lab, "/", 400)
    assert len(lines) == 400, lines[-5:]
    served = Counter(re.search(r"backend=(\S+)", line).group(1) for line in lines)
    assert set(served) == {"be1", "be2"}
    share = served["be1"] / 400
    assert 0.65 < share < 0.85, served  # weights 3:1
    # Backends see the real client address, not the balancer's.
    assert all("client=10.10.0.2:" in line for line in lines)
    after = status(lab)["groups"][0]["counters"]
    assert after["new_flow"] - before.get("new_flow", 0) >= 400
    fwd = "tx" if lab.topology == "one-armed" else "redirect"
    assert after[fwd] > before.get(fwd, 0)
    assert after.get("pass_ttl", 0) == 0


def test_replies_come_from_the_vip(running):
    lab, _, _ = running
    # curl only completes if the SYN-ACK came from VIP:80; print where it talked to.
    lines = curl(lab, "/", 5, "-o", "/dev/null", "-w", "'%{remote_ip}:%{remote_port}'")
    assert lines == [f"{VIP}:80"] * 5


def test_long_transfers_intact(running):
    lab, _, tmp = running
    n = 8 * 1024 * 1024
    out = lab.run(lab.client_ns, "sh", "-c",
                  f"curl -s -m 60 -D - -o /tmp/xl-dl-$$ 'http://{VIP}/bytes?n={n}' && "
                  f"sha256sum /tmp/xl-dl-$$ && stat -c %s /tmp/xl-dl-$$; rm -f /tmp/xl-dl-$$",
                  timeout=90).stdout
    want = re.search(r"(?i)x-sha256: (\w+)", out).group(1)
    assert want in out.split("\n", 100)[-3] or out.count(want) == 2, out
    assert f"\n{n}\n" in out
    # Upload: several MiB echoed back byte for byte.
    blob = tmp / "upload.bin"
    blob.write_bytes(hashlib.sha256(b"seed").digest() * (4 * 1024 * 1024 // 32))
    echoed = lab.run(lab.client_ns, "sh", "-c",
                     f"curl -s -m 60 --data-binary @{blob} http://{VIP}/echo | sha256sum",
                     timeout=90).stdout.split()[0]
    assert echoed == hashlib.sha256(blob.read_bytes()).hexdigest()


def test_udp_through_vip(running):
    lab, _, _ = running
    out = lab.run(lab.client_ns, "python3", "-c", UDP_CLIENT, "60", timeout=120).stdout
    lines = out.splitlines()
    assert len(lines) == 60
    # Every reply comes from the VIP's address and port; both backends served.
    assert all(line.startswith(f"{VIP}:5000 ") for line in lines), lines[:3]
    names = Counter(line.split()[1] for line in lines)
    assert set(names) == {"be1", "be2"}, names
    assert all("10.10.0.2:" in line for line in lines)


def test_bad_config_changes_nothing(running):
    lab, _, tmp = running
    ids = prog_ids(lab)
    bad = tmp / "bad.yaml"
    bad.write_text(POOL.replace("port: 8080", "port: 80800"))
    r = xdplb(lab, "attach", *lab.lb_ifaces, "--config", str(bad), check=False)
    assert r.returncode == 2
    assert f"{bad}:" in r.stderr and "backends[1].port" in r.stderr
    line = POOL.replace("port: 8080", "port: 80800").splitlines().index("        port: 80800")
    assert f"{bad}:{line + 1}:" in r.stderr, r.stderr
    assert prog_ids(lab) == ids
    assert len(curl(lab, "/", 5)) == 5
    # A second attach with a good config is refused while one is running... on another
    # interface name that does not exist it fails before touching anything.
    r = xdplb(lab, "attach", "nosuch0", "--config", str(tmp / "pool.yaml"), check=False)
    assert r.returncode == 2 and "nosuch0" in r.stderr
    assert prog_ids(lab) == ids
