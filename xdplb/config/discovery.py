"""``backends_from``: a VIP's backends found in DNS instead of listed, and what the agent's
answers become.

The schema part (``BackendsFrom``, ``DnsDiscovery``) validates the keys; ``to_backends``
turns a DNS answer (``Record``s, from ``xdplb/agent/discovery.py``) into backends, and
``effective_config`` puts the discovered backends into the config, so that everything after
it (desired state, health checks, readers) sees an ordinary list of backends.

SRV: the records of the lowest priority value are the primaries, all higher ones the
backups (``backup: true``). A weight of 0 ("rarely chosen", RFC 2782) becomes the smallest
weight: the other weights of its priority are scaled up (by up to ``ZERO_WEIGHT_SCALE``) and it
gets 1. A records: every address a backend, weight 1, on ``port`` or the VIP's port.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, StrictStr, ValidationError, model_validator

from xdplb.config.errors import describe, fail
from xdplb.config.schema import (
    Backend,
    Config,
    Duration,
    Port,
    Vip,
    VipFacts,
    _Model,
    backend_address_problems,
    capacity_problems,
    reverse_nat_problems,
    table_fit_problems,
)

RecordType = Literal["SRV", "A"]
REFRESH_MIN = 1.0  # seconds: re-querying faster than this only loads the resolver
DEFAULT_REFRESH = 30.0
ZERO_WEIGHT_SCALE = 100  # an SRV weight 0 gets ~1/100 of a weight-1 sibling's share
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _check_dns_name(value: str) -> str:
    if len(value.rstrip(".")) > 253 or not _NAME_RE.fullmatch(value):
        fail(f"{value!r} is not a DNS name (labels of letters, digits, '-' and '_', "
             "separated by dots)")
    return value if value.endswith(".") else value + "."  # always absolute: no search list


def _parse_resolver(value: Any) -> IPv4Address | IPv6Address:
    # Loopback is fine here (a local caching resolver), unlike for VIPs and backends.
    with contextlib.suppress(ValueError, TypeError):
        addr = ipaddress.ip_address(value) if isinstance(value, str) else None
        if addr is not None and not (addr.is_multicast or addr.is_unspecified):
            return addr
    fail(f"{describe(value) if not isinstance(value, str) else repr(value)} is not a unicast "
         "IP address (the resolver is named by address)")


def _check_refresh(value: float) -> float:
    if value < REFRESH_MIN:
        fail(f"refresh must be at least {REFRESH_MIN:g}s")
    return value


class DnsDiscovery(_Model):
    """``backends_from.dns``: which name to ask for, of which type, from which resolver."""

    name: Annotated[StrictStr, AfterValidator(_check_dns_name)]
    type: RecordType
    # None: the host's resolvers (/etc/resolv.conf)
    resolver: Annotated[IPv4Address | IPv6Address, BeforeValidator(_parse_resolver)] | None = None
    port: Port | None = None  # type A only; None: the VIP's port
    refresh: Annotated[Duration, AfterValidator(_check_refresh)] = DEFAULT_REFRESH

    @model_validator(mode="after")
    def _check_port(self) -> DnsDiscovery:
        if self.type == "SRV" and self.port is not None:
            fail((("port",), "port is only used with type: A (SRV records carry their port)",
                  None))
        return self

    def describe(self) -> str:
        """``_http._tcp.web.lab. SRV from 10.0.0.53`` for logs and errors."""
        return f"{self.name} {self.type} from {self.resolver or 'the system resolver'}"


class BackendsFrom(_Model):
    """``vips[].backends_from``: where the backends are found instead of ``backends``."""

    dns: DnsDiscovery


def check_one_source(data: Any) -> Any:
    """A VIP lists its backends or says where to find them: exactly one of the two."""
    if not isinstance(data, dict):
        return data
    if "backends" in data and "backends_from" in data:
        fail((("backends_from",), "backends_from replaces backends: give one of them, not both",
              None))
    if "backends" not in data and "backends_from" not in data:
        fail((("backends",), "missing required key 'backends' (or 'backends_from', to find "
              "them in DNS)", None))
    dns = data.get("backends_from", {}).get("dns") \
        if isinstance(data.get("backends_from"), dict) else None
    port = dns.get("port") if isinstance(dns, dict) else None
    if data.get("forwarding") == "dsr" and isinstance(port, int) and port != data.get("port"):
        fail((("backends_from", "dns", "port"), f"port {port} differs from the VIP's port "
              f"{data.get('port')}: dsr cannot rewrite ports (the backend answers the client "
              "directly)", None))
    return data


# --- answers -> backends -------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Record:
    """One endpoint of an answer: an SRV target's address (priority, weight and port from
    its SRV record), or an A record's address (priority 0, weight 1)."""

    priority: int
    address: str
    port: int
    weight: int = 1


def _weights(srv_weights: list[int]) -> list[int]:
    """One priority's SRV weights as backend weights: 0 is the smallest, never a drain."""
    if not any(srv_weights):
        return [1] * len(srv_weights)  # all 0: an equal chance for each (RFC 2782)
    if all(srv_weights):
        return srv_weights
    scale = max(1, min(ZERO_WEIGHT_SCALE, 65535 // max(srv_weights)))
    return [w * scale if w else 1 for w in srv_weights]


def to_backends(records: Iterable[Record], vip: Vip) -> tuple[tuple[Backend, ...], list[str]]:
    """The backends of ``vip`` for an answer, and why records were left out. The lowest
    priority is primary, the others backup; an endpoint listed twice counts once (its
    lowest priority)."""
    ordered = sorted(set(records))
    if not ordered:
        return (), []
    first = ordered[0].priority
    seen: set[tuple[str, int]] = set()
    kept: list[Record] = []
    skipped: list[str] = []
    for r in ordered:
        if (r.address, r.port) in seen:
            continue
        seen.add((r.address, r.port))
        if vip.forwarding == "dsr" and r.port != vip.port:
            skipped.append(f"{r.address}:{r.port}: dsr cannot rewrite ports (VIP port "
                           f"{vip.port})")
            continue
        kept.append(r)
    out: list[Backend] = []
    for priority in sorted({r.priority for r in kept}):
        group = [r for r in kept if r.priority == priority]
        for r, weight in zip(group, _weights([r.weight for r in group]), strict=True):
            try:
                out.append(Backend(address=r.address, port=r.port, weight=weight,
                                   backup=priority != first))
            except ValidationError as e:
                skipped.append(f"{r.address}:{r.port}: {e.errors()[0]['msg']}")
    return tuple(out), skipped


class DiscoveryError(ValueError):
    """Discovered backends the data path cannot take (capacity, reverse NAT)."""


def effective_config(
    cfg: Config,
    found: Mapping[str, tuple[Backend, ...]],
    local: frozenset[IPv4Address] = frozenset(),
) -> tuple[Config, list[str]]:
    """``cfg`` with each ``backends_from`` VIP's backends set to ``found[vip name]`` (none
    yet: empty), and what was left out: backends at a VIP's address or one of the
    balancer's (``local``), as the config would refuse them. Raises DiscoveryError when the
    whole set does not fit the data path (the caller keeps the last one)."""
    vips = [v.model_copy(update={"backends": found.get(v.name, ())})
            if v.backends_from is not None else v for v in cfg.vips]
    dropped: list[str] = []
    bad: set[tuple[int, int]] = set()
    for loc, msg, _ in backend_address_problems([VipFacts.of(i, v) for i, v in enumerate(vips)],
                                                local):
        i, j = int(loc[0]), int(loc[2])
        if cfg.vips[i].backends_from is None:
            continue  # the file's own backends were checked with the file
        bad.add((i, j))
        dropped.append(f"{vips[i].name}: {msg.replace('{where}', 'a VIP')}")
    if bad:
        vips = [v.model_copy(update={"backends": tuple(
            b for j, b in enumerate(v.backends) if (i, j) not in bad)})
            if v.backends_from is not None else v for i, v in enumerate(vips)]
    out = cfg.model_copy(update={"vips": tuple(vips)})
    facts = [VipFacts.of(i, v) for i, v in enumerate(out.vips)]
    problems = [*capacity_problems(list(out.vips)), *table_fit_problems(out.maglev, facts),
                *reverse_nat_problems(out.vips)]
    if problems:
        raise DiscoveryError("; ".join(msg for _, msg, _ in problems))
    return out, dropped


# Vip names BackendsFrom, which builds on schema.py: resolved now that both exist (the package
# imports this module with the loader, so no Vip is validated before).
Vip.model_rebuild(_types_namespace={"BackendsFrom": BackendsFrom})
Config.model_rebuild()
