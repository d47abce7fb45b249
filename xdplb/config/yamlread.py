"""Reading pool.yaml as YAML, bounded: whatever a file holds, reading it takes bounded time and
memory and ends in a tree or a :class:`ConfigError`, never in another exception (the agent
reads the file on every reload while it balances, so a file must not be able to end it).

What is bounded, and where:

- size: at most ``MAX_BYTES`` are read (a 5 GB file or ``/dev/zero`` costs no more);
- lines: their number and length, before parsing. ruamel.yaml's round-trip scanner builds a
  comment, and a run of empty lines, one character at a time (``s += ch``), which turns
  quadratic on long ones: a 1 MiB comment line took 23 s here, 1 MiB of empty lines 15 s;
- characters: NUL and other control characters are refused with their line before parsing;
- nesting depth, the length of one value, and the number of values once aliases are
  expanded (a "billion laughs" file is 9 lines): counted while ruamel.yaml composes the
  node tree (:class:`_BoundedComposer`). ruamel itself shares an aliased node instead of
  copying it, so the tree stays small, but everything after it (``loader._to_plain``,
  pydantic) walks the expanded document; a recursive alias would make it infinite;
- tags: a pool.yaml holds plain values, so explicit tags (``!!omap``, ``!!python/...``) are
  refused, which keeps ruamel's rarer constructors out of reach;
- a value ruamel cannot construct (``2001-13-45`` resolves as a timestamp) is reported at
  its line instead of escaping as a ValueError.
"""

from __future__ import annotations

import re
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent, ScalarEvent

from xdplb.abi.layout import MAX_BACKENDS
from xdplb.config.errors import ConfigError, ConfigProblem

# A full pool (xdplb.abi.layout's limits) takes ~60 bytes and ~8 values a backend; these leave
# several times that room and follow the limits if they grow.
MAX_BYTES = max(1 << 20, 256 * MAX_BACKENDS)
MAX_LINES = max(50_000, 12 * MAX_BACKENDS)
MAX_NODES = max(50_000, 12 * MAX_BACKENDS)
MAX_LINE_CHARS = 4096  # a flow list of every HTTP status code is 2.5 KB
MAX_DEPTH = 16  # pool.yaml nests 6 deep (vips / [i] / backends / [j] / address / value)
MAX_VALUE_CHARS = 1024  # names are at most 64 characters, an HTTP path a few hundred

# Characters YAML allows in a stream (YAML 1.2, 5.1); anything else is refused with its line.
_NOT_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def read_text(filename: str) -> str:
    """The file's text, at most ``MAX_BYTES`` of it: the read stops there, whatever the file."""
    try:
        with open(filename, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise _error(filename, None, "config file not found") from None
    except OSError as e:
        raise _error(filename, None, f"cannot read: {e.strerror or e}") from None
    _check_size(len(data), filename)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _error(filename, line, f"not valid UTF-8 (byte {e.start})") from None


def load_tree(text: str, filename: str) -> Any:
    """Parse one YAML document in round-trip mode (keeps lines); None for an empty file."""
    _check_text(text, filename)
    yaml = YAML(typ="rt")
    yaml.Composer = _BoundedComposer
    yaml.Constructor = _GuardedConstructor
    try:
        return yaml.load(text)
    except _Refused as e:
        raise _error(filename, e.line, e.message) from None
    except MarkedYAMLError as e:
        raise ConfigError([_yaml_problem(e, filename)]) from None
    except YAMLError as e:
        raise _error(filename, None, f"invalid YAML: {' '.join(str(e).split())}") from None
    except Exception as e:  # last resort: an assert deep in ruamel must not end an agent either
        raise _error(filename, None, f"invalid YAML: {type(e).__name__}: {e}") from None


def _check_text(text: str, filename: str) -> None:
    _check_size(len(text), filename)  # a str: len() is a lower bound of its UTF-8 size
    if text.count("\n") >= MAX_LINES:
        raise _error(filename, None, f"the file has more than {MAX_LINES} lines")
    if bad := _NOT_PRINTABLE.search(text):
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        raise _error(filename, line, f"invalid YAML: control character U+{ord(bad[0]):04X} "
                                     f"in column {column} (not allowed in YAML)")
    for i, line in enumerate(text.split("\n")):
        if len(line) > MAX_LINE_CHARS:
            raise _error(filename, i + 1, f"a line of {len(line)} characters "
                                          f"(at most {MAX_LINE_CHARS} accepted)")


def _check_size(n: int, filename: str) -> None:
    if n > MAX_BYTES:
        raise _error(filename, None, f"the file is larger than {MAX_BYTES} bytes "
                                     "(a pool.yaml at the data path's limits needs far less)")


def _error(filename: str, line: int | None, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(filename, line, "", message)])


def _yaml_problem(e: MarkedYAMLError, filename: str) -> ConfigProblem:
    mark = e.problem_mark or e.context_mark
    line = mark.line + 1 if mark is not None else None
    msg = e.problem or e.context or "syntax error"
    if e.problem and e.context:
        ctx_line = e.context_mark.line + 1 if e.context_mark is not None else None
        where = f" started on line {ctx_line}" if ctx_line not in (None, line) else ""
        msg = f"{msg} ({e.context}{where})"
    return ConfigProblem(filename, line, "", f"invalid YAML: {msg}")


class _Refused(Exception):
    """Input over one of the limits, at a position."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.line: int | None = mark.line + 1 if mark is not None else None


class _BoundedComposer(Composer):
    """ruamel's composer, counting depth and values as it builds the tree.

    Every node counts once, an alias as the number of values it stands for (its anchored
    node's expanded size, known once that node is complete), so the count is the size of
    the expanded document and stops the first alias that would take it past ``MAX_NODES``.
    An alias to a node not yet complete is one inside itself: recursive.
    """

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self._xl_depth = 0
        self._xl_nodes = 0
        self._xl_sizes: dict[int, int] = {}  # id(anchored node) -> expanded size

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        mark = event.start_mark
        if isinstance(event, AliasEvent):
            node = super().compose_node(parent, index)
            size = self._xl_sizes.get(id(node))
            if size is None:
                raise _Refused(f"invalid YAML: recursive alias *{event.anchor} "
                               "(a node contains itself)", mark)
            self._add(size, mark)
            return node
        if event.tag not in (None, "!"):
            tag = re.sub(r"^tag:yaml\.org,2002:", "!!", event.tag)
            raise _Refused(f"invalid YAML: tag {tag} is not accepted "
                           "(pool.yaml holds plain values)", mark)
        if isinstance(event, ScalarEvent) and len(event.value) > MAX_VALUE_CHARS:
            raise _Refused(f"a value of {len(event.value)} characters "
                           f"(at most {MAX_VALUE_CHARS} accepted)", mark)
        if self._xl_depth >= MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep "
                           "(pool.yaml needs 6)", mark)
        before = self._xl_nodes
        self._xl_depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._xl_depth -= 1
        self._add(1, mark)
        if event.anchor is not None:
            self._xl_sizes[id(node)] = self._xl_nodes - before
        return node

    def _add(self, n: int, mark: Any) -> None:
        self._xl_nodes += n
        if self._xl_nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} values once aliases are expanded "
                           "(an alias bomb?)", mark)


class _GuardedConstructor(RoundTripConstructor):
    """Reports a value ruamel fails to construct (``int('1' * 5000)``, a timestamp with month
    13) at its line: those raise ValueError and the like, not YAMLError."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (YAMLError, _Refused):
            raise
        except Exception as e:  # whatever a value is, it is a config problem, not a crash
            raise _Refused(f"invalid YAML: cannot read {node.value!r}: {e}"
                           if isinstance(node.value, str) else f"invalid YAML: {e}",
                           node.start_mark) from None
