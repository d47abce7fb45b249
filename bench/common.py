"""What every benchmark shares: paths, BCC compilation of bench programs, results as JSON,
the description of the machine, and CPU time read from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
BPF_SRC = BENCH / "bpf"
DOCS = REPO / "docs"
# The namespace lab and the agent runner live there (scripts/netns is not a package). Last on
# the path: a module of the same name here must win.
sys.path.append(str(REPO / "scripts" / "netns"))

TICK = os.sysconf("SC_CLK_TCK")


def compile_bcc(source: str, cflags: Iterable[str] = ()) -> Any:
    """Compile bench/bpf/<source> with BCC; returns the ``bcc.BPF`` object."""
    from bcc import BPF

    # The loader's stderr capture: BCC warns about the skewed kernel headers on every compile.
    from xdplb.kernel.loader import _quiet_stderr

    quiet = _quiet_stderr()
    try:
        with quiet:
            return BPF(text=(BPF_SRC / source).read_bytes(), cflags=list(cflags))
    except Exception as e:
        raise RuntimeError(f"compiling bench/bpf/{source} failed: {e}\n{quiet.errors()}") from e


def xdp_fd(bpf: Any, fn: str) -> int:
    from bcc import BPF

    return bpf.load_func(fn.encode(), BPF.XDP).fd


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    """Median of ``runs`` calls of ``measure`` (and every sample, for the record)."""
    samples = [measure() for _ in range(runs)]
    return statistics.median(samples), samples


# --- results -------------------------------------------------------------------------------


def save(name: str, data: dict[str, Any]) -> Path:
    """Write bench/out/<name>.json: the results plus the machine they were measured on."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    doc = {"benchmark": name, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "machine": machine(), **data}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return path


def load(name: str) -> dict[str, Any] | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    """CPU, cores, memory, kernel and distribution of this machine."""
    lscpu = dict(re.findall(r"^([^:\n]+):\s+(.*)$", _sh("lscpu"), re.M))
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    os_release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', Path("/etc/os-release").read_text(),
                                 re.M))
    return {
        "cpu": lscpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "hypervisor": lscpu.get("Hypervisor vendor", "none"),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": os_release.get("PRETTY_NAME", "?"),
        "python": platform.python_version(),
    }


# --- CPU time ------------------------------------------------------------------------------


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of the given tasks (processes or kernel threads), in seconds.

    Tasks that are gone count 0: callers take deltas over tasks alive for the whole window.
    """
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / TICK


def busy_seconds() -> float:
    """CPU time all CPUs spent not idle since boot (/proc/stat), in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICK


def softirq_seconds() -> float:
    """CPU time all CPUs spent in softirqs since boot (/proc/stat): the kernel's packet work."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[7]) / TICK


@contextlib.contextmanager
def private_instance(prefix: str) -> Iterator[Path]:
    """A bpffs directory and a run directory of this benchmark's own, set as XDPLB_BPFFS and
    XDPLB_RUN_DIR (before xdplb is imported: pins.py and runfiles.py read them at import);
    both removed afterwards, also on failure. Yields the run directory."""
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/sys/fs/bpf"))
    run_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-run-"))
    os.environ["XDPLB_BPFFS"], os.environ["XDPLB_RUN_DIR"] = str(root), str(run_dir)
    try:
        yield run_dir
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def loaded_program(cfg: Any, pin_dir: Path | None) -> tuple[Any, Any, Any]:
    """The real program compiled for ``cfg`` (maps pinned in ``pin_dir``) and its maps filled
    by MapSync as the agent does: (program, maps, desired state). Close the program."""
    from xdplb.agent.mapsync import MapSync
    from xdplb.kernel.loader import compile_program
    from xdplb.kernel.maps import KernelMaps
    from xdplb.model.desired import desired_state

    program = compile_program(cfg.flows.max_entries, pin_dir)
    try:
        maps = KernelMaps(program.map_fds, own=False)
        sync = MapSync(maps)
        state = desired_state(cfg, sync.read_current())
        sync.apply(state, sync.read_current())
    except BaseException:
        program.close()
        raise
    return program, maps, state

