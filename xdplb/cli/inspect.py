"""Commands that look inside a running balancer: ``flows``, ``stats``, ``backends``,
``trace``. They read the pinned maps only, so they work from another shell while the agent
runs, and when only the pins are left. Registered on ``xdplb.cli.main``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from xdplb.abi.layout import TcpState

# numpy, BCC, pyroute2 and friends load only when one of these commands runs: every other
# xdplb command starts faster without them.
STATE_NAMES = [s.name.lower() for s in TcpState]

TABLE_LIMIT = 100  # rows a table shows unless --limit says otherwise

iface_arg = click.argument("iface", required=False)
json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
watch_opt = click.option("--watch", is_flag=True, help="Refresh until Ctrl-C, like top.")
interval_opt = click.option("--interval", type=click.FloatRange(min=0.0), default=1.0,
                            show_default=True, help="Seconds between refreshes / rate samples.")
count_opt = click.option("--count", type=click.IntRange(min=1),
                         help="With --watch: stop after N refreshes.")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Exceptions -> the documented exit codes, with a message that says what to do."""
    from xdplb.cli.main import EXIT_NOTHING, EXIT_RUNTIME, EXIT_USAGE, fail
    from xdplb.inspect.reader import Ambiguous, ForeignLayout, NothingAttached
    from xdplb.kernel.pinned import CompileError

    try:
        yield
    except NothingAttached as e:
        fail(str(e), EXIT_NOTHING)
    except (Ambiguous, ValueError) as e:
        fail(str(e), EXIT_USAGE)
    except BrokenPipeError:  # `xdplb flows --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (ForeignLayout, CompileError, RuntimeError, OSError) as e:
        fail(str(e), EXIT_RUNTIME)


def _loop(sample, show, watch: bool, interval: float, count: int | None, as_json: bool,
          prime: bool = False) -> None:
    from xdplb.cli import watch as watcher

    if not watch:
        count = 1
    elif interval <= 0:
        raise ValueError("--watch needs an --interval above 0")
    watcher.loop(sample, show, interval, count,
                 in_place=watch and not as_json and sys.stdout.isatty(), prime=prime)


# --- flows -------------------------------------------------------------------------------


@click.command()
@iface_arg
@click.option("--vip", metavar="NAME|ADDR[:PORT]", help="Only flows to this VIP.")
@click.option("--backend", metavar="ADDR[:PORT]", help="Only flows on this backend.")
@click.option("--client", metavar="ADDR[:PORT]", help="Only flows from this client.")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), help="Only this protocol.")
@click.option("--state", "states", multiple=True, type=click.Choice(STATE_NAMES),
              help="Only flows in this TCP state (repeatable).")
@click.option("--sort", metavar="KEY", help="Order: bytes (default), packets, rate (default "
              "with --watch), age, idle (largest first), client.")
@click.option("--limit", type=click.IntRange(min=0),
              help=f"At most N rows, 0 for all (default: all with --json, {TABLE_LIMIT} "
                   "in a table).")
@json_opt
@watch_opt
@interval_opt
@count_opt
def flows(iface: str | None, vip: str | None, backend: str | None, client: str | None,
          proto: str | None, states: tuple[str, ...], sort: str | None, limit: int | None,
          as_json: bool, watch: bool, interval: float, count: int | None) -> None:
    """Tracked flows: client, VIP, backend, packets and bytes each way, age, TCP state."""
    from xdplb.inspect import flowview
    from xdplb.inspect.flowtable import FlowFilter, FlowTable, order
    from xdplb.inspect.reader import Reader

    sort = sort or ("rate" if watch else "bytes")
    if limit is None:
        limit = 0 if as_json else TABLE_LIMIT

    def sample() -> tuple[FlowTable, Any, int]:  # filtered table, catalog, size before
        with Reader.open(iface) as r:
            flt = FlowFilter.build(
                r.catalog, vip, backend, client, proto,
                frozenset(STATE_NAMES.index(s) for s in states) if states else None)
            t = r.flows
            return t.take(flt.mask(t)), r.catalog, len(t)

    def show(cur: tuple[FlowTable, Any, int], prev: tuple[FlowTable, Any, int] | None,
             out: Any = None) -> str:
        t, cat, total = cur
        rates = t.byte_rates(prev[0]) if watch and prev else None
        idx = order(t, sort, rates)
        if limit:
            idx = idx[:limit]
        sel = t.take(idx)
        cols = flowview.columns(sel, cat, rates and (rates[0][idx], rates[1][idx]),
                                ts=round(time.time(), 3) if watch else None)
        if as_json:
            buf = out or io.StringIO()
            flowview.write_jsonl(cols, buf)
            return "" if out else buf.getvalue()
        head = (f"{len(t)} flows" + (f" match (of {total})" if len(t) != total else "")
                + f", table {total}/{t.capacity}; sorted by {sort}")
        if len(sel) < len(t):
            head += f"; first {len(sel)} (--limit 0 shows all)"
        return head + "\n" + flowview.table(cols) + "\n"

    with _errors():
        if as_json and not watch:  # the big case: stream straight out, no copy in memory
            show(sample(), None, out=sys.stdout)
            return
        _loop(sample, show, watch, interval, count, as_json)


# --- stats -------------------------------------------------------------------------------


@click.command()
@iface_arg
@json_opt
@watch_opt
@interval_opt
@count_opt
def stats(iface: str | None, as_json: bool, watch: bool, interval: float,
          count: int | None) -> None:
    """Packets, bytes and flows per VIP and backend, with rates; global counters and drops.

    Rates are measured over --interval (0: counters only, no wait)."""
    from xdplb.inspect import render
    from xdplb.inspect import stats as collector

    def sample() -> dict[str, Any]:
        from xdplb.inspect.reader import Reader

        with Reader.open(iface) as r:
            return collector.collect(r)

    def show(cur: dict[str, Any], prev: dict[str, Any] | None) -> str:
        if prev is not None:
            collector.add_rates(cur, prev)
        return json.dumps(cur) + "\n" if as_json else render.render_stats(cur)

    with _errors():
        _loop(sample, show, watch, interval, count, as_json, prime=interval > 0)


# --- backends ----------------------------------------------------------------------------


@click.command()
@iface_arg
@json_opt
@interval_opt
def backends(iface: str | None, as_json: bool, interval: float) -> None:
    """Backends: VIP, health and last check, weight, share of the Maglev table, flows; and
    each one's share of its VIP's new flows over --interval next to its weight's share
    (HOT: far above it; --interval 0: not sampled)."""
    from xdplb.inspect import backends as backend_rows
    from xdplb.inspect import render
    from xdplb.inspect.reader import Reader

    with _errors(), Reader.open(iface) as r:
        rows = backend_rows.collect(r)
        if interval > 0:
            backend_rows.sample_shares(r, rows, interval)
    click.echo(json.dumps({"backends": rows}, indent=2) if as_json
               else render.render_backends(rows))


# --- trace -------------------------------------------------------------------------------


@click.command()
@click.argument("proto", metavar="PROTO")
@click.argument("src", metavar="SRC:SPORT")
@click.argument("dst", metavar="DST:DPORT")
@click.option("--iface", help="The instance attached to IFACE (default: the only one).")
@json_opt
def trace(proto: str, src: str, dst: str, iface: str | None, as_json: bool) -> None:
    """Which backend a flow goes to now and why, from the real program (BPF_PROG_TEST_RUN
    on a synthetic packet; the live flow table is not touched)."""
    from xdplb.inspect import render
    from xdplb.inspect import trace as tracer
    from xdplb.inspect.reader import Reader

    with _errors():
        probe = tracer.Probe.parse(proto, src, dst)
        with Reader.open(iface) as r:
            res = tracer.trace(r, probe)
    click.echo(json.dumps(res, indent=2) if as_json else render.render_trace(res))
    if not res["agree"]:
        from xdplb.cli.main import EXIT_RUNTIME, fail

        fail("the program and the model DISAGREE: " + "; ".join(res["disagreements"]),
             EXIT_RUNTIME)


COMMANDS = (flows, stats, backends, trace)
