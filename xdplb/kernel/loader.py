"""Compiling and loading the XDP program with BCC.

BCC is imported only here, lazily, so everything else (the CLI's readers, the scapy data
path, config checks) works on a machine without it. The agent does not import this module:
it compiles in a child (``pinned.build_pinned``) so that LLVM never stays in its memory;
short-lived commands (``trace``, the test engines) compile in-process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdplb.abi.layout import MAPS, half_open_max, render_maps, render_structs
from xdplb.kernel.pinned import CompileError  # defined there: the agent raises it without BCC

MAIN_SOURCE = "xdplb.c"
ENTRY = "xdplb_main"


def bpf_dir() -> Path:
    """Where the C sources are: package data ``xdplb.bpf`` (``bpf/`` of the checkout, mapped
    by pyproject.toml; a wheel carries a copy)."""
    spec = importlib.util.find_spec("xdplb.bpf")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / MAIN_SOURCE).is_file():
            return Path(loc)
    raise CompileError(f"the BPF sources ({MAIN_SOURCE}) are not installed with xdplb "
                       f"(looked in {', '.join(locations) or 'no xdplb.bpf package'})")


@dataclass
class Program:
    """A loaded (not yet attached) program and its maps. Keep it alive while in use."""

    bpf: Any  # bcc.BPF
    prog_fd: int
    map_fds: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        """Release our fds; pinned or attached objects stay alive in the kernel."""
        self.bpf.cleanup()


def generated_sources(
    flow_max: int, pin_dir: str | None, pinned: frozenset[str] | None = None
) -> dict[str, str]:
    """The generated header and -D flags for one build."""
    return {
        "layout.h": render_structs() + render_maps(pin_dir, pinned),
        "XL_FLOW_MAX": str(flow_max),
        "XL_HALF_OPEN_MAX": str(half_open_max(flow_max)),
    }


def compile_program(
    flow_max: int,
    pin_dir: Path | None = None,
    source: str | Path = MAIN_SOURCE,
    pinned: frozenset[str] | None = None,
) -> Program:
    """Compile bpf/<source> (or the C file at a given path, whose quoted includes are looked
    up beside it, then in bpf/) against the generated layout and load its entry point.

    With ``pin_dir`` the maps (all, or only those named in ``pinned``) are pinned there;
    maps already pinned there are reused, which is what keeps flows alive across agent
    restarts and program upgrades. Unpinned maps are private to this program (e.g. a trace
    that shares the live config maps but must not touch the live flow table).
    """
    dirs = [bpf_dir()]
    if isinstance(source, Path):
        dirs.insert(0, source.parent)
        source = source.name
    if not (dirs[0] / source).is_file():
        raise CompileError(f"BPF source {dirs[0] / source} not found")
    if pin_dir is not None and pinned is None:
        pin_dir.mkdir(parents=True, exist_ok=True)

    gen = generated_sources(flow_max, str(pin_dir) if pin_dir else None, pinned)
    text = inline_includes(source, {"layout.h": gen["layout.h"]}, dirs)
    cflags = [
        f"-DXL_FLOW_MAX={gen['XL_FLOW_MAX']}",
        f"-DXL_HALF_OPEN_MAX={gen['XL_HALF_OPEN_MAX']}",
        "-Wno-unused-function",
    ]
    return load_xdp(text, ENTRY, source, [m.name for m in MAPS], cflags)


def load_xdp(text: str, entry: str, source: str, maps: list[str],
             cflags: list[str] | None = None) -> Program:
    """Compile one translation unit with BCC and load its XDP function ``entry``, with the
    fds of the maps named in ``maps``; compiler noise is shown only when it fails."""
    try:
        from bcc import BPF  # Debian's python3-bpfcc
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise CompileError(
            "BCC is not importable (install python3-bpfcc and use a venv created with "
            "--system-site-packages; scripts/setup.sh does both)"
        ) from e
    quiet = _quiet_stderr()
    try:
        with quiet:
            bpf = BPF(text=text.encode(), cflags=cflags or ["-Wno-unused-function"])
            fn = bpf.load_func(entry.encode(), BPF.XDP)
    except Exception as e:
        raise CompileError(f"compiling {source} failed: {e}\n{quiet.errors()}") from e
    map_fds = {name: bpf.get_table(name.encode()).get_fd() for name in maps}
    return Program(bpf=bpf, prog_fd=fn.fd, map_fds=map_fds)


_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


def inline_includes(source: str, generated: dict[str, str], dirs: list[Path]) -> str:
    """One translation unit from <dir>/<source>: quoted includes, generated or found in the
    first of ``dirs`` that has them, are pasted in (once each).

    BCC rewrites map method calls (``flows.lookup()``) only in its main file, so the
    program's own headers cannot stay separate files at compile time.
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        if name in generated:
            body = generated[name]
        else:
            found = [d / name for d in dirs if (d / name).is_file()]
            if not found:
                raise CompileError(f"{name} (included) not found in {', '.join(map(str, dirs))}")
            body = found[0].read_text()
        body = body.replace("#pragma once\n", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), body)

    return expand(source)


class _quiet_stderr:
    """BCC prints compiler diagnostics (and warnings from the skewed kernel headers) to fd 2.
    Capture them: shown only when compilation fails, as part of the error."""

    def __enter__(self) -> _quiet_stderr:
        self.saved = os.dup(2)
        self.buf = tempfile.TemporaryFile()
        if not os.environ.get("XDPLB_BCC_VERBOSE"):
            os.dup2(self.buf.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.buf.seek(0)
        self.text = self.buf.read().decode(errors="replace")
        self.buf.close()

    def errors(self) -> str:
        """The compiler's error lines (warnings dropped), for the exception message."""
        lines = self.text.splitlines()
        keep = [i for i, line in enumerate(lines) if "error:" in line]
        out = []
        for i in keep[:5]:
            out += lines[i : i + 3]
        return "\n".join(out) or self.text[-2000:]
