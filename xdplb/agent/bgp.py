"""VIP addresses announced over BGP: what to announce (``decide``) and the speaker that does it
(``ExaBGP``), driven by ``Announcer``.

BGP itself is spoken by ExaBGP (docs/operations.md says why), run by the agent as its child
with per-instance files (``runfiles.speaker_file``): its config, the two pipes of its API, its
pid file and log. ExaBGP talks to an API process over that process's stdin and stdout; ours is
a two-line shell relay between them and two FIFOs the agent holds open. The speaker never
outlives the agent: it gets SIGTERM when the agent dies (``setpriv --pdeathsig``), and the
relay ends when the agent's end of the command FIFO closes, which ends ExaBGP
(``exabgp.api.terminate``); either way its sessions close and the routers withdraw at once.

Peer session states come from the speaker itself: ExaBGP's ``neighbor-changes`` JSON messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xdplb.agent.errors import UsageError
from xdplb.config import Config
from xdplb.config.bgp import Bgp, Peer
from xdplb.instance import pins, runfiles
from xdplb.model.desired import backend_label

log = logging.getLogger("xdplb")

ANNOUNCED, WITHDRAWN = "announced", "withdrawn"
# ExaBGP's neighbour states -> ours; "idle": no word from the speaker about the peer yet.
PEER_STATES = {"connected": "connected", "up": "established", "down": "down"}
RESTART_DELAY = 5.0  # seconds before a speaker that died is started again


@dataclass(frozen=True)
class Announcement:
    prefix: str  # "10.200.0.10/32"
    state: str  # ANNOUNCED | WITHDRAWN
    reason: str


@dataclass(frozen=True)
class NodeView:
    """What the announcements depend on besides the config."""

    attached: bool  # the program (or scapy forwarder) is on every interface
    down: frozenset[str] = frozenset()  # backend labels health checks took down
    drained: frozenset[str] = frozenset()  # backend labels drained (xdplb drain)
    health: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # label -> result
    node_drained: bool = False  # xdplb drain-node
    stopping: bool = False


def _serving(cfg: Config, view: NodeView) -> dict[str, tuple[int, int, int]]:
    """VIP address -> (backends that may take new flows, backends not checked yet, backends)
    over all its VIPs. A checked backend counts once a check has passed: a node that comes
    back must not attract traffic it cannot serve yet."""
    out: dict[str, tuple[int, int, int]] = {}
    for v in cfg.vips:
        checked = v.health_check.type != "none"
        ok = pending = 0
        for b in v.backends:
            label = backend_label(v.name, str(b.address), b.target_port(v))
            if not b.weight or label in view.drained or label in view.down:
                continue
            if not checked or view.health.get(label, {}).get("passed"):
                ok += 1
            else:
                pending += 1
        have = out.get(str(v.address), (0, 0, 0))
        out[str(v.address)] = (have[0] + ok, have[1] + pending, have[2] + len(v.backends))
    return out


def decide(cfg: Config, view: NodeView) -> list[Announcement]:
    """Each VIP address (/32) announced while one of its VIPs has a healthy, undrained backend
    and the program is attached; withdrawn otherwise, with the reason."""
    out = []
    for addr, (ok, pending, total) in _serving(cfg, view).items():
        why = ("the agent is stopping" if view.stopping else
               "the program is not attached" if not view.attached else
               "the node is drained (xdplb drain-node)" if view.node_drained else
               None if ok else
               "waiting for a first passed health check" if pending else
               f"none of its {total} backends is healthy and undrained")
        if why:
            out.append(Announcement(f"{addr}/32", WITHDRAWN, why))
        else:
            out.append(Announcement(f"{addr}/32", ANNOUNCED,
                                    f"{ok} of {total} backends healthy and undrained"))
    return out


def _route_source(peer: str) -> str:
    """The address this host sends from toward ``peer`` (its route's preferred source)."""
    from pyroute2 import IPRoute  # netlink only where BGP is configured
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            for r in ipr.route("get", dst=peer):
                if src := r.get_attr("RTA_PREFSRC"):
                    return str(src)
    except NetlinkError:
        pass
    raise UsageError(f"bgp: no route to peer {peer} in this network namespace (set the peer's "
                     "local_address, or add a route)")


def exabgp_config(bgp: Bgp, relay: str, local: Mapping[str, str]) -> str:
    """ExaBGP's configuration: one neighbour per peer, our API process on each."""
    router_id = str(bgp.router_id or local[str(bgp.peers[0].address)])
    parts = [f"process xdplb {{\n    run /bin/sh {relay};\n    encoder json;\n}}\n"]
    for p in bgp.peers:
        parts.append(
            f"neighbor {p.address} {{\n"
            f"    router-id {router_id};\n"
            f"    local-address {local[str(p.address)]};\n"
            f"    local-as {bgp.asn};\n"
            f"    peer-as {p.asn};\n"
            f"    hold-time {int(bgp.hold_time)};\n"
            f"    api {{\n        processes [ xdplb ];\n        neighbor-changes;\n    }}\n"
            f"}}\n")
    return "\n".join(parts)


def _relay_script(cmd_fifo: str, evt_fifo: str) -> str:
    # ExaBGP's messages (our stdin) to the event FIFO, commands from the command FIFO to
    # ExaBGP (our stdout). Job control is off, so the background cat would read /dev/null:
    # hand it stdin through fd 3. The foreground cat ends when the agent's end closes.
    return f"exec 3<&0\ncat <&3 >'{evt_fifo}' &\nexec cat '{cmd_fifo}'\n"


class ExaBGP:
    """One ExaBGP process with this instance's files; ``send`` commands, ``poll`` messages."""

    FILES = ("conf", "relay", "cmd", "evt", "pid", "log")

    def __init__(self, bgp: Bgp, group: pins.PinGroup) -> None:
        self.bgp = bgp
        self.path = {n: runfiles.speaker_file(group, n) for n in self.FILES}
        self.proc: subprocess.Popen | None = None
        self._cmd: int | None = None
        self._evt: int | None = None
        self._buf = b""
        self.peers: dict[str, str] = {str(p.address): "idle" for p in bgp.peers}
        self.started = 0.0

    def start(self) -> None:
        exe = shutil.which("exabgp", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if not exe:
            raise UsageError("bgp: ExaBGP is not installed (`apt-get install exabgp`; "
                             "scripts/setup.sh installs it)")
        local = {str(p.address): str(p.local_address) if p.local_address
                 else _route_source(str(p.address)) for p in self.bgp.peers}
        self.stop()  # files a killed agent left
        self.path["conf"].parent.mkdir(parents=True, exist_ok=True)
        for n in ("cmd", "evt"):
            os.mkfifo(self.path[n], 0o600)
        # Both ends ours and read-write: opening never blocks, and neither pipe ever reads
        # EOF or raises EPIPE on our side; the relay sees EOF once this process is gone.
        # Non-blocking: a speaker that stops reading must not stall the agent's loop.
        self._cmd = os.open(self.path["cmd"], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._evt = os.open(self.path["evt"], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.path["relay"].write_text(_relay_script(str(self.path["cmd"]),
                                                    str(self.path["evt"])))
        self.path["conf"].write_text(exabgp_config(self.bgp, str(self.path["relay"]), local))
        env = dict(os.environ, **{
            "exabgp.daemon.user": "root", "exabgp.daemon.drop": "false",
            "exabgp.daemon.daemonize": "false", "exabgp.daemon.pid": str(self.path["pid"]),
            "exabgp.log.destination": str(self.path["log"]),
            "exabgp.api.ack": "false", "exabgp.api.cli": "false",
            # Our relay gone (the agent died) ends the speaker, and with it its sessions.
            "exabgp.api.respawn": "false", "exabgp.api.terminate": "true",
        })
        with open(self.path["log"], "ab") as out:
            # --pdeathsig: the kernel sends SIGTERM to the speaker when the agent's thread that
            # started it (the main thread) ends, kill -9 included.
            # A session of its own: Ctrl-C in the agent's terminal must not end it before the
            # agent has withdrawn the routes and waited --drain-time.
            self.proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", exe, str(self.path["conf"])], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.peers = dict.fromkeys(self.peers, "idle")
        self.started = time.monotonic()
        log.info("bgp: started ExaBGP (pid %d) for peers %s", self.proc.pid,
                 ", ".join(self.peers))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, line: str) -> None:
        """One API command (a write below PIPE_BUF: all of it or nothing); OSError when the
        speaker has not read the earlier ones (the pipe is full)."""
        if self._cmd is not None:
            try:
                os.write(self._cmd, line.encode() + b"\n")
            except BlockingIOError:
                raise OSError(f"ExaBGP is not reading its commands ({line!r} not sent)") \
                    from None

    def poll(self) -> list[str]:
        """Read the speaker's messages; the peers whose session came up since."""
        came_up = []
        while self._evt is not None:
            try:
                chunk = os.read(self._evt, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") != "state":
                continue
            n = msg.get("neighbor") or {}
            peer = (n.get("address") or {}).get("peer")
            state = PEER_STATES.get(n.get("state", ""), n.get("state", "unknown"))
            if peer in self.peers and state != self.peers[peer]:
                log.warning("bgp: peer %s is %s%s", peer, state,
                            f" ({n['reason']})" if n.get("reason") else "")
                self.peers[peer] = state
                if state == "established":
                    came_up.append(peer)
        return came_up

    def stop(self) -> None:
        """Stop the speaker (its sessions close) and remove its files."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        for fd in (self._cmd, self._evt):
            if fd is not None:
                os.close(fd)
        self._cmd = self._evt = None
        for p in self.path.values():
            if p.name != f"{runfiles.SPEAKER_PREFIX}log":  # the log tells what happened
                p.unlink(missing_ok=True)


class Announcer:
    """Keeps the speaker's announcements equal to ``decide``'s, and publishes both."""

    def __init__(self, bgp: Bgp, group: pins.PinGroup) -> None:
        self.bgp = bgp
        self.speaker = ExaBGP(bgp, group)
        self.current: dict[str, Announcement] = {}

    def start(self) -> None:
        self.speaker.start()

    def _command(self, peer: Peer, a: Announcement) -> str:
        if a.state == ANNOUNCED:
            return (f"neighbor {peer.address} announce route {a.prefix} "
                    f"next-hop {peer.next_hop or 'self'}")
        return f"neighbor {peer.address} withdraw route {a.prefix}"

    def _send(self, items: Iterable[Announcement], peers: Iterable[Peer]) -> None:
        peers = list(peers)
        for a in items:
            for p in peers:
                self.speaker.send(self._command(p, a))

    def update(self, wanted: list[Announcement]) -> bool:
        """Announce and withdraw what changed (and everything again to a peer that came
        up, or to a restarted speaker); True when anything changed."""
        if not self.speaker.alive():
            if self.speaker.proc is not None:
                log.error("bgp: ExaBGP exited (%s); its routes are gone; restarting it in "
                          "%gs (see %s)", self.speaker.proc.returncode, RESTART_DELAY,
                          self.speaker.path["log"])
                self.speaker.stop()
                self.speaker.started = time.monotonic()
                self.current = {}
                return True
            if time.monotonic() - self.speaker.started < RESTART_DELAY:
                return False
            self.speaker.started = time.monotonic()  # a failed start is tried again later
            self.current = {}
            self.speaker.start()
        came_up = set(self.speaker.poll())
        new = {a.prefix: a for a in wanted}
        changed = [a for p, a in new.items() if (old := self.current.get(p)) is None
                   or old.state != a.state]
        for a in changed:
            log.warning("bgp: %s %s: %s", a.prefix, a.state, a.reason)
        self._send(changed, self.bgp.peers)
        gone = [Announcement(p, WITHDRAWN, "no longer configured")
                for p in self.current if p not in new]
        self._send(gone, self.bgp.peers)
        again = [a for a in new.values() if a.state == ANNOUNCED and a not in changed]
        self._send(again, [p for p in self.bgp.peers if str(p.address) in came_up])
        moved = bool(changed or gone or came_up) or new != self.current
        self.current = new
        return moved

    def state(self) -> dict[str, Any]:
        """``{"peers": [...], "announcements": [...]}`` as status --json shows it."""
        sp = self.speaker
        return {
            "speaker": {"name": "exabgp", "pid": sp.proc.pid if sp.alive() else None,
                        "log": str(sp.path["log"])},
            "asn": self.bgp.asn,
            "peers": [{"address": str(p.address), "asn": p.asn,
                       "state": sp.peers.get(str(p.address), "idle")} for p in self.bgp.peers],
            "announcements": [{"prefix": a.prefix, "state": a.state, "reason": a.reason}
                              for a in self.current.values()],
        }

    def stop(self) -> None:
        self.speaker.stop()
        self.current = {}

    def wait_withdrawn(self, wanted: list[Announcement], drain_time: float) -> None:
        """Withdraw everything, then give the routers ``drain_time`` to move the traffic."""
        self.update(wanted)
        if any(a.state == WITHDRAWN for a in wanted) and drain_time > 0:
            log.info("bgp: routes withdrawn; waiting %gs (--drain-time) before detaching",
                     drain_time)
            end = time.monotonic() + drain_time
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(left, 0.2))
                with contextlib.suppress(OSError):
                    self.speaker.poll()
