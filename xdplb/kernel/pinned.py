"""The XDP program built by a short-lived child, then opened by its pins.

BCC links LLVM and clang; once a program is compiled they hold some 180 MB resident until the
process exits. The agent lives for weeks and needs the program only as file descriptors, so
``build_pinned`` runs the compile in ``python -m xdplb.kernel.build`` (which calls
``loader.compile_program``): the child pins every map in the pin directory, as an in-process
compile does, pins the loaded program at a staging pin, reports the ids on stdout and exits.
This module opens those pins and never imports BCC or the loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from xdplb.abi.layout import MAPS
from xdplb.kernel import bpfsys

# Where the child leaves the program until the agent has attached it and moves the pin to its
# final name. bpffs refuses names with a dot.
STAGED_PIN = "prog_new"
BUILD_MODULE = "xdplb.kernel.build"


class CompileError(RuntimeError):
    """The BPF program could not be compiled or loaded (message says why)."""


@dataclass
class PinnedProgram:
    """A loaded program and its maps, opened from pins: owns the fds, holds no BCC object."""

    prog_fd: bpfsys.Fd
    map_fds: dict[str, bpfsys.Fd] = field(default_factory=dict)
    staged: Path | None = None  # the staging pin, until promote()

    def promote(self, path: Path) -> None:
        """Move the staging pin to ``path``; a pin already there is replaced in one rename,
        so readers of ``path`` always find a program."""
        assert self.staged is not None, "already promoted"
        os.replace(self.staged, path)
        self.staged = None

    def close(self) -> None:
        """Release the fds and a staging pin not promoted; the maps' pins and attached
        programs stay alive in the kernel."""
        if self.staged is not None:
            self.staged.unlink(missing_ok=True)
            self.staged = None
        for fd in (self.prog_fd, *self.map_fds.values()):
            fd.close()


def build_pinned(flow_max: int, pin_dir: Path) -> PinnedProgram:
    """Compile and load the program in a child process (maps pinned in, or reused from,
    ``pin_dir``) and open the result. Raises CompileError (or OSError) as an in-process
    compile would; leaves no staging pin behind on failure."""
    staged = pin_dir / STAGED_PIN
    # -P: `-m` would put the working directory first on sys.path, so an installed agent
    # started inside a checkout would build the checkout's sources instead of its own.
    cmd = [sys.executable, "-P", "-m", BUILD_MODULE,
           "--flow-max", str(flow_max), "--pin-dir", str(pin_dir)]
    try:
        # stderr is inherited: XDPLB_BCC_VERBOSE output and a crash's traceback show as before.
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        *noise, last = out.stdout.splitlines() or [""]
        sys.stdout.write("".join(f"{line}\n" for line in noise))  # not ours: pass it on
        try:
            report = json.loads(last)
        except ValueError:
            report = {}
        raise_reported(report)
        if out.returncode != 0 or "prog_id" not in report:  # a crash: traceback on stderr
            raise CompileError(f"building the BPF program in a child (python -m {BUILD_MODULE}) "
                               f"failed with exit code {out.returncode}; its errors are above")
        return _open(pin_dir, staged, report)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def _open(pin_dir: Path, staged: Path, report: dict) -> PinnedProgram:
    """Open the staged program and the maps, checking they are the objects the child made
    (a pin replaced in between would otherwise be used silently)."""
    fds: list[bpfsys.Fd] = []
    try:
        prog = bpfsys.obj_get(staged)
        fds.append(prog)
        maps = {}
        for m in MAPS:
            maps[m.name] = bpfsys.obj_get(pin_dir / m.name)
            fds.append(maps[m.name])
        got = object_ids(prog, maps)
        if got != {k: report.get(k) for k in got}:
            raise CompileError(f"the pins in {pin_dir} changed while the program was built "
                               f"(built {report}, found {got})")
    except BaseException:
        for fd in fds:
            fd.close()
        raise
    return PinnedProgram(prog_fd=prog, map_fds=maps, staged=staged)


# --- the child's report: one JSON line, the last on its stdout ---------------------------------


def object_ids(prog_fd: int, map_fds: dict[str, int]) -> dict:
    """Kernel ids of a program and its maps: what the child reports and the parent checks."""
    return {"prog_id": bpfsys.prog_info(prog_fd).id,
            "map_ids": {n: bpfsys.map_info(fd).id for n, fd in map_fds.items()}}


def report_error(e: Exception) -> dict:
    """An error as the parent re-raises it: an OSError with its errno, else a CompileError;
    the message is the same either way."""
    if isinstance(e, OSError) and e.errno is not None:
        return {"oserror": [e.errno, e.strerror, e.filename]}
    return {"error": str(e)}


def raise_reported(report: dict) -> None:
    if "oserror" in report:
        raise OSError(*report["oserror"])  # the errno picks the subclass, as the original
    if "error" in report:
        raise CompileError(report["error"])
