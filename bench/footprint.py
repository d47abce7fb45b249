#!/usr/bin/env python3
"""Footprint: what a reader and the agent cost in time and memory, against a bare interpreter.

In one run, on a one-armed lab with an attached agent (native XDP):

- ``python -c pass`` with the interpreter xdplb runs on: the floor every command pays.
- ``xdplb --netns LB status``: wall time (median) and peak RSS (max) of ``--runs`` runs,
  interleaved with the baseline's, so both meet the same machine. Targets: <= 40 MiB and
  <= 0.3 s. Also which modules it loads (count, and none of the heavy ones).
- The agent: VmRSS of the ``xdplb attach`` process once attached (max of a few samples) and its
  VmHWM. Target: <= 120 MiB.

Bounded (``--budget`` seconds once the lab is up, each command 30 s); the lab, the agent and
its pins are removed on any exit.

    sudo .venv/bin/python bench/footprint.py [--runs K]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401 (first: puts the lab modules on sys.path)

# isort: split
from agent_process import XDPLB, AgentProcess
from common import save
from lab import Lab
from pools import ECHO, WEB, pool_yaml

from xdplb.instance import pins, runfiles

PREFIX = "xlb-fp"
TARGETS = {"status_rss_mib": 40.0, "status_wall_s": 0.3, "agent_rss_mib": 120.0}
HEAVY = ("numpy", "pydantic", "ruamel", "pyroute2", "scapy", "bcc")
RUN_TIMEOUT = 30.0  # one command
GNU_TIME = "/usr/bin/time"  # Debian's `time` package
AGENT_SAMPLES, AGENT_SAMPLE_GAP = 5, 0.5  # VmRSS once attached: 2.5 s of samples
# Runs the CLI as the xdplb script does, then reports what it imported (stderr: stdout is the
# command's).
MODULES_PROBE = ("import sys\nfrom xdplb.cli.main import main\nsys.argv[0] = 'xdplb'\n"
                 "try:\n    main()\nexcept SystemExit:\n    pass\n"
                 "print(__import__('json').dumps(sorted(sys.modules)), file=sys.stderr)")


class OutOfTime(Exception):
    """The whole benchmark ran past --budget."""


def run_once(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one run of ``cmd``.

    The peak comes from GNU time, a small process: the kernel counts a child's peak from
    before its exec too, and a child of this (large) Python process starts out as large."""
    with tempfile.NamedTemporaryFile("r") as rss, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", rss.name, *cmd],
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            p.wait(RUN_TIMEOUT)
        finally:
            if p.returncode is None:  # too slow, or out of time: leave nothing running
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: "
                               f"{err.read().decode(errors='replace')[-2000:]}")
        return wall, int(rss.read().split()[-1])


def modules(cmd_args: list[str]) -> list[str]:
    """The modules a process running the CLI with ``cmd_args`` has loaded when it is done."""
    out = subprocess.run([sys.executable, "-c", MODULES_PROBE, *cmd_args], capture_output=True,
                         text=True, timeout=RUN_TIMEOUT, check=True).stderr
    return json.loads(out.strip().splitlines()[-1])


def summary(samples: list[tuple[float, int]]) -> dict[str, Any]:
    walls, rss = [w for w, _ in samples], [r / 1024 for _, r in samples]
    return {"wall_s": statistics.median(walls), "rss_mib": max(rss),
            "wall_samples_s": [round(w, 4) for w in walls],
            "rss_samples_mib": [round(r, 2) for r in rss]}


def vm_kib(pid: int) -> dict[str, int]:
    fields = (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(v.split()[0]) for k, v in fields if k in ("VmRSS", "VmHWM")}


def remove_leftovers(lab: Lab) -> None:
    """Pins and run files of the lab's LB, if the agent could not remove them itself."""
    for root in (pins.BPFFS / pins.ROOT_NAME, runfiles.RUN_ROOT):
        if root.is_dir():
            for d in root.glob(f"*/{lab.lb_ns}"):
                shutil.rmtree(d, ignore_errors=True)


def measure(runs: int, budget: int, tmp: Path) -> dict[str, Any]:
    """Every row, on a lab built for the purpose and removed afterwards."""
    lab = Lab(topology="one-armed", backends=2, prefix=PREFIX)
    try:
        with lab:
            signal.alarm(budget)
            try:
                rows = _rows(lab, runs, tmp)
            finally:
                signal.alarm(0)  # the teardown is not cut short
    finally:
        remove_leftovers(lab)
    return {"runs": runs, "interpreter": sys.executable, "targets": TARGETS, **rows}


def _rows(lab: Lab, runs: int, tmp: Path) -> dict[str, Any]:
    baseline = [sys.executable, "-c", "pass"]
    status = [str(XDPLB), "--netns", lab.lb_ns, "status"]
    cfg = tmp / "pool.yaml"
    cfg.write_text(pool_yaml(WEB, ECHO, table_size=65537, flows={"max_entries": 100_000}))
    t0 = time.perf_counter()
    with AgentProcess(lab, cfg, "--mode", "native", timeout=120) as agent:
        attach_s = time.perf_counter() - t0
        samples = []
        for _ in range(AGENT_SAMPLES):
            time.sleep(AGENT_SAMPLE_GAP)
            samples.append(vm_kib(agent.proc.pid))
        groups = json.loads(subprocess.run([*status, "--json"], capture_output=True, text=True,
                                           check=True, timeout=RUN_TIMEOUT).stdout)["groups"]
        if not (groups and all(i["attached"] for i in groups[0]["interfaces"])):
            raise RuntimeError(f"status does not show the lab attached: {groups}")
        runs_of: dict[str, list[tuple[float, int]]] = {"baseline": [], "status": []}
        for _ in range(runs):  # interleaved: both meet the same moments of the machine
            runs_of["baseline"].append(run_once(baseline))
            runs_of["status"].append(run_once(status))
        status_mods = modules(status[1:])
    base_mods = len(json.loads(subprocess.run(
        [sys.executable, "-c", "import sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, timeout=RUN_TIMEOUT).stdout))
    base, st = summary(runs_of["baseline"]), summary(runs_of["status"])
    base.update(command="python -c pass", modules=base_mods)
    st.update(command="xdplb --netns LB status", modules=len(status_mods),
              xdplb_modules=sum(m.split(".")[0] == "xdplb" for m in status_mods),
              heavy_checked=list(HEAVY),
              heavy_modules=sorted({m.split(".")[0] for m in status_mods} & set(HEAVY)),
              wall_x_baseline=st["wall_s"] / base["wall_s"],
              rss_x_baseline=st["rss_mib"] / base["rss_mib"])
    rss = max(s["VmRSS"] for s in samples) / 1024
    agent_row = {"command": "xdplb attach (native), attached", "rss_mib": rss,
                 "peak_rss_mib": max(s["VmHWM"] for s in samples) / 1024,
                 "rss_samples_mib": [round(s["VmRSS"] / 1024, 2) for s in samples],
                 "attach_s": attach_s, "rss_x_baseline": rss / base["rss_mib"]}
    return {"baseline": base, "status": st, "agent": agent_row}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9, help="runs of each command (median, max)")
    ap.add_argument("--budget", type=int, default=300, help="seconds for the whole benchmark")
    args = ap.parse_args(argv)
    if not 1 <= args.runs <= 100:
        ap.error("--runs must be 1..100")
    if not os.access(GNU_TIME, os.X_OK):
        ap.error(f"needs GNU time at {GNU_TIME} (Debian: apt-get install time)")

    def out_of_time(*_: object) -> None:
        raise OutOfTime(f"footprint: over its budget of {args.budget} s")

    signal.signal(signal.SIGALRM, out_of_time)  # unwinds through the agent's and lab's exits
    with tempfile.TemporaryDirectory(prefix="xlb-bench-fp-") as tmp:
        res = measure(args.runs, args.budget, Path(tmp))
    b, s, a = res["baseline"], res["status"], res["agent"]
    print(f"python -c pass: {b['wall_s'] * 1e3:.0f} ms, {b['rss_mib']:.1f} MiB, "
          f"{b['modules']} modules")
    print(f"xdplb status:   {s['wall_s'] * 1e3:.0f} ms ({s['wall_x_baseline']:.1f}x), "
          f"{s['rss_mib']:.1f} MiB ({s['rss_x_baseline']:.1f}x), {s['modules']} modules "
          f"({s['xdplb_modules']} of xdplb), heavy: {', '.join(s['heavy_modules']) or 'none'}")
    print(f"agent attached: {a['rss_mib']:.1f} MiB ({a['rss_x_baseline']:.1f}x), "
          f"peak {a['peak_rss_mib']:.1f} MiB, attach {a['attach_s']:.1f} s")
    save("footprint", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
