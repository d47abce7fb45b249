"""What keeps the agent's event loop alive: error accounting, retries, and the watch on its
program.

An event that fails (a map write, a health result, a reload, a control command, a full
state directory) is logged and counted, and never ends the agent: the data path keeps
forwarding with the last state written, and the maps are written again on a later tick
until they match (``Retry``). ``ProgramWatch`` notices when the agent's program leaves one of
its interfaces (``ip link set dev X xdp off``, the interface or its namespace deleted).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from xdplb.kernel import xdp_link

log = logging.getLogger("xdplb")

RETRY_MIN, RETRY_MAX = 1.0, 60.0  # seconds between attempts to write the maps again


@dataclass
class Errors:
    """Failures of the agent's own work, by kind, as published in agent.json."""

    by_kind: dict[str, int] = field(default_factory=dict)
    last: dict[str, Any] | None = None

    def count(self, kind: str, exc: BaseException, what: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.last = {"kind": kind, "message": f"{exc}", "time": time.time()}
        log.error("%s failed: %s; %s", kind, exc, what)
        log.debug("%s failure", kind, exc_info=exc)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_kind": dict(self.by_kind), "last": self.last}


@dataclass
class Retry:
    """When to write the maps again after a failed write: 1 s, then doubling up to 60 s."""

    pending: bool = False
    delay: float = RETRY_MIN
    at: float = 0.0

    def failed(self) -> None:
        if self.pending:
            self.delay = min(self.delay * 2, RETRY_MAX)
        self.pending = True
        self.at = time.monotonic() + self.delay

    def due(self) -> bool:
        return self.pending and time.monotonic() >= self.at

    def done(self) -> None:
        self.pending, self.delay = False, RETRY_MIN


@dataclass
class ProgramWatch:
    """Whether each interface still carries program ``prog_id``; reasons by interface."""

    prog_id: int
    lost: dict[str, str] = field(default_factory=dict)

    def check(self, ifaces: list[str]) -> bool:
        """Look again; True when something changed (logged)."""
        changed = False
        for name in ifaces:
            try:
                st = xdp_link.xdp_state(name)
                now = st.prog_id if st else 0
                why = (None if now == self.prog_id else
                       "no XDP program is attached" if not now else
                       f"XDP program {now}, not xdplb's {self.prog_id}, is attached")
            except (OSError, LookupError):
                why = "the interface is gone"
            if why == self.lost.get(name):
                continue
            changed = True
            if why:
                self.lost[name] = why
                log.error("%s: xdplb's program is no longer attached (%s): the interface is "
                          "not balanced; `xdplb detach %s` removes the rest, `xdplb attach` "
                          "attaches again", name, why, name)
            else:
                del self.lost[name]
                log.warning("%s: xdplb's program is attached again", name)
        return changed
