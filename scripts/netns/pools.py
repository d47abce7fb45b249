"""Pools for the namespace lab and the bench namespace: the one place tests, benchmarks and the
demo get their pool.yaml from. A pool is a few :class:`Vip` (``WEB``, ``ECHO`` and ``DNS`` are
the common ones) over the lab's addresses, plus Maglev and flow-table settings:

    pool_yaml(WEB, ECHO, table_size=65537, flows={"max_entries": 100_000})
    pool_yaml(Vip("web", 80, (BE1, Backend(BE2, weight=0))), table_size=251)

``pool_yaml`` gives text, not a Config: tests write it to files and check FILE:LINE messages.
Its layout is fixed (block style, keys in pool.yaml's usual order, a key only when it is set),
so a test can find a line in it. ``pool_data`` gives the same pool as plain data, for
``Config.model_validate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, asdict, dataclass
from typing import Any

from lab import Lab

VIP = "10.200.0.10"  # in Lab.vip_net, which the client routes via the LB
BE1, BE2, BE3 = Lab(backends=3).backend_addrs  # a Lab object only plans: nothing is built


@dataclass(frozen=True)
class Backend:
    """One of a VIP's backends (``vips[].backends[]``)."""

    address: str
    port: int | None = None  # None: the VIP's port
    weight: int | None = None  # None: the config's default
    backup: bool | None = None  # True: new flows only while no primary is up


@dataclass(frozen=True)
class HealthCheck:
    """A VIP's ``health_check``; fields left None are not written."""

    type: str  # "http" or "tcp"
    path: str | None = None
    interval: str | None = None  # a duration as pool.yaml writes it: "500ms"
    timeout: str | None = None
    rise: int | None = None
    fall: int | None = None


@dataclass(frozen=True)
class Dns:
    """A VIP's ``backends_from.dns``; fields left None are not written."""

    name: str
    type: str  # "SRV" or "A"
    resolver: str | None = None
    port: int | None = None  # type A only
    refresh: str | None = None  # a duration as pool.yaml writes it: "2s"


@dataclass(frozen=True)
class Vip:
    """One entry of ``vips``."""

    name: str
    port: int
    backends: tuple[Backend | str, ...]  # an address alone: that backend on the VIP's port
    _: KW_ONLY
    protocol: str = "tcp"
    address: str = VIP
    health_check: HealthCheck | None = None
    forwarding: str | None = None  # None: the default (nat)
    encap: str | None = None  # dsr only
    source: str | None = None  # fullnat only
    source_ports: str | None = None  # fullnat only: "FIRST-LAST"
    table_size: int | None = None  # the VIP's own maglev.table_size (None: the pool's)
    backends_from: Dns | None = None  # instead of backends (give backends=())
    scheduler: str | None = None  # None: the default (maglev)


# What several pools share: the lab's backends serve HTTP on 80 and 8080, UDP echo on 5000 and
# 5001 (lab.HTTP_PORTS, lab.UDP_PORTS).
WEB = Vip("web", 80, (Backend(BE1, weight=3), Backend(BE2, port=8080)))
ECHO = Vip("echo", 5000, (BE1, Backend(BE2, port=5001)), protocol="udp")
DNS = Vip("dns", 53, (BE1, BE2), protocol="udp")


def bgp(asn: int, peers: Sequence[Mapping[str, Any]], **keys: Any) -> dict[str, Any]:
    """A ``bgp`` section: ``bgp(65001, [{"address": "10.20.0.254", "asn": 65000}],
    hold_time="3s")``."""
    return {"asn": asn, **keys, "peers": [dict(p) for p in peers]}


def pool_data(*vips: Vip, table_size: int | None = None, seed: int | None = None,
              flows: Mapping[str, int | str] | None = None,
              bgp: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The pool as plain data; ``maglev`` and ``flows`` keys left out stay at their defaults,
    ``bgp`` (see :func:`bgp`) is left out unless given."""
    data: dict[str, Any] = {"vips": [_vip(v) for v in vips]}
    if maglev := _set({"table_size": table_size, "seed": seed}):
        data["maglev"] = maglev
    if flows:
        data["flows"] = dict(flows)
    if bgp:
        data["bgp"] = dict(bgp)
    return data


def pool_yaml(*vips: Vip, table_size: int | None = None, seed: int | None = None,
              flows: Mapping[str, int | str] | None = None,
              bgp: Mapping[str, Any] | None = None) -> str:
    """The pool as pool.yaml text (see :func:`pool_data`)."""
    return "".join(_yaml(pool_data(*vips, table_size=table_size, seed=seed, flows=flows,
                                   bgp=bgp), 0))


def _set(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _vip(v: Vip) -> dict[str, Any]:
    d: dict[str, Any] = {"name": v.name, "address": v.address, "port": v.port,
                         "protocol": v.protocol}
    d |= _set({"forwarding": v.forwarding, "encap": v.encap, "source": v.source,
               "source_ports": v.source_ports, "scheduler": v.scheduler})
    if v.health_check is not None:
        d["health_check"] = _set(asdict(v.health_check))
    if v.table_size is not None:
        d["maglev"] = {"table_size": v.table_size}
    if v.backends_from is not None:
        d["backends_from"] = {"dns": _set(asdict(v.backends_from))}
    else:
        d["backends"] = [_set(asdict(Backend(b) if isinstance(b, str) else b))
                         for b in v.backends]
    return d


def _yaml(data: Mapping[str, Any], indent: int) -> Iterator[str]:
    """Block-style YAML lines of mappings, lists of mappings and plain scalars."""
    pad = " " * indent
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield f"{pad}{key}:\n"
            yield from _yaml(value, indent + 2)
        elif isinstance(value, list):
            yield f"{pad}{key}:{'' if value else ' []'}\n"
            for item in value:
                first, *rest = _yaml(item, indent + 4)
                yield f"{pad}  - {first.lstrip()}"
                yield from rest
        elif isinstance(value, bool):
            yield f"{pad}{key}: {str(value).lower()}\n"
        else:
            yield f"{pad}{key}: {value}\n"


# Backups (backup: true): BE1 serves while it is up, BE2 stands in when it is not; health
# checked fast, so that a stopped server is down within a second. Web on 80, streams on 7000.
FAST_HTTP = HealthCheck("http", path="/healthz", interval="500ms", timeout="400ms", rise=2,
                        fall=2)
FAST_TCP = HealthCheck("tcp", interval="500ms", timeout="400ms", rise=2, fall=2)
BACKUP_WEB = Vip("web", 80, (BE1, Backend(BE2, backup=True)), health_check=FAST_HTTP)
BACKUP_STREAM = Vip("stream", 7000, (BE1, Backend(BE2, backup=True)), health_check=FAST_TCP)

# Backends from DNS (tests/test_discovery.py): a resolver on an address of its own in the
# lab (scripts/netns/dnsserver.py). web: SRV (targets, ports, weights, priorities); stream:
# A records on the VIP's port, asked again every second; alt: A records on port 8080.
RESOLVER = "10.20.0.53"
DNS_WEB = Vip("web", 80, (), health_check=FAST_HTTP,
              backends_from=Dns("_http._tcp.web.lab.", "SRV", RESOLVER, refresh="30s"))
DNS_STREAM = Vip("stream", 7000, (),
                 backends_from=Dns("stream.web.lab.", "A", RESOLVER, refresh="1s"))
DNS_ALT = Vip("alt", 81, (),
              backends_from=Dns("alt.web.lab.", "A", RESOLVER, port=8080, refresh="1s"))

# Several balancer nodes (bgplab.py): DSR on the segment they share, fast checks, and BGP to
# the lab's router; the same pool on every node (the same seed above all).
FLEET_CHECK = HealthCheck("tcp", interval="500ms", timeout="300ms", rise=1, fall=2)
FLEET_WEB = Vip("web", 80, (BE1, BE2), forwarding="dsr", encap="l2", health_check=FLEET_CHECK)
FLEET_STREAM = Vip("stream", 7000, (BE1, BE2), forwarding="dsr", encap="l2",
                   health_check=FLEET_CHECK)  # the backends' TCP echo: long streams


def fleet_yaml(router: str, *vips: Vip, router_asn: int = 65000, asn: int = 65001,
               hold_time: str = "3s") -> str:
    """A node's pool.yaml in the BGP lab: ``vips`` (default web and stream) announced to
    ``router``."""
    return pool_yaml(*(vips or (FLEET_WEB, FLEET_STREAM)), table_size=251, seed=7,
                     flows={"max_entries": 16384},
                     bgp=bgp(asn, [{"address": router, "asn": router_asn}],
                             hold_time=hold_time))
