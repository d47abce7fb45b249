"""A non-editable install works: `pip install` of the checkout into a fresh venv (system site
packages, for Debian's python3-bpfcc), then the INSTALLED `xdplb attach` balances HTTP through
the VIP of a one-armed lab. Catches what an editable install hides: BPF sources missing from
the wheel, modules that only import from a checkout, test tools shipped by mistake."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_process import AgentProcess
from lab import Lab, run_command
from pools import ECHO, VIP, WEB, pool_yaml

import xdplb
from xdplb.abi.layout import layout_version

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: its site packages hold BCC (python3-bpfcc)
INSTALL_TIMEOUT = 240  # a plain `pip install` takes 10-25 s here; fail rather than hang
# Not part of a fresh clone: venvs, VCS data, caches and build leftovers. A stale build/ or
# *.egg-info in the tree would mask a broken package-data line (setuptools reuses them).
SKIP_TOP = {".venv", ".git", "build", "dist", ".pytest_cache", ".ruff_cache", ".hypothesis",
            ".import_linter_cache"}
SKIP_ANY = ("__pycache__", "*.egg-info", "*.pyc")
# Environment that would let the installed interpreter import the checkout instead.
LEAKY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")

# The e2e tests' pool (tests/test_e2e.py): weighted HTTP (3:1) and a UDP echo VIP.
POOL = pool_yaml(WEB, ECHO, table_size=65537, seed=0, flows={"max_entries": 100_000})

# Run by the venv's interpreter, isolated (-I: no cwd, no PYTHON* variables) so that only
# what pip installed can be imported.
PROBE = """
import json, sys, xdplb, xdplb.kernel.loader as loader
print(json.dumps({"file": xdplb.__file__, "bpf_dir": str(loader.bpf_dir()), "path": sys.path}))
"""


@dataclass
class Installed:
    venv: Path
    site: Path  # the venv's site-packages

    @property
    def xdplb(self) -> Path:
        return self.venv / "bin" / "xdplb"


def _ignore(root: Path) -> Callable[[str, list[str]], set[str]]:
    """copytree ignore function: skip what a fresh clone would not have."""
    any_level = shutil.ignore_patterns(*SKIP_ANY)

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = set(any_level(directory, names))
        here = Path(directory)
        if here == root:
            skip |= SKIP_TOP & set(names)
        if here == root / "bench":
            skip |= {"out"} & set(names)  # benchmark results (.gitignore)
        return skip

    return ignore


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """The checkout installed as a user installs it: a copy of the working tree (so the build
    writes nothing into the shared checkout), a fresh venv, `pip install SRC` with its
    dependencies from the registry (pip's cache may serve them). Removed afterwards."""
    with pytest.MonkeyPatch.context() as mp, \
            tempfile.TemporaryDirectory(prefix="xdplb-install-") as tmp:
        for name in LEAKY_ENV:
            mp.delenv(name, raising=False)
        src, venv = Path(tmp) / "src", Path(tmp) / "venv"
        shutil.copytree(REPO, src, ignore=_ignore(REPO), symlinks=True)
        run_command([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(venv)],
                    timeout=60)
        run_command([str(venv / "bin" / "pip"), "install", "--no-input", str(src)],
                    timeout=INSTALL_TIMEOUT, cwd=tmp)
        (site,) = (venv / "lib").glob("python3*/site-packages")
        yield Installed(venv=venv, site=site)


def _probe(inst: Installed) -> dict:
    out = run_command([str(inst.venv / "bin" / "python"), "-I", "-c", PROBE],
                      cwd=inst.venv, timeout=60).stdout
    return json.loads(out)


def test_installed_package_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    p = _probe(installed)
    assert Path(p["file"]).is_relative_to(installed.site), p
    assert Path(p["bpf_dir"]).is_relative_to(installed.site), p
    assert not any(entry and Path(entry).is_relative_to(REPO) for entry in p["path"]), p


def test_wheel_ships_the_bpf_sources_and_no_test_tools(installed: Installed) -> None:
    (record,) = installed.site.glob("xdplb-*.dist-info/RECORD")
    files = [line.rsplit(",", 2)[0] for line in record.read_text().splitlines() if line]
    # Only the package, its metadata and the console script: no tests/, scripts/, bench/.
    stray = [f for f in files if not f.startswith(("xdplb/", "xdplb-", "../../../bin/xdplb"))]
    assert not stray, stray
    sources = {p.name for p in (REPO / "bpf").iterdir() if p.suffix in (".c", ".h")}
    assert sources and {"xdplb.c", "decap.c"} <= sources
    shipped = {f.split("/")[-1] for f in files
               if f.startswith("xdplb/bpf/") and f.endswith((".c", ".h"))}
    assert shipped == sources
    pkg = installed.site / "xdplb"
    assert not [p for p in pkg.rglob("*") if p.name in ("testkit", "fib_probe.c")]
    assert not list(installed.site.glob("testkit")) and not list(installed.site.glob("tests"))


def test_installed_version(installed: Installed) -> None:
    out = run_command([str(installed.xdplb), "--version"], cwd=installed.venv).stdout.strip()
    assert out == f"xdplb {xdplb.__version__} (map layout {layout_version()})"


def test_installed_attach_balances_http(installed: Installed, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    exe = str(installed.xdplb)
    # Not from the checkout: the agent compiles in a `python -m` child, which puts its working
    # directory first on sys.path and would import the checkout's xdplb from there.
    monkeypatch.chdir(tmp_path)
    with Lab(topology="one-armed", backends=2, prefix="xlt-inst") as lab:
        pool = tmp_path / "pool.yaml"
        pool.write_text(POOL)
        with AgentProcess(lab, pool, "--mode", "native", exe=[exe]) as agent:
            status = json.loads(run_command(
                [exe, "--netns", lab.lb_ns, "status", "--json"]).stdout)
            (group,) = status["groups"]
            assert all(i["attached"] and i["mode"] == "native" for i in group["interfaces"])
            n = 200
            script = f"for i in $(seq {n}); do curl -s -m 5 http://{VIP}/; echo; done"
            out = lab.run(lab.client_ns, "sh", "-c", script, timeout=120).stdout
            lines = [line for line in out.splitlines() if line]
            assert len(lines) == n, (lines[-5:], agent.log_text())
            served = Counter(re.search(r"backend=(\S+)", line).group(1) for line in lines)
            assert set(served) == {"be1", "be2"}, served
            assert 0.6 < served["be1"] / n < 0.9, served  # weights 3:1
            # Balanced by the XDP program (not proxied): backends see the client's address.
            assert all(f"client={lab.client_addr}:" in line for line in lines), lines[:3]
            counters = json.loads(run_command(
                [exe, "--netns", lab.lb_ns, "status", "--json"]).stdout)["groups"][0]["counters"]
            assert counters.get("new_flow", 0) >= n and counters.get("tx", 0) > 0, counters
            rc = agent.stop()
            assert rc == 0, agent.log_text()
        # Detached cleanly: no program left on the LB's interface.
        link = lab.run(lab.lb_ns, "ip", "-d", "link", "show", "dev", "eth0").stdout
        assert "prog/xdp" not in link, link
