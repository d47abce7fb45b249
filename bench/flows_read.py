#!/usr/bin/env python3
"""Benchmark: `xdplb flows --json` on a pinned flow table of 1,000,000 synthetic flows.

Compiles the real program with its maps pinned under a bpffs directory of this run's own
(``XDPLB_BPFFS``), fills the config maps from a small pool and the flow table with N
synthetic flows (batch writes), then times, end to end as separate processes:

- ``xdplb flows IFACE --json`` (every row, piped to this process, which counts the lines),
- ``xdplb flows IFACE`` (the top-100 table: read + sort everything, print little),

against a baseline measured in the same run: a raw BPF_MAP_LOOKUP_BATCH dump of the same
map (no decoding), in this process. Removes its pins and run files, also on failure.

    sudo .venv/bin/python bench/flows_read.py [--flows 1000000]

Needs root and BCC (for the compile); touches no network interface.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401 (first: puts the lab modules on sys.path)
import numpy as np
from pools import DNS, WEB, pool_yaml

REPO = Path(__file__).resolve().parent.parent
XDPLB = REPO / ".venv" / "bin" / "xdplb"
IFACE = "xlt-ibench0"  # the pin group's name only: no such interface is needed
TIMEOUT = 600  # seconds any one timed command may take


def synthetic_flows(n: int, backend_ids: list[int], now_ns: int) -> tuple[bytes, bytes]:
    """n distinct client flows to the web VIP, as raw FlowKey and Flow records."""
    from xdplb.abi.layout import FAMILY_IPV4
    from xdplb.inspect.flowtable import FLOW_DTYPE, KEY_DTYPE

    rng = np.random.default_rng(7)
    i = np.arange(n, dtype=np.uint64)
    keys = np.zeros(n, dtype=KEY_DTYPE)  # zeroed: padding and unused address bytes
    keys["src"] = (np.uint64(0x0A000000) + i // 50000).astype(np.uint32)  # 10.0.x.y
    keys["sport"] = (1024 + i % 50000).astype(np.uint16)
    keys["dst"] = 0x0AC8000A  # 10.200.0.10
    keys["dport"] = 80
    keys["proto"] = 6
    keys["family"] = FAMILY_IPV4
    flows = np.zeros(n, dtype=FLOW_DTYPE)
    flows["backend_id"] = rng.choice(backend_ids, n)
    flows["first_ns"] = now_ns - rng.integers(1, 3600 * 10**9, n)
    flows["last_ns"] = flows["first_ns"] + rng.integers(0, 10**9, n)
    flows["fwd_packets"] = rng.integers(1, 10**4, n)
    flows["fwd_bytes"] = flows["fwd_packets"] * 800
    flows["rev_packets"] = rng.integers(1, 10**4, n)
    flows["rev_bytes"] = flows["rev_packets"] * 1200
    flows["tcp_state"] = rng.integers(0, 5, n)
    return keys.tobytes(), flows.tobytes()


def fill(fd: int, keys: bytes, values: bytes, ksize: int, vsize: int, chunk: int = 65536
         ) -> None:
    from xdplb.kernel import bpfsys

    n = len(keys) // ksize
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        bpfsys.map_update_batch(
            fd, [keys[i * ksize : (i + 1) * ksize] for i in range(s, e)],
            [values[i * vsize : (i + 1) * vsize] for i in range(s, e)])


def timed_flows_json(env: dict[str, str]) -> tuple[float, int]:
    """Seconds for `xdplb flows IFACE --json` to exit, and the rows it printed."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(XDPLB), "flows", IFACE, "--json"], stdout=subprocess.PIPE,
                         env=env)
    rows = 0
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        rows += chunk.count(b"\n")
    rc = p.wait(TIMEOUT)
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"xdplb flows --json exited {rc}")
    return dt, rows


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=TIMEOUT)
    return time.perf_counter() - t0


def raw_dump(fd: int, ksize: int, vsize: int, batch: int) -> tuple[float, int]:
    """The baseline: BPF_MAP_LOOKUP_BATCH over the whole map, entries kept as bytes."""
    from xdplb.kernel import bpfsys

    t0 = time.perf_counter()
    n = sum(len(k) for k, _ in bpfsys.map_lookup_batch(fd, ksize, vsize, batch))
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("flows_read: needs root", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO))
    with common.private_instance("xlt-ibench") as run_dir:
        return run(args.flows, run_dir)


def run(n: int, run_dir: Path) -> int:
    from xdplb.abi.layout import Flow, FlowKey, coarse_ns
    from xdplb.config import parse_config
    from xdplb.instance import pins, runfiles
    from xdplb.kernel import bulk

    pool = run_dir / "pool.yaml"
    # Room for every flow: the LRU never evicts.
    pool.write_text(pool_yaml(WEB, DNS, table_size=65537, flows={"max_entries": n + n // 10}))
    cfg = parse_config(pool.read_text(), str(pool))
    group = pins.group_for([IFACE])
    t0 = time.perf_counter()
    program, maps, state = common.loaded_program(cfg, group.path)
    try:
        # A live agent as far as readers can tell: VIP names resolve from its config.
        runfiles.write_json(group, runfiles.AGENT_FILE, {"pid": os.getpid(),
                                                         "config": str(pool)})
        ks, vs = ctypes.sizeof(FlowKey), ctypes.sizeof(Flow)
        web = next(v for v in state.vips if v.name == "web")
        keys, values = synthetic_flows(n, [b.backend_id for b in web.backends], coarse_ns())
        fill(maps.fds["flows"], keys, values, ks, vs)
        print(f"setup: compiled, pinned in {group.path}, {n} flows written "
              f"({time.perf_counter() - t0:.1f}s)")

        env = dict(os.environ)
        base, got = raw_dump(maps.fds["flows"], ks, vs, bulk.BATCH)
        if got != n:
            raise RuntimeError(f"the map holds {got} flows, {n} were written")
        json_s, rows = timed_flows_json(env)
        if rows != n:
            raise RuntimeError(f"flows --json printed {rows} rows, want {n}")
        table_s = timed([str(XDPLB), "flows", IFACE], env)
        startup_s = timed([str(XDPLB), "--help"], env)
    finally:
        program.close()
    print(f"baseline raw batch dump ({n} entries, in-process): {base:.2f}s")
    print(f"xdplb flows --json ({rows} rows, end to end):      {json_s:.2f}s "
          f"= {json_s / base:.1f}x the raw dump")
    print(f"xdplb flows (top-100 table of {n}):               {table_s:.2f}s "
          f"= {table_s / base:.1f}x the raw dump")
    print(f"(xdplb --help, interpreter start-up only:           {startup_s:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
