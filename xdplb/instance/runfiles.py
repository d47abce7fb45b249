"""What a running agent publishes besides the maps: its pid and config (for ``xdplb reload``,
``drain``), and health-check results (for ``xdplb backends``, metrics).

Files live under ``/run/xdplb/`` mirroring the pin group's path, written atomically as JSON.
They describe the agent, not the data path: when only pins are left they are absent or stale
(``agent_info`` checks the pid is alive).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xdplb.instance import pins

RUN_ROOT = Path(os.environ.get("XDPLB_RUN_DIR", "/run/xdplb"))
AGENT_FILE = "agent.json"
HEALTH_FILE = "health.json"
DRAINS_FILE = "drains.json"


def run_dir(group: pins.PinGroup) -> Path:
    """/run/xdplb/<layout>/<netns>/<ifaces> for a pin group."""
    return RUN_ROOT / group.path.relative_to(pins.BPFFS / pins.ROOT_NAME)


def write_json(group: pins.PinGroup, name: str, data: dict[str, Any]) -> None:
    d = run_dir(group)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(d / name)


def read_json(group: pins.PinGroup, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir(group) / name).read_text())
    except (OSError, ValueError):
        return None


def agent_info(group: pins.PinGroup) -> dict[str, Any] | None:
    """{"pid", "config", "ifaces", "datapath", ...} of the live agent of a group, or None."""
    info = read_json(group, AGENT_FILE)
    if not info:
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None
    return info


def health(group: pins.PinGroup) -> dict[str, Any]:
    """Health results by backend key ``"<vip name>/<addr>:<port>"``: {"state": "up" | "down" |
    "unknown", "since": unix time, "last": {"ok": bool, "time": unix time, "detail": str}}."""
    data = read_json(group, HEALTH_FILE) or {}
    return data.get("backends", {})


def clear(group: pins.PinGroup) -> None:
    """Remove all run state of a group (the agent is gone and so are its pins)."""
    d = run_dir(group)
    if d.is_dir():
        for f in d.iterdir():
            f.unlink(missing_ok=True)
    for p in (d, *d.parents):
        if p == RUN_ROOT.parent:
            break
        try:
            p.rmdir()
        except OSError:
            break


def read_drains(group: pins.PinGroup) -> set[str]:
    """The drained backends' labels (``state.backend_label``) of an instance."""
    data = read_json(group, DRAINS_FILE) or {}
    return set(data.get("drained", []))


def write_drains(group: pins.PinGroup, drained: set[str]) -> None:
    write_json(group, DRAINS_FILE, {"drained": sorted(drained)})
