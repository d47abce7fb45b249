"""Prometheus metrics of a balancer instance, read from its pinned maps at each scrape.

A scrape costs O(VIPs + backends), never O(flows): it reads the per-CPU counters (open flows
are counted per connection by the data path), the VIP names and Maglev shares the agent
published, and the agent's last flow sweep (``flowsweep``) for the counts only the flow
table knows (tracked and active flows, the table's fill). The agent serves them when
started with ``--metrics-addr HOST:PORT``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xdplb.abi.layout import OUTCOMES
from xdplb.agent import flowsweep
from xdplb.inspect import backends, stats, status
from xdplb.inspect.reader import Reader
from xdplb.instance import pins

OUTCOME_NAMES = frozenset(c.name.lower() for c in OUTCOMES)
HEALTH_STATES = ("up", "down", "unknown")


def parse_addr(spec: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all addresses) -> (host, port)."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics-addr wants HOST:PORT (e.g. 127.0.0.1:9477), not {spec!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--metrics-addr: {host!r} is not an IP address") from None
    return host or "0.0.0.0", int(port)


def _vip_label(row: dict[str, Any]) -> str:
    return row["vip"] or f"{row['vip_address']}:{row['vip_port']}"


def _open_families(kind: str, labels: list[str]) -> dict[str, Metric]:
    """The data path's per-connection flow counts of a VIP or backend."""
    return {
        "open_flows": GaugeMetricFamily(f"xdplb_{kind}_open_flows", "Flows confirmed and not "
                                        "ended (counted per connection)", labels=labels),
        "opened_flows": CounterMetricFamily(f"xdplb_{kind}_opened_flows", "Flows confirmed "
                                            "by their next packet", labels=labels),
        "closed_flows": CounterMetricFamily(f"xdplb_{kind}_closed_flows", "Confirmed flows "
                                            "seen to end (FIN, RST, replaced)", labels=labels),
    }


def families(st: dict[str, Any], backends: list[dict[str, Any]]) -> list[Metric]:
    """Metric families from one ``stats.collect`` and one ``backends.collect``."""
    vl = ["vip", "address", "port", "protocol"]
    vip_fams = {
        "packets": CounterMetricFamily("xdplb_vip_packets", "Packets balanced to the VIP",
                                       labels=vl),
        "bytes": CounterMetricFamily("xdplb_vip_bytes", "Bytes balanced to the VIP", labels=vl),
        "new_flows": CounterMetricFamily("xdplb_vip_new_flows", "Flows created", labels=vl),
        "flows": GaugeMetricFamily("xdplb_vip_flows", "Tracked flows (as of the last flow "
                                   "sweep)", labels=vl),
        "active_flows": GaugeMetricFamily("xdplb_vip_active_flows",
                                          "Tracked flows not closed and recently seen (as of "
                                          "the last flow sweep)", labels=vl),
        **_open_families("vip", vl),
    }
    # The mode as an info metric (join on the VIP's labels), so that the counters' series
    # stay as they were and a VIP's change of mode does not start new ones.
    info = GaugeMetricFamily("xdplb_vip_info", "The VIP's forwarding mode (1); encap is "
                             "empty but for dsr", labels=[*vl, "forwarding", "encap"])
    for row in st["vips"]:
        labels = [_vip_label(row), row["vip_address"], str(row["vip_port"]), row["protocol"]]
        for k, fam in vip_fams.items():
            fam.add_metric(labels, row[k])
        info.add_metric([*labels, row["forwarding"] or "", row["encap"] or ""], 1)

    bl = ["vip", "backend"]
    be_fams = {
        "packets": CounterMetricFamily("xdplb_backend_packets", "Packets sent to the backend",
                                       labels=bl),
        "bytes": CounterMetricFamily("xdplb_backend_bytes", "Bytes sent to the backend",
                                     labels=bl),
        "new_flows": CounterMetricFamily("xdplb_backend_new_flows", "Flows created",
                                         labels=bl),
        "flows": GaugeMetricFamily("xdplb_backend_flows", "Tracked flows (as of the last "
                                   "flow sweep)", labels=bl),
        "active_flows": GaugeMetricFamily("xdplb_backend_active_flows",
                                          "Tracked flows not closed and recently seen (as of "
                                          "the last flow sweep)", labels=bl),
        **_open_families("backend", bl),
    }
    for row in st["backends"]:
        labels = [_vip_label(row), f"{row['address']}:{row['port']}"]
        for k, fam in be_fams.items():
            fam.add_metric(labels, row[k])

    up = GaugeMetricFamily("xdplb_backend_up", "1 when the data path gives the backend flows "
                           "(not marked down)", labels=bl)
    health = GaugeMetricFamily("xdplb_backend_health", "Health check state (1 for the "
                               "current one)", labels=[*bl, "state"])
    weight = GaugeMetricFamily("xdplb_backend_weight", "Configured weight", labels=bl)
    share = GaugeMetricFamily("xdplb_backend_maglev_share_ratio",
                              "Share of the VIP's Maglev table", labels=bl)
    backup = GaugeMetricFamily("xdplb_backend_backup", "1 for a backup (backup: true, or a "
                               "higher SRV priority): new flows only while no primary is up",
                               labels=bl)
    for row in backends:
        labels = [_vip_label(row), f"{row['address']}:{row['port']}"]
        up.add_metric(labels, 0 if row["down"] else 1)
        for s in HEALTH_STATES:
            health.add_metric([*labels, s], 1 if row["health"]["state"] == s else 0)
        weight.add_metric(labels, row["weight"])
        share.add_metric(labels, row["maglev_share"] / 100)
        backup.add_metric(labels, 1 if row.get("backup") else 0)
    serving = GaugeMetricFamily("xdplb_vip_serving_backups", "1 while no primary backend is "
                                "up and the backups take the VIP's new flows", labels=["vip"])
    for name, role in sorted({_vip_label(r): r.get("serving") for r in backends}.items()):
        serving.add_metric([name], 1 if role == "backup" else 0)
    dns_failures = CounterMetricFamily("xdplb_dns_failures", "DNS queries of backends_from "
                                       "that got no answer (the last set was kept)",
                                       labels=["vip"])
    dns_backends = GaugeMetricFamily("xdplb_dns_backends", "Backends the last DNS answer "
                                     "gave", labels=["vip"])
    for d in st.get("discovery", ()):
        dns_failures.add_metric([d["vip"]], d["dns_failures"])
        dns_backends.add_metric([d["vip"]], d["backends"])

    packets = CounterMetricFamily("xdplb_packets", "Packets by outcome (pass, drop reason, "
                                  "tx, redirect)", labels=["outcome"])
    events = CounterMetricFamily("xdplb_events", "Data path events", labels=["event"])
    for name, v in st["counters"].items():
        (packets if name in OUTCOME_NAMES else events).add_metric([name], v)

    ft = st["flow_table"]
    table = [
        GaugeMetricFamily("xdplb_flow_table_entries", "Entries in the flow table",
                          value=ft["entries"]),
        GaugeMetricFamily("xdplb_flow_table_capacity", "Size of the flow table",
                          value=ft["capacity"]),
        GaugeMetricFamily("xdplb_flow_table_fill_ratio", "Entries / size", value=ft["fill"]),
    ]
    if ft.get("swept_at") is not None:
        table.append(GaugeMetricFamily("xdplb_flow_sweep_timestamp_seconds", "When the flow "
                                       "table was last read (the sweep's counts)",
                                       value=ft["swept_at"]))
    return [info, *vip_fams.values(), *be_fams.values(), up, health, weight, share, backup,
            serving, dns_failures, dns_backends, packets, events, *table]


def bgp_families(b: dict[str, Any] | None) -> list[Metric]:
    """The BGP sessions and announcements (``status.bgp_state``); none without BGP."""
    if not b:
        return []
    peer = GaugeMetricFamily("xdplb_bgp_peer_established", "1 while the BGP session with the "
                             "peer is established (as the speaker reports it)",
                             labels=["peer", "asn"])
    state = GaugeMetricFamily("xdplb_bgp_peer_state", "The BGP session's state (1 for the "
                              "current one)", labels=["peer", "state"])
    for p in b["peers"]:
        peer.add_metric([p["address"], str(p["asn"])], 1 if p["state"] == "established" else 0)
        state.add_metric([p["address"], p["state"]], 1)
    ann = GaugeMetricFamily("xdplb_bgp_announced", "1 while the prefix is announced, 0 while "
                            "withdrawn", labels=["prefix"])
    for a in b["announcements"]:
        ann.add_metric([a["prefix"]], 1 if a["state"] == "announced" else 0)
    return [peer, state, ann]


class PinnedCollector(Collector):
    """Reads an instance's pins on every scrape."""

    def __init__(self, group: pins.PinGroup) -> None:
        self.group = group

    def describe(self) -> list[Metric]:
        return []  # no reading at registration time

    def collect(self) -> Iterator[Metric]:
        sweep = flowsweep.read(self.group) or {}  # before the agent's first sweep: zeroes
        with Reader(self.group) as r:
            st, bes = stats.collect(r, sweep), backends.collect(r, sweep)
        yield from families(st, bes)
        yield from bgp_families(status.bgp_state(self.group))


class MetricsServer:
    """The HTTP endpoint (a daemon thread); ``close()`` stops it."""

    def __init__(self, addr: str, group: pins.PinGroup) -> None:
        host, port = parse_addr(addr)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PinnedCollector(group))
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics on {addr}: {e.strerror or e}") from e
        self.address = self.server.server_address[:2]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(addr: str, group: pins.PinGroup) -> MetricsServer:
    """Serve ``/metrics`` for ``group`` on ``addr`` (OSError when it cannot bind)."""
    return MetricsServer(addr, group)

