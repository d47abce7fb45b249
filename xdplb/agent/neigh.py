"""Keeps the next hops of fullnat and dsr backends resolved (``kernel/neigh.py`` says why):
a managed neighbour entry per next hop while a VIP in such a mode has the backend, removed
when it leaves and when the agent detaches. A failure is logged: the data path then counts
drop_next_hop until the kernel learns the MAC some other way."""

from __future__ import annotations

import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdplb.abi.layout import Forwarding
from xdplb.agent.errors import UsageError
from xdplb.config import Config
from xdplb.kernel import neigh
from xdplb.model.desired import DesiredState

log = logging.getLogger(__name__)


class NeighbourKeeper:
    def __init__(self) -> None:
        self.ours: set[tuple[int, str]] = set()  # (ifindex, next hop) entries we made managed

    def keep(self, desired: DesiredState) -> None:
        """Managed entries for exactly the next hops of the state's non-nat backends."""
        addrs = {b.address for v in desired.vips if v.mode != Forwarding.NAT
                 for b in v.backends}
        try:
            with IPRoute() as ipr:
                want = {hop for a in sorted(addrs) if (hop := neigh.next_hop(ipr, a))}
                for oif, addr in sorted(want - self.ours):
                    if neigh.manage(ipr, oif, addr):
                        self.ours.add((oif, addr))
                for oif, addr in sorted(self.ours - want):
                    neigh.unmanage(ipr, oif, addr)
                    self.ours.discard((oif, addr))
        except (OSError, NetlinkError) as e:
            log.warning("could not keep backends' neighbours resolved: %s", e)

    def release(self) -> None:
        """Remove every entry we made managed (the data path is going away)."""
        if not self.ours:
            return
        try:
            with IPRoute() as ipr:
                for oif, addr in sorted(self.ours):
                    neigh.unmanage(ipr, oif, addr)
        except (OSError, NetlinkError) as e:
            log.warning("could not remove managed neighbour entries: %s", e)
        self.ours.clear()


def check_l2_on_link(cfg: Config) -> None:
    """Refuse dsr/l2 backends that are not on a directly connected segment: only the frame's
    MACs change, so the packet must reach the backend in one hop (the data path would drop
    it, counting drop_not_on_link). UsageError naming each."""
    addrs = sorted({(v.name, str(b.address)) for v in cfg.vips if v.mode == "dsr-l2"
                    for b in v.backends})
    if not addrs:
        return
    bad = []
    with IPRoute() as ipr:
        for vip, addr in addrs:
            hop = neigh.next_hop(ipr, addr)
            if hop is None:
                bad.append(f"{vip}/{addr} (no route)")
            elif hop[1] != addr:
                bad.append(f"{vip}/{addr} (reached via gateway {hop[1]})")
    if bad:
        raise UsageError("dsr with encap l2 needs each backend on a directly connected "
                         f"segment; not so: {', '.join(bad)} (use encap ipip, or connect it)")
