"""Child process of ``pinned.build_pinned``: compile and load the program with BCC, pin it.

    python -m xdplb.kernel.build --ring-size N --flow-max N --pin-dir DIR

The maps are pinned in (or reused from) DIR by ``loader.compile_program``, the program at
DIR/``pinned.STAGED_PIN``. The last line on stdout is the report, JSON: the kernel ids of the
program and maps, or the error the parent raises again. Then the process exits, and LLVM with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xdplb.kernel import bpfsys
from xdplb.kernel.loader import compile_program
from xdplb.kernel.pinned import (
    BUILD_MODULE,
    STAGED_PIN,
    CompileError,
    object_ids,
    report_error,
)


def build(flow_max: int, pin_dir: Path) -> dict:
    """Compile, pin, and return the report (the ids of what was pinned)."""
    program = compile_program(flow_max, pin_dir)
    try:
        staged = pin_dir / STAGED_PIN
        staged.unlink(missing_ok=True)  # left by a build whose agent died before attaching
        bpfsys.obj_pin(program.prog_fd, staged)
        return object_ids(program.prog_fd, program.map_fds)
    finally:
        program.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {BUILD_MODULE}",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--flow-max", type=int, required=True)
    ap.add_argument("--pin-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        report = build(args.flow_max, args.pin_dir)
    except (CompileError, OSError) as e:
        print(json.dumps(report_error(e)), flush=True)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
