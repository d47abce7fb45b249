"""The scapy forwarder on live veths (the bench namespace, frames injected on d0's peer): what
it sends is what the data path computed, 802.1Q tags survive the kernel's untagging, a
missing neighbour is resolved by the kernel and then used, and the kernel's own copy of a VIP
frame is dropped (no ICMP back)."""

from __future__ import annotations

import os
import socket
import time

import pytest
from pools import BE2, VIP, Backend, Vip, pool_yaml
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import states
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from testkit.benchns import bench_namespace
from testkit.fuzz import build
from testkit.pktcheck import checksum_errors

from xdplb.agent.mapsync import MapSync
from xdplb.config import parse_config
from xdplb.model.desired import desired_state
from xdplb.offline.engines import ScapyEngine
from xdplb.userspace.forwarder import PACKET_AUXDATA, SOL_PACKET, ScapyForwarder, with_tag

pytestmark = pytest.mark.root

CLIENT = "10.10.0.2"
POOL = pool_yaml(Vip("web", 80, (Backend(BE2, port=8080),)), Vip("later", 81, ("10.20.0.99",)),
                 table_size=251, flows={"max_entries": 4096})


class Peer:
    """An AF_PACKET socket on d0p: frames sent here arrive on d0."""

    def __init__(self) -> None:
        self.s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)  # the kernel untags here too
        self.s.bind(("d0p", 3))
        self.s.settimeout(0.1)

    def send(self, frame: bytes) -> None:
        self.s.send(frame)

    def frames(self, seconds: float = 1.5) -> list[bytes]:
        """Frames arriving on d0p (from d0) during ``seconds``."""
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data, anc, _, addr = self.s.recvmsg(65535, 64)
            except TimeoutError:
                continue
            if addr[2] != 4:  # not our own transmissions
                out.append(with_tag(data, anc))
        return out


@pytest.fixture(scope="module")
def setup():
    with bench_namespace(f"xlt-s-fw-{os.getpid()}") as bench:
        cfg = parse_config(POOL, "fw.yaml")
        ports = {n: bench.ifindex[n] for n in ("d0", "d1")}
        fw = ScapyForwarder(cfg, ports)
        sync = MapSync(fw.maps)
        current = sync.read_current()
        sync.apply(desired_state(cfg, current), current)
        sync.set_tx_ports(list(ports.values()))
        assert fw.start() == {"d0": "scapy", "d1": "scapy"}
        peer = Peer()
        try:
            with ScapyEngine(cfg, list(ports.values())) as engine:
                yield bench, fw, peer, engine
        finally:
            peer.s.close()
            fw.stop()
    assert fw.guard.owned is None  # removed on stop


def ip_frames(frames: list[bytes]) -> list[Ether]:
    """The IPv4 frames among ``frames``, each with checksums scapy confirms."""
    out = [p for p in map(Ether, frames) if IP in p]
    assert [checksum_errors(bytes(p)) for p in out] == [[]] * len(out)
    return out


def test_sends_what_the_data_path_computes_and_passes_tagged_frames(setup):
    """An untagged VIP frame leaves as the data path computes it; a tagged one (no VLAN is
    served) is the kernel's, so nothing with its tag comes back."""
    bench, _, peer, engine = setup
    frame = build(CLIENT, VIP, 6, 41000, 80, payload=b"plain")
    peer.send(frame)
    got = [p for p in ip_frames(peer.frames()) if p[IP].src == CLIENT]
    want = engine.run(frame, bench.ifindex["d0"])
    assert want.verdict == "tx"
    assert [bytes(p) for p in got] == [want.data]
    assert checksum_errors(want.data) == []
    tagged = build(CLIENT, VIP, 6, 41001, 80, vlan=42, payload=b"tagged")
    assert engine.run(tagged, bench.ifindex["d0"]).reason == "pass_vlan"
    peer.send(tagged)
    assert not [p for p in map(Ether, peer.frames()) if Dot1Q in p]


def test_kernel_copy_of_a_vip_frame_is_dropped(setup):
    _, fw, peer, _ = setup
    before = fw.stats["received"]
    peer.send(build(CLIENT, VIP, 6, 41002, 80))
    frames = ip_frames(peer.frames())
    assert fw.stats["received"] > before
    assert not [p for p in frames if ICMP in p], "the kernel answered a VIP frame"
    assert [(p[IP].dst, p[TCP].dport) for p in frames] == [("10.20.0.12", 8080)]


def test_missing_neighbour_is_resolved_by_the_kernel_then_used(setup):
    bench, fw, peer, _ = setup
    syn = build(CLIENT, VIP, 6, 41003, 81)
    peer.send(syn)
    arp = [Ether(f) for f in peer.frames() if Ether(f).haslayer(ARP)]
    assert any(a[ARP].pdst == "10.20.0.99" and a[ARP].op == 1 for a in arp), \
        "the kernel did not resolve the backend"
    assert fw.stats["to_kernel"] >= 1
    with IPRoute() as ipr:  # the neighbour answers (as it would have)
        ipr.neigh("replace", dst="10.20.0.99", lladdr="02:00:00:00:00:99",
                  ifindex=bench.ifindex["d0"], state=states["reachable"])
    time.sleep(0.3)  # the rtnetlink event reaches the forwarder, which reads the FIB again
    sent, to_kernel = fw.stats["sent"], fw.stats["to_kernel"]
    peer.send(build(CLIENT, VIP, 6, 41003, 81, flags="A"))
    got = ip_frames(peer.frames())
    # The SYN the kernel queued while resolving, then the ACK, sent by the forwarder itself.
    assert sorted((str(p[TCP].flags), p[Ether].dst, p[IP].dst, p[IP].ttl) for p in got) == \
        [("A", "02:00:00:00:00:99", "10.20.0.99", 63), ("S", "02:00:00:00:00:99", "10.20.0.99", 63)]
    assert (fw.stats["sent"], fw.stats["to_kernel"]) == (sent + 1, to_kernel)
