"""Talking to a running agent: ``reload``, ``drain``, ``undrain``, ``drain-node`` and
``undrain-node``.

The agent's pid and state are in its run state (runfiles.py); requests are a signal
(SIGHUP: reload the config file; SIGUSR1: re-read the drain list) and the answer is the
agent's ``last_event`` once its generation moves on.

Commands to one agent take its control lock (``locks.control``) for the whole exchange: two
``drain`` commands at once neither lose one another's change to drains.json (read, modify,
write) nor take the other's answer for their own.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xdplb.config import Config, load_config
from xdplb.instance import locks, pins, runfiles
from xdplb.model.desired import backend_label


class NoAgent(LookupError):
    """No running agent to talk to."""


@dataclass
class Running:
    group: pins.PinGroup
    info: dict[str, Any]


def find_agent(iface: str | None = None, pid: int | None = None) -> Running:
    """The running agent of ``iface`` (and with ``pid``), or the only one in this network
    namespace."""
    groups = pins.groups_with(iface) if iface else pins.groups()
    live = [Running(g, i) for g in groups if (i := runfiles.agent_info(g))
            and (pid is None or i.get("pid") == pid)]
    if not live:
        where = (f"on {iface}" if iface else "in this network namespace") + (
            f" with pid {pid}" if pid is not None else "")
        raise NoAgent(f"no running xdplb agent {where}; start one with "
                      "`xdplb attach IFACE --config pool.yaml`")
    if len(live) > 1:
        names = ", ".join("+".join(r.group.ifaces) for r in live)
        raise NoAgent(f"several agents run here ({names}); name the interface")
    return live[0]


def signal_and_wait(run: Running, sig: int, kind: str, timeout: float = 30) -> dict[str, Any]:
    """Send ``sig`` and wait for the agent's answer (its next ``last_event`` of ``kind``).
    Call with the control lock held."""
    now = runfiles.agent_info(run.group)  # as it is now that we hold the lock
    if now is None or now.get("pid") != run.info.get("pid"):
        raise NoAgent("the agent exited")
    before = (now.get("last_event") or {}).get("time", 0)
    os.kill(int(run.info["pid"]), sig)
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = runfiles.agent_info(run.group)
        if info is None:
            raise NoAgent("the agent exited")
        ev = info.get("last_event") or {}
        if ev.get("kind") == kind and ev.get("time", 0) > before:
            return ev
        time.sleep(0.05)
    raise TimeoutError(f"the agent did not answer within {timeout:g}s")


def reload(run: Running) -> dict[str, Any]:
    with locks.control(run.group):
        return signal_and_wait(run, signal.SIGHUP, "reload")


def resolve_backend(cfg: Config, vip: str, backend: str,
                    discovered: Mapping[str, Any] | None = None) -> str:
    """``VIP`` (name or addr:port) and ``BACKEND`` (addr or addr:port) -> backend label; a
    ``backends_from`` VIP's backends are those the agent published (``discovered``,
    ``runfiles.pool``)."""
    matches = [v for v in cfg.vips if vip in (v.name, f"{v.address}:{v.port}")]
    if not matches:
        raise ValueError(f"no VIP {vip!r} in the agent's config (use a name or ADDR:PORT)")
    if len(matches) > 1:
        raise ValueError(f"{vip!r} names several VIPs (tcp and udp?): use the VIP's name")
    v = matches[0]
    endpoints = [(str(b.address), b.target_port(v)) for b in v.backends]
    if v.backends_from is not None:
        published = ((discovered or {}).get(v.name) or {}).get("backends", ())
        endpoints = [(a, int(p)) for a, _, p in (e.rpartition(":") for e in published)]
    found = [(a, p) for a, p in endpoints if backend in (a, f"{a}:{p}")]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise ValueError(f"{what} backend {backend!r} in VIP {v.name} (use ADDR:PORT)")
    return backend_label(v.name, *found[0])


def set_drain(run: Running, vip: str, backend: str, drained: bool) -> tuple[str, dict]:
    """Drain (weight 0: no new flows, existing ones stay) or undrain a backend."""
    cfg = load_config(run.info["config"])
    label = resolve_backend(cfg, vip, backend, runfiles.pool(run.group))
    with locks.control(run.group):
        current = runfiles.read_drains(run.group)
        (current.add if drained else current.discard)(label)
        runfiles.write_drains(run.group, current)
        return label, signal_and_wait(run, signal.SIGUSR1, "drains")


def set_node_drain(run: Running, drained: bool) -> dict:
    """Withdraw (or announce again) every BGP announcement of the node; the data path stays."""
    with locks.control(run.group):
        runfiles.write_node_drained(run.group, drained)
        return signal_and_wait(run, signal.SIGUSR1, "drains")
