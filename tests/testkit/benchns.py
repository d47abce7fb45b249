"""A throwaway network namespace whose links, routes, rules and neighbours give every
bpf_fib_lookup outcome, for running both data paths side by side (``xdplb fuzz``, the parity
tests). Nothing in it sends or receives: the engines only look its FIB up.

    d0  10.10.0.1/24 clients, 10.20.0.1/24 backends   attached (TX)
    d1  10.30.0.1/24                                    attached (REDIRECT)
    d2  10.40.0.1/24                                    not attached (PASS_FOREIGN_EGRESS)
    d3  10.50.0.1/24, MTU 576                           attached (FRAG_NEEDED)
    d4  10.11.0.1/24, forwarding off                    an ingress for FWD_DISABLED

Neighbours in every state class (permanent, noarp, stale: valid; failed, none: NO_NEIGH),
gateway routes with and without a resolved gateway and with a locked MTU, blackhole,
unreachable and prohibit routes, a TOS route, and rules (a source-routed table, a prohibit
rule), so the rule walk is exercised too.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.rtnl.ndmsg import states

LB_MAC = "02:00:00:00:00:01"
RTAX_MTU = 2

# (link, address/prefix, mtu, forwarding, attached)
LINKS = (
    ("d0", ("10.10.0.1/24", "10.20.0.1/24"), 1500, True, True),
    ("d1", ("10.30.0.1/24",), 1500, True, True),
    ("d2", ("10.40.0.1/24",), 1500, True, False),
    ("d3", ("10.50.0.1/24",), 576, True, True),
    ("d4", ("10.11.0.1/24",), 1500, False, False),
)
# (address, link, state); MAC 02:00:00:00:<3rd octet>:<4th octet>
NEIGHBOURS = (
    *((f"10.10.0.{i}", "d0", "permanent") for i in range(2, 10)),
    ("10.10.0.10", "d0", "noarp"),
    ("10.10.0.11", "d0", "stale"),
    ("10.10.0.12", "d0", "failed"),
    ("10.10.0.254", "d0", "permanent"),  # gateway for the clients of 10.12/24 and 10.13/24
    ("10.20.0.11", "d0", "permanent"),
    ("10.20.0.12", "d0", "permanent"),
    ("10.20.0.13", "d0", "stale"),
    ("10.20.0.14", "d0", "noarp"),
    ("10.20.0.15", "d0", "failed"),
    ("10.20.0.254", "d0", "permanent"),  # gateway of 10.70/24 and 10.72/24
    ("10.30.0.5", "d1", "permanent"),
    ("10.30.0.254", "d1", "permanent"),  # gateway of table 100
    ("10.40.0.5", "d2", "permanent"),
    ("10.50.0.5", "d3", "permanent"),
    ("10.11.0.2", "d4", "permanent"),
)
# Backends whose next hop gives each outcome (10.20.0.99 and 10.71.0.5: no neighbour).
BACKENDS = ("10.20.0.11", "10.20.0.12", "10.20.0.13", "10.20.0.14", "10.20.0.15", "10.20.0.99",
            "10.30.0.5", "10.40.0.5", "10.50.0.5", "10.70.0.5", "10.71.0.5", "10.72.0.5",
            "10.60.0.5", "10.61.0.5", "10.62.0.5", "10.20.0.1")
# Clients: on d0 (neighbours of every kind), on d4, and behind gateways/rules.
CLIENTS = ("10.10.0.2", "10.10.0.3", "10.10.0.4", "10.10.0.5", "10.10.0.10", "10.10.0.11",
           "10.10.0.12", "10.10.0.13", "10.11.0.2", "10.12.0.7", "10.13.0.7", "10.99.0.1")
VIPS = ("10.200.0.10", "10.200.0.20", "10.200.0.30", "10.200.0.40")  # the last: other modes


@dataclass
class Bench:
    """The namespace, entered: engines made now resolve next hops in it."""

    name: str
    ifindex: dict[str, int] = field(default_factory=dict)

    @property
    def attached(self) -> list[int]:
        """The interfaces a balancer would be attached to (its TX/redirect ports)."""
        return [self.ifindex[n] for n, *_, att in LINKS if att]

    @property
    def ingresses(self) -> list[int]:
        """Ingress interfaces worth running frames on (0: loopback, as a bare test run)."""
        return [0, *(self.ifindex[n] for n, *_ in LINKS)]


def _mac(addr: str) -> str:
    o = ipaddress.IPv4Address(addr).packed
    return f"02:00:00:00:{o[2]:02x}:{o[3]:02x}"


def _sysctl(name: str, value: int) -> None:
    # /proc/sys/net is the namespace of the writing thread: the bench's, once entered
    Path("/proc/sys/net/ipv4", name).write_text(str(value))


def _build(ipr: IPRoute, bench: Bench, rules: bool) -> None:
    _sysctl("ip_forward", 1)
    for name, addrs, mtu, fwd, _ in LINKS:
        # One MAC for every link: the test frames, addressed to LB_MAC, are then for the
        # balancer on whichever ingress they arrive (if_macs judges the others foreign)
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"}, address=LB_MAC)
        idx = bench.ifindex[name] = ipr.link_lookup(ifname=name)[0]
        for a in addrs:
            ip, plen = a.split("/")
            ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
        ipr.link("set", index=idx, mtu=mtu, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname=f"{name}p")[0], state="up")
        _sysctl(f"conf/{name}/forwarding", int(fwd))
    bench.ifindex["lo"] = 1
    for addr, link, state in NEIGHBOURS:
        ipr.neigh("add", dst=addr, lladdr=_mac(addr), ifindex=bench.ifindex[link],
                  state=states[state])
    for net, kind in (("10.60.0.0", "blackhole"), ("10.61.0.0", "unreachable"),
                      ("10.62.0.0", "prohibit")):
        ipr.route("add", dst=net, dst_len=24, type=kind)
    ipr.route("add", dst="10.70.0.0", dst_len=24, gateway="10.20.0.254")
    ipr.route("add", dst="10.71.0.0", dst_len=24, gateway="10.20.0.253")
    ipr.route("add", dst="10.72.0.0", dst_len=24, gateway="10.20.0.254",
              metrics={"mtu": 300, "lock": 1 << RTAX_MTU})
    for net in ("10.12.0.0", "10.13.0.0"):
        ipr.route("add", dst=net, dst_len=24, gateway="10.10.0.254")
    ipr.route("add", dst="10.20.0.0", dst_len=24, tos=0x10, oif=bench.ifindex["d1"])
    if not rules:  # the kernel takes a shortcut (main table only) while no rule was added
        return
    # Clients of 10.12/24 reach the backends through d1; those of 10.13/24 are refused.
    ipr.route("add", dst="10.20.0.0", dst_len=24, gateway="10.30.0.254", table=100)
    ipr.rule("add", table=100, priority=100, src="10.12.0.0", src_len=24)
    ipr.rule("add", priority=101, src="10.13.0.0", src_len=24, action="FR_ACT_PROHIBIT")


@contextlib.contextmanager
def bench_namespace(name: str, rules: bool = True) -> Iterator[Bench]:
    """Create the namespace (``rules``: with policy routing rules), enter it (this thread),
    and remove it on the way out, also after a failure."""
    with contextlib.suppress(OSError):
        netns.remove(name)  # left by a killed run with the same name
    netns.create(name)
    try:
        netns.pushns(name)
        try:
            bench = Bench(name)
            with IPRoute() as ipr:
                _build(ipr, bench, rules)
            yield bench
        finally:
            netns.popns()
    finally:
        netns.remove(name)
