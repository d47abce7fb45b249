"""What a running agent publishes besides the maps: its pid and config (for ``xdplb reload``,
``drain``), and health-check results (for ``xdplb backends``, metrics).

Files live under ``/run/xdplb/`` mirroring the pin group's path, written atomically as JSON.
They describe the agent, not the data path: when only pins are left they are absent or stale
(``agent_info`` checks the pid is alive). The exception is ``drains.json``, which is state of
the instance: it survives the agent's stop and restart, and only ``xdplb detach`` removes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xdplb.abi.codec import PROTOCOLS
from xdplb.instance import pins

if TYPE_CHECKING:  # types only: readers load neither pydantic nor numpy through here
    from xdplb.config import Config
    from xdplb.model.desired import Service

RUN_ROOT = Path(os.environ.get("XDPLB_RUN_DIR", "/run/xdplb"))
AGENT_FILE = "agent.json"
HEALTH_FILE = "health.json"
DRAINS_FILE = "drains.json"
VIPS_FILE = "vips.json"
POOL_FILE = "pool.json"  # per VIP: the serving set (primary/backup), backups, DNS discovery
BGP_FILE = "bgp.json"  # the speaker's peers and the announcements, as the agent last saw them
NODE_FILE = "node.json"  # instance state like drains.json: {"drained": bool} (drain-node)
# What survives the agent's stop and restart (only `xdplb detach` removes them).
INSTANCE_FILES = (DRAINS_FILE, NODE_FILE)
SPEAKER_PREFIX = "speaker."  # the BGP speaker's own files: config, pipes, pid, log


def run_dir(group: pins.PinGroup) -> Path:
    """/run/xdplb/<layout>/<netns>/<ifaces> for a pin group."""
    return RUN_ROOT / group.path.relative_to(pins.BPFFS / pins.ROOT_NAME)


def write_json(group: pins.PinGroup, name: str, data: dict[str, Any]) -> None:
    d = run_dir(group)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(d / name)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full /run keeps the last complete file, not half of one
        raise


def read_json(group: pins.PinGroup, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir(group) / name).read_text())
    except (OSError, ValueError):
        return None


SLOTS_FILE = "slots.json"  # {"generation", "slots": {backend id: Maglev slots}}


def ring_slots(group: pins.PinGroup) -> dict[int, int] | None:
    """The Maglev slots per backend id the live agent last wrote, or None (no live agent:
    readers count them in the rings)."""
    data = read_json(group, SLOTS_FILE) if agent_info(group) else None
    if not data:
        return None
    return {int(k): v for k, v in data.get("slots", {}).items()}


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


def pool(group: pins.PinGroup) -> dict[str, dict[str, Any]]:
    """Per VIP name, as the live agent published it: {"key": [address, port, ip proto],
    "serving": "primary" | "backup" | "none", "backups": ["ADDR:PORT", ...], "dns": its
    discovery's state or None}."""
    return (read_json(group, POOL_FILE) or {}).get("vips", {})


def clear(group: pins.PinGroup, keep: tuple[str, ...] = ()) -> None:
    """Remove the run state of a group (the agent is gone and so are its pins), but ``keep``."""
    d = run_dir(group)
    if d.is_dir():
        for f in d.iterdir():
            if f.name not in keep:
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


def speaker_file(group: pins.PinGroup, name: str) -> Path:
    """A file of the instance's BGP speaker (``speaker.conf``, ``speaker.pid``...): one set
    per instance, as the pins, so that agents side by side never share them."""
    return run_dir(group) / f"{SPEAKER_PREFIX}{name}"


def node_drained(group: pins.PinGroup) -> bool:
    """Whether ``xdplb drain-node`` withdrew this instance's announcements."""
    return bool((read_json(group, NODE_FILE) or {}).get("drained"))


def write_node_drained(group: pins.PinGroup, drained: bool) -> None:
    write_json(group, NODE_FILE, {"drained": drained})


def _file_key(path: str | None) -> list[int] | None:
    """What tells one version of a file from the next, without reading it."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns] if st else None


def write_vip_names(group: pins.PinGroup, cfg: Config, config_path: str | None) -> None:
    """Publish the names of the VIPs the agent applied (``cfg``, read from ``config_path``):
    readers then name VIPs without parsing and validating the config file again, which
    costs a reader more time and memory than reading the maps. Stamped with the config
    file as it is now, so that readers go back to the file once it is edited."""
    write_json(group, VIPS_FILE, {
        "pid": os.getpid(),
        "config": config_path,
        "config_file": _file_key(config_path),
        "vips": [[str(v.address), v.port, PROTOCOLS[v.protocol], v.name] for v in cfg.vips],
    })


def vip_names(group: pins.PinGroup, info: dict[str, Any]) -> dict[Service, str] | None:
    """(address, port, proto) -> name as the live agent (``info``, from ``agent_info``)
    published them; None when it published none for its config file as the file is now."""
    data = read_json(group, VIPS_FILE)
    if (not data or data.get("pid") != info.get("pid")
            or data.get("config") != info.get("config")
            or data.get("config_file") != _file_key(info.get("config"))):
        return None
    return {(addr, port, proto): name for addr, port, proto, name in data["vips"]}
