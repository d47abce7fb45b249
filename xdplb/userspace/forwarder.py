"""The scapy data path, attached: frames tapped with AF_PACKET on the attached interfaces go
through ``pydatapath.PyDatapath`` and leave again by the same sockets. The tap sits after GRO:
``gso`` turns what it hands over back into the frames that were on the wire.

- TX / redirect: sent on the egress interface's socket, as XDP would.
- Pass, rewritten (no neighbour yet, or an egress we are not attached to): handed to the
  kernel's IP output through a raw socket, TTL decremented as its forwarding would; this is
  also what makes the kernel resolve the neighbour (the FIB then sees it, below).
- Pass, untouched, and drop: nothing to do; the kernel has its own copy of the frame unless
  ``nftguard`` dropped it (see there for what the data path owns).

Next hops come from ``fib.Fib``, re-read after every rtnetlink change (links, addresses,
routes, rules, neighbours, forwarding sysctls). The nftables guard follows the maps: when
VIPs or backends change it is rewritten. No BCC anywhere on this path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import rtnl

from xdplb.abi.codec import from_be16, ipv4_of
from xdplb.abi.layout import BackendFlag
from xdplb.config import Config
from xdplb.kernel.maps import read_counters
from xdplb.userspace import gso, nftguard
from xdplb.userspace.datapath import XDP_PASS, XDP_REDIRECT, XDP_TX, PyDatapath, decrement_ttl
from xdplb.userspace.fib import Fib
from xdplb.userspace.parse import parse
from xdplb.userspace.usermaps import UserMaps

log = logging.getLogger("xdplb")

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # our own transmissions, looped back to the tap
SO_RCVBUFFORCE = 33
SOL_PACKET, PACKET_AUXDATA = 263, 8
AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 0x10, 0x40
ETH_P_8021Q = 0x8100
RCVBUF = 8 << 20  # bursts wait here while Python catches up
RECV_LEN = 65536 + 64  # a 64 KB GRO aggregate, its headers and the virtio_net_hdr
BATCH = 256  # frames per socket per wake-up, so one busy interface cannot starve another
TICK = 0.2  # seconds between checks of the maps (guard) and statistics publication
RTNLGRP_IPV4_NETCONF = 24  # forwarding sysctl changes
EVENTS = (rtnl.RTMGRP_LINK | rtnl.RTMGRP_NEIGH | rtnl.RTMGRP_IPV4_IFADDR | rtnl.RTMGRP_IPV4_ROUTE
          | rtnl.RTMGRP_IPV4_RULE | 1 << (RTNLGRP_IPV4_NETCONF - 1))
STATS_FILE = "scapy.json"


class ScapyForwarder:
    """Maps (fill them through ``sync.MapSync``), the data path on them, and the loop that
    feeds it frames. ``start()`` returns {iface: "scapy"} like the XDP attach does modes."""

    def __init__(self, cfg: Config, ifaces: dict[str, int],
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.maps = UserMaps(cfg.flows.max_entries)
        self.fib = Fib()
        self.datapath = PyDatapath(self.maps, self.fib)
        self.ifaces = dict(ifaces)
        self.publish = publish
        self.guard = nftguard.Guard(nftguard.table_name(list(ifaces.values())), list(ifaces))
        self.stats = {"received": 0, "aggregates": 0, "sent": 0, "to_kernel": 0, "errors": 0}
        self._socks: dict[int, socket.socket] = {}
        self._raw: socket.socket | None = None
        self._events: socket.socket | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._guard_writes = -1  # maps.writes the guard was computed at
        self._backends_seen: set[tuple[str, int, int]] = set()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> dict[str, str]:
        """Open the taps, install the guard, start forwarding (the maps must be filled)."""
        try:
            for name, idx in self.ifaces.items():
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                try:
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                # The kernel strips an 802.1Q tag before the tap; auxdata gives it back.
                s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
                # GRO aggregates and frames awaiting checksum offload are marked (gso.py).
                s.setsockopt(SOL_PACKET, gso.PACKET_VNET_HDR, 1)
                s.bind((name, ETH_P_ALL))
                s.setblocking(False)
                self._socks[idx] = s
            self._raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            # A plain rtnetlink socket: any message means "re-read"; pyroute2's sockets are
            # per thread and this one is read by the forwarding thread.
            self._events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                         socket.NETLINK_ROUTE)
            self._events.bind((0, EVENTS))
            self._events.setblocking(False)
            self._wake = os.pipe()
            # Taps first, then the guard: frames in between are queued, not lost.
            self._refresh_guard()
            self._thread = threading.Thread(target=self._loop, name="xdplb-scapy", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return {name: "scapy" for name in self.ifaces}

    def stop(self) -> None:
        """Stop forwarding and give the interfaces back to the kernel."""
        self._stop.set()
        if self._wake is not None:
            os.write(self._wake[1], b"x")
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        try:
            self.guard.remove()
        except nftguard.NftError as e:
            log.error("scapy data path: %s; remove it with `xdplb detach IFACE`", e)
        for s in (*self._socks.values(), self._raw, self._events):
            if s is not None:
                s.close()
        self._socks = {}
        self._raw = self._events = None
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        self.fib.close()

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._events is not None and self._wake is not None
        by_fd = {s.fileno(): (s, idx) for idx, s in self._socks.items()}
        fds = [*by_fd, self._events.fileno(), self._wake[0]]
        next_publish = 0.0
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(fds, [], [], TICK)
                for fd in ready:
                    if fd in by_fd:
                        self._drain(*by_fd[fd])
                    elif fd == self._events.fileno():
                        self._netlink_changed()
                if self.maps.writes != self._guard_writes:
                    self._refresh_guard()
                if time.monotonic() >= next_publish:
                    next_publish = time.monotonic() + 1.0
                    self._publish()
            except Exception:  # noqa: BLE001 (one bad frame or event must not stop the path)
                self.stats["errors"] += 1
                log.exception("scapy data path")
        self._publish()

    def _netlink_changed(self) -> None:
        assert self._events is not None
        while True:
            try:
                self._events.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost; re-reading everything covers them
                continue
        self.fib.invalidate()
        self._guard_writes = -1  # our addresses may have changed too

    def _drain(self, sock: socket.socket, ifindex: int) -> None:
        for _ in range(BATCH):
            try:
                data, anc, flags, addr = sock.recvmsg(RECV_LEN, 64)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            self.stats["received"] += 1
            vnet, frame = data[: gso.VNET_HDR.size], with_tag(data[gso.VNET_HDR.size :], anc)
            # No GSO type, no checksum to complete: a frame as it was on the wire (most are).
            if not vnet[1] and not vnet[0] & gso.F_NEEDS_CSUM and not flags & socket.MSG_TRUNC:
                self._forward(frame, ifindex)
                continue
            try:
                if flags & socket.MSG_TRUNC:
                    raise gso.Unsupported(f"frame longer than {RECV_LEN} bytes")
                frames = gso.wire_frames(vnet, frame)
            except gso.Unsupported as e:
                self.stats["errors"] += 1
                log.debug("scapy data path: cannot forward: %s", e)
                continue
            self.stats["aggregates"] += gso.is_aggregate(vnet)
            for f in frames:
                self._forward(f, ifindex)

    def _forward(self, frame: bytes, ifindex: int) -> None:
        out = self.datapath.run(frame, ifindex)
        try:
            if out.action in (XDP_TX, XDP_REDIRECT):
                self._socks[out.egress].send(gso.NO_VNET_HDR + out.data)
                self.stats["sent"] += 1
            elif out.action == XDP_PASS and out.data != frame:
                self._to_kernel(out.data)
                self.stats["to_kernel"] += 1
        except OSError as e:
            self.stats["errors"] += 1
            log.debug("scapy data path: cannot send: %s", e)

    def _to_kernel(self, frame: bytes) -> None:
        """What the kernel's forwarding does with a frame XDP passes to it: route it (and
        resolve its neighbour), one hop further."""
        assert self._raw is not None
        _, p = parse(frame)
        assert p is not None  # the data path rewrote it: it parsed
        ip = bytearray(frame[p.ip : p.ip + ((frame[p.ip + 2] << 8) | frame[p.ip + 3])])
        decrement_ttl(ip, 0)
        self._raw.sendto(bytes(ip), (socket.inet_ntoa(bytes(ip[16:20])), 0))

    # --- guard and statistics ------------------------------------------------------------

    def _owned(self) -> nftguard.Owned:
        protos = {}
        vips = set()
        for k, info in self.maps.items("vips"):
            protos[info.vip_id] = k.proto
            vips.add((ipv4_of(k.addr), k.proto, from_be16(k.port)))
        for _, be in self.maps.items("backends"):
            if be.flags & BackendFlag.VALID and be.vip_id in protos:
                # Kept after a backend goes: its tracked flows still get replies rewritten.
                self._backends_seen.add((ipv4_of(be.addr), protos[be.vip_id],
                                         from_be16(be.port)))
        with IPRoute() as ipr:
            local = {a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                     for a in ipr.get_addr(family=socket.AF_INET)}
        return nftguard.Owned(frozenset(a for a, _, _ in vips), frozenset(vips),
                              frozenset(self._backends_seen), frozenset(local))

    def _refresh_guard(self) -> None:
        writes = self.maps.writes
        if self.guard.apply(self._owned()):
            log.info("scapy data path: nftables guard %s updated", self.guard.table)
        self._guard_writes = writes

    def _publish(self) -> None:
        if self.publish is not None:
            with contextlib.suppress(OSError):
                self.publish({"datapath": "scapy", "interfaces": self.ifaces,
                              "counters": read_counters(self.maps), "forwarder": self.stats,
                              "time": time.time()})


def with_tag(frame: bytes, ancillary: list[tuple[int, int, bytes]]) -> bytes:
    """The frame as it was on the wire (as XDP sees it): with its 802.1Q tag put back, from
    the PACKET_AUXDATA of an AF_PACKET recvmsg()."""
    for level, kind, data in ancillary:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= AUXDATA.size:
            status, *_, tci, tpid = AUXDATA.unpack_from(data)
            if status & TP_STATUS_VLAN_VALID:
                tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q
                return frame[:12] + struct.pack("!HH", tpid, tci) + frame[12:]
    return frame
