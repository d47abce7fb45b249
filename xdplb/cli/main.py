"""The ``xdplb`` command line.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error, 3 nothing attached.

Every command imports what it needs when it runs: readers such as ``status`` read a few map
entries, and pydantic, numpy, pyroute2 or BCC would cost them more than the reading does.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import TYPE_CHECKING, NoReturn

import click

from xdplb import __version__
from xdplb.abi.layout import layout_version

if TYPE_CHECKING:
    from xdplb.config import Config

EXIT_RUNTIME, EXIT_USAGE, EXIT_NOTHING = 1, 2, 3
NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000


def fail(msg: str, code: int) -> NoReturn:
    click.echo(f"xdplb: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="xdplb",
                      message="%(prog)s %(version)s (map layout " + layout_version() + ")")
@click.option("--netns", metavar="NAME", help="Run in network namespace NAME (/run/netns/NAME).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(netns: str | None, verbose: bool) -> None:
    """xdplb: an XDP/eBPF L4 load balancer with Maglev consistent hashing."""
    from xdplb.cli import journal

    journal.setup(verbose)  # under journald: no timestamp of our own, a priority prefix
    _leave_netns_exec_mounts()
    if netns:
        try:
            # Network namespace only: bpffs (and our pins) stay those of the host mount ns.
            _setns(netns)
        except FileNotFoundError:
            fail(f"no network namespace {netns!r} (`ip netns list` shows those there are); "
                 "nothing was created", EXIT_USAGE)
        except OSError as e:
            fail(f"cannot enter network namespace {netns}: {e}", EXIT_USAGE)


def _leave_netns_exec_mounts() -> None:
    """Under `ip netns exec`, go back to the mount namespace it left, where bpffs and the
    pins are those `--netns` sees (``pins.enter_origin_mount_ns``). Before any thread."""
    from xdplb.instance import pins

    try:
        pins.enter_origin_mount_ns()
    except OSError as e:  # then attach refuses to pin (pins.ensure_bpffs), naming --netns
        click.echo(f"xdplb: warning: {e}: bpffs stays hidden; use `xdplb --netns`", err=True)


def _setns(name: str) -> None:
    """Enter network namespace ``name`` (of /run/netns, or a path to a namespace file) in
    the calling thread (the CLI has only one). A missing one is FileNotFoundError: never
    created, as pyroute2's setns would."""
    path = name if os.sep in name else os.path.join(NETNS_DIR, name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _load(path: str, here: bool = False) -> Config:
    """The config at ``path``, or exit 2 saying what is wrong. ``here``: also refuse backends
    at this network namespace's own addresses (as the agent running here would)."""
    from xdplb.config import ConfigError, load_config

    try:
        if here:
            from xdplb.kernel.localaddrs import local_addresses, local_port_range

            return load_config(path, local_addresses=local_addresses(),
                               local_port_range=local_port_range())
        return load_config(path)
    except ConfigError as e:
        fail(f"invalid config, nothing changed:\n{e}", EXIT_USAGE)


def _duration(option: str, text: str) -> float:
    """A duration as pool.yaml writes them ("2s", "500ms", 0), or exit 2."""
    from pydantic import TypeAdapter, ValidationError

    from xdplb.config.schema import OptionalDuration

    try:
        return TypeAdapter(OptionalDuration).validate_python(
            float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValidationError as e:
        fail(f"{option}: {e.errors()[0]['msg']}", EXIT_USAGE)


@main.command()
@click.argument("ifaces", nargs=-1, metavar="[IFACE...]")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="pool.yaml (its `interfaces:` when no IFACE is given)")
@click.option("--mode", type=click.Choice(["native", "generic", "auto"]), default="auto",
              show_default=True, help="XDP mode; auto: native, else generic with a warning.")
@click.option("--keep", is_flag=True, help="Leave program and pinned maps in place on exit.")
@click.option("--datapath", type=click.Choice(["bpf", "scapy"]), default="bpf", show_default=True,
              help="bpf: the XDP program; scapy: the Python data path (no BCC, slower).")
@click.option("--metrics-addr", metavar="HOST:PORT",
              help="Serve Prometheus metrics on http://HOST:PORT/metrics (off by default).")
@click.option("--drain-time", default="2s", show_default=True, metavar="DURATION",
              help="On stop: time between withdrawing the BGP routes and detaching.")
@click.option("--flow-sweep", default="30s", show_default=True, metavar="DURATION",
              help="With --metrics-addr: how often the flow table is read for the metrics "
                   "only it gives (tracked and active flows, fill, unseen ends).")
def attach(ifaces: tuple[str, ...], config_path: str, mode: str, keep: bool, datapath: str,
           metrics_addr: str | None, drain_time: str, flow_sweep: str) -> None:
    """Attach to IFACE(s) and balance until Ctrl-C/SIGTERM (first IFACE faces clients)."""
    from xdplb.agent import faults, metrics
    from xdplb.agent.core import Agent
    from xdplb.agent.errors import AttachError, UsageError
    from xdplb.kernel.pinned import CompileError

    if metrics_addr:
        try:
            metrics.parse_addr(metrics_addr)
        except ValueError as e:
            fail(str(e), EXIT_USAGE)
    drain_s = _duration("--drain-time", drain_time)
    sweep_s = _duration("--flow-sweep", flow_sweep)
    cfg = _load(config_path)
    ifaces = ifaces or cfg.interfaces or ()  # the command line wins over the config file
    if not ifaces:
        fail(f"no interface: name one (`xdplb attach IFACE --config ...`) or list them under "
             f"`interfaces:` in {config_path}", EXIT_USAGE)
    server = None
    try:
        agent = Agent(cfg, list(ifaces), mode=mode, keep=keep, config_path=config_path,
                      datapath=datapath, drain_time=drain_s,
                      flow_sweep=sweep_s if metrics_addr else 0.0)
        if metrics_addr:  # bound before attaching: a taken port changes nothing
            server = metrics.serve(metrics_addr, agent.group)
        agent.start()
    except UsageError as e:
        fail(str(e), EXIT_USAGE)
    except (AttachError, CompileError, OSError) as e:
        fail(str(e), EXIT_RUNTIME)
    finally:
        if server is not None and not agent.attached:
            server.close()
    if faults.enabled():
        click.echo(f"xdplb: fault injection armed by ${faults.ENV}", err=True)
    stop = ("SIGTERM leaves the data path in place (`xdplb detach` removes it)" if keep
            else "Ctrl-C to detach")
    click.echo(f"xdplb: attached to {', '.join(ifaces)}; {stop}", err=True)
    try:
        agent.run()
    except Exception as e:  # the loop survives its events' errors; this is a bug's last stop
        fail(f"the agent failed ({type(e).__name__}: {e}); the data path was left in place",
             EXIT_RUNTIME)
    finally:
        if server is not None:
            server.close()


@main.command()
@click.argument("iface", required=False)
@click.option("--force", is_flag=True, help="Also remove an XDP program that is not xdplb's.")
@click.option("--all", "stale", is_flag=True,
              help="Remove the pins of instances whose namespace or interface is gone.")
def detach(iface: str | None, force: bool, stale: bool) -> None:
    """Remove program, pins and drains of IFACE (stopping its running agent), or --all stale."""
    from xdplb.agent.detach import detach as do_detach
    from xdplb.agent.detach import detach_stale
    from xdplb.agent.errors import UsageError

    if (iface is None) == (not stale):
        fail("name an interface, or give --all (not both)", EXIT_USAGE)
    try:
        lines = detach_stale() if stale else do_detach(iface, force=force)
        if not lines:
            raise LookupError("no pins of a gone namespace or interface")
        for line in lines:
            click.echo(line)
    except UsageError as e:
        fail(str(e), EXIT_USAGE)
    except LookupError as e:
        fail(f"{e}; nothing to do", EXIT_NOTHING)
    except OSError as e:
        fail(str(e), EXIT_RUNTIME)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Attached interfaces, XDP mode, VIPs and backends."""
    from xdplb.inspect.status import collect, render

    groups = collect()
    if not groups:
        if as_json:
            click.echo(json.dumps({"groups": []}))
        fail("no xdplb program in this network namespace; run `xdplb attach IFACE "
             "--config pool.yaml`", EXIT_NOTHING)
    click.echo(json.dumps({"groups": groups}, indent=2) if as_json else render(groups))


@main.command()
@click.argument("iface", required=False)
@click.option("--pid", type=int, help="The agent with this pid (a unit's $MAINPID).")
def reload(iface: str | None, pid: int | None) -> None:
    """Apply the edited config file of the running agent (same as SIGHUP to it)."""
    from xdplb.cli import control

    try:
        run = control.find_agent(iface, pid)
        _load(run.info["config"], here=True)  # says what is wrong, exit 2, agent untouched
        ev = control.reload(run)
    except control.NoAgent as e:
        fail(str(e), EXIT_NOTHING)
    except (OSError, TimeoutError) as e:
        fail(str(e), EXIT_RUNTIME)
    if not ev["ok"]:
        fail(ev["message"], EXIT_RUNTIME if ev.get("error") else EXIT_USAGE)
    click.echo(f"reloaded: {ev['message']} (generation {ev['generation']})")


def _drain(vip: str, backend: str, iface: str | None, drained: bool) -> None:
    from xdplb.cli import control
    from xdplb.config import ConfigError

    try:
        run = control.find_agent(iface)
        label, ev = control.set_drain(run, vip, backend, drained)
    except control.NoAgent as e:
        fail(str(e), EXIT_NOTHING)
    except ConfigError as e:
        fail(f"the agent's config no longer validates:\n{e}", EXIT_USAGE)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    except (OSError, TimeoutError) as e:
        fail(str(e), EXIT_RUNTIME)
    if not ev["ok"]:  # the drain list is written: the agent's retry applies it
        fail(f"{label}: the agent could not apply it yet: {ev['message']} (`xdplb status` "
             "shows when it has)", EXIT_RUNTIME)
    state = "drained: no new flows, established ones continue" if drained else "undrained"
    click.echo(f"{label} {state} (generation {ev['generation']})")


@main.command()
@click.argument("vip")
@click.argument("backend")
@click.option("--iface", help="Interface of the agent, when several run here.")
def drain(vip: str, backend: str, iface: str | None) -> None:
    """Stop new flows to BACKEND of VIP (name or ADDR:PORT); established flows stay."""
    _drain(vip, backend, iface, True)


@main.command()
@click.argument("vip")
@click.argument("backend")
@click.option("--iface", help="Interface of the agent, when several run here.")
def undrain(vip: str, backend: str, iface: str | None) -> None:
    """Let BACKEND of VIP take new flows again."""
    _drain(vip, backend, iface, False)


def _drain_node(iface: str | None, drained: bool) -> None:
    from xdplb.cli import control

    try:
        run = control.find_agent(iface)
        ev = control.set_node_drain(run, drained)
    except control.NoAgent as e:
        fail(str(e), EXIT_NOTHING)
    except (OSError, TimeoutError) as e:
        fail(str(e), EXIT_RUNTIME)
    if not ev["ok"]:
        fail(f"the agent could not apply it yet: {ev['message']}", EXIT_RUNTIME)
    state = ("drained: its BGP routes are withdrawn, the data path keeps serving what still "
             "arrives" if drained else "undrained: its BGP routes are announced again")
    click.echo(f"node {state} (generation {ev['generation']})")


@main.command("drain-node")
@click.option("--iface", help="Interface of the agent, when several run here.")
def drain_node(iface: str | None) -> None:
    """Withdraw every BGP announcement of this node without stopping it."""
    _drain_node(iface, True)


@main.command("undrain-node")
@click.option("--iface", help="Interface of the agent, when several run here.")
def undrain_node(iface: str | None) -> None:
    """Announce this node's VIP addresses again (those that have healthy backends)."""
    _drain_node(iface, False)


@main.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
def check_config(config_path: str) -> None:
    """Validate a pool.yaml without touching anything."""
    cfg = _load(config_path)
    n = sum(len(v.backends) for v in cfg.vips)
    click.echo(f"{config_path}: OK ({len(cfg.vips)} VIPs, {n} backends)")


from xdplb.cli import decap as cli_decap  # noqa: E402 (registers on `main`, defined above)
from xdplb.cli import inspect as cli_inspect  # noqa: E402
from xdplb.cli import offline as cli_offline  # noqa: E402

for _command in (*cli_inspect.COMMANDS, *cli_offline.COMMANDS):
    main.add_command(_command)
main.add_command(cli_decap.decap)
