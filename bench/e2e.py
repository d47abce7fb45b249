#!/usr/bin/env python3
"""End to end through the namespace lab: xdplb against the alternatives, back to back.

Every peer gets a fresh two-armed lab (client, LB, two backends), the same services and the
same traffic (see workload.py): UDP packets/s over many flows (an XDP generator), one TCP stream
(iperf3), new TCP connections/s (wrk); the LB's CPU is recorded for each. A first run with
an XDP_DROP program on the LB's client-facing interface gives the generator's own ceiling.

    sudo .venv/bin/python bench/e2e.py [--seconds S] [--only NAME[,NAME...]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common import save  # first: puts the lab modules on sys.path

# isort: split
from agent_process import xdplb
from lab import Lab
from peers import Peer, Xdplb, all_peers
from workload import (
    FRAME_LEN,
    UDP_FLOWS,
    VIP,
    BenchLab,
    Generator,
    Sink,
    conn_rate,
    tcp_throughput,
    udp_pps,
)

from xdplb.kernel import bpfsys, xdp_link

PREFIX = "xlb-e2e"
TARGETS = {"iptables": 2.0, "nginx": 5.0, "haproxy": 5.0}  # xdplb native pps >= N x peer


@contextlib.contextmanager
def bench_lab(name: str, topology: str = "two-armed", dsr: bool = False
              ) -> Iterator[tuple[BenchLab, Generator]]:
    vips = (VIP,) if dsr else ()  # DSR backends take the VIP's packets on their lo
    with tempfile.TemporaryDirectory(prefix=f"xlb-bench-{name}-") as tmp, \
            Lab(topology=topology, backends=2, prefix=PREFIX, backend_vips=vips) as lab:
        gen = Generator(lab)
        try:
            yield BenchLab(lab, Path(tmp)), gen
        finally:
            gen.close()


def _guard(test: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One failed measurement is recorded as such; the other peers and tests still run."""
    try:
        return test()
    except Exception as e:  # noqa: BLE001 (any failure of a peer is a result to report)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[-400:]}


def generator_ceiling(seconds: int) -> dict[str, Any]:
    """The generator into an XDP_DROP program on the LB: the most it can offer here."""
    with bench_lab("generator") as (bl, gen), \
            bpfsys.load_xdp_return(bpfsys.XDP_DROP, "bench_drop") as fd:
        xdp_link.xdp_attach(bl.lab.lb_client_iface, fd, "native", netns=bl.lab.lb_ns)
        return _guard(lambda: udp_pps(bl, gen, None, seconds))


def run_peer(peer: Peer, sink: Sink, seconds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"name": peer.name, "label": peer.label}
    why = peer.unavailable()
    if why:
        return out | {"unavailable": why}
    print(f"== {peer.label}", flush=True)
    dsr = getattr(peer, "forwarding", None) == "dsr"
    with bench_lab(peer.name, peer.topology, dsr) as (bl, gen):
        try:
            peer.start(bl.lab, bl.tmp)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            return out | {"error": f"start failed: {e}"[-400:]}
        try:
            if peer.udp:
                with sink.at_lb_egress(bl.lab):
                    out["udp"] = _guard(lambda: udp_pps(bl, gen, sink, seconds))
                if getattr(peer, "encap", None) == "ipip":
                    # `xdplb decap` holds the backends' eth0, where the sink would go
                    out["udp_backends"] = {"unsupported": "the backends' XDP is xdplb decap"}
                else:
                    with sink.attached(bl.lab):
                        out["udp_backends"] = _guard(lambda: udp_pps(bl, gen, sink, seconds))
            else:
                out["udp"] = out["udp_backends"] = {
                    "unsupported": f"{peer.label} does not balance UDP"}
            if peer.no_tcp:
                out["tcp"] = out["tcp_down"] = out["conn"] = {"unsupported": peer.no_tcp}
                return out
            # the kernel data path's counters (the scapy one has no maps to read)
            kernel = isinstance(peer, Xdplb) and peer.datapath is None
            probe = directions(bl.lab) if kernel else None
            out["tcp"] = _guard(lambda: tcp_throughput(bl, seconds, probe=probe))
            out["tcp_down"] = _guard(lambda: tcp_throughput(bl, seconds, True, probe))
            out["conn"] = _guard(lambda: conn_rate(bl, seconds))
        finally:
            peer.stop()
    return out


def directions(lab: Lab) -> Callable[[], dict[str, Any]]:
    """What the LB handled so far, per direction: xdplb's counters (client -> VIP: flows hit
    and new; backend -> client: replies) and, in the routed lab, the router's count of what
    reached it for the client from the LB and from the backends directly."""

    def probe() -> dict[str, Any]:
        try:
            c = json.loads(xdplb(lab, "stats", "--json", check=True).stdout)["counters"]
        except Exception as e:  # noqa: BLE001 (the measurement goes on; the cell says why)
            return {"error": f"xdplb stats: {e}"[-300:]}
        out: dict[str, Any] = {"lb_inbound": c.get("flow_hit", 0) + c.get("new_flow", 0),
                               "lb_replies": c.get("reply", 0),
                               "counters": {k: v for k, v in c.items() if v}}
        if lab.routed:
            rc = lab.router_counts()
            out["router_via_lb"] = rc["via_lb"]["packets"]
            out["router_from_backends"] = rc["from_backends"]["packets"]
        return out

    return probe


def ratios(peers: list[dict[str, Any]]) -> dict[str, Any]:
    """xdplb native against each other peer, per metric (None where either is missing)."""
    by = {p["name"]: p for p in peers}
    ref = by.get("xdplb-native", {})

    def get(p: dict[str, Any], test: str, key: str) -> float | None:
        v = p.get(test, {}).get(key)
        return v if isinstance(v, int | float) and v > 0 else None

    out: dict[str, Any] = {}
    for name, p in by.items():
        if name == "xdplb-native":
            continue
        r = {}
        for test, key in (("udp", "pps"), ("udp_backends", "pps"), ("tcp", "gbit_per_s"),
                          ("tcp_down", "gbit_per_s"), ("conn", "conn_per_s")):
            a, b = get(ref, test, key), get(p, test, key)
            r[test] = a / b if a and b else None
        a, b = get(ref, "udp", "lb_ns_per_packet"), get(p, "udp", "lb_ns_per_packet")
        r["udp_lb_cpu_per_packet"] = b / a if a and b else None  # > 1: peer costs more
        if name in TARGETS:
            r["udp_target"] = TARGETS[name]
            r["udp_target_met"] = None if r["udp"] is None else r["udp"] >= TARGETS[name]
        out[name] = r
    return out


def _fmt(v: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if v is None else f"{v / scale:,.{digits}f}"


def print_table(res: dict[str, Any]) -> None:
    print(f"\nend to end, {res['seconds']} s per test, {FRAME_LEN}-byte UDP frames over "
          f"{UDP_FLOWS} flows; generator ceiling {_fmt(res['generator'].get('offered_pps'))} pps")
    print(f"{'peer':<28} {'UDP pps':>10} {'LB ns/pkt':>10} {'TCP Gbit/s':>11} "
          f"{'down Gbit/s':>11} {'conn/s':>8} {'LB us/conn':>10}")
    for p in res["peers"]:
        if "unavailable" in p or "error" in p:
            print(f"{p['label']:<28} {p.get('unavailable') or p.get('error')}")
            continue
        u, t, d, c = p["udp"], p["tcp"], p.get("tcp_down", {}), p["conn"]
        print(f"{p['label']:<28} {_fmt(u.get('pps')):>10} {_fmt(u.get('lb_ns_per_packet')):>10} "
              f"{_fmt(t.get('gbit_per_s'), digits=2):>11} "
              f"{_fmt(d.get('gbit_per_s'), digits=2):>11} {_fmt(c.get('conn_per_s')):>8} "
              f"{_fmt(c.get('lb_us_per_conn'), digits=1):>10}")
        if "probe" in d:
            print(f"{'':<28} download, LB handled: {d['probe'].get('lb_inbound')} inbound, "
                  f"{d['probe'].get('lb_replies')} replies; router got "
                  f"{d['probe'].get('router_via_lb', '-')} via LB, "
                  f"{d['probe'].get('router_from_backends', '-')} from backends")


def run(seconds: int, only: set[str] | None = None) -> dict[str, Any]:
    peers = [p for p in all_peers() if only is None or p.name in only]
    res: dict[str, Any] = {"seconds": seconds, "topology": "two-armed lab, 2 backends "
                           "(the forwarding modes: routed lab, 2 backends)",
                           "frame_bytes": FRAME_LEN, "udp_flows": UDP_FLOWS}
    print("== generator ceiling", flush=True)
    res["generator"] = generator_ceiling(seconds)
    sink = Sink()
    try:
        res["peers"] = [run_peer(p, sink, seconds) for p in peers]
    finally:
        sink.close()
    res["ratios"] = ratios(res["peers"])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each measurement")
    ap.add_argument("--only", help="comma-separated peer names (default: all)")
    args = ap.parse_args(argv)
    if not 1 <= args.seconds <= 30:
        ap.error("--seconds must be 1..30 (bounded load)")
    only = set(args.only.split(",")) if args.only else None
    res = run(args.seconds, only)
    print_table(res)
    save("e2e", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
