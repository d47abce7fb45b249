#!/usr/bin/env python3
"""Scale: 1,024 VIPs in the kernel and a metrics scrape next to a million flows.

Compiles the real program with its maps pinned under a bpffs directory of this run's own
(``XDPLB_BPFFS``), then, in one run:

- **1,024 VIPs** of 4 backends each, loaded by MapSync as the agent does: the kernel memory
  their Maglev rings hold (memlock of every ring map), at the default table size (65,537)
  and with a per-VIP ``maglev.table_size`` of 1,021, and how long each apply took.
- **A scrape at 1M flows**: the flow table filled with 1,000,000 synthetic flows (batch
  writes), the agent's flow sweep run once (timed), then the metrics collector's scrape
  (``generate_latest``, median of ``--runs``), against the scrape as it was before (the
  same families computed from a bulk read of the whole flow table) in the same run.
  Target: the scrape at most 50 ms.

Writes bench/out/scale.json. Removes its pins and run files, also on failure. Needs root and
BCC; touches no network interface.

    sudo .venv/bin/python bench/scale.py [--flows 1000000] [--runs 5]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from typing import Any

import common  # noqa: F401 (first: puts the lab modules on sys.path)

# isort: split
from common import loaded_program, private_instance, save
from flows_read import fill, synthetic_flows
from pools import WEB, Vip, pool_yaml

IFACE = "xlt-sbench0"  # the pin group's name only: no such interface is needed
VIPS = 1024
SCRAPE_TARGET_S = 0.050


def many_vips(n: int, table_size: int | None) -> str:
    """n VIPs (10.201.x.y:80) of 4 backends each, all distinct."""
    vips = [Vip(f"v{i}", 80, tuple(f"10.{30 + i // 250}.{i % 250}.{b + 1}" for b in range(4)),
                address=f"10.201.{i // 250}.{i % 250 + 1}", table_size=table_size)
            for i in range(n)]
    return pool_yaml(WEB, *vips, flows={"max_entries": 1024})


def load_vips(results: dict[str, Any]) -> None:
    from xdplb.agent.mapsync import MapSync
    from xdplb.config import parse_config
    from xdplb.instance import pins
    from xdplb.kernel.loader import compile_program
    from xdplb.kernel.maps import KernelMaps
    from xdplb.model.desired import desired_state

    group = pins.group_for([IFACE + "v"])
    program = compile_program(1024, group.path)
    try:
        maps = KernelMaps(program.map_fds, own=False)
        sync = MapSync(maps, source_of=lambda _: None)
        for label, size in (("default", None), ("small", 1021)):
            cfg = parse_config(many_vips(VIPS, size), "vips.yaml")
            t0 = time.perf_counter()
            sync.apply(desired_state(cfg, sync.read_current()), sync.read_current())
            dt = time.perf_counter() - t0
            rings, mem = maps.ring_memory()
            slots = sum(cfg.table_size_of(v) for v in cfg.vips)
            results[f"vips_{label}"] = {"vips": len(cfg.vips), "rings": rings,
                                        "table_size": size or cfg.maglev.table_size,
                                        "slots": slots, "ring_bytes": mem,
                                        "bytes_per_slot": round(mem / slots, 2),
                                        "apply_s": round(dt, 3)}
            print(f"{len(cfg.vips)} VIPs, table {size or cfg.maglev.table_size}: {rings} rings, "
                  f"{mem / 2**20:.1f} MiB of ring memory ({mem / slots:.2f} B/slot), "
                  f"applied in {dt:.2f}s")
        maps.close()
    finally:
        program.close()


def scrape_at(n: int, runs: int, results: dict[str, Any]) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from xdplb.abi.layout import Flow, FlowKey, coarse_ns
    from xdplb.agent import flowsweep, metrics
    from xdplb.config import parse_config
    from xdplb.inspect import backends, stats
    from xdplb.inspect.reader import Reader
    from xdplb.instance import pins, runfiles
    from xdplb.model.desired import ring_slots

    group = pins.group_for([IFACE])
    cfg = parse_config(pool_yaml(WEB, flows={"max_entries": n + n // 10}), "pool.yaml")
    program, maps, state = loaded_program(cfg, group.path)
    try:
        # A live agent as far as readers can tell: what it publishes at each apply
        runfiles.write_json(group, runfiles.AGENT_FILE, {"pid": os.getpid()})
        runfiles.write_json(group, runfiles.SLOTS_FILE, {"generation": 1,
                                                         "slots": ring_slots(state)})
        web = state.vips[0]
        keys, values = synthetic_flows(n, [b.backend_id for b in web.backends], coarse_ns())
        fill(maps.fds["flows"], keys, values, ctypes.sizeof(FlowKey), ctypes.sizeof(Flow))
        t0 = time.perf_counter()
        sweep = flowsweep.publish(group, maps)
        sweep_s = time.perf_counter() - t0
        if sweep["entries"] != n:
            raise RuntimeError(f"the sweep found {sweep['entries']} flows, {n} were written")

        registry = CollectorRegistry(auto_describe=False)
        registry.register(metrics.PinnedCollector(group))

        class WholeTable:  # the scrape before: both readings from the whole flow table
            def collect(self) -> Any:
                with Reader(group) as r:
                    return metrics.families(stats.collect(r), backends.collect(r))

        old = CollectorRegistry(auto_describe=False)
        old.register(WholeTable())
        new_s, old_s = [], []
        for _ in range(runs):  # interleaved: both meet the same machine
            for reg, out in ((registry, new_s), (old, old_s)):
                t0 = time.perf_counter()
                text = generate_latest(reg)
                out.append(time.perf_counter() - t0)
            if b"xdplb_backend_open_flows" not in text and reg is registry:
                raise RuntimeError("the scrape has no open-flow gauges")
        maps.close()
    finally:
        program.close()
    scrape, before = statistics.median(new_s), statistics.median(old_s)
    results["scrape"] = {"flows": n, "runs": runs, "scrape_s": round(scrape, 4),
                         "whole_table_s": round(before, 4), "sweep_s": round(sweep_s, 3),
                         "target_s": SCRAPE_TARGET_S}
    print(f"scrape at {n} flows: {scrape * 1e3:.1f} ms (target <= {SCRAPE_TARGET_S * 1e3:.0f} "
          f"ms); the same families from the whole table: {before * 1e3:.0f} ms; one flow "
          f"sweep: {sweep_s:.2f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("scale: needs root", file=sys.stderr)
        return 1
    results: dict[str, Any] = {}
    with private_instance("xlt-sbench"):
        load_vips(results)
        scrape_at(args.flows, args.runs, results)
    save("scale", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
