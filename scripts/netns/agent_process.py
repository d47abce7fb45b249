"""Run `xdplb attach` in a lab's LB namespace as a user would, for tests and the demo."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from lab import REPO, Lab, run_command

XDPLB = REPO / ".venv" / "bin" / "xdplb"


def xdplb(lab: Lab, *args: str, check: bool = True, timeout: float = 60
          ) -> subprocess.CompletedProcess:
    """Run an xdplb command in the LB's network namespace (``--netns``, never `ip netns
    exec`: that would hide bpffs and the agent's pins)."""
    # A failure's message carries the command's stderr (what went wrong).
    return run_command([str(XDPLB), "--netns", lab.lb_ns, *args], check=check, timeout=timeout)


def status(lab: Lab) -> dict:
    return json.loads(xdplb(lab, "status", "--json").stdout)


class AgentProcess:
    """A foreground `xdplb attach` on the LB's interfaces; ``stop()`` sends SIGTERM."""

    def __init__(self, lab: Lab, config: Path, *extra: str, timeout: float = 60,
                 exe: list[str] | None = None, ns: str | None = None) -> None:
        self.lab = lab
        self.ns = ns or lab.lb_ns  # another balancer's (bgplab.py's nodes)
        self.log = config.with_suffix(".agent.log")
        cmd = [*(exe or [str(XDPLB)]), "--netns", self.ns, "attach", *lab.lb_ifaces,
               "--config", str(config), *extra]
        start = self.log.stat().st_size if self.log.exists() else 0  # several agents, one log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log.open("a"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited ({self.proc.returncode}): {self.log_text()}")
            if "attached to" in self.log_text()[start:]:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"agent did not attach within {timeout}s: {self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text()

    def kill9(self) -> None:
        """Die without cleaning up, as a crashed agent would."""
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
