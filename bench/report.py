#!/usr/bin/env python3
"""Write docs/performance.md (from bench/performance.md.in) and docs/performance-pps.png from
the results in bench/out/*.json, and print the summary table.

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import string
import sys
from typing import Any

from common import BENCH, DOCS, load

PLOT = DOCS / "performance-pps.png"
PERPACKET_ROWS = (
    ("established", "xdplb, established flow (flow hit, DNAT, cached next hop, XDP_TX)"),
    ("established_no_cache", "xdplb, established flow, next-hop cache off (FIB every packet)"),
    ("new_flow", "xdplb, new flow: SYN, full flow table (hash, Maglev, 1 LRU insert)"),
    ("new_flow_empty", "xdplb, new flow: SYN, flow table with room"),
    ("reply", "xdplb, reply (reverse NAT, cached next hop, XDP_TX)"),
    ("non_vip", "xdplb, non-VIP pass-through"),
    ("baseline", "baseline: parse Ethernet/IPv4/TCP, XDP_TX"),
    ("null", "empty program (only returns XDP_TX): the test-run loop's share"),
    ("baseline_lookup", "baseline + one hash lookup, {key_bytes}-byte key (a flow key)"),
    ("baseline_insert_empty", "baseline + one LRU insert (miss, then insert), 1M table with room"),
    ("baseline_insert", "baseline + one LRU insert (miss, then insert), full 1M table"),
    ("baseline_update", "baseline + the LRU update alone, full 1M table"),
    ("baseline_fib", "baseline + one bpf_fib_lookup"),
    ("baseline_insert_fib", "baseline + one LRU insert, full 1M table, + one bpf_fib_lookup"),
    ("baseline_encap", "baseline + dsr/ipip's bpf_xdp_adjust_head and outer IPv4 header"),
)
# The forwarding modes' table: (mode label, established case, new-flow case)
MODE_ROWS = (
    ("nat", "established", "new_flow"),
    ("fullnat", "established_fullnat", "new_flow_fullnat"),
    ("dsr/l2", "established_dsr_l2", "new_flow_dsr_l2"),
    ("dsr/ipip", "established_dsr_ipip", "new_flow_dsr_ipip"),
)


def _n(v: Any, digits: int = 0) -> str:
    return "n/a" if not isinstance(v, int | float) else f"{v:,.{digits}f}"


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**missed**"


def machine(m: dict[str, Any]) -> str:
    return (f"| CPU | {m['cpu']} ({m['cpus']} vCPUs, hypervisor: {m['hypervisor']}) |\n"
            f"|---|---|\n| memory | {m['memory_gib']} GiB |\n| kernel | {m['kernel']} |\n"
            f"| OS | {m['os']} |\n| Python | {m['python']} |")


def perpacket(r: dict[str, Any]) -> str:
    out = ["| case | ns/packet | x baseline | target |", "|---|---:|---:|---|"]
    for key, label in PERPACKET_ROWS:
        c = r["cases"].get(key)
        if c is None:
            continue
        target = r["targets"].get(key)
        tcell = (f"<= {target}x: {_verdict(r['ratios'][key], target, False)}"
                 if target else "")
        label = label.format(key_bytes=r.get("key_bytes", 40))
        out.append(f"| {label} | {c['ns']:.0f} | {r['ratios'][key]:.1f} | {tcell} |")
    cross = [(k, k.removesuffix("_direct")) for k in r["cases"] if k.endswith("_direct")]
    checks = ", ".join(f"{b} {r['cases'][b]['ns']:.0f} vs {r['cases'][d]['ns']:.0f}"
                       for d, b in cross)
    naive = r["naive_established"]
    out += ["", f"{r['frame_bytes']}-byte frames, median of {r['runs']} measurements of "
            f"{r['repeat']:,} runs each; the harness's own {r['harness_extra_ns']:.0f} ns are "
            f"taken out; \"x baseline\" is the median of the ratios within each round of "
            f"the interleaved runs. Cross-check, harness vs direct run (ns) for programs that "
            f"leave the frame alone: {checks}. Timed without the harness, xdplb on an "
            f"established flow reports {naive['ns']:.0f} ns, but its counters show why: "
            f"{', '.join(f'{k} {v:,}' for k, v in naive['counters'].items())}."]
    return "\n".join(out)


def perpacket_modes(r: dict[str, Any]) -> str:
    """Established and new flow per forwarding mode, against the baseline and nat's rows."""
    cases, ratios, vs_nat = r["cases"], r["ratios"], r.get("mode_ratios", {})
    if "established_fullnat" not in cases:
        return "Not measured in this run (bench/perpacket.py before the forwarding modes)."

    def cells(key: str) -> str:
        nat = "1.0" if key in ("established", "new_flow") else _n(vs_nat.get(key), 2)
        return f"{cases[key]['ns']:.0f} | {ratios[key]:.1f} | {nat}"

    out = ["| mode | established ns/packet | x baseline | x nat | new flow ns/packet "
           "| x baseline | x nat |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, est, new in MODE_ROWS:
        out.append(f"| {label} | {cells(est)} | {cells(new)} |")
    rp = cases["reply_fullnat"]
    inc = r.get("incidental_per_run", {}).get("new_flow_fullnat", {})
    empty = ", ".join(f"{label} {cases[f'{new}_empty']['ns']:.0f}" for label, _, new in MODE_ROWS
                      if f"{new}_empty" in cases)
    out += ["", f"Same run and rounds as the table above; \"x nat\" is the median of the ratios "
            f"to nat's row within each round. fullnat's reply (backend -> the balancer's "
            f"port, found through fnat_ports): {rp['ns']:.0f} ns, "
            f"{vs_nat.get('reply_fullnat', 0):.2f}x nat's reply. New flows with room in the "
            f"flow table (first pass): {empty} ns. fullnat's new flows ran "
            f"{r['repeats']['new_flow_fullnat']:,} times per measurement (source ports "
            f"{r['fnat_ports']}); at most {inc.get('fnat_port_taken', 0):.1%} of them found the "
            f"hash's port held by a live flow and {inc.get('drop_source_ports', 0):.2%} found "
            f"no port in the two tries (dropped, drop_source_ports)."]
    return "\n".join(out)


SCHEDULER_NAMES = ("source-hash", "wrr", "rr", "random", "least-conn")


def perpacket_schedulers(r: dict[str, Any]) -> str:
    """A new flow's cost per scheduler, next to maglev's (nat, same run and rounds)."""
    cases, vs = r["cases"], r.get("mode_ratios", {})
    keys = [(s, f"new_flow_{s.replace('-', '_')}") for s in SCHEDULER_NAMES]
    if not all(k in cases for _, k in keys):
        return "Not measured in this run (bench/perpacket.py before the schedulers)."
    out = ["| scheduler (nat VIP, 2 backends) | new flow ns/packet | x maglev |",
           "|---|---:|---:|", f"| maglev (default) | {cases['new_flow']['ns']:.0f} | 1.0 |"]
    out += [f"| {s} | {cases[k]['ns']:.0f} | {_n(vs.get(k), 2)} |" for s, k in keys]
    out += ["", "\"x maglev\" is the median of the ratios within each round. wrr and rr add "
            "one atomic add on the VIP's shared counter, least-conn a loop over the VIP's "
            "serving backends (three lookups each) and atomic counts at each open and close."]
    return "\n".join(out)


E2E_HEAD = ("| peer | UDP packets/s out of the LB | xdplb native / peer | CPU ns per packet "
            "| UDP packets/s at the backends | xdplb native / peer | TCP Gbit/s "
            "| TCP download Gbit/s | new TCP conn/s | CPU µs per conn |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _udp_cell(u: dict[str, Any]) -> str:
    if "pps" in u:
        return _n(u["pps"])
    return "no UDP" if "unsupported" in u else f"failed: {u.get('error', '?')[:60]}"


def _tcp_cell(t: dict[str, Any]) -> str:
    if "gbit_per_s" in t:
        return _n(t["gbit_per_s"], 2)
    if "unsupported" in t:
        return "n/a"
    return f"failed: {t['error'][:60]}" if "error" in t else "-"


def e2e_directions(r: dict[str, Any]) -> str:
    """Per xdplb peer, the TCP download: what the LB handled in each direction."""
    out = ["| peer | download Gbit/s | LB: client -> VIP packets | LB: replies "
           "| router: to the client via the LB | router: from the backends directly "
           "| LB CPU (cores) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p in r["peers"]:
        d = p.get("tcp_down", {})
        pr = d.get("probe")
        if pr is None:
            continue
        out.append(f"| {p['label']} | {_n(d.get('gbit_per_s'), 2)} | {_n(pr.get('lb_inbound'))} "
                   f"| {_n(pr.get('lb_replies'))} | {_n(pr.get('router_via_lb'))} "
                   f"| {_n(pr.get('router_from_backends'))} "
                   f"| {_n(d.get('lb_cpu_cores'), 2)} |")
    if len(out) == 2:
        return "Not measured in this run."
    out += ["", "Packets over the whole download (iperf3 -R, one stream), from `xdplb stats "
            "--json` before and after (client -> VIP: `flow_hit` + `new_flow`; replies: "
            "`reply`) and, in the routed lab, the router's nftables counters of what it "
            "forwarded to the client by the sender's MAC (`Lab.router_counts()`; n/a in the "
            "two-armed lab, which has no router). LB CPU: the machine's softirq time plus "
            "the LB namespace's processes, in cores, during the download."]
    return "\n".join(out)


def e2e(r: dict[str, Any]) -> str:
    out = [E2E_HEAD]
    for p in r["peers"]:
        if "unavailable" in p or "error" in p:
            out.append(f"| {p['label']} | {p.get('unavailable') or p.get('error')} "
                       f"| | | | | | | | |")
            continue
        u, ub, t, c = p["udp"], p.get("udp_backends", {}), p["tcp"], p["conn"]
        d = p.get("tcp_down", {})
        ratios = r["ratios"].get(p["name"], {})
        rel = {k: "1.0" if p["name"] == "xdplb-native" else _n(ratios.get(k), 2)
               for k in ("udp", "udp_backends")}
        out.append(f"| {p['label']} | {_udp_cell(u)} | {rel['udp']} "
                   f"| {_n(u.get('lb_ns_per_packet'))} | {_udp_cell(ub)} | {rel['udp_backends']} "
                   f"| {_tcp_cell(t)} | {_tcp_cell(d)} | {_n(c.get('conn_per_s'))} "
                   f"| {_n(c.get('lb_us_per_conn'), 1)} |")
    g = r["generator"]
    out += ["", f"{r['seconds']} s per measurement, {r['frame_bytes']}-byte UDP frames over "
            f"{r['udp_flows']:,} flows. The generator alone reaches "
            f"{_n(g.get('offered_pps'))} packets/s into an XDP_DROP on the LB. CPU per "
            f"packet / per connection: kernel softirq time of the whole machine plus the "
            f"CPU of the processes in the LB's namespace, per packet counted out of the LB."]
    return "\n".join(out)


def targets(pp: dict[str, Any], ee: dict[str, Any], cp: dict[str, Any]) -> str:
    lines = []
    for key, target in pp["targets"].items():
        lines.append(f"- per packet, {key.replace('_', '-')}: {pp['ratios'][key]:.1f}x the "
                     f"baseline, target <= {target}x: {_verdict(pp['ratios'][key], target, False)}")
    pairs = [(k, ref, t, pp["pair_ratios"]) for k, (ref, t) in pp.get("pair_targets", {}).items()]
    pairs += [(k, ref, t, pp["hop_pair_ratios"])
              for k, (ref, t) in pp.get("hop_pair_targets", {}).items()]
    for key, ref, target, ratios in pairs:
        if target is not None:
            got = ratios[key]
            lines.append(f"- per packet, {key.replace('_', '-')} vs {ref.replace('_', '-')}: "
                         f"{got:.2f}x, target <= {target}x: {_verdict(got, target, False)}")
    for key, (ref, extra) in pp.get("extra_targets", {}).items():
        more = pp["cases"][key]["ns"] - pp["cases"][ref]["ns"]
        lines.append(f"- per packet, {key.replace('_', '-')}: {more:+.1f} ns over the "
                     f"{ref.replace('_', '-')}, target <= +{extra:g} ns: "
                     f"{_verdict(more, extra, False)}")
    for name, r in ee["ratios"].items():
        if "udp_target" in r:
            v = r["udp"]
            lines.append(f"- UDP packets/s, xdplb native vs {name}: "
                         f"{'n/a' if v is None else f'{v:.2f}x'}, target >= {r['udp_target']}x: "
                         f"{_verdict(v, r['udp_target'], True) if v else 'not measurable'}")
    ms = cp["maglev"]["1000"]["median_ms"]
    lines.append(f"- Maglev build, 1000 backends: {ms:.1f} ms, target <= "
                 f"{cp['maglev_target_ms']:.0f} ms: {_verdict(ms, cp['maglev_target_ms'], False)}")
    return "\n".join(lines)


def controlplane(r: dict[str, Any]) -> str:
    out = ["| measurement | result |", "|---|---:|"]
    for n, m in r["maglev"].items():
        out.append(f"| Maglev table build, M = {r['table_size']}, {n} backends "
                   f"| {m['median_ms']:.1f} ms |")
    c = r["config_change"]
    out.append(f"| config change -> maps updated ({c['backends']} backends, one removed or "
               f"added; {c['slots_written_median']:.0f} slots rewritten) "
               f"| {c['median_ms']:.1f} ms |")
    a = r["agent"]
    out.append(f"| agent resident memory, attached, {a['backends']} backends "
               f"| {a['rss_mib']:.0f} MiB (peak {a['peak_rss_mib']:.0f}) |")
    return "\n".join(out)


def footprint(r: dict[str, Any] | None) -> str:
    """The footprint table, or why there is none (bench/footprint.py runs apart from the rest)."""
    if r is None:
        return "Not measured in this run: `sudo .venv/bin/python bench/footprint.py` adds it."
    b, s, a, t = r["baseline"], r["status"], r["agent"], r["targets"]
    status_ok = (_verdict(s["rss_mib"], t["status_rss_mib"], False) == "met"
                 and _verdict(s["wall_s"], t["status_wall_s"], False) == "met")
    out = ["| process | wall time | x baseline | peak RSS | x baseline | target |",
           "|---|---:|---:|---:|---:|---|",
           f"| baseline: `python -c pass`, the same interpreter | {b['wall_s'] * 1e3:.0f} ms "
           f"| 1.0 | {b['rss_mib']:.1f} MiB | 1.0 | |",
           f"| `xdplb status` on an attached lab | {s['wall_s'] * 1e3:.0f} ms "
           f"| {s['wall_x_baseline']:.1f} | {s['rss_mib']:.1f} MiB | {s['rss_x_baseline']:.1f} "
           f"| <= {t['status_rss_mib']:.0f} MiB and <= {t['status_wall_s']} s: "
           f"{'met' if status_ok else '**missed**'} |",
           f"| agent, attached (VmRSS; peak {a['peak_rss_mib']:.0f} MiB) | | "
           f"| {a['rss_mib']:.1f} MiB | {a['rss_x_baseline']:.1f} "
           f"| <= {t['agent_rss_mib']:.0f} MiB: "
           f"{_verdict(a['rss_mib'], t['agent_rss_mib'], False)} |",
           "", f"Wall time is the median and RSS the maximum of {r['runs']} runs of each "
           f"command, the two interleaved. `status` loaded {s['modules']} modules "
           f"({s['xdplb_modules']} of xdplb's; the bare interpreter {b['modules']}), of the "
           f"heavy ones ({', '.join(s['heavy_checked'])}): "
           f"{', '.join(s['heavy_modules']) or 'none'}."]
    return "\n".join(out)


def footprint_targets(r: dict[str, Any] | None) -> list[str]:
    if r is None:
        return ["- footprint (`xdplb status`, agent memory): not measured"]
    s, a, t = r["status"], r["agent"], r["targets"]
    return [f"- `xdplb status`: {s['rss_mib']:.1f} MiB, target <= {t['status_rss_mib']:.0f} MiB: "
            f"{_verdict(s['rss_mib'], t['status_rss_mib'], False)}; {s['wall_s']:.2f} s, "
            f"target <= {t['status_wall_s']} s: {_verdict(s['wall_s'], t['status_wall_s'], False)}",
            f"- agent after attach: {a['rss_mib']:.0f} MiB, target <= {t['agent_rss_mib']:.0f} "
            f"MiB: {_verdict(a['rss_mib'], t['agent_rss_mib'], False)}"]


def scale(r: dict[str, Any] | None) -> str:
    """The scale table (bench/scale.py): 1,024 VIPs' ring memory, a scrape at 1M flows."""
    if r is None:
        return "Not measured in this run: `sudo .venv/bin/python bench/scale.py` adds it."
    out = ["| measurement | result |", "|---|---:|"]
    for key in ("vips_default", "vips_small"):
        v = r[key]
        out.append(f"| {v['vips']} VIPs of 4 backends, table size {v['table_size']}: kernel "
                   f"memory of their {v['rings']} rings (fdinfo memlock) "
                   f"| {v['ring_bytes'] / 2**20:.1f} MiB ({v['bytes_per_slot']:.2f} B/slot) |")
        out.append(f"| ... loaded by MapSync (every ring created and filled) "
                   f"| {v['apply_s']:.2f} s |")
    s = r["scrape"]
    out += [f"| metrics scrape at {s['flows']:,} flows (median of {s['runs']}) "
            f"| {s['scrape_s'] * 1e3:.1f} ms |",
            f"| the same families computed from the whole flow table (the scrape before) "
            f"| {s['whole_table_s'] * 1e3:.0f} ms |",
            f"| one flow sweep by the agent (every 30 s) | {s['sweep_s']:.2f} s |"]
    return "\n".join(out)


def scale_targets(r: dict[str, Any] | None) -> list[str]:
    if r is None:
        return ["- scrape at 1M flows, 1,024 VIPs: not measured"]
    s = r["scrape"]
    return [f"- metrics scrape at {s['flows']:,} flows: {s['scrape_s'] * 1e3:.1f} ms, target "
            f"<= {s['target_s'] * 1e3:.0f} ms: {_verdict(s['scrape_s'], s['target_s'], False)}",
            f"- 1,024 VIPs loaded: {r['vips_default']['ring_bytes'] / 2**20:.0f} MiB of rings "
            f"at the default table size, {r['vips_small']['ring_bytes'] / 2**20:.1f} MiB at "
            f"{r['vips_small']['table_size']} slots (reported; memory follows the config)"]


CONVERGENCE_EVENTS = {
    "graceful": "SIGTERM of a node's agent (withdraw, then detach): its next hop gone",
    "killed": "`kill -9` of a node's agent (the speaker dies with it): its next hop gone",
    "silent": "a node's BGP packets dropped at the router (only the hold timer tells): gone",
    "back": "the agent started again: its next hop back (attach, check passed, announced)",
}


def convergence(r: dict[str, Any] | None) -> str:
    """The fleet's route convergence (bench/convergence.py)."""
    if r is None:
        return "Not measured in this run: `sudo .venv/bin/python bench/convergence.py` adds it."
    out = ["| event (at the router's kernel route to the VIP) | median | max | runs |",
           "|---|---:|---:|---:|"]
    for key, label in CONVERGENCE_EVENTS.items():
        e = r["events"][key]
        out.append(f"| {label} | {e['median_s'] * 1e3:.0f} ms | {e['max_s'] * 1e3:.0f} ms "
                   f"| {e['runs']} |")
    out.append(f"\nHold time {r['hold_time_s']} s, keepalive {r['keepalive_s']} s; the route "
               f"is polled every {r['poll_s'] * 1e3:.0f} ms (`ip -j route`), which bounds the "
               "resolution.")
    return "\n".join(out)


def plot(r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(p["label"], p["udp"]["pps"], p.get("udp_backends", {}).get("pps", 0.0))
            for p in r["peers"] if "pps" in p.get("udp", {})]
    fig, ax = plt.subplots(figsize=(8, 0.9 * len(rows) + 1.8))
    labels, out, delivered = zip(*reversed(rows), strict=True)
    y = range(len(labels))
    for vals, dy, color, name in ((out, 0.2, "#3b78b0", "out of the LB"),
                                  (delivered, -0.2, "#9cc3e4", "at the backends")):
        bars = ax.barh([i + dy for i in y], [v / 1e6 for v in vals], height=0.38,
                       color=color, label=name)
        ax.bar_label(bars, [f"{v / 1e6:.2f}" for v in vals], padding=3)
    ax.set_yticks(list(y), labels)
    ax.legend(loc="lower right")
    ax.set_xlabel("UDP packets/s (millions), 64-byte frames")
    ax.set_title("xdplb and alternatives, same lab and traffic (2-vCPU VM)")
    ax.set_xlim(0, max(out + delivered) / 1e6 * 1.25)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def main() -> int:
    pp, ee, cp = load("perpacket"), load("e2e"), load("controlplane")
    missing = [n for n, r in (("perpacket", pp), ("e2e", ee), ("controlplane", cp)) if r is None]
    if missing:
        print(f"report: no results for {', '.join(missing)}: run bench/<name>.py first",
              file=sys.stderr)
        return 1
    fp = load("footprint")  # optional: the page says when it was not measured
    sc = load("scale")
    cv = load("convergence")
    plot(ee)
    parts = {"machine": machine(ee["machine"]), "perpacket": perpacket(pp),
             "perpacket_modes": perpacket_modes(pp),
             "perpacket_schedulers": perpacket_schedulers(pp), "e2e": e2e(ee),
             "e2e_directions": e2e_directions(ee),
             "controlplane": controlplane(cp), "footprint": footprint(fp),
             "scale": scale(sc), "convergence": convergence(cv),
             "targets": "\n".join([targets(pp, ee, cp), *footprint_targets(fp),
                                   *scale_targets(sc)]),
             "date": ee["finished"], "plot": PLOT.name}
    template = string.Template((BENCH / "performance.md.in").read_text())
    (DOCS / "performance.md").write_text(template.substitute(parts))
    print(parts["targets"])
    print(f"wrote docs/performance.md and docs/{PLOT.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
