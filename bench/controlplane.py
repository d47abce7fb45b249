#!/usr/bin/env python3
"""Control plane: Maglev table builds, config change -> maps updated, agent memory.

- Maglev: ``maglev.build_table`` for M = 65537 and 10, 100, 1000 equal backends (median of
  ``--runs``; target <= 50 ms at 1000 backends).
- Config change: the agent's own path from a changed pool.yaml to the kernel maps (parse and
  validate, desired state with the new Maglev ring, ``MapSync.apply`` writing only what
  changed) for a one-backend change on a loaded program: a VIP of 100 backends loses one,
  then gets it back (median of ``--runs`` changes).
- Agent memory: resident set size of a running ``xdplb attach`` (native XDP, a lab LB with
  the same 100-backend config) once attached.

    sudo .venv/bin/python bench/controlplane.py [--runs K]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 (first: puts the lab modules on sys.path)

# isort: split
from agent_process import AgentProcess
from common import save
from lab import Lab
from pools import Vip, pool_yaml

from xdplb.agent.mapsync import MapSync
from xdplb.config import parse_config
from xdplb.kernel.loader import compile_program
from xdplb.kernel.maps import KernelMaps
from xdplb.model.desired import desired_state
from xdplb.model.maglev import build_table

M = 65537
SIZES = (10, 100, 1000)
MAGLEV_TARGET_MS = 50.0


def backend_addrs(n: int) -> list[str]:
    return [f"10.20.{i // 250}.{10 + i % 250}" for i in range(n)]


def pool(n: int, drop: int | None = None) -> str:
    """One TCP VIP with ``n`` backends (without the ``drop``-th)."""
    addrs = [a for i, a in enumerate(backend_addrs(n)) if i != drop]
    return pool_yaml(Vip("web", 80, tuple(addrs)))


def timed_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def maglev_builds(runs: int) -> dict[str, dict]:
    out = {}
    for n in SIZES:
        keys = [(f"{a}:80".encode(), 1) for a in backend_addrs(n)]  # state.py's identities
        samples = [timed_ms(lambda k=keys: build_table(k, M, 0)) for _ in range(runs)]
        out[str(n)] = {"median_ms": statistics.median(samples), "samples_ms": samples}
    return out


def config_change(runs: int, n: int = 100) -> dict:
    texts = [pool(n), pool(n, drop=n // 2)]
    cfg = parse_config(texts[0], "pool.yaml")
    program = compile_program(cfg.flows.max_entries)
    try:
        sync = MapSync(KernelMaps(program.map_fds, own=False))
        current = sync.read_current()
        sync.apply(desired_state(cfg, current), current)
        samples, slots = [], []
        for i in range(runs):
            text = texts[(i + 1) % 2]

            def change(text: str = text) -> None:
                new = parse_config(text, "pool.yaml")
                cur = sync.read_current()
                slots.append(sync.apply(desired_state(new, cur), cur).slots_written)

            samples.append(timed_ms(change))
    finally:
        program.close()
    return {"backends": n, "median_ms": statistics.median(samples), "samples_ms": samples,
            "slots_written_median": statistics.median(slots)}


def agent_rss(n: int = 100) -> dict:
    with tempfile.TemporaryDirectory(prefix="xlb-bench-cp-") as tmp, \
            Lab(topology="one-armed", backends=1, prefix="xlb-cp") as lab:
        cfg = Path(tmp) / "pool.yaml"
        cfg.write_text(pool(n))
        with AgentProcess(lab, cfg, "--mode", "native") as agent:
            time.sleep(2)  # settled after the attach
            status = Path(f"/proc/{agent.proc.pid}/status").read_text()
            kib = {k: int(v.split()[0]) for k, v in
                   (line.split(":", 1) for line in status.splitlines())
                   if k in ("VmRSS", "VmHWM")}
    return {"backends": n, "rss_mib": kib["VmRSS"] / 1024, "peak_rss_mib": kib["VmHWM"] / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9, help="samples per measurement (median)")
    args = ap.parse_args(argv)
    if not 1 <= args.runs <= 100:
        ap.error("--runs must be 1..100")
    res = {"table_size": M, "maglev": maglev_builds(args.runs),
           "maglev_target_ms": MAGLEV_TARGET_MS, "config_change": config_change(args.runs),
           "agent": agent_rss()}
    for n, m in res["maglev"].items():
        print(f"maglev build, M={M}, {n:>4} backends: {m['median_ms']:6.1f} ms")
    c = res["config_change"]
    print(f"config change -> maps ({c['backends']} backends, one removed/added): "
          f"{c['median_ms']:.1f} ms, {c['slots_written_median']:.0f} slots written")
    print(f"agent RSS: {res['agent']['rss_mib']:.0f} MiB")
    save("controlplane", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
