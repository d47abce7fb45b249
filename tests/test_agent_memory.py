"""The long-lived agent carries no compiler: BCC compiles in a short-lived child
(``python -m xdplb.kernel.build``) that pins the program, and the agent attaches it from the
pin. LLVM, clang and libbcc mapped into the agent held ~170 MB of its ~245 MB RSS."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from agent_process import AgentProcess, status
from lab import Lab
from pools import BE1, BE2, Vip, pool_yaml

from xdplb.kernel.loader import compile_program
from xdplb.kernel.pinned import STAGED_PIN, CompileError, build_pinned

pytestmark = pytest.mark.root

# The shared objects `import bcc` maps (libbcc, and the LLVM and clang it links).
COMPILER_LIBS = re.compile(r"/lib(bcc|LLVM|clang)[^/]*\.so[^/]*$")


def compiler_libs(maps: str) -> set[str]:
    """Compiler libraries in a process's /proc/PID/maps."""
    return {line.split()[-1] for line in maps.splitlines() if COMPILER_LIBS.search(line)}


def rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_the_pattern_finds_bccs_libraries():
    """Without this, a renamed or static libbcc would let the agent check pass vacuously."""
    probe = "import bcc; print(open('/proc/self/maps').read())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    found = compiler_libs(out)
    assert any("bcc" in f for f in found) and any("LLVM" in f for f in found), found


def test_attached_agent_maps_no_compiler(tmp_path):
    with Lab(topology="one-armed", backends=2, prefix="xlt-mem") as lab:
        pool = tmp_path / "pool.yaml"
        pool.write_text(pool_yaml(Vip("web", 80, (BE1, BE2))))
        with AgentProcess(lab, pool, "--mode", "native") as agent:
            pid = agent.proc.pid
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert compiler_libs(maps) == set(), f"agent RSS {rss_kib(pid)} KiB"
            (g,) = status(lab)["groups"]
            # The child's staging pin became the program pin of what is attached.
            assert g["interfaces"][0]["attached"] and g["prog_id"]
            assert not (Path(g["pin_dir"]) / STAGED_PIN).exists()
        assert agent.proc.returncode == 0, agent.log_text()


def test_child_errors_are_raised_as_in_process(tmp_path):
    """A failed build in the child raises what compiling in-process raises, and leaves no
    staging pin (here: a pin dir outside bpffs, where BCC cannot open its pinned maps)."""
    pin_dir = tmp_path / "not-bpffs"
    with pytest.raises(CompileError) as here:
        compile_program(1024, pin_dir)
    with pytest.raises(CompileError) as child:
        build_pinned(1024, pin_dir)
    assert str(child.value) == str(here.value)
    assert not (pin_dir / STAGED_PIN).exists()
