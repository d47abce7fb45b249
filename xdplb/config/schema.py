"""The pool.yaml schema: pydantic models for VIPs, backends, health checks, Maglev and flow
settings, and the checks across VIPs. Loading and error locations are in ``loader.py``."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
from collections.abc import Sequence
from contextvars import ContextVar
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from xdplb.abi.layout import (
    LC_MAX_BACKENDS,
    MAX_BACKENDS,
    MAX_REV_NAT,
    MAX_RING_SLOTS,
    MAX_VIPS,
    REV_TARGETS,
)
from xdplb.config.errors import Loc, Problem, describe, fail

if TYPE_CHECKING:  # defined there, resolved there (Vip.model_rebuild): it builds on this module
    from xdplb.config.discovery import BackendsFrom

Protocol = Literal["tcp", "udp"]
Forwarding = Literal["nat", "fullnat", "dsr"]
Encap = Literal["ipip", "l2"]
# How a VIP picks a new flow's backend (layout.Scheduler, model/desired.py SCHEDULERS)
SchedulerName = Literal["maglev", "wrr", "rr", "random", "source-hash", "least-conn"]
# fullnat's default source ports: below Linux's default ip_local_port_range (32768-60999), so
# that the balancer's own connections (health checks) never pick one of a flow's.
DEFAULT_SOURCE_PORTS = (1024, 32767)
HealthCheckType = Literal["tcp", "http", "none"]

TABLE_SIZE_MIN, TABLE_SIZE_MAX = 3, 1_000_003
MAX_ENTRIES_MIN, MAX_ENTRIES_MAX = 1024, 100_000_000
DURATION_MIN, DURATION_MAX = 0.001, 3600.0
_LIMITED_BROADCAST = IPv4Address("255.255.255.255")
_THIS_NETWORK = IPv4Network("0.0.0.0/8")  # "this host on this network": never a destination
# Validation context key: the balancer's own addresses, when the caller knows them.
LOCAL_ADDRESSES = "xdplb_local_addresses"
# ... and the range the host's own sockets take ephemeral ports from (ip_local_port_range).
LOCAL_PORT_RANGE = "xdplb_local_port_range"


# --- field types ---------------------------------------------------------------------------------



def _in_range(lo: int, hi: int) -> AfterValidator:
    def check(value: int) -> int:
        if not lo <= value <= hi:
            fail(f"{value} is out of range ({lo}-{hi})")
        return value

    return AfterValidator(check)


Port = Annotated[StrictInt, _in_range(1, 65535)]
Weight = Annotated[StrictInt, _in_range(0, 65535)]
Seed = Annotated[StrictInt, _in_range(0, 2**32 - 1)]
MaxEntries = Annotated[StrictInt, _in_range(MAX_ENTRIES_MIN, MAX_ENTRIES_MAX)]
StatusCode = Annotated[StrictInt, _in_range(100, 599)]
CacheMs = Annotated[StrictInt, _in_range(0, 10_000)]
RateLimit = Annotated[StrictInt, _in_range(0, 2**32 - 1)]  # per CPU it must fit a u32
Count = Annotated[StrictInt, Field(ge=1)]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    # Trial division is instant for n <= TABLE_SIZE_MAX (~1000 divisions).
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _check_table_size(value: int) -> int:
    if not TABLE_SIZE_MIN <= value <= TABLE_SIZE_MAX:
        fail(f"{value} is out of range ({TABLE_SIZE_MIN}-{TABLE_SIZE_MAX})")
    if not _is_prime(value):
        below = next(n for n in range(value - 1, 1, -1) if _is_prime(n))
        above = next(n for n in range(value + 1, 2 * value + 2) if _is_prime(n))
        fail(f"{value} is not prime (nearest primes: {below}, {above})")
    return value


TableSize = Annotated[StrictInt, AfterValidator(_check_table_size)]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        fail(
            f"{value!r} is not a valid name (letters, digits, '-', '_', '.'; "
            "must start with a letter or digit; at most 64 characters)"
        )
    return value


Name = Annotated[StrictStr, AfterValidator(_check_name)]

# Address family of the VIP being validated, so that a backend's address validator can tell an
# IPv4/IPv6 mix from a plain IPv6 address. Set by Vip's wrap validator, scoped to that VIP.
_VIP_FAMILY: ContextVar[int | None] = ContextVar("xdplb_vip_family", default=None)


def _parse_address(value: Any, role: Literal["VIP", "backend", "source"]) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    if not isinstance(value, str):
        fail(f"expected an IP address string, got {describe(value)}")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        fail(f"{value!r} is not an IP address")
    vip_family = _VIP_FAMILY.get() if role == "backend" else None
    if vip_family is not None and vip_family != addr.version:
        fail(f"address family mix (IPv{addr.version} backend for IPv{vip_family} VIP)")
    if not isinstance(addr, IPv4Address):
        fail("IPv6 is not supported by the data path yet")
    if addr in _THIS_NETWORK or addr.is_multicast or addr == _LIMITED_BROADCAST:
        fail(f"{addr} is not a unicast address")
    if addr.is_loopback:
        fail(f"{addr} is a loopback address (127.0.0.0/8): packets to it never leave a host")
    return addr


VipAddress = Annotated[IPv4Address, BeforeValidator(lambda v: _parse_address(v, "VIP"))]
SourceAddress = Annotated[IPv4Address, BeforeValidator(lambda v: _parse_address(v, "source"))]


def _parse_port_range(value: Any) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, str | int):
        fail(f"expected a port range such as '1024-32767', got {describe(value)}")
    text = str(value).strip()
    match = re.fullmatch(r"(\d{1,5})(?:\s*-\s*(\d{1,5}))?", text)
    if not match:
        fail(f"{value!r} is not a port range (use e.g. '1024-32767')")
    lo, hi = int(match[1]), int(match[2] or match[1])
    if not 1 <= lo <= hi <= 65535:
        fail(f"{value!r} is not a port range within 1-65535 (first <= last)")
    return (lo, hi)


PortRange = Annotated[tuple[int, int], BeforeValidator(_parse_port_range)]
BackendAddress = Annotated[IPv4Address, BeforeValidator(lambda v: _parse_address(v, "backend"))]

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def _format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _parse_duration(value: Any, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        fail(f"expected a duration such as '2s' or '500ms', got {describe(value)}")
    if zero_ok and value in (0, "0"):
        return 0.0
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if not match:
            fail(
                f"{value!r} is not a valid duration "
                "(use e.g. '2s', '500ms', '1m' or a number of seconds)"
            )
        seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        seconds = float(value)
    if not (math.isfinite(seconds) and DURATION_MIN <= seconds <= DURATION_MAX):
        fail(f"{value} is out of range ({'0 or ' if zero_ok else ''}1ms-1h)")
    return seconds


Duration = Annotated[float, BeforeValidator(_parse_duration)]

# A duration, or 0 for "never".
OptionalDuration = Annotated[float, BeforeValidator(lambda v: _parse_duration(v, zero_ok=True))]


def _int_as_list(value: Any) -> Any:
    # expect_status accepts a single code as shorthand for a one-element list.
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def _non_empty(what: str) -> BeforeValidator:
    # Checked on the input, not with min_length: pydantic counts only the items that validated,
    # so a list whose every item is invalid would also be reported as empty.
    def check(value: Any) -> Any:
        if isinstance(value, list | tuple) and not value:
            fail(f"must not be empty (at least one {what} is required)")
        return value

    return BeforeValidator(check)


def none_as_empty(value: Any) -> Any:
    # An optional section left empty (every key commented out) means "all defaults".
    return {} if value is None else value


# --- models --------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HealthCheck(_Model):
    """How the control plane probes a VIP's backends. Durations are in seconds."""

    # Field order matters: validators below read earlier fields (type, interval) from info.data.
    type: HealthCheckType = "none"
    path: StrictStr = "/"
    expect_status: Annotated[tuple[StatusCode, ...], _non_empty("status code")] | None = None
    interval: Duration = 2.0
    timeout: Duration = 1.0
    rise: Count = 2
    fall: Count = 3

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str, info: ValidationInfo) -> str:
        cls._http_only("path", info)
        # The path goes verbatim into the request line, so it must not break it.
        if not value.startswith("/") or any(c.isspace() or not c.isprintable() for c in value):
            fail(f"{value!r} is not a valid HTTP path (must start with '/', no spaces)")
        return value

    @field_validator("expect_status", mode="before")
    @classmethod
    def _check_expect_status(cls, value: Any, info: ValidationInfo) -> Any:
        cls._http_only("expect_status", info)
        return _int_as_list(value)

    @staticmethod
    def _http_only(key: str, info: ValidationInfo) -> None:
        # HTTP settings without any probe almost always mean a forgotten "type: http". With
        # type: tcp they are accepted and ignored (the reference pool.yaml does exactly that),
        # so switching a check between tcp and http is a one-line change.
        if info.data.get("type") == "none":
            fail(f"{key} is only used by type: http, but type is none (add 'type: http')")

    @model_validator(mode="after")
    def _check_timeout(self) -> HealthCheck:
        if self.timeout >= self.interval:
            # Blame the key the author wrote; a default they never saw would be confusing.
            key = "timeout" if "timeout" in self.model_fields_set else "interval"
            fail(
                (
                    (key,),
                    f"timeout ({_format_duration(self.timeout)}) must be shorter than "
                    f"interval ({_format_duration(self.interval)})",
                    None,
                )
            )
        return self


class Backend(_Model):
    """A real server behind a VIP."""

    address: BackendAddress
    port: Port | None = None  # None: keep the VIP's port
    weight: Weight = 1  # 0 drains: existing flows stay, no new ones
    backup: StrictBool = False  # new flows only while no primary is up (model/desired.py)

    def target_port(self, vip: Vip) -> int:
        """The destination port packets for ``vip`` are rewritten to on this backend."""
        return vip.port if self.port is None else self.port


class VipMaglev(_Model):
    """A VIP's own Maglev table size (its ring is a map of its own), e.g. a small prime for
    the many VIPs of few backends each: kernel memory is 2 bytes a slot."""

    table_size: TableSize


class Vip(_Model):
    """A virtual service: address, port and protocol, load-balanced over ``backends``."""

    name: Name
    address: VipAddress
    port: Port
    protocol: Protocol
    backends: Annotated[tuple[Backend, ...], _non_empty("backend")] = ()
    # Instead of backends: found in DNS by the agent (config/discovery.py).
    backends_from: BackendsFrom | None = None
    health_check: Annotated[HealthCheck, BeforeValidator(none_as_empty)] = Field(
        default_factory=HealthCheck
    )
    forwarding: Forwarding = "nat"
    encap: Encap | None = None  # dsr only; None: ipip
    source: SourceAddress | None = None  # fullnat only; None: the address toward each backend
    source_ports: PortRange | None = None  # fullnat only; None: DEFAULT_SOURCE_PORTS
    maglev: VipMaglev | None = None  # None: the top-level maglev.table_size
    scheduler: SchedulerName = "maglev"

    @property
    def mode(self) -> str:
        """The data path's mode: nat, fullnat, dsr-l2 or dsr-ipip."""
        if self.forwarding == "dsr":
            return f"dsr-{self.encap or 'ipip'}"
        return self.forwarding

    @property
    def port_range(self) -> tuple[int, int]:
        return self.source_ports or DEFAULT_SOURCE_PORTS

    @model_validator(mode="before")
    @classmethod
    def _one_backend_source(cls, data: Any) -> Any:
        from xdplb.config.discovery import check_one_source  # it builds on this module

        return check_one_source(data)

    @model_validator(mode="after")
    def _check_mode_keys(self) -> Vip:
        problems: list[Problem] = []
        only = {"encap": "dsr", "source": "fullnat", "source_ports": "fullnat"}
        for key, mode in only.items():
            if key in self.model_fields_set and self.forwarding != mode:
                problems.append(((key,), f"{key} is only used with forwarding: {mode} "
                                         f"(this VIP's forwarding is {self.forwarding})", None))
        if self.forwarding == "dsr":
            # The backend answers the client itself, from the VIP and the VIP's port: a
            # rewritten port would reach a socket the reply cannot come from.
            problems += [(("backends", i, "port"),
                          f"port {b.port} differs from the VIP's port {self.port}: dsr "
                          "cannot rewrite ports (the backend answers the client directly)",
                          None)
                         for i, b in enumerate(self.backends)
                         if b.port is not None and b.port != self.port]
        if self.scheduler == "least-conn" and len(self.backends) > LC_MAX_BACKENDS:
            problems.append((("scheduler",), f"least-conn compares at most {LC_MAX_BACKENDS} "
                             f"backends per new flow (this VIP has {len(self.backends)}): "
                             "use another scheduler or split the VIP", None))
        if problems:
            fail(*problems)
        return self

    @property
    def key(self) -> tuple[IPv4Address, int, Protocol]:
        """What identifies the VIP in the data path: (address, port, protocol)."""
        return (self.address, self.port, self.protocol)

    @model_validator(mode="wrap")
    @classmethod
    def _scope_family(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Vip:
        family = None
        if isinstance(data, dict) and isinstance(data.get("address"), str):
            with contextlib.suppress(ValueError):  # a bad address is reported by its validator
                family = ipaddress.ip_address(data["address"]).version
        token = _VIP_FAMILY.set(family)
        try:
            return handler(data)
        finally:
            _VIP_FAMILY.reset(token)

    @field_validator("backends")
    @classmethod
    def _check_duplicates(cls, backends: tuple[Backend, ...], info: ValidationInfo) -> Any:
        vip_port = info.data.get("port")  # absent if invalid; default ports then compare as None
        seen: dict[tuple[IPv4Address, int | None], int] = {}
        problems: list[Problem] = []
        for i, backend in enumerate(backends):
            port = vip_port if backend.port is None else backend.port
            first = seen.setdefault((backend.address, port), i)
            if first != i:
                shown = f"{backend.address}:{port}" if port is not None else str(backend.address)
                problems.append(((i,), f"duplicate backend {shown} (same as {{where}})", (first,)))
        if problems:
            fail(*problems)
        return backends


class Maglev(_Model):
    """Maglev lookup-table parameters (one table of ``table_size`` slots per VIP)."""

    table_size: TableSize = 65537
    seed: Seed = 0


class Flows(_Model):
    """Connection-tracking (flow) table parameters."""

    max_entries: MaxEntries = 1_000_000
    # How long a flow reuses its bpf_fib_lookup result (next-hop MACs and egress) before it
    # looks again; 0 looks up every packet. Neighbour and route changes reach a flow within it.
    next_hop_cache_ms: CacheMs = 100
    # UDP has no end of connection: a flow idle this long is over, and the client's next
    # datagram is a new flow (balanced anew: a drained backend gets no more). 0: never.
    udp_idle_timeout: OptionalDuration = 60.0
    # dsr VIPs' new flows a second (over all CPUs, counted per CPU) that are inserted into the
    # flow tables; the rest are balanced by the table without an entry (Katran's LRU bypass:
    # a flood cannot churn the tables faster). nat and fullnat replies need their flow's
    # entry, so their flows are always inserted. 0: no limit.
    new_flow_rate_limit: RateLimit = 0


def _check_iface(value: str) -> str:
    if not re.fullmatch(r"[^\s/:+]{1,15}", value):
        fail(f"{value!r} is not an interface name (1-15 characters, none of space, '/', ':', '+')")
    return value


from xdplb.config.bgp import Bgp  # noqa: E402 (it builds on the field types above)


class Config(_Model):
    """The whole pool.yaml."""

    vips: Annotated[tuple[Vip, ...], _non_empty("VIP")]
    maglev: Annotated[Maglev, BeforeValidator(none_as_empty)] = Field(default_factory=Maglev)
    flows: Annotated[Flows, BeforeValidator(none_as_empty)] = Field(default_factory=Flows)
    # What `xdplb attach` attaches to when its command line names no interface (a systemd
    # unit's config file says where it runs); names as Linux allows them, '+' is the pins'.
    interfaces: Annotated[tuple[Annotated[StrictStr, AfterValidator(_check_iface)], ...],
                          Field(min_length=1)] | None = None
    bgp: Bgp | None = None  # announce the VIP addresses to routers (config/bgp.py)

    @model_validator(mode="before")
    @classmethod
    def _check_capacity(cls, data: Any) -> Any:
        # Before anything else: thousands of VIPs are reported as one problem, not checked
        # (and reported) one by one.
        if isinstance(data, dict) and (problems := capacity_problems(data.get("vips"))):
            fail(*problems)
        return data

    @field_validator("vips")
    @classmethod
    def _check_unique(cls, vips: tuple[Vip, ...], info: ValidationInfo) -> tuple[Vip, ...]:
        facts = [VipFacts.of(i, v) for i, v in enumerate(vips)]
        local = (info.context or {}).get(LOCAL_ADDRESSES, frozenset())
        ports = (info.context or {}).get(LOCAL_PORT_RANGE)
        if problems := [*uniqueness_problems(facts), *backend_address_problems(facts, local),
                        *source_port_problems(vips, local, ports)]:
            fail(*problems)
        return vips

    def table_size_of(self, vip: Vip) -> int:
        """Slots of ``vip``'s Maglev ring: its own table_size, else the top-level one."""
        return vip.maglev.table_size if vip.maglev is not None else self.maglev.table_size

    @model_validator(mode="after")
    def _check_table_fits(self) -> Config:
        facts = [VipFacts.of(i, v) for i, v in enumerate(self.vips)]
        if problems := table_fit_problems(self.maglev, facts):
            fail(*problems)
        return self

    @model_validator(mode="after")
    def _check_reverse_nat(self) -> Config:
        if problems := reverse_nat_problems(self.vips):
            fail(*problems)
        return self


class VipFacts(NamedTuple):
    """What the cross-VIP checks need; None where that part of the VIP is invalid.

    pydantic skips a field's validators once any item in it fails, so the loader also runs the
    checks on facts taken from the raw VIPs: otherwise a duplicate name would only show up after
    every unrelated error in other VIPs had been fixed.
    """

    index: int
    name: str | None
    key: tuple[IPv4Address, int, str] | None
    n_backends: int | None
    address: IPv4Address | None = None  # known even when the key is not (a bad port)
    backend_addresses: tuple[IPv4Address | None, ...] = ()
    table_size: int | None = None  # the VIP's own maglev.table_size, if it gives a valid one

    @classmethod
    def of(cls, index: int, vip: Vip) -> VipFacts:
        return cls(index, vip.name, vip.key, len(vip.backends), vip.address,
                   tuple(b.address for b in vip.backends),
                   vip.maglev.table_size if vip.maglev is not None else None)

    @classmethod
    def from_raw(cls, index: int, raw: Any) -> VipFacts:
        if not isinstance(raw, dict):
            return cls(index, None, None, None)
        name = valid_or_none(_NAME, raw.get("name"))
        parts = (
            valid_or_none(_ADDRESS, raw.get("address")),
            valid_or_none(_PORT, raw.get("port")),
            valid_or_none(_PROTOCOL, raw.get("protocol")),
        )
        key = None if None in parts else parts
        own = valid_or_none(_VIP_MAGLEV, raw.get("maglev"))
        size = own.table_size if own is not None else None
        backends = raw.get("backends")
        if not isinstance(backends, list):
            return cls(index, name, key, None, parts[0], (), size)
        addresses = tuple(valid_or_none(_BACKEND_ADDRESS, b.get("address"))
                          if isinstance(b, dict) else None for b in backends)
        return cls(index, name, key, len(backends), parts[0], addresses, size)


_NAME: TypeAdapter[str] = TypeAdapter(Name)
_ADDRESS: TypeAdapter[IPv4Address] = TypeAdapter(VipAddress)
_BACKEND_ADDRESS: TypeAdapter[IPv4Address] = TypeAdapter(BackendAddress)
_PORT: TypeAdapter[int] = TypeAdapter(Port)
_PROTOCOL: TypeAdapter[str] = TypeAdapter(Protocol)
MAGLEV: TypeAdapter[Maglev] = TypeAdapter(Maglev)
_VIP_MAGLEV: TypeAdapter[VipMaglev] = TypeAdapter(VipMaglev)


def valid_or_none(adapter: TypeAdapter[Any], value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def uniqueness_problems(vips: Sequence[VipFacts]) -> list[Problem]:
    """Duplicate VIP names and duplicate (address, port, protocol); locs relative to ``vips``."""
    names: dict[str, int] = {}
    keys: dict[tuple[IPv4Address, int, str], int] = {}
    problems: list[Problem] = []
    for vip in vips:
        i = vip.index
        if vip.name is not None and (first := names.setdefault(vip.name, i)) != i:
            msg = f"duplicate VIP name {vip.name!r} (first used by {{where}})"
            problems.append(((i, "name"), msg, (first,)))
        if vip.key is not None and (first := keys.setdefault(vip.key, i)) != i:
            address, port, protocol = vip.key
            msg = f"duplicate VIP {address}:{port}/{protocol} (same as {{where}})"
            problems.append(((i,), msg, (first,)))
    return problems


def table_fit_problems(maglev: Maglev, vips: Sequence[VipFacts]) -> list[Problem]:
    """VIPs with at least table_size backends, and rings over MAX_RING_SLOTS in all; locs
    relative to the whole config."""
    # Maglev gives every backend a slot only if the table is larger than the backend count.
    # Blame the table_size the author set (the VIP's, else the top-level one), else the VIP
    # with too many backends.
    explicit = "table_size" in maglev.model_fields_set
    problems: list[Problem] = []
    total = 0
    for vip in vips:
        size = vip.table_size or maglev.table_size
        total += size
        if vip.n_backends is not None and vip.n_backends >= size:
            loc: Loc = (("vips", vip.index, "maglev", "table_size") if vip.table_size
                        else ("maglev", "table_size") if explicit
                        else ("vips", vip.index, "backends"))
            label = repr(vip.name) if vip.name is not None else f"vips[{vip.index}]"
            msg = f"Maglev table_size {size} must be greater than the number of backends"
            problems.append((loc, f"{msg} (VIP {label} has {vip.n_backends})", None))
    if total > MAX_RING_SLOTS:
        msg = (f"the VIPs' Maglev tables have {total} slots in all ({total * 2 >> 20} MiB of "
               f"kernel memory); the data path holds at most {MAX_RING_SLOTS}: give VIPs of "
               "few backends a smaller table (vips[].maglev.table_size)")
        problems.append(((("maglev", "table_size") if explicit else ("vips",)), msg, None))
    return problems


def backend_address_problems(
    vips: Sequence[VipFacts], local: frozenset[IPv4Address] = frozenset()
) -> list[Problem]:
    """Backends at an address no backend may have; locs relative to ``vips``.

    A VIP's address (its own or another VIP's, whatever the port): the data path takes every
    packet to a VIP address as VIP traffic, so the rewritten packet would come back to the
    balancer instead of reaching a server. One of the balancer's own addresses (``local``,
    known only where the agent runs): the packet would be delivered to the balancer itself.
    """
    vip_at: dict[IPv4Address, int] = {}
    for vip in vips:
        if vip.address is not None:
            vip_at.setdefault(vip.address, vip.index)
    problems: list[Problem] = []
    for vip in vips:
        for j, address in enumerate(vip.backend_addresses):
            loc: Loc = (vip.index, "backends", j, "address")
            if address is None:
                continue
            if (first := vip_at.get(address)) is not None:
                whose = "this VIP's own address" if first == vip.index else "the address of {where}"
                msg = f"{address} is {whose}: packets sent to it would be balanced again"
                problems.append((loc, msg, (first,)))
            elif address in local:
                msg = (f"{address} is an address of this balancer (of an interface in its "
                       "network namespace): packets sent to it would not leave it")
                problems.append((loc, msg, None))
    return problems


def source_port_problems(
    vips: Sequence[Vip], local: frozenset[IPv4Address], ephemeral: tuple[int, int] | None
) -> list[Problem]:
    """fullnat source ports that the host's own sockets may also pick (``ephemeral``, the
    host's ip_local_port_range, known only where the agent runs): when the source is an
    address of the host (as the default one always is), a health check's connection and a
    flow could share an address and port, and the check's answers would be taken for the
    flow's. Locs relative to ``vips``."""
    if ephemeral is None:
        return []
    problems: list[Problem] = []
    for i, vip in enumerate(vips):
        if vip.forwarding != "fullnat" or (vip.source is not None and vip.source not in local):
            continue
        lo, hi = vip.port_range
        if lo <= ephemeral[1] and ephemeral[0] <= hi:
            whose = "the default source (an address of this host)" if vip.source is None \
                else f"source {vip.source} (an address of this host)"
            key = "source_ports" if vip.source_ports is not None else "forwarding"
            problems.append(((i, key), f"source ports {lo}-{hi} overlap the host's "
                             f"ip_local_port_range {ephemeral[0]}-{ephemeral[1]}, which "
                             f"{whose} also uses: choose ports outside it", None))
    return problems


def capacity_problems(vips: Any) -> list[Problem]:
    """More VIPs, or backends over all VIPs, than the data path's arrays hold
    (``xdplb.abi.layout``); locs relative to the whole config, at the first one too many."""
    if not isinstance(vips, list | tuple):
        return []
    if len(vips) > MAX_VIPS:
        msg = f"{len(vips)} VIPs: the data path holds at most {MAX_VIPS}"
        return [(("vips", MAX_VIPS), msg, None)]
    counts = [len(b) if isinstance(b := _raw_backends(v), list | tuple) else 0 for v in vips]
    total, before = sum(counts), 0
    for i, n in enumerate(counts):
        if before + n > MAX_BACKENDS:
            msg = (f"{total} backends over all VIPs: the data path holds at most "
                   f"{MAX_BACKENDS}, and this is number {MAX_BACKENDS + 1}")
            return [(("vips", i, "backends", MAX_BACKENDS - before), msg, None)]
        before += n
    return []


def _raw_backends(vip: Any) -> Any:
    if isinstance(vip, Vip):
        return vip.backends
    return vip.get("backends") if isinstance(vip, dict) else None


def reverse_nat_problems(vips: Sequence[Vip]) -> list[Problem]:
    """What the data path's reverse NAT (``rev_nat``) cannot hold; locs relative to the
    config. A reply from a backend endpoint (address, target port, protocol) is told apart
    between at most REV_TARGETS VIPs, and the map has an entry per endpoint and per
    (address, protocol). Only nat VIPs need it: fullnat replies find their flow by their
    own port, dsr replies never pass the balancer (``DesiredState.reverse_nat``)."""
    served: dict[tuple[IPv4Address, int, str], list[int]] = {}
    addresses: set[tuple[IPv4Address, str]] = set()
    problems: list[Problem] = []
    for i, vip in enumerate(vips):
        if vip.forwarding != "nat":
            continue
        for j, backend in enumerate(vip.backends):
            port = backend.target_port(vip)
            seen = served.setdefault((backend.address, port, vip.protocol), [])
            addresses.add((backend.address, vip.protocol))
            if i in seen:
                continue
            seen.append(i)
            if len(seen) == REV_TARGETS + 1:
                msg = (f"backend {backend.address}:{port}/{vip.protocol} serves more than "
                       f"{REV_TARGETS} VIPs (also vips{seen[:-1]}): the data path tells the "
                       f"replies of at most {REV_TARGETS} apart; give it another port per VIP")
                problems.append((("vips", i, "backends", j), msg, None))
    if len(served) + len(addresses) > MAX_REV_NAT:
        msg = (f"{len(served)} backend endpoints and {len(addresses)} backend addresses need "
               f"more reverse-NAT entries than the data path holds ({MAX_REV_NAT})")
        problems.append((("vips",), msg, None))
    return problems
