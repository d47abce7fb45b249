"""``xdplb decap attach|detach|status``: the IPIP decapsulation program of a "dsr, encap ipip"
backend (bpf/decap.c). One-shot commands, like ``ip link set xdp``: after ``attach`` the
program stays attached and pinned (xdplb/instance/decap.py) until ``detach``. Registered on
the main command group by cli/main.py."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Any

import click

MODES = ("native", "generic", "auto")


class Refused(Exception):
    """The command cannot do what was asked, and changed nothing (exit 2)."""


@click.group()
def decap() -> None:
    """IPIP decapsulation in XDP for DSR backends (`dsr, encap ipip`)."""


@contextmanager
def _errors() -> Iterator[None]:
    """Exceptions -> the documented exit codes and a one-line message, never a traceback."""
    from xdplb.cli.main import EXIT_NOTHING, EXIT_RUNTIME, EXIT_USAGE, fail
    from xdplb.kernel.pinned import CompileError

    try:
        yield
    except Refused as e:
        fail(str(e), EXIT_USAGE)
    except LookupError as e:
        fail(str(e), EXIT_NOTHING)
    except OSError as e:
        if e.errno == errno.ENODEV:  # no such interface
            fail(str(e.strerror or e), EXIT_USAGE)
        fail(str(e), EXIT_RUNTIME)
    except (CompileError, ValueError) as e:
        fail(str(e), EXIT_RUNTIME)


def _ifindex(iface: str) -> int:
    from xdplb.kernel import xdp_link
    from xdplb.kernel.xdp_link import NoSuchInterface

    try:
        return xdp_link.ifindex(iface)
    except NoSuchInterface as e:
        raise OSError(errno.ENODEV, f"no interface {iface!r} in this network namespace") from e


def _owner(iface: str, prog_id: int) -> str:
    """Who the XDP program ``prog_id`` on ``iface`` belongs to, for a refusal."""
    from xdplb.instance import decap as places
    from xdplb.instance import pins
    from xdplb.kernel import decap as kdecap

    if any(pins.prog_id(g) == prog_id for g in pins.groups_with(iface)):
        return f"xdplb's balancer (program {prog_id}; `xdplb detach {iface}` removes it)"
    if any(kdecap.pinned_prog_id(d.path) == prog_id for d in places.every_version(iface)):
        return (f"the decap program of another xdplb version (program {prog_id}; "
                f"`xdplb decap detach {iface}` removes it)")
    return f"XDP program {prog_id}, which is not xdplb's (`ip link set {iface} xdp off`)"


def _addr_lines(added: list[IPv4Address], removed: list[IPv4Address],
                now: list[IPv4Address]) -> list[str]:
    out = [f"decapsulating IPIP to {', '.join(map(str, now)) or '(no address)'}"]
    if added or removed:
        change = [f"+{a}" for a in added] + [f"-{a}" for a in removed]
        out.append(f"addresses changed: {' '.join(change)}")
    return out


def decap_addresses() -> list[IPv4Address]:
    """The outer destinations to decapsulate for: this namespace's IPv4 addresses, without
    loopback ones (from the wire they are martians: the kernel drops them, let it)."""
    from xdplb.kernel.localaddrs import local_addresses

    return sorted(a for a in local_addresses() if not a.is_loopback)


def do_attach(iface: str, mode: str) -> list[str]:
    """Attach (or, when it is attached already, refresh its addresses). Returns the lines to
    print; raises Refused for a foreign XDP program."""
    from xdplb.instance import decap as places
    from xdplb.instance import pins
    from xdplb.kernel import bpfsys, xdp_link
    from xdplb.kernel import decap as kdecap

    index = _ifindex(iface)
    pins.ensure_bpffs()
    where = places.for_iface(iface)
    st = xdp_link.xdp_state(index)
    pinned = kdecap.pinned_prog_id(where.path) if where.complete() else None
    local = decap_addresses()
    if st is not None and st.prog_id:
        if st.prog_id != pinned:
            raise Refused(f"{iface} already carries {_owner(iface, st.prog_id)}; nothing changed")
        fds = kdecap.open_pinned(where.path)
        try:
            added, removed = kdecap.sync_addrs(fds[kdecap.ADDRS], local)
        finally:
            for fd in fds.values():
                fd.close()
        return [f"decap already attached to {iface} (program {st.prog_id}, {st.mode}); "
                "addresses refreshed", *_addr_lines(added, removed, local)]
    if where.exists():  # left by a program that is no longer attached (e.g. `detach --force`)
        where.remove()
    program = kdecap.compile_decap()
    try:
        kdecap.sync_addrs(program.map_fds[kdecap.ADDRS], local)
        kdecap.pin(program, where.path)
        try:
            used, why = kdecap.attach(index, program.prog_fd, mode)
        except OSError as e:
            where.remove()
            st = xdp_link.xdp_state(index)
            if st is not None and st.prog_id:  # attached meanwhile by someone else
                raise Refused(f"{iface} already carries {_owner(iface, st.prog_id)}; "
                              "nothing changed") from e
            raise OSError(e.errno, f"cannot attach XDP to {iface} in {mode} mode: {e}") from e
        prog_id = bpfsys.prog_info(program.prog_fd).id
    finally:
        program.close()
    lines = []
    if why:
        lines.append(f"warning: native XDP not available on {iface} ({why}); attached in "
                     "generic mode, which is much slower")
    lines.append(f"decap attached to {iface} (program {prog_id}, {used}); pins {where.path}")
    return lines + _addr_lines([], [], local)


def do_detach(iface: str) -> list[str]:
    """Detach the decap program from ``iface`` and remove its pins; LookupError when there
    was nothing."""
    from xdplb.instance import decap as places
    from xdplb.kernel import bpfsys, linkinfo
    from xdplb.kernel import decap as kdecap

    found = places.every_version(iface)  # an older xdplb's pins are removed too
    try:
        index: int | None = _ifindex(iface)
    except OSError:
        if not found:
            raise
        index = None  # the interface is gone: its pins are all that is left
    done: list[str] = []
    for where in found:
        if index is not None and (where.path / kdecap.PROG_PIN).exists():
            with bpfsys.obj_get(where.path / kdecap.PROG_PIN) as fd:
                if kdecap.detach(index, fd):
                    prog_id = bpfsys.prog_info(fd).id
                    done.append(f"detached decap program {prog_id} from {iface}")
        where.remove()
        done.append(f"removed pins {where.path}")
    if not found and index is not None and (st := linkinfo.xdp_state(index)) and st.prog_id:
        raise Refused(f"{iface} carries {_owner(iface, st.prog_id)}, not the decap program; "
                      "nothing changed")
    if not done:
        raise LookupError(f"no decap program or pins on {iface}; nothing to do")
    return done


def collect(iface: str | None = None) -> list[dict[str, Any]]:
    """What ``status`` shows, per interface with decap pins in this network namespace."""
    from xdplb.instance import decap as places
    from xdplb.kernel import decap as kdecap
    from xdplb.kernel import linkinfo

    found = [places.for_iface(iface)] if iface else places.all_in_ns()
    local = decap_addresses()
    out = []
    for where in found:
        if not where.complete():
            continue
        fds = kdecap.open_pinned(where.path)
        try:
            prog_id = kdecap.pinned_prog_id(where.path)
            addrs = kdecap.read_addrs(fds[kdecap.ADDRS])
            counters = kdecap.read_counters(fds[kdecap.COUNTERS])
        finally:
            for fd in fds.values():
                fd.close()
        try:
            st = linkinfo.xdp_state(where.iface)
            present = True
        except OSError:
            st, present = None, False
        attached = st is not None and st.prog_id == prog_id
        out.append({
            "iface": where.iface, "present": present, "attached": attached,
            "mode": st.mode if attached and st else None, "prog_id": prog_id,
            "pin_dir": str(where.path), "addresses": [str(a) for a in addrs],
            "addresses_current": addrs == local, "counters": counters,
        })
    return out


def render(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        state = (f"attached ({r['mode']})" if r["attached"] else
                 "NOT ATTACHED (pins only)" if r["present"] else "INTERFACE GONE (pins only)")
        lines.append(f"{r['iface']}: decap program {r['prog_id']} {state}, pins {r['pin_dir']}")
        addrs = ", ".join(r["addresses"]) or "(none)"
        stale = "" if r["addresses_current"] else (
            f"  (the namespace's addresses changed: `xdplb decap attach {r['iface']}` "
            "refreshes them)")
        lines.append(f"  decapsulates IPIP to: {addrs}{stale}")
        lines += [f"  {name:<16} {n}" for name, n in r["counters"].items()]
    return "\n".join(lines)


@decap.command("attach")
@click.argument("iface")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="XDP mode; auto: native, else generic with a warning.")
def attach_cmd(iface: str, mode: str) -> None:
    """Attach the IPIP decap program to IFACE (again: refresh its addresses)."""
    with _errors():
        for line in do_attach(iface, mode):
            click.echo(line)


@decap.command("detach")
@click.argument("iface")
def detach_cmd(iface: str) -> None:
    """Detach the decap program from IFACE and remove its pins."""
    with _errors():
        for line in do_detach(iface):
            click.echo(line)


@decap.command("status")
@click.argument("iface", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_cmd(iface: str | None, as_json: bool) -> None:
    """Counters and addresses of the decap program, per interface."""
    from xdplb.cli.main import EXIT_NOTHING, EXIT_USAGE, fail

    with _errors():
        rows = collect(iface)
        if not rows:
            if iface:
                from xdplb.kernel import linkinfo

                try:
                    linkinfo.xdp_state(iface)
                except OSError:
                    fail(f"no interface {iface!r} in this network namespace", EXIT_USAGE)
            if as_json:
                click.echo(json.dumps({"interfaces": []}))
            where = f"on {iface}" if iface else "in this network namespace"
            fail(f"no decap program {where}; run `xdplb decap attach IFACE`", EXIT_NOTHING)
        click.echo(json.dumps({"interfaces": rows}, indent=2) if as_json else render(rows))
