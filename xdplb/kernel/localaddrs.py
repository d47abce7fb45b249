"""The balancer's own addresses: the IPv4 addresses of every interface of the calling
thread's network namespace (rtnetlink, pyroute2). A backend must not be one of them
(``xdplb.config.check_backends_not_local``): only the agent, in the namespace it balances
in, can tell, whereas ``check-config`` may run anywhere."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address

from pyroute2 import IPRoute


def local_addresses() -> frozenset[IPv4Address]:
    with IPRoute() as ipr:
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
        # point-to-point link and the same as IFA_LOCAL elsewhere.
        return frozenset(IPv4Address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
                         for m in ipr.get_addr(family=socket.AF_INET))


def local_port_range() -> tuple[int, int]:
    """The ephemeral ports the host's own sockets take (net.ipv4.ip_local_port_range of the
    calling thread's network namespace: /proc/sys follows it)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = f.read().split()
    return int(lo), int(hi)


def source_toward(address: str) -> str | None:
    """The address this host sends from toward ``address`` (the route's preferred source,
    as `ip route get` shows it), or None without a route."""
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=address)
        except Exception:  # noqa: BLE001 - pyroute2 raises NetlinkError (ENETUNREACH...)
            return None
    for r in routes:
        if src := r.get_attr("RTA_PREFSRC"):
            return str(src)
    return None


def link_macs(ifindexes: list[int]) -> dict[int, bytes]:
    """The MAC (6 bytes) of each interface of ``ifindexes`` that has one."""
    out = {}
    with IPRoute() as ipr:
        for idx in ifindexes:
            for link in ipr.get_links(idx):
                mac = link.get_attr("IFLA_ADDRESS")
                if mac and len(mac.split(":")) == 6:
                    out[idx] = bytes.fromhex(mac.replace(":", ""))
    return out
