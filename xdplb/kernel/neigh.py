"""Neighbours the data path needs resolved. bpf_fib_lookup answers NO_NEIGH for a next hop
whose MAC the kernel has not learnt; nat hands such a packet to the kernel (which resolves
it and forwards), but in fullnat and dsr the kernel cannot take a packet over, so nothing
would ever make it resolve the MAC. A *managed* neighbour entry (NTF_EXT_MANAGED, Linux 5.16)
is one the kernel resolves by itself and keeps reachable, probing it as it would a used one.
Entries someone else set (permanent, noarp, already managed) are left alone."""

from __future__ import annotations

import contextlib

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NTF_EXT_MANAGED = 1
_NUD_NOARP, _NUD_PERMANENT = 0x40, 0x80
RTN_UNICAST = 1


def next_hop(ipr: IPRoute, address: str) -> tuple[int, str] | None:
    """(egress ifindex, next hop address) toward ``address``, or None without a unicast
    route (then there is no neighbour to resolve)."""
    try:
        routes = ipr.route("get", dst=address)
    except NetlinkError:
        return None
    for r in routes:
        if r["type"] == RTN_UNICAST and (oif := r.get_attr("RTA_OIF")):
            return oif, r.get_attr("RTA_GATEWAY") or address
    return None


def manage(ipr: IPRoute, oif: int, address: str) -> bool:
    """Make the neighbour entry of ``address`` on ``oif`` a managed one, unless an entry
    someone else controls is there. True when the entry is now ours."""
    for n in ipr.get_neighbours(dst=address, ifindex=oif):
        if n["state"] & (_NUD_PERMANENT | _NUD_NOARP) or \
                (n.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED:
            return False
    ipr.neigh("replace", dst=address, ifindex=oif, state=0, NDA_FLAGS_EXT=NTF_EXT_MANAGED)
    return True


def unmanage(ipr: IPRoute, oif: int, address: str) -> None:
    """Remove the managed entry of ``address`` on ``oif`` (gone already: nothing to do)."""
    for n in ipr.get_neighbours(dst=address, ifindex=oif):
        if (n.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED:
            with contextlib.suppress(NetlinkError):  # removed meanwhile
                ipr.neigh("del", dst=address, ifindex=oif)
