"""Traffic through a lab's VIP for the whole of a test (scripts/netns/traffic.py): long TCP
streams checked byte for byte and steady new HTTP connections, read back as events."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lab import HERE, Lab


class Traffic:
    def __init__(self, lab: Lab, vip: str, log: Path, streams: int = 8, rate: float = 10,
                 duration: float = 300, stall: float = 5.0) -> None:
        self.log = log
        self.proc = lab.popen(lab.client_ns, sys.executable, str(HERE / "traffic.py"),
                              "--vip", vip, "--log", str(log), "--streams", str(streams),
                              "--rate", str(rate), "--duration", str(duration),
                              "--stall", str(stall))
        self.n = streams

    def events(self, kind: str, since: float = 0.0) -> list[dict]:
        assert self.proc.poll() in (None, 0), f"traffic driver exited {self.proc.returncode}"
        text = self.log.read_text() if self.log.exists() else ""
        return [e for line in text.splitlines()
                if (e := json.loads(line))["ev"] == kind and e.get("t", 0) >= since]

    def wait_streams(self, timeout: float = 20) -> dict[int, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(up := {e["id"]: e["backend"] for e in self.events("stream")}) == self.n:
                return up
            time.sleep(0.2)
        raise AssertionError(f"streams did not connect: {self.events('stream')}")

    def breaks(self, since: float = 0.0) -> list[dict]:
        return self.events("break", since)

    def failed_new(self, since: float = 0.0) -> tuple[int, list[dict]]:
        """(new connections since, those that got no answer)."""
        new = self.events("new", since)
        return len(new), [e for e in new if not e.get("backend")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
