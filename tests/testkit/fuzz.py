"""Differential fuzzing of the two data paths: the BPF program and the scapy data path get
the same frames, and must give the same verdict, output bytes, counters, flow effect and
flow-table state.

``FrameGen`` is a deterministic, seeded generator (same seed, same frames): well-formed
flows from many clients to the VIPs and replies from the backends that got them, frames
built then mutated (header fields set to edge values, bytes flipped, cut, extended), random
bytes, and other traffic (ARP, IPv6, QinQ, ICMP, broadcast). Every ``epoch`` frames the
backend sets change (backends come and go, weights change, some are marked down), so
tracked flows meet removed and failed backends. It runs in the bench namespace
(``benchns.py``), where next hops give every bpf_fib_lookup outcome.

``scripts/fuzz.sh --frames N --seed S`` runs it from the command line; tests/test_parity.py runs
100,000 frames in CI.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pools import Backend, Vip, pool_data
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.utils import checksum

from testkit.benchns import BACKENDS, CLIENTS, LB_MAC, VIPS, Bench
from testkit.pktcheck import rewrite_errors
from xdplb.config import Config
from xdplb.model.desired import desired_state
from xdplb.offline.engines import MAX_FRAME, MIN_FRAME, Engine, RunResult
from xdplb.userspace.parse import OK, parse

RING_SIZE = 251  # small: rings rebuild fast and flows collide on slots
FLOW_MAX = 131072  # never fills in a run, so the kernel's approximate LRU never evicts
CLIENT_MAC = "02:00:00:00:0a:02"
LB_SOURCE = "10.20.0.1"  # the bench's own address toward its backends (fullnat, dsr/ipip)
# (VIP address, port, protocol): balanced services; the generator also hits other ports
SERVICES = ((VIPS[0], 80, "tcp"), (VIPS[0], 53, "udp"), (VIPS[1], 443, "tcp"),
            (VIPS[2], 80, "udp"), (VIPS[2], 80, "tcp"),
            (VIPS[3], 80, "tcp"), (VIPS[3], 53, "udp"), (VIPS[3], 81, "tcp"),
            (VIPS[3], 82, "udp"), (VIPS[3], 83, "tcp"))
# Forwarding of the services above that are not nat (by index). One fullnat range is a few
# ports only, so that flows run out of them.
MODES: dict[int, dict[str, str]] = {
    5: {"forwarding": "fullnat", "source_ports": "30000-30007"},
    6: {"forwarding": "fullnat"},
    7: {"forwarding": "dsr", "encap": "l2"},
    8: {"forwarding": "dsr"},
    9: {"forwarding": "dsr", "encap": "ipip"},
}
TCP_FLAGS = ("S", "A", "PA", "FA", "R", "RA", "SA", "F", "", "SF", "U")
TARGET_PORTS = (None, 8080, 53, 5353)
TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20}
ROUTER_ALERT = b"\x94\x04\x00\x00"  # the IP option scapy's IPOption_Router_Alert() builds


def build(src: str, dst: str, proto: int, sport: int, dport: int, *, flags: str = "S",
          payload: bytes = b"", ttl: int = 64, tos: int = 0, vlan: int | None = None,
          options: bool = False, frag: int = 0, more_frags: bool = False,
          udp_zero: bool = False, smac: str = CLIENT_MAC, dmac: str = LB_MAC,
          df: bool = False) -> bytes:
    """A well-formed Ethernet/[802.1Q]/IPv4/TCP|UDP frame, byte for byte what scapy builds
    from the same fields (tests check), at a fraction of the cost: the fuzz needs 100,000."""
    opts = ROUTER_ALERT if options else b""
    if proto == 6:
        bits = sum(TCP_FLAG_BITS[c] for c in flags)
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, bits, 8192, 0, 0)
        check_at = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
        check_at = 6
    l4 += payload
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45 + len(opts) // 4, tos, 20 + len(opts) + len(l4), 1,
                     (0x2000 if more_frags else 0) | (0x4000 if df else 0) | frag, ttl, proto, 0,
                     s, d) + opts
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    c = checksum(s + d + struct.pack("!BBH", 0, proto, len(l4)) + l4)
    if proto == 17:
        c = 0 if udp_zero else c or 0xFFFF  # 0 means "no checksum"
    l4 = l4[:check_at] + struct.pack("!H", c) + l4[check_at + 2 :]
    eth = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", ""))
    if vlan is not None:
        eth += struct.pack("!HH", 0x8100, vlan)
    return eth + b"\x08\x00" + ip + l4


# --- mutations: each takes the frame and a Random, returns the mutated frame ----------------


def _ip_off(f: bytearray) -> int:
    return 18 if f[12:14] == b"\x81\x00" else 14


def _set(off_of: Callable[[bytearray], int], width: int, values: Callable[[random.Random], int]
         ) -> Callable[[bytearray, random.Random], bytearray]:
    def mutate(f: bytearray, rnd: random.Random) -> bytearray:
        off = off_of(f)
        if off + width <= len(f):
            f[off : off + width] = values(rnd).to_bytes(width, "big")
            _refresh_ip_checksum(f, off)
        return f
    return mutate


def _refresh_ip_checksum(f: bytearray, changed: int) -> None:
    """A field set in the IPv4 header gets a right header checksum, so the frame meets the
    rule for that field rather than stopping at the checksum check (flipped bytes keep
    theirs wrong: they test that check)."""
    ip = _ip_off(f)
    if not ip <= changed < ip + 20 or ip + 20 > len(f):
        return
    f[ip + 10 : ip + 12] = b"\0\0"
    f[ip + 10 : ip + 12] = struct.pack("!H", checksum(bytes(f[ip : ip + 20])))


def _l4(f: bytearray) -> int:
    ip = _ip_off(f)
    return ip + (f[ip] & 15) * 4 if ip < len(f) else len(f)


MUTATIONS: dict[str, Callable[[bytearray, random.Random], bytearray]] = {
    "version_ihl": _set(_ip_off, 1, lambda r: r.choice((0x44, 0x45, 0x46, 0x4F, 0x65, 0x35,
                                                        r.randrange(256)))),
    "tot_len": _set(lambda f: _ip_off(f) + 2, 2,
                    lambda r: r.choice((0, 19, 20, 27, 39, 40, 41, 1500, 65535,
                                        r.randrange(65536)))),
    "frag": _set(lambda f: _ip_off(f) + 6, 2, lambda r: r.choice((0x2000, 0x0001, 0x4000,
                                                                  0x1FFF, 0x6000, 0))),
    "ttl": _set(lambda f: _ip_off(f) + 8, 1, lambda r: r.choice((0, 1, 2, 255))),
    "proto": _set(lambda f: _ip_off(f) + 9, 1, lambda r: r.choice((6, 17, 1, 47, 0))),
    "tcp_doff": _set(lambda f: _l4(f) + 12, 1, lambda r: r.randrange(16) << 4),
    "udp_len": _set(lambda f: _l4(f) + 4, 2, lambda r: r.choice((0, 7, 8, 9, 65535,
                                                                 r.randrange(600)))),
    "ethertype": _set(lambda f: 12, 2, lambda r: r.choice((0x0800, 0x8100, 0x86DD, 0x0806,
                                                           0x88A8, r.randrange(65536)))),
    "byte": lambda f, r: _flip(f, r, r.randrange(len(f))),
    "header_byte": lambda f, r: _flip(f, r, r.randrange(min(len(f), 64))),
    "truncate": lambda f, r: f[: r.randrange(MIN_FRAME, len(f) + 1)],
    "extend": lambda f, r: f + r.randbytes(r.randrange(1, 40)),
}


def _ip(src: str, dst: str, proto: int, payload: bytes, df: bool = False) -> bytes:
    """An IPv4 header (checksummed) and ``payload``."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000 if df else 0,
                     64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:] + payload


def _flip(f: bytearray, rnd: random.Random, i: int) -> bytearray:
    f[i] = rnd.randrange(256)
    return f


def mutate(frame: bytes, names: list[str], rnd: random.Random) -> bytes:
    f = bytearray(frame)
    for n in names:
        f = MUTATIONS[n](f, rnd)
    return bytes(f[:MAX_FRAME]) if len(f) >= MIN_FRAME else bytes(f) + bytes(MIN_FRAME - len(f))


# --- configs ------------------------------------------------------------------------------------




def random_config(rnd: random.Random, flow_max: int = FLOW_MAX) -> Config:
    """A config over the bench's backends: services present or not, backends, ports,
    weights and schedulers drawn afresh."""
    vips = []
    for i, (addr, port, proto) in enumerate(SERVICES):
        if vips and rnd.random() < 0.15:
            continue
        bes = []
        mode = MODES.get(i, {})
        for a in rnd.sample(BACKENDS, rnd.randint(1, 6)):
            # Weight, then port: a seed's configs depend on the order of the draws.
            weight = rnd.choice((0, 1, 1, 2, 3))
            target = rnd.choice(TARGET_PORTS)
            # dsr keeps the VIP's port: the backend answers the client itself
            bes.append(Backend(a, port=None if mode.get("forwarding") == "dsr" else target,
                               weight=weight))
        # maglev twice as likely: the default
        sched = rnd.choice(("maglev", "maglev", "wrr", "rr", "random", "source-hash",
                            "least-conn"))
        vips.append(Vip(f"s{i}", port, tuple(bes), protocol=proto, address=addr, **mode,
                        scheduler=sched))
    return Config.model_validate(pool_data(*vips, table_size=RING_SIZE, seed=rnd.randrange(2),
                                           flows={"max_entries": flow_max}))


def reconfigure(engines: tuple[Engine, ...], rnd: random.Random, down_share: float = 0.15
                ) -> None:
    """A random config for every engine, some of its backends marked down (as failed
    health checks do)."""
    cfg = random_config(rnd, engines[0].flow_max)
    st = desired_state(cfg, engines[0].sync.read_current())
    keys = [(v.vip_id, be.address, be.port) for v in st.vips for be in v.backends]
    down = frozenset(k for k in keys if rnd.random() < down_share)
    for e in engines:
        e.configure(cfg, down)


def base_config(flow_max: int = FLOW_MAX) -> Config:
    """Every service, every backend: the first epoch's config."""
    return Config.model_validate(pool_data(
        *(Vip(f"s{i}", p, BACKENDS, protocol=proto, address=a, **MODES.get(i, {}))
          for i, (a, p, proto) in enumerate(SERVICES)),
        table_size=RING_SIZE, seed=1, flows={"max_entries": flow_max}))


# --- the generator ------------------------------------------------------------------------------


@dataclass
class Frame:
    data: bytes
    ingress: int
    kind: str


class FrameGen:
    """Deterministic frames for a bench; ``learn()`` feeds back where flows went, so that
    replies come from the backends that really got them."""

    def __init__(self, seed: int, bench: Bench) -> None:
        self.rnd = random.Random(seed)
        self.bench = bench
        self.flows: deque[tuple[str, int, str, int, int]] = deque(maxlen=4000)
        self.recent: deque[tuple] = deque(maxlen=500)  # forward 5-tuples, to hit flows again
        self.kinds = {"flow": 45, "reply": 20, "mutated": 17, "random": 6, "other": 7, "big": 5,
                      "reply_frag": 4, "icmp_error": 3}

    def frame(self) -> Frame:
        kind = self.rnd.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
        if kind in ("reply", "reply_frag", "icmp_error") and not (self.flows and self.recent):
            kind = "flow"
        return getattr(self, f"_{kind}")()

    def _ingress(self) -> int:
        r = self.rnd.random()
        return self.bench.ifindex["d0"] if r < 0.8 else self.rnd.choice(self.bench.ingresses)

    def _flow(self, payload_max: int = 64) -> Frame:
        r = self.rnd
        if self.recent and r.random() < 0.5:
            client, sport, addr, port, p = r.choice(self.recent)
        else:
            addr, port, proto = r.choice(SERVICES)
            if r.random() < 0.05:
                port = r.choice((22, 81, 8080))  # a VIP address, not a VIP port
            p = 6 if proto == "tcp" else 17
            client, sport = r.choice(CLIENTS), r.randrange(20000, 30000)
            self.recent.append((client, sport, addr, port, p))
        frag = r.random() < 0.03
        data = build(client, addr, p, sport, port,
                     flags=r.choice(TCP_FLAGS), payload=r.randbytes(r.randrange(payload_max)),
                     ttl=r.choice((64,) * 12 + (2, 1, 0)), tos=r.choice((0, 0, 0, 0x10, 0xB8)),
                     vlan=r.randrange(4095) if r.random() < 0.05 else None,
                     options=r.random() < 0.03, frag=r.randrange(100) if frag else 0,
                     more_frags=frag and r.random() < 0.7, udp_zero=r.random() < 0.1)
        return Frame(data, self._ingress(), "flow")

    def _reply(self) -> Frame:
        r = self.rnd
        be, bport, client, cport, proto = r.choice(self.flows)
        if r.random() < 0.05:
            bport += 1  # a stray: no tracked flow
        data = build(be, client, proto, bport, cport, flags=r.choice(TCP_FLAGS),
                     payload=r.randbytes(r.randrange(64)), ttl=r.choice((64, 64, 64, 1)),
                     udp_zero=r.random() < 0.1, smac="02:00:00:00:00:11")
        return Frame(data, self._ingress(), "reply")

    def _reply_frag(self) -> Frame:
        """A fragment (first, or one further on) of a backend's reply, or a whole reply, some
        with IP options."""
        r = self.rnd
        be, bport, client, cport, proto = r.choice(self.flows)
        offset = r.choice((0, 0, r.randrange(1, 400)))
        data = build(be, client, proto, bport + (r.random() < 0.05), cport,
                     flags=r.choice(TCP_FLAGS), payload=r.randbytes(r.randrange(64)),
                     ttl=r.choice((64, 64, 64, 1)), options=r.random() < 0.3, frag=offset,
                     more_frags=r.random() < (0.8 if offset == 0 else 0.5),
                     udp_zero=r.random() < 0.1, smac="02:00:00:00:00:11")
        return Frame(data, self._ingress(), "reply_frag")

    def _mutated(self) -> Frame:
        r = self.rnd
        base = self._reply() if self.flows and r.random() < 0.3 else self._flow()
        names = r.choices(list(MUTATIONS), k=r.randint(1, 3))
        return Frame(mutate(base.data, names, r), base.ingress, "mutated")

    def _random(self) -> Frame:
        r = self.rnd
        body = r.randbytes(r.randrange(2, 120))
        etype = r.choice((b"\x08\x00", b"\x81\x00", b"\x86\xdd", b"\x08\x06", r.randbytes(2)))
        return Frame(r.randbytes(12) + etype + body, self._ingress(), "random")

    def _other(self) -> Frame:
        r = self.rnd
        eth = Ether(src=CLIENT_MAC, dst=LB_MAC)
        pkt = r.choice((
            Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.10.0.1"),
            eth / IPv6(dst="fd00::1") / TCP(dport=80),
            eth / Dot1Q(vlan=1) / Dot1Q(vlan=2) / IP(src=CLIENTS[0], dst=VIPS[0]) / TCP(dport=80),
            eth / IP(src=CLIENTS[0], dst=VIPS[0]) / ICMP(),
            Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src=CLIENTS[0],
                                                                 dst="10.10.0.255") / UDP(),
            eth / IP(src=CLIENTS[1], dst="10.10.0.1") / TCP(dport=22),
            eth / IP(src=CLIENTS[1], dst=VIPS[1], proto=47) / bytes(8),
        ))
        return Frame(bytes(pkt), self._ingress(), "other")

    def _big(self) -> Frame:
        f = self._flow(payload_max=1600)
        f.kind = "big"
        return f

    def _icmp_error(self) -> Frame:
        """An ICMP error quoting a flow's packet: to the VIP about a reply, or toward the
        client about its packet to the backend (from a router or the backend), some about no
        flow, some quoting too little, some of a type that quotes nothing of ours."""
        r = self.rnd
        to_vip = r.random() < 0.5
        if to_vip:
            client, cport, vip, port, proto = r.choice(self.recent)
            src, dst, quoted = client, vip, (vip, port, client, cport)
        else:
            be, bport, client, cport, proto = r.choice(self.flows)
            src = be if r.random() < 0.5 else r.choice(BACKENDS)
            dst, quoted = client, (client, cport, be, bport + (r.random() < 0.05))
        qsrc, qsport, qdst, qdport = quoted
        inner = build(qsrc, qdst, proto, qsport, qdport, payload=r.randbytes(r.randrange(16)),
                      udp_zero=r.random() < 0.1)[14 : 14 + r.choice((28, 28, 28, 24, 40))]
        kind, code, rest = r.choice((3, 3, 11, 12, 5, 8)), r.randrange(5), 0
        if to_vip and r.random() < 0.25:
            # dsr/ipip: a router's "fragmentation needed" about our outer packet (from the
            # bench's address toward the backends) to some backend, quoting the client's
            src, dst = r.choice(BACKENDS), LB_SOURCE
            sent = build(client, vip, proto, cport, port, df=True)[14:]
            inner = _ip(LB_SOURCE, r.choice(BACKENDS), 4, sent, df=r.random() < 0.9)[
                : r.choice((48, 48, 40, 60))]
            kind, code, rest = 3, r.choice((4, 4, 4, 3)), r.choice((1400, 1480, 80, 0))
        icmp = struct.pack("!BBHI", kind, code, 0, rest) + inner
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 7, 0,
                         r.choice((64, 64, 64, 1)), 1, 0, socket.inet_aton(src),
                         socket.inet_aton(dst))
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        eth = bytes.fromhex(LB_MAC.replace(":", "")) + bytes.fromhex("020000000011") + b"\x08\x00"
        return Frame(eth + ip + icmp, self._ingress(), "icmp_error")

    def learn(self, frame: Frame, res: RunResult) -> None:
        """Remember a balanced flow (backend, its port, client, client port, protocol)."""
        if res.effect not in ("created", "rebalanced", "hit"):
            return
        rc, p = parse(res.data)
        if rc != OK or p.sport < 0:
            return
        ip, d = p.ip, res.data
        self.flows.append(
            (".".join(map(str, d[ip + 16 : ip + 20])), int.from_bytes(d[p.dport : p.dport + 2],
             "big"), ".".join(map(str, d[ip + 12 : ip + 16])),
             int.from_bytes(d[p.sport : p.sport + 2], "big"), p.proto))


# --- the differential run -----------------------------------------------------------------------


@dataclass
class FuzzReport:
    frames: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # time in each engine's run()
    verdicts: dict[str, int] = field(default_factory=dict)
    effects: dict[str, int] = field(default_factory=dict)
    epochs: int = 0
    difference: str | None = None  # the first one; the run stops there

    def rate(self, engine: str) -> float:
        """Frames per second through one engine."""
        return self.frames / self.seconds[engine] if self.seconds.get(engine) else 0.0


def _describe(i: int, f: Frame, a: RunResult, b: RunResult, names: tuple[str, str]) -> str:
    lines = [f"frame {i} ({f.kind}, ingress {f.ingress}): {f.data.hex()}"]
    for n, r in zip(names, (a, b), strict=True):
        lines.append(f"  {n}: {r.verdict} {r.reason} effect={r.effect} backend={r.backend} "
                     f"counters={r.counters}\n    out {r.data.hex()}")
    return "\n".join(lines)


def _results_differ(a: RunResult, b: RunResult) -> bool:
    return a.comparable() != b.comparable()


def _tables_differ(a: Engine, b: Engine) -> str | None:
    diff = a.flow_table().diff(b.flow_table())
    if diff:
        return f"flow tables differ ({len(diff)}):\n  " + "\n  ".join(diff[:10])
    return None


def run_fuzz(a: Engine, b: Engine, gen: FrameGen, frames: int, epoch: int = 5000,
             check_every: int = 2000, progress: Callable[[int], None] | None = None
             ) -> FuzzReport:
    """Run ``frames`` frames through both engines (configured from ``base_config()``),
    changing the backend sets every ``epoch`` frames and comparing the flow tables every
    ``check_every``. Stops at the first difference."""
    rep = FuzzReport(seconds={a.name: 0.0, b.name: 0.0})
    names = (a.name, b.name)
    for i in range(frames):
        if i and i % epoch == 0:
            if (d := _tables_differ(a, b)) is not None:
                rep.difference = f"before epoch {rep.epochs + 1}: {d}"
                return rep
            reconfigure((a, b), gen.rnd)
            rep.epochs += 1
        f = gen.frame()
        t0 = time.perf_counter()
        ra = a.run(f.data, f.ingress)
        t1 = time.perf_counter()
        rb = b.run(f.data, f.ingress)
        rep.seconds[a.name] += t1 - t0
        rep.seconds[b.name] += time.perf_counter() - t1
        rep.frames = i + 1
        if _results_differ(ra, rb):
            rep.difference = _describe(i, f, ra, rb, names)
            return rep
        if errs := rewrite_errors(f.data, ra.data):
            rep.difference = f"bad checksums {errs}:\n{_describe(i, f, ra, rb, names)}"
            return rep
        rep.verdicts[ra.reason] = rep.verdicts.get(ra.reason, 0) + 1
        rep.effects[ra.effect] = rep.effects.get(ra.effect, 0) + 1
        gen.learn(f, rb)
        if (i + 1) % check_every == 0 and (d := _tables_differ(a, b)) is not None:
            rep.difference = f"after frame {i}: {d}"
            return rep
        if progress is not None and (i + 1) % 10000 == 0:
            progress(i + 1)
    if (d := _tables_differ(a, b)) is not None:
        rep.difference = f"at the end: {d}"
    return rep

