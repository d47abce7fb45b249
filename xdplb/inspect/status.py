"""``xdplb status``: what is attached where, read from the pins (works without the agent).

It reads a few small maps and one netlink message per interface, so it imports only what
that takes: no numpy, pydantic, pyroute2, BCC or scapy (tests/test_footprint.py checks).
"""

from __future__ import annotations

from typing import Any

from xdplb.abi.layout import layout_version
from xdplb.inspect.catalog import Catalog, mode_text, role_text, scheduler_name
from xdplb.instance import pins, runfiles
from xdplb.kernel import linkinfo
from xdplb.kernel.maps import KernelMaps, read_counters


def _iface_state(name: str, prog_id: int | None) -> dict[str, Any]:
    try:
        st = linkinfo.xdp_state(name)
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
        prog_id = pins.prog_id(g)
        entry: dict[str, Any] = {
            "pin_dir": str(g.path),
            "layout": g.path.parent.parent.name,
            "current_layout": g.path.parent.parent.name == layout_version(),
            "prog_id": prog_id,
            "interfaces": [_iface_state(i, prog_id) for i in g.ifaces],
            "vips": [],
            "counters": {},
            "agent": _agent(g),
            "bgp": bgp_state(g),
        }
        if entry["current_layout"]:
            with pins.open_maps(g) as maps:
                entry["vips"] = _vips(maps, g)
                entry["counters"] = read_counters(maps)
        out.append(entry)
    return out


def _agent(g: pins.PinGroup) -> dict[str, Any] | None:
    """The running agent as it publishes itself: pid, errors it survived, lost program."""
    info = runfiles.agent_info(g)
    if info is None:
        return None
    errors = info.get("errors") or {}
    return {"pid": info.get("pid"), "config": info.get("config"),
            "generation": info.get("generation"), "errors": errors.get("total", 0),
            "errors_by_kind": errors.get("by_kind", {}), "last_error": errors.get("last"),
            "retry_pending": info.get("retry_pending", False),
            "program_lost": info.get("program_lost", {})}


def bgp_state(g: pins.PinGroup) -> dict[str, Any] | None:
    """The running agent's BGP peers and announcements (as its speaker reported them), or
    None without a running agent or a ``bgp`` section."""
    if runfiles.agent_info(g) is None:
        return None
    return runfiles.read_json(g, runfiles.BGP_FILE)


def _render_bgp(b: dict[str, Any]) -> list[str]:
    peers = ", ".join(f"{p['address']} (AS{p['asn']}) {p['state']}" for p in b["peers"])
    lines = [f"  bgp AS{b.get('asn')}: peers {peers}"]
    lines += [f"  {a['prefix']} {a['state'].upper()}: {a['reason']}" for a in b["announcements"]]
    return lines


def _vips(maps: KernelMaps, g: pins.PinGroup | None = None) -> list[dict[str, Any]]:
    # Names, backups and discovery as the live agent applied them (no config parsing here).
    cat = Catalog.read(maps, roles_of=g)
    return [{
        "id": v.id,
        "name": cat.published.get(v.id, {}).get("name"),
        "serving": cat.serving.get(v.id),
        "dns": cat.published.get(v.id, {}).get("dns"),
        "address": v.address,
        "port": v.port,
        "protocol": v.protocol,
        "forwarding": v.forwarding[0],
        "encap": v.forwarding[1],
        "source_ports": list(v.source_ports) if v.source_ports else None,
        "scheduler": scheduler_name(v.scheduler),
        "backends": [{"id": b.id, "address": b.address, "port": b.port, "weight": b.weight,
                      "down": b.down, "source": b.source,
                      "backup": b.id in cat.backups}
                     for b in cat.vip_backends(v.id)],
    } for v in sorted(cat.vips.values(), key=lambda v: v.id)]


def _mode(v: dict[str, Any]) -> str:
    """``fullnat 1024-32767``, ``dsr/ipip``, ``nat``: a VIP's mode in the table."""
    text = mode_text(v["forwarding"], v["encap"])
    if v["source_ports"]:
        text += " {}-{}".format(*v["source_ports"])
    return text


def _dns_line(v: dict[str, Any]) -> str:
    d = v["dns"]
    failing = f", FAILING: {d['failing']}" if d.get("failing") else ""
    return (f"  {v['name']}: backends from DNS {d['name']} {d['type']}: {d['backends']} "
            f"({d['last_answer']}), dns_failures={d['dns_failures']}{failing}")


def render(groups: list[dict[str, Any]]) -> str:
    from tabulate import tabulate  # the table only: --json goes without

    parts = []
    for g in groups:
        ifs = ", ".join(
            f"{i['name']} ({i['mode']})" if i["attached"] else f"{i['name']} (NOT attached)"
            for i in g["interfaces"]
        )
        parts.append(f"{ifs}  prog {g['prog_id']}  pins {g['pin_dir']}")
        if a := g.get("agent"):
            parts.append(f"  agent pid {a['pid']}, {a['errors']} errors survived"
                         + "".join(f"; {i}: PROGRAM LOST ({why})"
                                   for i, why in a["program_lost"].items()))
        if b := g.get("bgp"):
            parts += _render_bgp(b)
        if not g["current_layout"]:
            parts.append("  pins of another xdplb build (layout differs): not read")
            continue
        rows = [
            [f"{v['protocol']} {v['address']}:{v['port']}", _mode(v), v["scheduler"],
             f"{b['address']}:{b['port']}", b["source"] or "-", b["weight"],
             ("down" if b["down"] else "up") + role_text(b["backup"], v["serving"])]
            for v in g["vips"] for b in v["backends"]
        ]
        parts.append(tabulate(rows, headers=["VIP", "MODE", "SCHEDULER", "BACKEND", "SOURCE",
                                             "WEIGHT", "STATE"], tablefmt="plain"))
        parts += [_dns_line(v) for v in g["vips"] if v.get("dns")]
        c = {k: v for k, v in g["counters"].items() if v}
        parts.append("counters: " + (", ".join(f"{k}={v}" for k, v in c.items()) or "none"))
    return "\n".join(parts)
