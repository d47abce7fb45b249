"""What the readers load. `xdplb status` reads a few map entries and one netlink message per
interface: numpy, pydantic, ruamel, pyroute2, scapy or BCC would cost it more than its work
(bench/footprint.py measures time and memory; nothing here is timed). Readers name VIPs from
the file the agent publishes, without parsing pool.yaml again."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from agent_process import AgentProcess
from lab import Lab
from pools import ECHO, WEB, pool_yaml

from xdplb.config import load_config
from xdplb.inspect import catalog
from xdplb.instance import pins, runfiles
from xdplb.kernel import bpfsys, linkinfo, xdp_link

HEAVY = {"numpy", "pydantic", "pydantic_core", "ruamel", "pyroute2", "scapy", "bcc"}
NAMES = {("10.200.0.10", 80, 6): "web", ("10.200.0.10", 5000, 17): "echo"}
# The CLI as the xdplb script runs it; then the top-level packages it imported, on stderr.
CLI_PROBE = ("import json, sys\nfrom xdplb.cli import main\nsys.argv[0] = 'xdplb'\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
             "sys.exit(code)")
# Both ways of reading an interface's XDP state, for every interface here.
STATES_PROBE = ("import json, socket\nfrom xdplb.kernel import linkinfo, xdp_link\n"
                "print(json.dumps({n: [repr(linkinfo.xdp_state(n)), repr(xdp_link.xdp_state(n))]"
                " for _, n in socket.if_nameindex()}))")


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[str, set[str]]:
    """stdout of ``xdplb ARGS`` (exit 0 required) and the packages it loaded."""
    p = subprocess.run([sys.executable, "-c", CLI_PROBE, *args], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout, set(json.loads(p.stderr.strip().splitlines()[-1]))


def test_status_loads_nothing_heavy(tmp_path: Path) -> None:
    """Without root: a pin group of another layout on `lo` (its maps are not read, the
    interface is); the modules status imports are the same either way."""
    bpffs = tmp_path / "bpffs"
    (bpffs / pins.ROOT_NAME / "000000000000" / pins.netns_name() / "lo").mkdir(parents=True)
    env = {**os.environ, "XDPLB_BPFFS": str(bpffs), "XDPLB_RUN_DIR": str(tmp_path / "run")}
    out, loaded = run_cli("status", "--json", env=env)
    assert loaded & HEAVY == set()
    (g,) = json.loads(out)["groups"]
    assert g["current_layout"] is False
    assert g["interfaces"] == [{"name": "lo", "present": True, "attached": False, "mode": None,
                                "prog_id": None}]
    out, loaded = run_cli("status", env=env)
    assert "lo (NOT attached)" in out and "another xdplb build" in out
    assert loaded & HEAVY == set()


def test_linkinfo_agrees_with_xdp_link_here() -> None:
    for index, name in socket.if_nameindex():
        assert linkinfo.xdp_state(name) == xdp_link.xdp_state(name)
        assert linkinfo.xdp_state(index) == xdp_link.xdp_state(index)
    with pytest.raises(OSError, match="nope0"):
        linkinfo.xdp_state("nope0")


def test_decode_xdp_modes() -> None:
    """IFLA_XDP as the kernel sends it (ints) and as pyroute2 decodes it (strings)."""
    assert linkinfo.decode_xdp(3, 0, None, {}) is None
    assert linkinfo.decode_xdp(3, None, None, {}) is None
    for attached in (linkinfo.XDP_ATTACHED_SKB, "xdpgeneric"):
        st = linkinfo.decode_xdp(3, attached, 7, {"generic": 7})
        assert (st.ifindex, st.prog_id, st.mode, st.progs) == (3, 7, "generic", {"generic": 7})
    st = linkinfo.decode_xdp(3, linkinfo.XDP_ATTACHED_MULTI, None, {"offload": 9, "native": 8})
    assert (st.prog_id, st.mode) == (8, "native")


@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A run dir where a live "agent" (this process) published its config and VIP names."""
    monkeypatch.setattr(runfiles, "RUN_ROOT", tmp_path / "run")
    group = pins.PinGroup(pins.BPFFS / pins.ROOT_NAME / "v" / "ns" / "eth0")
    pool = tmp_path / "pool.yaml"
    pool.write_text(pool_yaml(WEB, ECHO))
    runfiles.write_json(group, runfiles.AGENT_FILE, {"pid": os.getpid(), "config": str(pool)})
    runfiles.write_vip_names(group, load_config(str(pool)), str(pool))
    return group, pool


def test_vip_names_come_from_the_published_file(published, tmp_path: Path) -> None:
    group, _ = published
    probe = ("import json, sys\nfrom pathlib import Path\nfrom xdplb.inspect import catalog\n"
             "from xdplb.instance import pins\n"
             "names = catalog.vip_names(pins.PinGroup(Path(sys.argv[1])))\n"
             "print(json.dumps([[*k, v] for k, v in names.items()]))\n"
             "print(json.dumps(sorted(sys.modules)), file=sys.stderr)")
    env = {**os.environ, "XDPLB_RUN_DIR": str(tmp_path / "run")}
    p = subprocess.run([sys.executable, "-c", probe, str(group.path)], capture_output=True,
                       text=True, timeout=60, env=env, check=True)
    assert {(a, port, proto): n for a, port, proto, n in json.loads(p.stdout)} == NAMES
    assert not {m.split(".")[0] for m in json.loads(p.stderr)} & HEAVY  # no pool.yaml parsed


def test_vip_names_fall_back_to_the_config_file(published) -> None:
    """An edited config file (not reloaded yet), or names from another agent, or none: the
    names come from the config file, as when agents published none."""
    group, pool = published
    assert catalog.vip_names(group) == NAMES
    pool.write_text(pool.read_text().replace("name: web", "name: website"))
    assert catalog.vip_names(group)[("10.200.0.10", 80, 6)] == "website"
    runfiles.write_vip_names(group, load_config(str(pool)), str(pool))
    path = runfiles.run_dir(group) / runfiles.VIPS_FILE
    path.write_text(path.read_text().replace("website", "stale"))
    assert catalog.vip_names(group)[("10.200.0.10", 80, 6)] == "stale"  # the file is read
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "pid": data["pid"] + 1}))
    assert catalog.vip_names(group)[("10.200.0.10", 80, 6)] == "website"
    path.unlink()
    assert runfiles.vip_names(group, runfiles.agent_info(group)) is None
    assert catalog.vip_names(group)[("10.200.0.10", 80, 6)] == "website"


@pytest.mark.root
def test_status_on_an_attached_lab(tmp_path: Path) -> None:
    """The real thing: `xdplb --netns LB status` reads the agent's maps and the interface's
    XDP state and still loads nothing heavy; and on native and generic attachments the two
    ways of reading the XDP state agree."""
    lab = Lab(topology="one-armed", backends=2, prefix="xlt-fp")
    try:
        with lab:
            pool = tmp_path / "pool.yaml"
            pool.write_text(pool_yaml(WEB, ECHO, table_size=65537,
                                      flows={"max_entries": 100_000}))
            with AgentProcess(lab, pool, "--mode", "native"):
                out, loaded = run_cli("--netns", lab.lb_ns, "status", "--json")
                assert loaded & HEAVY == set()
                (g,) = json.loads(out)["groups"]
                assert g["interfaces"][0]["attached"] and g["interfaces"][0]["mode"] == "native"
                assert {(v["protocol"], v["port"]) for v in g["vips"]} == {("tcp", 80),
                                                                           ("udp", 5000)}
                out, loaded = run_cli("--netns", lab.lb_ns, "status")
                assert "eth0 (native)" in out and "10.20.0.12:8080" in out
                assert loaded & HEAVY == set()

                be1 = lab.backend_ns[0]
                with bpfsys.load_xdp_pass(name="xlt_fp_generic") as prog:
                    xdp_link.xdp_attach("eth0", prog, "generic", netns=be1)
                    seen = {}
                    for ns in (lab.lb_ns, lab.sw_ns, be1):
                        states = json.loads(lab.run(ns, sys.executable, "-c", STATES_PROBE,
                                                    nsenter=True).stdout)
                        for name, (ours, theirs) in states.items():
                            assert ours == theirs, (ns, name)
                            seen[ns, name] = ours
                assert "mode='native'" in seen[lab.lb_ns, "eth0"]
                assert "mode='generic'" in seen[be1, "eth0"]
    finally:
        root = pins.BPFFS / pins.ROOT_NAME
        for d in root.glob(f"*/{lab.lb_ns}") if root.is_dir() else ():
            shutil.rmtree(d, ignore_errors=True)  # never leave pins behind, whatever failed
