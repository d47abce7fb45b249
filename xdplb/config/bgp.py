"""The ``bgp`` section of pool.yaml: how the node announces its VIP addresses to its routers.

Only the model lives here; the agent (``agent/bgp.py``) configures and drives the speaker.
It builds on the field types of ``schema.py``, which hooks ``Bgp`` into ``Config``.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, StrictInt, field_validator

from xdplb.config.errors import fail
from xdplb.config.schema import Duration, _in_range, _Model, _non_empty, _parse_address

# 4-byte AS numbers (RFC 6793); 0 and 4294967295 are reserved (RFC 7607, 7300).
Asn = Annotated[StrictInt, _in_range(1, 4_294_967_294)]
# A BGP address: a unicast IPv4 address, as a VIP's or a backend's.
BgpAddress = Annotated[IPv4Address, BeforeValidator(lambda v: _parse_address(v, "source"))]
HOLD_TIME_MIN, HOLD_TIME_MAX = 3, 65535  # RFC 4271: 0 (no keepalives) or at least 3 s


def _check_hold_time(seconds: float) -> float:
    # The speaker sends whole seconds; 0 (never expire) would let a dead node keep its routes.
    if seconds != int(seconds) or not HOLD_TIME_MIN <= seconds <= HOLD_TIME_MAX:
        fail(f"{seconds:g}s is not a BGP hold time (whole seconds, "
             f"{HOLD_TIME_MIN}s-{HOLD_TIME_MAX}s)")
    return seconds


HoldTime = Annotated[Duration, AfterValidator(_check_hold_time)]


class Peer(_Model):
    """One BGP neighbour (a router) the node announces its VIP addresses to."""

    address: BgpAddress
    asn: Asn
    # The session's source address (a node with several uplinks); default: the route's.
    local_address: BgpAddress | None = None
    # The next hop announced to this peer; default: the session's local address.
    next_hop: BgpAddress | None = None


class Bgp(_Model):
    """``bgp``: the node's AS, router id, hold time and peers."""

    asn: Asn
    router_id: BgpAddress | None = None  # None: the address facing the first peer
    hold_time: HoldTime = 9.0
    peers: Annotated[tuple[Peer, ...], _non_empty("peer")]

    @field_validator("peers")
    @classmethod
    def _check_unique(cls, peers: tuple[Peer, ...]) -> tuple[Peer, ...]:
        seen: dict[IPv4Address, int] = {}
        problems: list[Any] = []
        for i, p in enumerate(peers):
            if p.address in seen:
                problems.append(((i, "address"), f"duplicate peer {p.address} (also {{where}})",
                                 (seen[p.address],)))
            seen.setdefault(p.address, i)
        if problems:
            fail(*problems)
        return peers
