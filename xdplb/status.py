"""``xdplb status``: what is attached where, read from the pins (works without the agent)."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from xdplb import pins, xdp_link
from xdplb.agent import open_group_maps, pinned_prog_id
from xdplb.layout import BackendFlag, layout_version
from xdplb.maps import read_counters
from xdplb.state import PROTO_NAMES
from xdplb.sync import from_be16, ipv4_of


def _iface_state(name: str, prog_id: int | None) -> dict[str, Any]:
    try:
        st = xdp_link.xdp_state(xdp_link.ifindex(name))
    except (OSError, LookupError):
        return {"name": name, "present": False, "attached": False, "mode": None}
    attached = bool(st and st.prog_id and st.prog_id == prog_id)
    return {
        "name": name,
        "present": True,
        "attached": attached,
        "mode": st.mode if st and attached else None,
        "prog_id": st.prog_id if st else None,
    }


def collect() -> list[dict[str, Any]]:
    """One entry per pin group in this network namespace."""
    out = []
    for g in pins.groups(any_version=True):
        prog_id = pinned_prog_id(g)
        entry: dict[str, Any] = {
            "pin_dir": str(g.path),
            "layout": g.path.parent.parent.name,
            "current_layout": g.path.parent.parent.name == layout_version(),
            "prog_id": prog_id,
            "interfaces": [_iface_state(i, prog_id) for i in g.ifaces],
            "vips": [],
            "counters": {},
        }
        if entry["current_layout"]:
            with open_group_maps(g) as maps:
                entry["vips"] = _vips(maps)
                entry["counters"] = read_counters(maps)
        out.append(entry)
    return out


def _vips(maps) -> list[dict[str, Any]]:
    backends: dict[int, list[dict[str, Any]]] = {}
    for bid, be in maps.items("backends"):
        if not be.flags & BackendFlag.VALID:
            continue
        backends.setdefault(be.vip_id, []).append({
            "id": bid,
            "address": ipv4_of(be.addr),
            "port": from_be16(be.port),
            "weight": be.weight,
            "down": bool(be.flags & BackendFlag.DOWN),
        })
    vips = []
    for k, info in maps.items("vips"):
        vips.append({
            "id": info.vip_id,
            "address": ipv4_of(k.addr),
            "port": from_be16(k.port),
            "protocol": PROTO_NAMES.get(k.proto, str(k.proto)),
            "backends": sorted(backends.get(info.vip_id, []), key=lambda b: b["id"]),
        })
    return sorted(vips, key=lambda v: v["id"])


def render(groups: list[dict[str, Any]]) -> str:
    parts = []
    for g in groups:
        ifs = ", ".join(
            f"{i['name']} ({i['mode']})" if i["attached"] else f"{i['name']} (NOT attached)"
            for i in g["interfaces"]
        )
        parts.append(f"{ifs}  prog {g['prog_id']}  pins {g['pin_dir']}")
        if not g["current_layout"]:
            parts.append("  pins of another xdplb build (layout differs): not read")
            continue
        rows = [
            [f"{v['protocol']} {v['address']}:{v['port']}",
             f"{b['address']}:{b['port']}", b["weight"], "down" if b["down"] else "up"]
            for v in g["vips"] for b in v["backends"]
        ]
        parts.append(tabulate(rows, headers=["VIP", "BACKEND", "WEIGHT", "STATE"],
                              tablefmt="plain"))
        c = {k: v for k, v in g["counters"].items() if v}
        parts.append("counters: " + (", ".join(f"{k}={v}" for k, v in c.items()) or "none"))
    return "\n".join(parts)
