"""xdplb/userspace/fib.py (the scapy data path's bpf_fib_lookup) against the kernel's own
helper, run by a probe XDP program (tests/testkit/bpf/fib_probe.c) under BPF_PROG_TEST_RUN, on
the bench namespace (every result code), with and without policy routing rules."""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import states
from testkit.benchns import BACKENDS, CLIENTS, VIPS, bench_namespace

from xdplb.kernel import bpfsys
from xdplb.kernel.loader import compile_program
from xdplb.userspace import fib

pytestmark = pytest.mark.root

PROBE_C = Path(__file__).parent / "testkit" / "bpf" / "fib_probe.c"
PROBE = struct.Struct("<14s4s4sBBHiI6s6s4s")
TOS = (0, 0x10, 0x04, 0x1C, 0xB8)
TOT_LEN = (60, 300, 301, 576, 577, 1500)
PROTOS = (6, 17)


@pytest.fixture(scope="module", params=[True, False], ids=["rules", "no-rules"])
def bench(request):
    with bench_namespace(f"xlt-s-fib-{os.getpid()}", rules=request.param) as b:
        prog = compile_program(1024, source=PROBE_C)
        f = fib.Fib()
        try:
            yield b, prog.prog_fd, f
        finally:
            f.close()
            prog.close()


def kernel(prog_fd: int, daddr: bytes, saddr: bytes, tos: int, proto: int, tot_len: int,
           ifindex: int) -> fib.FibResult:
    frame = PROBE.pack(bytes(14), daddr, saddr, tos, proto, tot_len, 0, 0, bytes(6), bytes(6),
                       bytes(4))
    ctx = bpfsys.xdp_md(len(frame), ifindex) if ifindex else None
    out = bpfsys.prog_test_run(prog_fd, frame, ctx_in=ctx).data_out
    *_, mtu, rc, idx, smac, dmac, nexthop = PROBE.unpack(out)
    # ipv4_dst names the next hop (gateway or daddr) only on success: dsr/l2's on-link check
    return fib.FibResult(rc, idx, smac, dmac, mtu if rc == fib.FRAG_NEEDED else 0,
                         nexthop=nexthop if rc == fib.SUCCESS else b"")


def same(ours: fib.FibResult, theirs: fib.FibResult) -> bool:
    """Equal where the helper defines its output: the code always, the next hop on success,
    the egress device when the neighbour is missing, the MTU when the packet is too long."""
    if ours.rc != theirs.rc:
        return False
    if ours.rc == fib.SUCCESS:
        return ours == theirs
    if ours.rc == fib.FRAG_NEEDED:
        return ours.mtu == theirs.mtu
    if ours.rc == fib.NO_NEIGH:
        return ours.ifindex == theirs.ifindex
    return True


def addresses(rnd: random.Random) -> list[str]:
    nets = ("10.10.0", "10.20.0", "10.30.0", "10.40.0", "10.50.0", "10.60.0", "10.61.0",
            "10.62.0", "10.70.0", "10.71.0", "10.72.0", "10.11.0", "10.12.0", "10.99.0")
    extra = [f"{rnd.choice(nets)}.{rnd.choice((0, 1, 5, 254, 255, rnd.randrange(256)))}"
             for _ in range(40)]
    return [*BACKENDS, *CLIENTS, *VIPS, "127.0.0.1", "255.255.255.255", "224.0.0.1", *extra]


def test_every_result_code_agrees_with_the_kernel(bench):
    b, prog_fd, f = bench
    rnd = random.Random(3)
    addrs = addresses(rnd)
    seen: dict[int, int] = {}
    for _ in range(6000):
        d, s = (ipaddress.IPv4Address(rnd.choice(addrs)).packed for _ in range(2))
        args = (d, s, rnd.choice(TOS), rnd.choice(PROTOS), rnd.choice(TOT_LEN),
                rnd.choice(b.ingresses))
        want = kernel(prog_fd, *args)
        got = f.lookup(*args[:-1], args[-1] or fib.LOOPBACK_IFINDEX)  # test run: 0 is lo
        assert same(got, want), (args, got, want)
        seen[want.rc] = seen.get(want.rc, 0) + 1
    expected = {fib.SUCCESS, fib.BLACKHOLE, fib.UNREACHABLE, fib.PROHIBIT, fib.NOT_FWDED,
                fib.FWD_DISABLED, fib.NO_NEIGH, fib.FRAG_NEEDED}
    assert expected <= set(seen), seen


def test_cache_sees_changes_after_invalidate(bench):
    b, prog_fd, f = bench
    args = (ipaddress.IPv4Address("10.20.0.99").packed,
            ipaddress.IPv4Address("10.10.0.2").packed, 0, 6, 60, b.ifindex["d0"])
    assert f.lookup(*args).rc == fib.NO_NEIGH
    with IPRoute() as ipr:
        ipr.neigh("add", dst="10.20.0.99", lladdr="02:00:00:00:00:99",
                  ifindex=b.ifindex["d0"], state=states["reachable"])
        try:
            assert kernel(prog_fd, *args).rc == fib.SUCCESS
            assert f.lookup(*args).rc == fib.NO_NEIGH  # cached until told
            f.invalidate()
            assert same(f.lookup(*args), kernel(prog_fd, *args))
        finally:
            ipr.neigh("del", dst="10.20.0.99", ifindex=b.ifindex["d0"])
            f.invalidate()
    assert f.lookup(*args).rc == fib.NO_NEIGH
