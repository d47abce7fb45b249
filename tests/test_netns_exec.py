"""`ip netns exec NS xdplb ...` works like `xdplb --netns NS ...` (issue: a balancer that runs as
a service): an agent started either way is found, drained and reloaded by commands run either
way, and an agent left by `--keep` is taken over by the next attach either way.

`ip netns exec` gives the command a mount namespace of its own, with NS's sysfs on /sys, so
/sys/fs/bpf is empty there; xdplb goes back to the mount namespace it came from
(``pins.enter_origin_mount_ns``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from agent_process import XDPLB, AgentProcess
from lab import Lab, run_command
from pools import BE1, BE2, VIP, Vip, pool_yaml

from xdplb.instance import pins

WAYS = ("--netns", "ip netns exec")
POOL = pool_yaml(Vip("web", 80, (BE1, BE2)))
# AgentProcess runs `EXE --netns NS attach ...`; run that way under `ip netns exec`, this drops
# the --netns again, so the agent is started the way a user types `ip netns exec NS xdplb ...`.
WITHOUT_NETNS = "import sys; del sys.argv[1:3]; from xdplb.cli.main import main; sys.exit(main())"


def xdplb(lab: Lab, way: str, *args: str, check: bool = True):
    pre = [str(XDPLB), "--netns", lab.lb_ns] if way == "--netns" else [
        "ip", "netns", "exec", lab.lb_ns, str(XDPLB)]
    return run_command([*pre, *args], check=check, timeout=60)


def agent(lab: Lab, config: Path, way: str, *extra: str) -> AgentProcess:
    exe = None if way == "--netns" else ["ip", "netns", "exec", lab.lb_ns, sys.executable,
                                         "-c", WITHOUT_NETNS]
    return AgentProcess(lab, config, *extra, exe=exe)


def groups(lab: Lab, way: str) -> list[dict]:
    return json.loads(xdplb(lab, way, "status", "--json").stdout)["groups"]


def weights(lab: Lab, way: str) -> dict[str, int]:
    (g,) = groups(lab, way)
    return {b["address"]: b["weight"] for v in g["vips"] for b in v["backends"]}


def answered_by(lab: Lab, sport: int) -> str:
    return lab.http_get(lab.client_ns, VIP, sport=sport).split("backend=", 1)[1].split()[0]


def assert_nothing_left(lab: Lab) -> None:
    for way in WAYS:
        p = xdplb(lab, way, "status", check=False)
        assert p.returncode == 3, (way, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def lab():
    with Lab(topology="one-armed", backends=2, prefix="xlt-nx") as lab:
        try:
            yield lab
        finally:
            xdplb(lab, "--netns", "detach", "eth0", check=False)


@pytest.mark.root
@pytest.mark.parametrize("started", WAYS)
def test_agent_found_either_way(lab: Lab, tmp_path: Path, started: str) -> None:
    config = tmp_path / "pool.yaml"
    config.write_text(POOL)
    # Client ports whose connections land on be1 while nothing is drained.
    with agent(lab, config, started):
        on_be1 = [p for p in range(22000, 22040) if answered_by(lab, p) == "be1"][:4]
        assert on_be1
        for way in WAYS:
            (g,) = groups(lab, way)
            assert g["interfaces"][0]["attached"], (way, g)
            assert xdplb(lab, way, "flows", "--json").returncode == 0
            assert "drained" in xdplb(lab, way, "drain", "web", BE1).stdout
            for seen in WAYS:
                assert weights(lab, seen) == {BE1: 0, BE2: 1}, (way, seen)
            assert [answered_by(lab, p) for p in on_be1] == ["be2"] * len(on_be1), way
            assert "undrained" in xdplb(lab, way, "undrain", "web", BE1).stdout
            assert weights(lab, way) == {BE1: 1, BE2: 1}
            assert "reloaded" in xdplb(lab, way, "reload").stdout
    assert_nothing_left(lab)


@pytest.mark.root
@pytest.mark.parametrize(("first", "then"), [(WAYS[1], WAYS[0]), (WAYS[0], WAYS[1])])
def test_kept_program_taken_over_either_way(lab: Lab, tmp_path: Path, first: str,
                                            then: str) -> None:
    config = tmp_path / "pool.yaml"
    config.write_text(POOL)
    with agent(lab, config, first, "--keep"):
        (g,) = groups(lab, then)
        kept = g["prog_id"]
    for way in WAYS:  # the agent is gone, its program and pins are not
        (g,) = groups(lab, way)
        assert g["prog_id"] == kept and g["interfaces"][0]["attached"], (way, g)
    with agent(lab, config, then) as a:  # ours, not foreign: replaced in place
        assert "already carries an XDP program" not in a.log_text()
        (g,) = groups(lab, first)
        assert g["interfaces"][0]["attached"] and g["prog_id"] != kept
        assert answered_by(lab, 22100) in ("be1", "be2")
    assert_nothing_left(lab)


def test_no_private_bpffs_under_ip_netns_exec(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Where the mount namespace `ip netns exec` made cannot be left, attach does not mount a
    bpffs of its own there (its pins would vanish with the command): it names --netns."""
    monkeypatch.setattr(pins, "BPFFS", tmp_path / "bpf")
    monkeypatch.setattr(pins, "_origin_mount_ns", lambda: "/proc/4242/ns/mnt")
    with pytest.raises(OSError, match=r"run `xdplb --netns NAME attach \.\.\.` instead"):
        pins.ensure_bpffs()
    assert not (tmp_path / "bpf").exists()


def test_netns_that_does_not_exist_is_not_created() -> None:
    name = "xlt-nx-typo"
    p = run_command([str(XDPLB), "--netns", name, "status"], check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"no network namespace '{name}'" in p.stderr and "Traceback" not in p.stderr
    assert not Path("/run/netns", name).exists()
