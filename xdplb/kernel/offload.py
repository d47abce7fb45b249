"""Partial checksums: where an attached interface can hand the program a frame whose TCP/UDP
checksum is not complete, and the setting that prevents it.

A sender with TX checksum offload leaves the L4 checksum partial (only the pseudo-header
sum), for the NIC to complete. Frames from the wire are always complete, but on a veth the
far end's skb crosses over as it is: XDP then sees the partial checksum, and the
incremental update of a rewrite makes it wrong (the receiver drops the frame, or, in generic
mode, a NIC would complete it wrongly). The kernel completes the checksum whenever such a
packet leaves through a device without TX checksum offload, so turning offload off on the
veth's peer (whatever sent the packet, a bridge port or the host itself) is enough.

The peer may be in another network namespace: found by the veth's link-netnsid, which
``ip netns list-id`` names for namespaces under /run/netns; ``nsenter`` and ``ethtool``
(iproute2, util-linux, ethtool: set up by scripts/setup.sh) then read and change it there.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute

NETNS_RUN = "/run/netns"


class OffloadError(RuntimeError):
    """The peer's TX checksum offload is on and cannot be turned off from here; the message
    names the setting."""


@dataclass(frozen=True)
class VethPeer:
    """The far end of a veth: its ifindex in its namespace, and that namespace's name
    (None: ours)."""

    iface: str
    ifindex: int
    netns: str | None
    nsid: int | None

    def where(self) -> str:
        return f"network namespace {self.netns}" if self.netns else "this network namespace"


def veth_peer(ifindex: int) -> VethPeer | None:
    """The peer of a veth interface, or None when the interface is not a veth. Raises
    OffloadError when the peer's namespace has no name we can enter."""
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifindex)
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "veth":
        return None
    name, peer = link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_LINK")
    nsid = link.get_attr("IFLA_LINK_NETNSID")
    if nsid is None:
        return VethPeer(name, peer, None, None)
    netns = _netns_names().get(nsid)
    if netns is None:
        raise OffloadError(
            f"{name} is a veth whose peer (ifindex {peer}) is in a network namespace without "
            f"a name under {NETNS_RUN} (netnsid {nsid}), so xdplb cannot check its TX "
            f"checksum offload; turn it off there (`ethtool -K PEER tx off`) and attach again")
    return VethPeer(name, peer, netns, nsid)


def _netns_names() -> dict[int, str]:
    """nsid -> name of the named namespaces this one has ids for."""
    out = _run(None, "ip", "netns", "list-id")
    return {int(m[1]): m[2] for m in re.finditer(r"nsid (\d+) \(iproute2 netns name: ([^)]+)\)",
                                                 out)}


def _run(netns: str | None, *cmd: str) -> str:
    full = ["nsenter", f"--net={NETNS_RUN}/{netns}", *cmd] if netns else list(cmd)
    p = subprocess.run(full, capture_output=True, text=True, timeout=10, check=False)
    if p.returncode != 0:
        raise OffloadError(f"`{' '.join(full)}` failed: {p.stderr.strip() or p.returncode}")
    return p.stdout


def peer_name(peer: VethPeer) -> str:
    """The peer's interface name in its namespace (ethtool takes names only)."""
    out = _run(peer.netns, "ip", "-o", "link", "show")
    m = re.search(rf"^{peer.ifindex}: ([^:@\s]+)", out, re.M)
    if m is None:
        raise OffloadError(f"the peer of {peer.iface} (ifindex {peer.ifindex}) is not in "
                           f"{peer.where()}")
    return m[1]


def tx_checksum_on(peer: VethPeer, name: str) -> bool:
    out = _run(peer.netns, "ethtool", "-k", name)
    m = re.search(r"^tx-checksumming: (on|off)", out, re.M)
    return m is not None and m[1] == "on"


def ensure_complete_checksums(ifindex: int) -> str | None:
    """Make frames arriving on ``ifindex`` carry complete checksums: on a veth whose peer
    has TX checksum offload on, turn it off. Returns what was changed (for the log), None
    when nothing had to be; raises OffloadError (naming the setting) when it cannot."""
    peer = veth_peer(ifindex)
    if peer is None:
        return None
    name = peer_name(peer)
    if not tx_checksum_on(peer, name):
        return None
    _run(peer.netns, "ethtool", "-K", name, "tx", "off")
    if tx_checksum_on(peer, name):
        raise OffloadError(f"TX checksum offload of {name} ({peer.where()}), the peer of "
                           f"{peer.iface}, stays on; turn it off (`ethtool -K {name} tx off`)")
    return (f"{peer.iface}: turned TX checksum offload off on its veth peer {name} "
            f"({peer.where()}): with it on, the peer hands XDP partial checksums that a "
            f"rewrite would make wrong")
