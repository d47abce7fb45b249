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
