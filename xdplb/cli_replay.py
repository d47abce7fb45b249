"""``xdplb replay`` and ``xdplb fuzz``: the data paths run offline, on frames from a capture
or from the differential fuzzer. Registered on the main command group by cli.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

DATAPATHS = ("bpf", "scapy")


@click.command()
@click.argument("capture", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="pool.yaml")
@click.option("--datapath", type=click.Choice(DATAPATHS), default="bpf", show_default=True,
              help="bpf: the XDP program under BPF_PROG_TEST_RUN; scapy: the Python one.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="pcap of the frames that leave the data path.")
@click.option("--iface", "ifaces", multiple=True, metavar="NAME",
              help="Frames arrive on NAME (the first given) and every NAME counts as attached "
                   "(repeat for two-armed). Default: loopback, nothing attached.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per packet.")
def replay(capture: str, config_path: str, datapath: str, out_path: str,
           ifaces: tuple[str, ...], as_json: bool) -> None:
    """Run every frame of CAPTURE through one data path without attaching anything."""
    from xdplb import xdp_link
    from xdplb.cli import EXIT_RUNTIME, EXIT_USAGE, _load, fail
    from xdplb.program import CompileError
    from xdplb.replay import CaptureError
    from xdplb.replay import replay as run_replay
    from xdplb.testrun import open_engine

    cfg = _load(config_path)
    try:
        indexes = [xdp_link.ifindex(n) for n in ifaces]
    except (OSError, LookupError) as e:
        fail(f"interface not found in this network namespace: {e}", EXIT_USAGE)
    try:
        engine = open_engine(datapath, cfg, indexes)
    except (CompileError, OSError) as e:
        fail(str(e), EXIT_RUNTIME)
    counts: dict[str, int] = {}
    try:
        for rec in run_replay(engine, Path(capture), Path(out_path),
                              indexes[0] if indexes else 0):
            counts[rec.verdict] = counts.get(rec.verdict, 0) + 1
            click.echo(json.dumps(rec.json()) if as_json else rec.line())
    except CaptureError as e:
        fail(str(e), EXIT_USAGE)
    finally:
        engine.close()
    summary = ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
    click.echo(f"xdplb: {sum(counts.values())} frames through {datapath} ({summary or 'none'}); "
               f"output in {out_path}", err=True)


@click.command()
@click.option("--frames", type=click.IntRange(1), default=100_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epoch", type=click.IntRange(1), default=5000, show_default=True,
              help="Frames between changes of the backend sets.")
def fuzz(frames: int, seed: int, epoch: int) -> None:
    """Differential fuzzing: the same frames through the BPF program and the scapy data
    path, in a private network namespace; exit 1 at the first difference."""
    from xdplb.benchns import bench_namespace
    from xdplb.cli import EXIT_RUNTIME, fail
    from xdplb.fuzz import FrameGen, base_config, run_fuzz
    from xdplb.program import CompileError
    from xdplb.testrun import engine_pair

    def progress(n: int) -> None:
        click.echo(f"xdplb fuzz: {n} frames, no difference so far", err=True)

    try:
        with (bench_namespace(f"xdplb-fuzz-{os.getpid()}") as bench,
              engine_pair(base_config(), bench.attached) as (bpf, py)):
            rep = run_fuzz(bpf, py, FrameGen(seed, bench), frames, epoch=epoch,
                           progress=progress)
    except (CompileError, OSError) as e:
        fail(str(e), EXIT_RUNTIME)
    rates = ", ".join(f"{n} {rep.rate(n):.0f} frames/s" for n in rep.seconds)
    click.echo(f"{rep.frames} frames (seed {seed}, {rep.epochs} backend-set changes): {rates}")
    click.echo("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.verdicts.items())))
    click.echo("flow effects: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.effects.items())))
    if rep.difference:
        click.echo(f"DIFFERENCE: {rep.difference}")
        sys.exit(1)
    click.echo("no difference")


COMMANDS = (replay, fuzz)
