"""Load pool.yaml: ruamel.yaml's round-trip loader keeps the line of every key, so each pydantic
error ``loc`` is mapped back to ``FILE:LINE: field.path: message``. All problems found are
reported together in one :class:`ConfigError`. See docs/config.md.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Iterator, Sequence
from ipaddress import IPv4Address
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ValidationError,
)
from ruamel.yaml.scalarbool import ScalarBoolean

from xdplb.config.discovery import BackendsFrom, DnsDiscovery
from xdplb.config.errors import (
    PROBLEMS,
    ConfigError,
    ConfigProblem,
    Loc,
    Problem,
    describe,
    format_loc,
)
from xdplb.config.schema import (
    LOCAL_ADDRESSES,
    LOCAL_PORT_RANGE,
    MAGLEV,
    Backend,
    Config,
    Flows,
    HealthCheck,
    Maglev,
    Vip,
    VipFacts,
    VipMaglev,
    backend_address_problems,
    capacity_problems,
    none_as_empty,
    source_port_problems,
    table_fit_problems,
    uniqueness_problems,
    valid_or_none,
)
from xdplb.config.yamlread import load_tree, read_text

# --- loading -------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], *, local_addresses: Collection[IPv4Address] = frozenset(),
    local_port_range: tuple[int, int] | None = None,
) -> Config:
    """Read and validate a pool.yaml file; raise :class:`ConfigError` listing every problem.

    ``local_addresses`` are the balancer's own addresses (of the network namespace it runs
    in): a backend at one of them is refused too. Only the agent knows them; ``check-config``
    may run elsewhere. ``local_port_range`` (its ip_local_port_range) likewise: fullnat source
    ports must not overlap it.
    """
    filename = os.fspath(path)
    return parse_config(read_text(filename), filename, local_addresses=local_addresses,
                        local_port_range=local_port_range)


def parse_config(
    text: str,
    filename: str = "<string>",
    *,
    local_addresses: Collection[IPv4Address] = frozenset(),
    local_port_range: tuple[int, int] | None = None,
) -> Config:
    """Parse and validate pool.yaml text; ``filename`` is only used in error messages."""
    tree = load_tree(text, filename)
    if tree is None:
        msg = "the file is empty (expected a mapping with a 'vips' list)"
        raise ConfigError([ConfigProblem(filename, None, "", msg)])
    data = _to_plain(tree)
    local = frozenset(local_addresses)
    try:
        return Config.model_validate(data, context={LOCAL_ADDRESSES: local,
                                                    LOCAL_PORT_RANGE: local_port_range})
    except ValidationError as e:
        found = [*_problems(e, tree, filename), *_partial_problems(data, tree, filename, local)]
        # The partial checks may repeat what pydantic already reported; keep the first of each.
        unique = list(dict.fromkeys(found))
        raise ConfigError(sorted(unique, key=lambda p: (p.line is not None, p.line or 0))) from None


def check_backends_not_local(
    cfg: Config, local_addresses: Collection[IPv4Address], path: str | None = None,
    local_port_range: tuple[int, int] | None = None,
) -> None:
    """Raise :class:`ConfigError` if a backend of ``cfg`` is at one of the balancer's own
    addresses, or fullnat source ports overlap the host's ``local_port_range``; lines come
    from ``path``, the file ``cfg`` was loaded from (read again only when there is a
    problem: the common case costs no parse)."""
    local = frozenset(local_addresses)
    problems = [*backend_address_problems([VipFacts.of(i, v) for i, v in enumerate(cfg.vips)],
                                          local),
                *source_port_problems(cfg.vips, local, local_port_range)]
    if not problems:
        return
    if path is not None:
        # raises, with lines, unless the file changed
        load_config(path, local_addresses=local, local_port_range=local_port_range)
    raise ConfigError([ConfigProblem(path or "<config>", None, "vips" + format_loc(loc), msg)
                       for loc, msg, _ in problems])


def _to_plain(node: Any) -> Any:
    """Turn ruamel's round-trip types into plain Python ones so strict types behave as usual.
    The tree is bounded (yamlread: depth, expanded size, no recursive aliases)."""
    if isinstance(node, dict):
        return {_to_plain(k): _to_plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_plain(v) for v in node]
    # ScalarBoolean (an anchored true/false) subclasses int, not bool: it must not pass as 1.
    if isinstance(node, bool | ScalarBoolean):
        return bool(node)
    for plain in (int, float, str):
        if isinstance(node, plain):
            return plain(node)
    return node


def _problems(exc: ValidationError, tree: Any, filename: str) -> Iterator[ConfigProblem]:
    for err in exc.errors(include_url=False):
        loc: Loc = tuple(err["loc"])
        if err["type"] == PROBLEMS:
            for sub, msg, ref in err["ctx"]["problems"]:
                yield _custom_problem(loc, (sub, msg, ref), tree, filename)
        else:
            line, path = _locate(tree, loc, key_line=err["type"] == "extra_forbidden")
            yield ConfigProblem(filename, line, path, _message(err))


def _custom_problem(base: Loc, problem: Problem, tree: Any, filename: str) -> ConfigProblem:
    sub, msg, ref = problem
    if ref is not None:
        ref_line, ref_path = _locate(tree, base + ref)
        msg = msg.replace("{where}", f"{ref_path} on line {ref_line}" if ref_line else ref_path)
    line, path = _locate(tree, base + sub)
    return ConfigProblem(filename, line, path, msg)


def _partial_problems(
    data: Any, tree: Any, filename: str, local: frozenset[IPv4Address]
) -> Iterator[ConfigProblem]:
    """Run the cross-VIP checks on whatever parts of the raw VIPs are valid (see VipFacts);
    not on a file over the capacity limits, which is reported with that problem alone."""
    if not isinstance(data, dict) or not isinstance(data.get("vips"), list):
        return
    if capacity_problems(data["vips"]):
        return
    facts = [VipFacts.from_raw(i, raw) for i, raw in enumerate(data["vips"])]
    for problem in [*uniqueness_problems(facts), *backend_address_problems(facts, local)]:
        yield _custom_problem(("vips",), problem, tree, filename)
    maglev = valid_or_none(MAGLEV, none_as_empty(data.get("maglev")))
    if maglev is not None:
        for problem in table_fit_problems(maglev, facts):
            yield _custom_problem((), problem, tree, filename)


def _locate(tree: Any, loc: Loc, key_line: bool = False) -> tuple[int | None, str]:
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
        "bool_type": "true or false",
    }
    if kind in expected:
        return f"expected {expected[kind]}, got {describe(value)}"
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
        "backends_from": BackendsFrom,
        "dns": DnsDiscovery,
    }
    for seg in loc:
        if isinstance(seg, int):
            continue  # a list index: same element model
        if seg not in fields or seg not in model.model_fields:
            return None
        model = VipMaglev if (model, seg) == (Vip, "maglev") else fields[seg]
    return model
