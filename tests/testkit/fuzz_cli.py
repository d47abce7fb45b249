"""The differential fuzz from the command line, as root, from the checkout:

    bash scripts/fuzz.sh --frames 5000000 --seed 7

The same frames through the BPF program and the scapy data path in a private network
namespace; exit 1 at the first difference. A developer's tool, not part of the package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

# The fuzz's pools come from the lab's builder (scripts/netns/pools.py), as in the tests.
sys.path.append(str(Path(__file__).resolve().parents[2] / "scripts" / "netns"))

from testkit.benchns import bench_namespace  # noqa: E402
from testkit.fuzz import FrameGen, base_config, run_fuzz  # noqa: E402
from xdplb.kernel.loader import CompileError  # noqa: E402
from xdplb.offline.engines import engine_pair  # noqa: E402


@click.command()
@click.option("--frames", type=click.IntRange(1), default=100_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epoch", type=click.IntRange(1), default=5000, show_default=True,
              help="Frames between changes of the backend sets.")
def fuzz(frames: int, seed: int, epoch: int) -> None:
    """Differential fuzzing of the two data paths; exit 1 at the first difference."""

    def progress(n: int) -> None:
        click.echo(f"fuzz: {n} frames, no difference so far", err=True)

    try:
        with (bench_namespace(f"xdplb-fuzz-{os.getpid()}") as bench,
              engine_pair(base_config(), bench.attached) as (bpf, py)):
            rep = run_fuzz(bpf, py, FrameGen(seed, bench), frames, epoch=epoch,
                           progress=progress)
    except (CompileError, OSError) as e:
        click.echo(f"fuzz: {e}", err=True)
        sys.exit(1)
    rates = ", ".join(f"{n} {rep.rate(n):.0f} frames/s" for n in rep.seconds)
    click.echo(f"{rep.frames} frames (seed {seed}, {rep.epochs} backend-set changes): {rates}")
    click.echo("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.verdicts.items())))
    click.echo("flow effects: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.effects.items())))
    if rep.difference:
        click.echo(f"DIFFERENCE: {rep.difference}")
        sys.exit(1)
    click.echo("no difference")


if __name__ == "__main__":
    fuzz()
