"""Human views of ``xdplb stats``, ``backends`` and ``trace``: aligned tables and lines.

The JSON these commands print is the data itself; this is only its presentation.
"""

from __future__ import annotations

import time
from typing import Any

from tabulate import tabulate

from xdplb.inspect.catalog import mode_text, role_text


def fmt_seconds(s: float) -> str:
    """1.2s, 3m04s, 2h05m, 3d04h: ages at a glance."""
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_si(x: float | None) -> str:
    """Rates and big counters in SI units: 950, 1.2k, 3.4M."""
    if x is None:
        return "-"
    for unit in ("", "k", "M", "G", "T"):
        if abs(x) < 1000:
            return f"{x:.0f}{unit}" if unit == "" else f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}P"


def _vip_name(row: dict[str, Any]) -> str:
    return row["vip"] or f"{row['protocol']} {row['vip_address']}:{row['vip_port']}"


def render_stats(s: dict[str, Any]) -> str:
    def rated(row: dict[str, Any]) -> list[Any]:
        return [row["packets"], row["bytes"], row["new_flows"], row["flows"],
                row["active_flows"], fmt_si(row["packets_per_s"]), fmt_si(row["bytes_per_s"]),
                fmt_si(row["new_flows_per_s"])]

    cols = ["PACKETS", "BYTES", "NEW FLOWS", "FLOWS", "ACTIVE", "PKT/S", "B/S", "FLOWS/S"]
    vips = [[_vip_name(v), f"{v['protocol']} {v['vip_address']}:{v['vip_port']}",
             mode_text(v["forwarding"], v["encap"]), *rated(v)] for v in s["vips"]]
    bes = [[_vip_name(b), f"{b['address']}:{b['port']}", *rated(b)] for b in s["backends"]]
    c = s["counters"]
    drops = ", ".join(f"{k[5:]}={v}" for k, v in c.items() if k.startswith("drop_"))
    other = ", ".join(f"{k}={v}" for k, v in c.items() if not k.startswith("drop_") and v)
    ft = s["flow_table"]
    when = time.strftime("%H:%M:%S", time.localtime(s["ts"]))
    per = f", rates over {s['interval_s']:g}s" if s["interval_s"] else ""
    return "\n".join([
        f"{when}{per}",
        tabulate(vips, headers=["VIP", "ADDRESS", "MODE", *cols], tablefmt="plain"),
        "",
        tabulate(bes, headers=["VIP", "BACKEND", *cols], tablefmt="plain"),
        "",
        f"flow table: {ft['entries']} of {ft['capacity']} ({100 * ft['fill']:.1f}%)",
        f"drops: {drops}",
        f"counters: {other or 'none'}",
        *(discovery_line(d) for d in s.get("discovery", ())),
    ]) + "\n"


def discovery_line(d: dict[str, Any]) -> str:
    """A ``backends_from`` VIP's discovery in one line, for ``stats`` and ``status``."""
    ago = (f", last answer {fmt_seconds(max(time.time() - d['last_ok'], 0))} ago"
           if d.get("last_ok") else "")
    failing = f", FAILING: {d['failing']}" if d.get("failing") else ""
    return (f"dns {d['vip']}: {d['name']} {d['type']} from {d['resolver'] or 'system resolver'}"
            f": {d['backends']} backends ({d['last_answer']}{ago}), "
            f"dns_failures={d['dns_failures']}{failing}")


def _last_check(h: dict[str, Any]) -> str:
    last = h.get("last")
    if not last or last.get("time") is None:
        return "-"
    ago = fmt_seconds(max(time.time() - last["time"], 0))
    return f"{'ok' if last['ok'] else 'FAILED'} {ago} ago: {last.get('detail', '')}".strip()


def render_backends(rows: list[dict[str, Any]]) -> str:
    sampled = any("weight_share" in b for b in rows)
    table = [[_vip_name(b), f"{b['address']}:{b['port']}", b["weight"],
              b["health"]["state"] + (" (drained)" if b["weight"] == 0 else "")
              + role_text(b["backup"], b["serving"]),
              _last_check(b["health"]), f"{b['maglev_share']:.1f}%",
              *([_new_share(b), f"{b['weight_share']:.1f}%"] if sampled else []),
              b["flows"], b["active_flows"]] for b in rows]
    interval = next((b["interval_s"] for b in rows if "interval_s" in b), 0)
    return tabulate(table, headers=["VIP", "BACKEND", "WEIGHT", "HEALTH", "LAST CHECK",
                                    "SHARE",
                                    *([f"NEW/{interval:g}s", "BY WEIGHT"] if sampled else []),
                                    "FLOWS", "ACTIVE"], tablefmt="plain")


def _new_share(b: dict[str, Any]) -> str:
    """New flows in the interval and their share of the VIP's, HOT when far above the
    weight's share (inspect/backends.py)."""
    if b["new_flow_share"] is None:
        return f"{b['new_flows_interval']} (-)"
    return (f"{b['new_flows_interval']} ({b['new_flow_share']:.1f}%)"
            + (" HOT" if b["hot"] else ""))


def _flow_mode(f: dict[str, Any]) -> str:
    """A tracked flow's own mode (it may predate a change of its VIP's), fullnat's source."""
    text = mode_text(f["forwarding"], f["encap"])
    return f"{text} from {f['source']}" if f["source"] else text


def render_trace(t: dict[str, Any]) -> str:
    vip = t["vip"]
    lines = [f"{t['proto']} {t['src']} -> {t['dst']}"
             + (f"  (VIP {vip['vip'] or vip['vip_address']}, id {vip['vip_id']}, "
                f"{mode_text(vip['forwarding'], vip['encap'])})" if vip else "")]
    lines.append(f"verdict: {t['verdict']} (in on {t['ingress']}), packet out: {t['out']}")
    d, f, m, b = t["decision"], t["tracked_flow"], t["maglev"], t["backend"]
    be = f"backend {b['backend_id']} ({b['address']}:{b['port']})" if b else ""
    if d == "tracked":
        why = (f"tracked flow to {be}, age {fmt_seconds(f['age_s'])}, idle "
               f"{fmt_seconds(f['idle_s'])}, {f['tcp_state']}, {_flow_mode(f)}")
    elif d in ("new", "rebalanced") and m:
        sched = m.get("scheduler", "maglev")
        what = (f"turn {m['hash']}" if sched in ("wrr", "rr") else
                f"{'client address ' if sched == 'source-hash' else ''}hash {m['hash']:#010x} "
                f"(seed {m['seed']}{' ^ random salt' if sched == 'random' else ''})")
        why = f"{sched}: {what} % {m['ring_size']} = slot {m['slot']}, owned by {be}"
        if d == "rebalanced" and f.get("udp_idle_over"):
            why = (f"tracked flow idle {fmt_seconds(f['idle_s'])}, over "
                   f"flows.udp_idle_timeout: a new flow: {why}")
        elif d == "rebalanced":
            why = (f"tracked flow's backend {f['backend'] or f['backend_id']} is down or gone: "
                   f"re-picked: {why}")
        else:
            why = f"new flow: {why}"
    elif d == "reply" and f and f["source"]:
        why = (f"reply of a tracked fullnat flow (source {f['source']}): rewritten back to "
               "VIP -> client")
    elif d == "reply":
        why = "reply of a tracked flow: source rewritten back to the VIP"
    elif d == "drop":
        why = "dropped: " + ", ".join(k for k in t["counters"] if k.startswith("drop_"))
    elif d == "not_vip":
        why = "not VIP traffic nor a reply of a tracked flow: passes untouched"
    else:
        why = "passed to the kernel: " + ", ".join(t["counters"])
    if t["verdict"] == "drop" and d != "drop":  # a new flow whose next hop failed
        why += "; dropped: " + ", ".join(k for k in t["counters"] if k.startswith("drop_"))
    lines.append(f"why: {why}")
    for model in t["models"]:
        lines.append(f"model ({model['engine']}): {model['decision']} -> {model.get('out')}")
    lines.append("agree: yes" if t["agree"] else "agree: NO")
    return "\n".join(lines)
