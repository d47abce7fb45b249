"""Configuration errors: each problem names file, line and field path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic_core import PydanticCustomError

# --- problems ------------------------------------------------------------------------------


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
PROBLEMS = "xdplb_problems"
Loc = tuple[str | int, ...]
Problem = tuple[Loc, str, Loc | None]


def fail(*problems: Problem | str) -> NoReturn:
    items = [((), p, None) if isinstance(p, str) else p for p in problems]
    summary = "; ".join(
        (f"{format_loc(loc)}: " if loc else "") + msg.replace("{where}", format_loc(ref or ()))
        for loc, msg, ref in items
    )
    raise PydanticCustomError(PROBLEMS, "{summary}", {"summary": summary, "problems": items})



def describe(value: Any) -> str:
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


def format_loc(loc: Loc) -> str:
    """Format a loc without a YAML tree (for pydantic's own error text)."""
    out = ""
    for seg in loc:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out
