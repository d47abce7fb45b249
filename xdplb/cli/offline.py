"""``xdplb replay``: a data path run offline, on the frames of a capture. Registered on the
main command group by cli/main.py."""

from __future__ import annotations

import json
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
    from xdplb.cli.main import EXIT_RUNTIME, EXIT_USAGE, _load, fail
    from xdplb.kernel import xdp_link
    from xdplb.kernel.pinned import CompileError
    from xdplb.offline.engines import open_engine
    from xdplb.offline.replay import CaptureError
    from xdplb.offline.replay import replay as run_replay

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


COMMANDS = (replay,)
