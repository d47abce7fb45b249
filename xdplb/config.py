"""Load and validate pool.yaml: VIPs, their backends, health checks, Maglev and flow settings.

Validation is done by pydantic models; ruamel.yaml's round-trip loader keeps the line of every
key, so each pydantic error ``loc`` is mapped back to ``FILE:LINE: field.path: message``. All
problems found are reported together in one :class:`ConfigError`. See docs/config.md.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal, NamedTuple, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

__all__ = [
    "Backend",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "Flows",
    "HealthCheck",
    "HealthCheckType",
    "Maglev",
    "Protocol",
    "Vip",
    "load_config",
    "parse_config",
]

Protocol = Literal["tcp", "udp"]
HealthCheckType = Literal["tcp", "http", "none"]

TABLE_SIZE_MIN, TABLE_SIZE_MAX = 3, 1_000_003
MAX_ENTRIES_MIN, MAX_ENTRIES_MAX = 1024, 100_000_000
DURATION_MIN, DURATION_MAX = 0.001, 3600.0
_LIMITED_BROADCAST = IPv4Address("255.255.255.255")


# --- errors --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One configuration problem: where it is and what is wrong."""

    file: str
    line: int | None  # 1-based; None when the problem has no position (e.g. unreadable file)
    path: str  # field path such as "vips[0].backends[1].port"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """Invalid or unreadable configuration; ``str(e)`` has one line per problem."""

    def __init__(self, errors: Sequence[ConfigProblem]) -> None:
        self.errors: list[ConfigProblem] = list(errors)
        super().__init__("\n".join(str(p) for p in self.errors))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[ConfigProblem]]]:
        # Pickle (e.g. across processes) from the problems, not from the joined message.
        return (type(self), (self.errors,))


# A validator reports one or more problems through a single pydantic error of this type: each
# problem is (location relative to the validator, message, optional location it conflicts with).
# That lets cross-field checks point at the exact offending key and report every duplicate.
# A "{where}" in the message is replaced by where the conflicting item is
# ("vips[0] on line 2" when loading a file, just "[0]" in pydantic's own error text).
_PROBLEMS = "xdplb_problems"
_Loc = tuple[str | int, ...]
_Problem = tuple[_Loc, str, _Loc | None]


def _fail(*problems: _Problem | str) -> NoReturn:
    items = [((), p, None) if isinstance(p, str) else p for p in problems]
    summary = "; ".join(
        (f"{_format_loc(loc)}: " if loc else "") + msg.replace("{where}", _format_loc(ref or ()))
        for loc, msg, ref in items
    )
    raise PydanticCustomError(_PROBLEMS, "{summary}", {"summary": summary, "problems": items})


# --- field types ---------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """Name a YAML value's type the way a config author thinks of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    kind = {int: "an integer", float: "a number", str: "a string"}.get(type(value))
    return f"{kind} ({value!r})" if kind else type(value).__name__


def _in_range(lo: int, hi: int) -> AfterValidator:
    def check(value: int) -> int:
        if not lo <= value <= hi:
            _fail(f"{value} is out of range ({lo}-{hi})")
        return value

    return AfterValidator(check)


Port = Annotated[StrictInt, _in_range(1, 65535)]
Weight = Annotated[StrictInt, _in_range(0, 65535)]
Seed = Annotated[StrictInt, _in_range(0, 2**32 - 1)]
MaxEntries = Annotated[StrictInt, _in_range(MAX_ENTRIES_MIN, MAX_ENTRIES_MAX)]
StatusCode = Annotated[StrictInt, _in_range(100, 599)]
CacheMs = Annotated[StrictInt, _in_range(0, 10_000)]
Count = Annotated[StrictInt, Field(ge=1)]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    # Trial division is instant for n <= TABLE_SIZE_MAX (~1000 divisions).
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _check_table_size(value: int) -> int:
    if not TABLE_SIZE_MIN <= value <= TABLE_SIZE_MAX:
        _fail(f"{value} is out of range ({TABLE_SIZE_MIN}-{TABLE_SIZE_MAX})")
    if not _is_prime(value):
        below = next(n for n in range(value - 1, 1, -1) if _is_prime(n))
        above = next(n for n in range(value + 1, 2 * value + 2) if _is_prime(n))
        _fail(f"{value} is not prime (nearest primes: {below}, {above})")
    return value


TableSize = Annotated[StrictInt, AfterValidator(_check_table_size)]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        _fail(
            f"{value!r} is not a valid name (letters, digits, '-', '_', '.'; "
            "must start with a letter or digit; at most 64 characters)"
        )
    return value


Name = Annotated[StrictStr, AfterValidator(_check_name)]

# Address family of the VIP being validated, so that a backend's address validator can tell an
# IPv4/IPv6 mix from a plain IPv6 address. Set by Vip's wrap validator, scoped to that VIP.
_VIP_FAMILY: ContextVar[int | None] = ContextVar("xdplb_vip_family", default=None)


def _parse_address(value: Any, role: Literal["VIP", "backend"]) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    if not isinstance(value, str):
        _fail(f"expected an IP address string, got {_describe(value)}")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        _fail(f"{value!r} is not an IP address")
    vip_family = _VIP_FAMILY.get() if role == "backend" else None
    if vip_family is not None and vip_family != addr.version:
        _fail(f"address family mix (IPv{addr.version} backend for IPv{vip_family} VIP)")
    if not isinstance(addr, IPv4Address):
        _fail("IPv6 is not supported by the data path yet")
    if addr.is_unspecified or addr.is_multicast or addr == _LIMITED_BROADCAST:
        _fail(f"{addr} is not a unicast address")
    return addr


VipAddress = Annotated[IPv4Address, BeforeValidator(lambda v: _parse_address(v, "VIP"))]
BackendAddress = Annotated[IPv4Address, BeforeValidator(lambda v: _parse_address(v, "backend"))]

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def _format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _parse_duration(value: Any, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        _fail(f"expected a duration such as '2s' or '500ms', got {_describe(value)}")
    if zero_ok and value in (0, "0"):
        return 0.0
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if not match:
            _fail(
                f"{value!r} is not a valid duration "
                "(use e.g. '2s', '500ms', '1m' or a number of seconds)"
            )
        seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        seconds = float(value)
    if not (math.isfinite(seconds) and DURATION_MIN <= seconds <= DURATION_MAX):
        _fail(f"{value} is out of range ({'0 or ' if zero_ok else ''}1ms-1h)")
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
            _fail(f"must not be empty (at least one {what} is required)")
        return value

    return BeforeValidator(check)


def _none_as_empty(value: Any) -> Any:
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
            _fail(f"{value!r} is not a valid HTTP path (must start with '/', no spaces)")
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
            _fail(f"{key} is only used by type: http, but type is none (add 'type: http')")

    @model_validator(mode="after")
    def _check_timeout(self) -> HealthCheck:
        if self.timeout >= self.interval:
            # Blame the key the author wrote; a default they never saw would be confusing.
            key = "timeout" if "timeout" in self.model_fields_set else "interval"
            _fail(
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

    def target_port(self, vip: Vip) -> int:
        """The destination port packets for ``vip`` are rewritten to on this backend."""
        return vip.port if self.port is None else self.port


class Vip(_Model):
    """A virtual service: address, port and protocol, load-balanced over ``backends``."""

    name: Name
    address: VipAddress
    port: Port
    protocol: Protocol
    backends: Annotated[tuple[Backend, ...], _non_empty("backend")]
    health_check: Annotated[HealthCheck, BeforeValidator(_none_as_empty)] = Field(
        default_factory=HealthCheck
    )

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
        problems: list[_Problem] = []
        for i, backend in enumerate(backends):
            port = vip_port if backend.port is None else backend.port
            first = seen.setdefault((backend.address, port), i)
            if first != i:
                shown = f"{backend.address}:{port}" if port is not None else str(backend.address)
                problems.append(((i,), f"duplicate backend {shown} (same as {{where}})", (first,)))
        if problems:
            _fail(*problems)
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


class Config(_Model):
    """The whole pool.yaml."""

    vips: Annotated[tuple[Vip, ...], _non_empty("VIP")]
    maglev: Annotated[Maglev, BeforeValidator(_none_as_empty)] = Field(default_factory=Maglev)
    flows: Annotated[Flows, BeforeValidator(_none_as_empty)] = Field(default_factory=Flows)

    @field_validator("vips")
    @classmethod
    def _check_unique(cls, vips: tuple[Vip, ...]) -> tuple[Vip, ...]:
        if problems := _uniqueness_problems([_VipFacts.of(i, v) for i, v in enumerate(vips)]):
            _fail(*problems)
        return vips

    @model_validator(mode="after")
    def _check_table_fits(self) -> Config:
        facts = [_VipFacts.of(i, v) for i, v in enumerate(self.vips)]
        if problems := _table_fit_problems(self.maglev, facts):
            _fail(*problems)
        return self


class _VipFacts(NamedTuple):
    """What the cross-VIP checks need; None where that part of the VIP is invalid.

    pydantic skips a field's validators once any item in it fails, so the loader also runs the
    checks on facts taken from the raw VIPs: otherwise a duplicate name would only show up after
    every unrelated error in other VIPs had been fixed.
    """

    index: int
    name: str | None
    key: tuple[IPv4Address, int, str] | None
    n_backends: int | None

    @classmethod
    def of(cls, index: int, vip: Vip) -> _VipFacts:
        return cls(index, vip.name, vip.key, len(vip.backends))

    @classmethod
    def from_raw(cls, index: int, raw: Any) -> _VipFacts:
        if not isinstance(raw, dict):
            return cls(index, None, None, None)
        name = _valid(_NAME, raw.get("name"))
        parts = (
            _valid(_ADDRESS, raw.get("address")),
            _valid(_PORT, raw.get("port")),
            _valid(_PROTOCOL, raw.get("protocol")),
        )
        key = None if None in parts else parts
        backends = raw.get("backends")
        return cls(index, name, key, len(backends) if isinstance(backends, list) else None)


_NAME: TypeAdapter[str] = TypeAdapter(Name)
_ADDRESS: TypeAdapter[IPv4Address] = TypeAdapter(VipAddress)
_PORT: TypeAdapter[int] = TypeAdapter(Port)
_PROTOCOL: TypeAdapter[str] = TypeAdapter(Protocol)
_MAGLEV: TypeAdapter[Maglev] = TypeAdapter(Maglev)


def _valid(adapter: TypeAdapter[Any], value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def _uniqueness_problems(vips: Sequence[_VipFacts]) -> list[_Problem]:
    """Duplicate VIP names and duplicate (address, port, protocol); locs relative to ``vips``."""
    names: dict[str, int] = {}
    keys: dict[tuple[IPv4Address, int, str], int] = {}
    problems: list[_Problem] = []
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


def _table_fit_problems(maglev: Maglev, vips: Sequence[_VipFacts]) -> list[_Problem]:
    """VIPs with at least table_size backends; locs relative to the whole config."""
    # Maglev gives every backend a slot only if the table is larger than the backend count.
    # Blame table_size if the author set it, else the VIP with too many backends.
    size = maglev.table_size
    explicit = "table_size" in maglev.model_fields_set
    problems: list[_Problem] = []
    for vip in vips:
        if vip.n_backends is not None and vip.n_backends >= size:
            loc: _Loc = ("maglev", "table_size") if explicit else ("vips", vip.index, "backends")
            label = repr(vip.name) if vip.name is not None else f"vips[{vip.index}]"
            msg = f"Maglev table_size {size} must be greater than the number of backends"
            problems.append((loc, f"{msg} (VIP {label} has {vip.n_backends})", None))
    return problems


# --- loading -------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a pool.yaml file; raise :class:`ConfigError` listing every problem."""
    filename = os.fspath(path)
    try:
        with open(filename, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(filename, None, "", "config file not found")]) from None
    except UnicodeDecodeError as e:
        msg = f"not valid UTF-8 (byte {e.start})"
        raise ConfigError([ConfigProblem(filename, None, "", msg)]) from None
    except OSError as e:
        msg = f"cannot read: {e.strerror or e}"
        raise ConfigError([ConfigProblem(filename, None, "", msg)]) from None
    return parse_config(text, filename)


def parse_config(text: str, filename: str = "<string>") -> Config:
    """Parse and validate pool.yaml text; ``filename`` is only used in error messages."""
    try:
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        raise ConfigError([_yaml_problem(e, filename)]) from None
    except YAMLError as e:
        raise ConfigError([ConfigProblem(filename, None, "", f"invalid YAML: {e}")]) from None
    if tree is None:
        msg = "the file is empty (expected a mapping with a 'vips' list)"
        raise ConfigError([ConfigProblem(filename, None, "", msg)])
    try:
        data = _to_plain(tree, set())
    except _RecursiveAlias:
        msg = "recursive YAML alias (a node contains itself)"
        raise ConfigError([ConfigProblem(filename, None, "", msg)]) from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        found = [*_problems(e, tree, filename), *_partial_problems(data, tree, filename)]
        # The partial checks may repeat what pydantic already reported; keep the first of each.
        unique = list(dict.fromkeys(found))
        raise ConfigError(sorted(unique, key=lambda p: (p.line is not None, p.line or 0))) from None


def _yaml_problem(e: MarkedYAMLError, filename: str) -> ConfigProblem:
    mark = e.problem_mark or e.context_mark
    line = mark.line + 1 if mark is not None else None
    msg = e.problem or e.context or "syntax error"
    if e.problem and e.context:
        ctx_line = e.context_mark.line + 1 if e.context_mark is not None else None
        where = f" started on line {ctx_line}" if ctx_line not in (None, line) else ""
        msg = f"{msg} ({e.context}{where})"
    return ConfigProblem(filename, line, "", f"invalid YAML: {msg}")


class _RecursiveAlias(Exception):
    pass


def _to_plain(node: Any, active: set[int]) -> Any:
    """Turn ruamel's round-trip types into plain Python ones so strict types behave as usual."""
    if isinstance(node, dict | list):
        if id(node) in active:
            raise _RecursiveAlias
        active.add(id(node))
        try:
            if isinstance(node, dict):
                return {_to_plain(k, active): _to_plain(v, active) for k, v in node.items()}
            return [_to_plain(v, active) for v in node]
        finally:
            active.discard(id(node))
    # ScalarBoolean (an anchored true/false) subclasses int, not bool: it must not pass as 1.
    if isinstance(node, bool | ScalarBoolean):
        return bool(node)
    for plain in (int, float, str):
        if isinstance(node, plain):
            return plain(node)
    return node


def _problems(exc: ValidationError, tree: Any, filename: str) -> Iterator[ConfigProblem]:
    for err in exc.errors(include_url=False):
        loc: _Loc = tuple(err["loc"])
        if err["type"] == _PROBLEMS:
            for sub, msg, ref in err["ctx"]["problems"]:
                yield _custom_problem(loc, (sub, msg, ref), tree, filename)
        else:
            line, path = _locate(tree, loc, key_line=err["type"] == "extra_forbidden")
            yield ConfigProblem(filename, line, path, _message(err))


def _custom_problem(base: _Loc, problem: _Problem, tree: Any, filename: str) -> ConfigProblem:
    sub, msg, ref = problem
    if ref is not None:
        ref_line, ref_path = _locate(tree, base + ref)
        msg = msg.replace("{where}", f"{ref_path} on line {ref_line}" if ref_line else ref_path)
    line, path = _locate(tree, base + sub)
    return ConfigProblem(filename, line, path, msg)


def _partial_problems(data: Any, tree: Any, filename: str) -> Iterator[ConfigProblem]:
    """Run the cross-VIP checks on whatever parts of the raw VIPs are valid (see _VipFacts)."""
    if not isinstance(data, dict) or not isinstance(data.get("vips"), list):
        return
    facts = [_VipFacts.from_raw(i, raw) for i, raw in enumerate(data["vips"])]
    for problem in _uniqueness_problems(facts):
        yield _custom_problem(("vips",), problem, tree, filename)
    maglev = _valid(_MAGLEV, _none_as_empty(data.get("maglev")))
    if maglev is not None:
        for problem in _table_fit_problems(maglev, facts):
            yield _custom_problem((), problem, tree, filename)


def _locate(tree: Any, loc: _Loc, key_line: bool = False) -> tuple[int | None, str]:
    """Map a pydantic ``loc`` to (1-based line, field path) in the YAML tree.

    The line is the value's for scalars, the key's for collections and (``key_line``) for unknown
    keys, and the enclosing mapping's when the key is missing.
    """
    node: Any = tree
    line = _node_line(tree) or 1
    path = ""
    for i, seg in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict):
            path += _format_key(seg, path)
            if seg not in node:
                line = _node_line(node) or line  # missing key: the mapping it belongs in
                node = None
                continue
            child = node[seg]
            pos = _lc(node, "key", seg)
            if last and not key_line and not isinstance(child, dict | list | None):
                pos = _lc(node, "value", seg) or pos
            line = pos or line
            node = child
        elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
            path += f"[{seg}]"
            line = _lc(node, "item", seg) or line
            node = node[seg]
        else:
            path += f"[{seg}]" if isinstance(seg, int) else _format_key(seg, path)
            node = None
    return line, path


def _format_key(key: Any, path: str) -> str:
    if isinstance(key, str):
        return f".{key}" if path else key
    return f"[{key!r}]"  # a non-string mapping key, e.g. a bare number


def _node_line(node: Any) -> int | None:
    lc = getattr(node, "lc", None)
    return lc.line + 1 if lc is not None and lc.line is not None else None


def _lc(node: Any, kind: Literal["key", "value", "item"], index: Any) -> int | None:
    try:
        return getattr(node.lc, kind)(index)[0] + 1
    except (AttributeError, KeyError, IndexError, TypeError):
        return None  # e.g. keys pulled in by a YAML merge (<<) have no position of their own


def _format_loc(loc: _Loc) -> str:
    """Format a loc without a YAML tree (for pydantic's own error text)."""
    out = ""
    for seg in loc:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out


def _message(err: Any) -> str:
    """A config author's wording for pydantic's built-in error types."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    expected: dict[str, str] = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "an integer",
        "string_type": "a string",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "dict_type": "a mapping",
        "tuple_type": "a list",
        "list_type": "a list",
        "float_type": "a number",
    }
    if kind in expected:
        return f"expected {expected[kind]}, got {_describe(value)}"
    if kind == "missing":
        return f"missing required key {err['loc'][-1]!r}"
    if kind == "extra_forbidden":
        return _unknown_key_message(err["loc"])
    if kind == "literal_error":
        return f"{value!r} is not valid (expected {ctx.get('expected')})"
    if kind == "greater_than_equal":
        return f"{value} is too small (minimum {ctx.get('ge')})"
    return str(err["msg"])


def _unknown_key_message(loc: Sequence[Any]) -> str:
    key = loc[-1]
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown key {key!r}"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "expected one of: " + ", ".join(known)
    return f"unknown key {key!r} ({hint})"


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class validating the mapping at ``loc`` (for unknown-key suggestions)."""
    model: type[BaseModel] = Config
    fields: dict[str, type[BaseModel]] = {
        "vips": Vip,
        "backends": Backend,
        "health_check": HealthCheck,
        "maglev": Maglev,
        "flows": Flows,
    }
    for seg in loc:
        if isinstance(seg, int):
            continue  # a list index: same element model
        if seg not in fields or seg not in model.model_fields:
            return None
        model = fields[seg]
    return model
