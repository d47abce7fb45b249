"""Deterministic fault injection for tests of the agent's error handling.

Off unless ``XDPLB_FAULTS`` names a JSON file: ``{"map_write": 1, "health": 2}`` makes the
next map write fail once and the next two health results fail. Each point's count goes down
as it fires, and the file is re-read at every point, so a test can arm a fault in a running
agent by writing the file. Points: ``map_write`` (ENOMEM from a map update, after the
backends are written and before the rings are), ``health`` (handling a health result),
``reload`` (reading the config file), ``drains`` (reading the drain list, a control command).
A full state directory needs no injection: tests mount a small tmpfs and fill it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

ENV = "XDPLB_FAULTS"
ERRNO = {"map_write": errno.ENOMEM, "health": errno.EIO, "reload": errno.EIO,
         "drains": errno.EIO}


def fire(point: str) -> None:
    """Raise the armed fault of ``point``, if any (an OSError, as the real failure would)."""
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        armed = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return
    if not armed.get(point):
        return
    armed[point] -= 1
    Path(path).write_text(json.dumps(armed))
    code = ERRNO.get(point, errno.EIO)
    raise OSError(code, f"{os.strerror(code)} (injected by {ENV} at {point})")


class FaultyMaps:
    """Maps whose Maglev ring writes fail while ``map_write`` is armed: the backends are
    written, the rings not (a half-applied change, as a real ENOMEM mid-apply leaves).
    Everything else goes to the wrapped maps object. Installed only when ``XDPLB_FAULTS``
    is set."""

    def __init__(self, maps: Any) -> None:
        self._maps = maps

    def put_ring(self, vip_id: int, values: Any) -> None:
        fire("map_write")
        self._maps.put_ring(vip_id, values)

    def ring_update(self, vip_id: int, values: Any, changed: Any) -> None:
        fire("map_write")
        self._maps.ring_update(vip_id, values, changed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._maps, name)


def enabled() -> bool:
    return bool(os.environ.get(ENV))
