#!/usr/bin/env python3
"""Network-namespace test lab for xdplb: client, load balancer and backends on veth pairs.

Importable (``from lab import Lab``) and a CLI::

    python scripts/netns/lab.py up one-armed|two-armed|routed [--prefix P] [--backends N]
                                   [--backend-vips VIP,...]
    python scripts/netns/lab.py down [--prefix P]
    python scripts/netns/lab.py status [--prefix P]

See scripts/netns/README.md for the topologies. Everything the lab makes lives in namespaces
named ``{prefix}-client``, ``{prefix}-lb``, ``{prefix}-sw``, ``{prefix}-be<N>`` (and
``{prefix}-rt``, the router of the routed topology) and in
``/run/xdplb-lab/{prefix}``; nothing is created in the caller's namespace, so labs with
different prefixes can run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RUN_ROOT = Path("/run/xdplb-lab")
NETNS_DIR = Path("/run/netns")
BACKEND_SERVER = HERE / "backend_server.py"

TOPOLOGIES = ("one-armed", "two-armed", "routed")
MAX_BACKENDS = 64
HTTP_PORTS = (80, 8080)
UDP_PORTS = (5000, 5001)
ECHO_PORTS = (7000,)
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
# Only these role suffixes belong to a lab: prefix "xl" must never match "xl-other-client".
ROLE_RE = r"(?:client|lb[0-9]*|sw|rt|be[0-9]+)"  # lbN: the nodes of bgplab.py
# The router's nftables table (routed topology): counts what it forwards toward the client.
NFT_TABLE = "xdplb_lab"
ROUTER_COUNTERS = ("via_lb", "from_backends", "other")


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the command's stderr."""

    def __str__(self) -> str:
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        return f"{super().__str__()}: {(err or '').strip()}"


def run_command(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(list(cmd), timeout=timeout, check=False, **kw)
    if check and p.returncode != 0:
        raise CommandError(p.returncode, p.args, p.stdout, p.stderr)
    return p


def mac(ns_no: int, if_no: int) -> str:
    """The lab's readable MAC scheme: 02:00:00:00:<ns#>:<if#>."""
    return f"02:00:00:00:{ns_no:02x}:{if_no:02x}"


# ns# of each role; the bridge namespace is 0xfe and its ports take the ns# of their peer.
NS_NO = {"client": 0x01, "lb": 0x02, "rt": 0x03, "sw": 0xFE}


def _be_no(i: int) -> int:
    return 0x10 + i  # be1 -> 11, be2 -> 12: reads like the name in captures


@dataclass(frozen=True)
class Veth:
    """One veth pair, each end given as (namespace, interface name, MAC)."""

    ns_a: str
    if_a: str
    mac_a: str
    ns_b: str
    if_b: str
    mac_b: str


# --- namespaces and processes (by prefix, usable on a lab left by a crashed run) ----------------


def _lab_ns_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(prefix)}-{ROLE_RE}")


def list_netns() -> list[str]:
    """Names of the namespaces in /run/netns (what `ip netns list` shows)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def lab_namespaces(prefix: str) -> list[str]:
    """Existing namespaces that belong to the lab with this prefix."""
    pat = _lab_ns_re(prefix)
    return [n for n in list_netns() if pat.fullmatch(n)]


def netns_pids(names: Sequence[str]) -> dict[str, set[int]]:
    """Pids of the processes whose network namespace is one of the named ones."""
    want: dict[tuple[int, int], str] = {}
    for n in names:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / n)
            want[(st.st_dev, st.st_ino)] = n
    found: dict[str, set[int]] = {n: set() for n in names}
    if not want:
        return found
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{d}/ns/net")
        except OSError:
            continue  # gone, or a kernel thread
        n = want.get((st.st_dev, st.st_ino))
        if n is not None:
            found[n].add(int(d))
    return found


def _ancestors() -> set[int]:
    """This process and its ancestors: never killed, e.g. `ip netns exec xl-lb lab.py down`."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_pids(pids: set[int], grace: float = 3.0) -> None:
    """SIGTERM the given pids, SIGKILL whatever is still alive after `grace` seconds."""
    pids = set(pids) - _ancestors()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            if not pids:
                return
            time.sleep(0.05)


def teardown_prefix(prefix: str) -> None:
    """Remove the lab with this prefix: kill its processes, delete its namespaces and runtime dir.

    Works on any partial state (nothing there, half-built, or left by a crashed run) and never
    raises for what is already gone. Only namespaces named ``{prefix}-{client,lb,sw,rt,beN}`` are
    touched.
    """
    _check_prefix(prefix)
    names = lab_namespaces(prefix)
    rundir = RUN_ROOT / prefix
    pids: set[int] = set()
    for s in netns_pids(names).values():
        pids |= s
    # Backends whose namespace file vanished would otherwise keep the namespace alive unseen.
    for pid in _state_pids(rundir):
        if _alive(pid) and _is_backend_server(pid):
            pids.add(pid)
    kill_pids(pids)
    for n in names:
        # Deleting a namespace destroys its veths, and with them the peers in the other
        # namespaces and any XDP program attached to either end.
        p = run_command(["ip", "netns", "delete", n], check=False)
        if p.returncode != 0 and (NETNS_DIR / n).exists():
            print(f"lab: could not delete netns {n}: {p.stderr.strip()}", file=sys.stderr)
    shutil.rmtree(rundir, ignore_errors=True)
    _remove_agent_leftovers(prefix)


def _remove_agent_leftovers(prefix: str) -> None:
    """Pins and run state an xdplb agent left for the lab's LB namespace (killed -9, --keep),
    and the pins of decap programs left on its backends.

    bpffs outlives namespaces: a pin directory is named after the namespace, not tied to it.
    Layout: <root>/xdplb/<layout version>/<netns>/<ifaces>.
    """
    lb = re.compile(rf"{re.escape(prefix)}-lb[0-9]*")  # lbN: the nodes of bgplab.py
    for root in (Path("/sys/fs/bpf/xdplb"), Path("/run/xdplb")):
        for version in root.glob("*"):
            for ns_dir in version.glob(f"{prefix}-lb*"):
                if lb.fullmatch(ns_dir.name):
                    shutil.rmtree(ns_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                version.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()
    # `xdplb decap attach` on DSR backends: its pins keep the program loaded after the
    # namespace is gone (<root>/<version>/<netns>/<iface>).
    decap, pat = Path("/sys/fs/bpf/xdplb-decap"), _lab_ns_re(prefix)
    for version in decap.glob("*"):
        for ns_dir in version.glob(f"{prefix}-*"):
            if pat.fullmatch(ns_dir.name):
                shutil.rmtree(ns_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            version.rmdir()
    with contextlib.suppress(OSError):
        decap.rmdir()


def _state_pids(rundir: Path) -> list[int]:
    try:
        state = json.loads((rundir / "state.json").read_text())
        return [int(p) for p in state.get("pids", {}).values()]
    except (OSError, ValueError, AttributeError):
        return []


def _is_backend_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return BACKEND_SERVER.name.encode() in f.read()
    except OSError:
        return False


def _check_prefix(prefix: str) -> None:
    if not PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"bad lab prefix {prefix!r}: want [A-Za-z0-9][A-Za-z0-9_.-]{{0,39}}")


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C during teardown so that a second one cannot leave half a lab behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda sig, _frame: got.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


# --- XDP -----------------------------------------------------------------------------------------


def _xdplb() -> None:
    """Make the xdplb package importable when run from a checkout without installing it."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def xdp_attach_pass(targets: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Attach an XDP_PASS program natively to each (namespace, interface); return program ids."""
    _xdplb()
    from xdplb.kernel import bpfsys, xdp_link

    ids = {}
    with bpfsys.load_xdp_pass("xdplb_lab_pass") as fd:  # the attachments keep it loaded
        for ns, ifname in targets:
            xdp_link.xdp_attach(ifname, fd, "native", netns=ns)
            st = xdp_link.xdp_state(ifname, netns=ns)
            if st is None or st.mode != "native":
                raise RuntimeError(f"XDP_PASS not attached natively on {ns}/{ifname}: {st}")
            ids[(ns, ifname)] = st.prog_id
    return ids


def xdp_state(ns: str, ifname: str) -> Any:
    """The xdplb.xdp_link.XdpState (mode, prog_id) of ns/ifname, or None."""
    _xdplb()
    from xdplb.kernel import xdp_link

    return xdp_link.xdp_state(ifname, netns=ns)


def bpf_prog_exists(prog_id: int) -> bool:
    """Whether a BPF program with this id is still loaded anywhere."""
    _xdplb()
    from xdplb.kernel import bpfsys

    try:
        fd = bpfsys.prog_get_fd_by_id(prog_id)
    except OSError:
        return False
    fd.close()
    return True


_PING_CODE = """
import os, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
ident = os.getpid() & 0xFFFF
hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"xdplb-lab-ping!!"
pkt = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(pkt, ("{addr}", 0))
end = time.monotonic() + {timeout}
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, (src, _) = s.recvfrom(2048)
    except TimeoutError:
        break
    icmp = data[(data[0] & 15) * 4 :]
    if src == "{addr}" and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
        sys.exit(0)
sys.exit(1)
"""


# Broadcasts one ARP request on a device and prints the MAC of the first reply for the address.
_ARP_CODE = """
import socket, struct, sys, time
dev, src, target, timeout = "{dev}", "{src}", "{addr}", {timeout}
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((dev, 0x0806))
me = bytes.fromhex(open(f"/sys/class/net/{{dev}}/address").read().strip().replace(":", ""))
arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + me + socket.inet_aton(src)
s.send(b"\\xff" * 6 + me + b"\\x08\\x06" + arp + b"\\0" * 6 + socket.inet_aton(target))
end = time.monotonic() + timeout
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        f = s.recv(2048)
    except TimeoutError:
        break
    if f[20:22] == b"\\0\\x02" and f[28:32] == socket.inet_aton(target):
        print(f[22:28].hex(":"))
        sys.exit(0)
sys.exit(1)
"""


# --- the lab -------------------------------------------------------------------------------------


class Lab:
    """A client, a load balancer namespace and N backends; see README.md for the diagrams.

    A context manager: ``__enter__`` builds (after removing any leftover lab with the same
    prefix) and ``__exit__`` always tears down. ``up()``/``down()`` do the same by hand.
    """

    client_addr = "10.10.0.2"
    client_gw = "10.10.0.1"  # the LB's eth0, or in the routed lab the router's
    lb_client_addr = "10.10.0.1"  # routed: the LB's only address, 10.20.0.1 (set in __init__)
    lb_backend_addr = "10.20.0.1"
    router_client_addr = "10.10.0.1"  # routed topology only
    router_backend_addr = "10.20.0.254"
    client_net = "10.10.0.0/24"
    backend_net = "10.20.0.0/24"
    vip_net = "10.200.0.0/24"  # routed from the client via the LB; the LB has no route to it
    http_ports = HTTP_PORTS
    udp_ports = UDP_PORTS
    echo_ports = ECHO_PORTS

    def __init__(self, topology: str = "one-armed", backends: int = 2, prefix: str = "xl",
                 tx_offload: bool = False, backend_vips: Sequence[str] = ()) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, not {topology!r}")
        if not 1 <= backends <= MAX_BACKENDS:
            raise ValueError(f"backends must be 1..{MAX_BACKENDS}, not {backends}")
        _check_prefix(prefix)
        self.topology = topology
        self.routed = topology == "routed"
        # DSR-style backends: these addresses go on every backend's lo, which accepts packets
        # to them but does not answer ARP for them (the VIP's MAC is the LB's).
        self.backend_vips = [str(ipaddress.IPv4Address(v)) for v in backend_vips]
        self.prefix = prefix
        # False: every end computes its own checksums (the lab's tuned setting); True: veth's
        # default TX checksum offload, as in a namespace lab built by hand.
        self.tx_offload = tx_offload
        self.client_ns = f"{prefix}-client"
        self.lb_ns = f"{prefix}-lb"
        self.sw_ns = f"{prefix}-sw"
        self.backend_names = [f"be{i}" for i in range(1, backends + 1)]
        self.backend_ns = [f"{prefix}-{b}" for b in self.backend_names]
        self.backend_addrs = [f"10.20.0.{10 + i}" for i in range(1, backends + 1)]
        self.backend_macs = [mac(_be_no(i), 0) for i in range(1, backends + 1)]
        self.client_mac = mac(NS_NO["client"], 0)
        self.router_ns = f"{prefix}-rt" if self.routed else None
        self.router_macs = {f"eth{i}": mac(NS_NO["rt"], i) for i in (0, 1)} if self.routed else {}
        if self.routed:
            self.lb_client_addr = self.lb_backend_addr  # reached through the router
        two = topology == "two-armed"
        self.lb_ifaces = ["eth0", "eth1"] if two else ["eth0"]
        self.lb_client_iface = "eth0"
        self.lb_backend_iface = "eth1" if two else "eth0"
        self.lb_macs = {ifn: mac(NS_NO["lb"], i) for i, ifn in enumerate(self.lb_ifaces)}
        self.runtime_dir = RUN_ROOT / prefix
        self.veths = self._plan()
        # The ends facing the LB: XDP_TX / XDP_REDIRECT into an LB interface only arrive when
        # its peer has NAPI, i.e. an XDP program (GRO alone was not enough for XDP_TX).
        self.xdp_peers: list[tuple[str, str]] = []
        for v in self.veths:
            if v.ns_a == self.lb_ns:
                self.xdp_peers.append((v.ns_b, v.if_b))
            elif v.ns_b == self.lb_ns:
                self.xdp_peers.append((v.ns_a, v.if_a))
        self.xdp_prog_ids: dict[tuple[str, str], int] = {}
        self.backend_pids: dict[str, int] = {}
        self._procs: list[tuple[subprocess.Popen, bool]] = []
        self._is_up = False

    # -- naming ----------------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this lab."""
        rt = [self.router_ns] if self.router_ns else []
        return [self.client_ns, *rt, self.lb_ns, self.sw_ns, *self.backend_ns]

    @property
    def backend_gw(self) -> str:
        """The backends' default gateway: the LB, or in the routed lab the router."""
        return self.router_backend_addr if self.routed else self.lb_backend_addr

    def resolve_ns(self, ns: str) -> str:
        """A namespace of this lab, by full name ("xl-lb") or role ("lb", "be1")."""
        if ns in self.namespaces:
            return ns
        full = f"{self.prefix}-{ns}"
        if full in self.namespaces:
            return full
        raise ValueError(f"{ns!r} is not a namespace of lab {self.prefix!r}: {self.namespaces}")

    def backend_log_path(self, backend: int | str) -> Path:
        """Request log of a backend, by index (0-based), name ("be1") or address."""
        return self.runtime_dir / f"{self._backend_name(backend)}.log"

    def backend_log(self, backend: int | str) -> list[dict[str, Any]]:
        """The requests a backend has logged so far (one dict per request)."""
        try:
            text = self.backend_log_path(backend).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _backend_name(self, backend: int | str) -> str:
        if isinstance(backend, int):
            return self.backend_names[backend]
        if backend in self.backend_addrs:
            return self.backend_names[self.backend_addrs.index(backend)]
        if backend in self.backend_names:
            return backend
        if backend in self.backend_ns:
            return self.backend_names[self.backend_ns.index(backend)]
        raise ValueError(f"no backend {backend!r}")

    # -- running commands ------------------------------------------------------------------

    def nsenter_cmd(self, ns: str, *cmd: str) -> list[str]:
        """A command line that runs cmd in ns's network namespace only.

        Unlike `ip netns exec`, nsenter keeps the mount namespace, so bpffs at /sys/fs/bpf stays
        visible: run the xdplb agent (which pins maps) this way or with ``xdplb --netns``.
        """
        return ["nsenter", f"--net={NETNS_DIR / self.resolve_ns(ns)}", "--", *cmd]

    def _wrap(self, ns: str | None, cmd: Sequence[str], nsenter: bool) -> list[str]:
        if not cmd:
            raise ValueError("no command")
        if ns is None:
            return [str(c) for c in cmd]
        if nsenter:
            return self.nsenter_cmd(ns, *map(str, cmd))
        return ["ip", "netns", "exec", self.resolve_ns(ns), *map(str, cmd)]

    def run(
        self,
        ns: str | None,
        *cmd: str,
        check: bool = True,
        timeout: float = 30,
        nsenter: bool = False,
        **kw: Any,
    ) -> subprocess.CompletedProcess:
        """Run cmd in ns with `ip netns exec` (or nsenter; ns=None: here), capturing text output.

        Raises CommandError (a CalledProcessError that shows stderr) when check and it fails.
        """
        return run_command(self._wrap(ns, cmd, nsenter), check=check, timeout=timeout, **kw)

    def popen(
        self, ns: str | None, *cmd: str, nsenter: bool = False, **kw: Any
    ) -> subprocess.Popen:
        """Start cmd in ns (like `run`); the process (group) is killed on teardown."""
        kw.setdefault("start_new_session", True)  # lets teardown kill its children too
        p = subprocess.Popen(self._wrap(ns, cmd, nsenter), **kw)
        self._procs.append((p, bool(kw["start_new_session"])))
        return p

    # -- convenience probes for tests ------------------------------------------------------

    def ping(self, ns: str, addr: str, timeout: float = 2) -> bool:
        """Whether addr answers an ICMP echo request sent from ns.

        A raw socket in Python: iputils-ping is not installed everywhere.
        """
        code = _PING_CODE.format(addr=ipaddress.IPv4Address(addr), timeout=float(timeout))
        p = self.run(ns, sys.executable, "-c", code, check=False, timeout=timeout + 10)
        return p.returncode == 0

    def arp_who_has(self, ns: str, addr: str, dev: str = "eth0", timeout: float = 1) -> str | None:
        """The MAC that answers an ARP request for addr broadcast from ns's dev, or None.

        Raw frames rather than the neighbour table: whether a host answers ARP for an address
        (a DSR VIP on lo must not be answered) is what is asked, not what ns has cached.
        """
        out = self.run(ns, "ip", "-4", "-o", "addr", "show", "dev", dev).stdout
        src = re.search(r"inet ([\d.]+)", out)
        code = _ARP_CODE.format(dev=dev, src=src[1] if src else "0.0.0.0",
                                addr=ipaddress.IPv4Address(addr), timeout=float(timeout))
        p = self.run(ns, sys.executable, "-c", code, check=False, timeout=timeout + 10)
        return p.stdout.strip() if p.returncode == 0 else None

    def curl(self, ns: str, url: str, *args: str, timeout: float = 10) -> str:
        """Body of a curl request made from ns (fails on HTTP errors)."""
        # --noproxy: a proxy from the environment must never see lab traffic.
        cmd = ["curl", "-sS", "-f", "--noproxy", "*", "--max-time", str(timeout), *args, url]
        return self.run(ns, *cmd, timeout=timeout + 5).stdout

    def udp_request(
        self, ns: str, addr: str, port: int, payload: bytes, timeout: float = 2, sport: int = 0
    ) -> bytes:
        """Send one UDP datagram from ns and return the reply (raises on timeout)."""
        code = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.settimeout({float(timeout)}); s.bind(('0.0.0.0',{int(sport)}))\n"
            f"s.sendto(sys.stdin.buffer.read(),('{ipaddress.IPv4Address(addr)}',{int(port)}))\n"
            "sys.stdout.buffer.write(s.recv(65535))\n"
        )
        return self.run(
            ns, sys.executable, "-c", code, input=payload, text=False, timeout=timeout + 10
        ).stdout

    def http_get(self, ns: str, addr: str, port: int = 80, sport: int = 0,
                 timeout: float = 5) -> str:
        """Body of an HTTP/1.0 ``GET /`` from ns, from source port ``sport`` if given. It reads
        until the server closes, so the server closes first and the client's port is free
        again at once (no TIME_WAIT on this side): the next call may reuse the 5-tuple."""
        code = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({float(timeout)})\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('0.0.0.0',{int(sport)}))\n"
            f"s.connect(('{ipaddress.IPv4Address(addr)}',{int(port)}))\n"
            "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); out=b''\n"
            "while c:=s.recv(4096): out+=c\n"
            "sys.stdout.write(out.decode(errors='replace'))\n"
        )
        return self.run(ns, sys.executable, "-c", code, timeout=timeout + 10).stdout

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        """Build the lab (first removing any leftover one with the same prefix)."""
        teardown_prefix(self.prefix)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._is_up = True
        return self

    def down(self) -> None:
        """Tear the lab down: idempotent, and never fails on partial state."""
        with _sigint_deferred():
            self._kill_tracked()
            teardown_prefix(self.prefix)
            self._is_up = False

    def _kill_tracked(self) -> None:
        procs, self._procs = self._procs, []
        pending = []
        for p, own_group in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # The group outlives its leader when a child is still in it.
                if own_group:
                    os.killpg(p.pid, signal.SIGTERM)
                elif p.poll() is None:
                    p.terminate()
            pending.append((p, own_group))
        deadline = time.monotonic() + 3
        for p, own_group in pending:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if own_group:
                        os.killpg(p.pid, signal.SIGKILL)
                    else:
                        p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(3)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()

    # -- building --------------------------------------------------------------------------

    def _plan(self) -> list[Veth]:
        p, sw = self.prefix, self.sw_ns
        lb_mac = self.lb_macs
        v: list[Veth] = []
        c, lb = NS_NO["client"], NS_NO["lb"]
        if self.topology == "one-armed":
            v.append(Veth(self.client_ns, "eth0", self.client_mac, sw, "p-client", mac(0xFE, c)))
            v.append(Veth(self.lb_ns, "eth0", lb_mac["eth0"], sw, "p-lb", mac(0xFE, lb)))
        elif self.routed:
            assert self.router_ns is not None
            rt, rmac = self.router_ns, self.router_macs
            v.append(Veth(self.client_ns, "eth0", self.client_mac, rt, "eth0", rmac["eth0"]))
            v.append(Veth(rt, "eth1", rmac["eth1"], sw, "p-rt", mac(0xFE, NS_NO["rt"])))
            v.append(Veth(self.lb_ns, "eth0", lb_mac["eth0"], sw, "p-lb", mac(0xFE, lb)))
        else:
            lb0 = lb_mac["eth0"]
            v.append(Veth(self.client_ns, "eth0", self.client_mac, self.lb_ns, "eth0", lb0))
            v.append(Veth(self.lb_ns, "eth1", lb_mac["eth1"], sw, "p-lb", mac(0xFE, lb)))
        for i, name in enumerate(self.backend_names, 1):
            be_mac, port_mac = self.backend_macs[i - 1], mac(0xFE, _be_no(i))
            v.append(Veth(f"{p}-{name}", "eth0", be_mac, sw, f"p-{name}", port_mac))
        return v

    def _ifaces(self, ns: str) -> list[str]:
        out = [v.if_a for v in self.veths if v.ns_a == ns]
        return out + [v.if_b for v in self.veths if v.ns_b == ns]

    def _sh(self, ns: str, cmds: list[list[str]], stdin: str | None = None) -> None:
        """Run a list of commands in ns in one shell (one fork per namespace, not per command)."""
        script = "set -e\n" + "\n".join(shlex.join(c) for c in cmds)
        self.run(ns, "sh", "-c", script, timeout=60, input=stdin)

    def _build(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self._save_state()  # first, so that `down` finds a half-built lab too
        for ns in self.namespaces:
            run_command(["ip", "netns", "add", ns])
            # Before any interface exists, so that none ever gets IPv6 (no RS/DAD/MLD noise).
            self._sh(ns, [["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"],
                          ["ip", "link", "set", "lo", "up"]])  # fmt: skip
        # No STP: ports forward as soon as they are up. No snooping: no IGMP queries.
        br = f"br0 address {mac(0xFE, 0)} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
        run_command(["ip", "-n", self.sw_ns, "link", "add", *br.split()])
        for v in self.veths:
            # Created inside the namespaces, so no name ever appears in the caller's namespace.
            link = f"{v.if_a} address {v.mac_a} type veth peer name {v.if_b} address {v.mac_b}"
            run_command(["ip", "-n", v.ns_a, "link", "add", *link.split(), "netns", v.ns_b])
        lb_peers = set(self.xdp_peers)
        for ns in self.namespaces:
            self._sh(ns, self._configure(ns, lb_peers),
                     stdin=self._nft_script() if ns == self.router_ns else None)
        self._attach_xdp()
        self._start_backends()
        self._save_state()

    def _configure(self, ns: str, lb_peers: set[tuple[str, str]]) -> list[list[str]]:
        ifaces = self._ifaces(ns)
        sysctls = [f"net.ipv6.conf.{i}.disable_ipv6=1" for i in ifaces]
        cmds: list[list[str]] = []
        if ns == self.sw_ns:
            sysctls.append("net.ipv6.conf.br0.disable_ipv6=1")
        if ns == self.router_ns:
            sysctls.append("net.ipv4.ip_forward=1")
            for i in ("all", "default", *ifaces):
                # rp_filter: DSR/fullnat replies may come from sources the router would not
                # route back the same way; send_redirects: a backend talking to the VIP is
                # routed back out of eth1 to the LB, which must not earn it an ICMP redirect.
                sysctls += [f"net.ipv4.conf.{i}.rp_filter=0", f"net.ipv4.conf.{i}.send_redirects=0"]
        if ns in self.backend_ns and self.backend_vips:
            for i in ("all", "eth0"):
                # arp_ignore=1: answer ARP only for addresses on the interface asked (not the
                # VIPs on lo); arp_announce=2: never use a VIP as the source of an ARP request;
                # rp_filter=0: packets to a VIP arrive on eth0, not on lo where it lives.
                sysctls += [f"net.ipv4.conf.{i}.arp_ignore=1", f"net.ipv4.conf.{i}.arp_announce=2",
                            f"net.ipv4.conf.{i}.rp_filter=0"]  # fmt: skip
        if ns == self.lb_ns:
            sysctls.append("net.ipv4.ip_forward=1")
            for i in ("all", "default", *ifaces):
                # rp_filter: the LB sees client sources on the backend side and vice versa;
                # send_redirects: one-armed, replies are routed back out of the interface
                # they came in on, which would otherwise make the kernel send ICMP redirects.
                sysctls += [f"net.ipv4.conf.{i}.rp_filter=0", f"net.ipv4.conf.{i}.send_redirects=0"]
        cmds.append(["sysctl", "-q", "-w", *sysctls])
        for i in ifaces:
            # veth offers TX checksum offload: locally built packets leave with a partial
            # checksum that is wrong after an XDP rewrite, so every end computes it itself
            # (unless the lab is to keep veth's defaults: then `xdplb attach` must cope).
            if not self.tx_offload:
                cmds.append(["ethtool", "-K", i, "tx", "off"])
            if (ns, i) in lb_peers:
                cmds.append(["ethtool", "-K", i, "gro", "on"])  # NAPI for XDP_REDIRECT targets
        if ns == self.sw_ns:
            cmds += [["ip", "link", "set", i, "master", "br0"] for i in ifaces]
            cmds.append(["ip", "link", "set", "br0", "up"])
        elif ns == self.client_ns:
            cmds.append(["ip", "addr", "add", f"{self.client_addr}/24", "dev", "eth0"])
        elif ns == self.router_ns:
            cmds.append(["ip", "addr", "add", f"{self.router_client_addr}/24", "dev", "eth0"])
            cmds.append(["ip", "addr", "add", f"{self.router_backend_addr}/24", "dev", "eth1"])
        elif ns == self.lb_ns:
            if not self.routed:
                cmds.append(["ip", "addr", "add", f"{self.lb_client_addr}/24", "dev", "eth0"])
            dev = self.lb_backend_iface
            cmds.append(["ip", "addr", "add", f"{self.lb_backend_addr}/24", "dev", dev])
        else:
            addr = self.backend_addrs[self.backend_ns.index(ns)]
            cmds.append(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
            cmds += [["ip", "addr", "add", f"{v}/32", "dev", "lo"] for v in self.backend_vips]
        cmds += [["ip", "link", "set", i, "up"] for i in ifaces]
        if ns == self.client_ns:
            cmds.append(["ip", "route", "add", self.vip_net, "via", self.client_gw])
            if self.routed:
                cmds.append(["ip", "route", "add", "default", "via", self.client_gw])
        elif ns == self.router_ns:
            cmds.append(["ip", "route", "add", self.vip_net, "via", self.lb_backend_addr])
            cmds.append(["nft", "-f", "-"])  # the counters; the script comes on stdin
        elif ns == self.lb_ns and self.routed:
            cmds.append(["ip", "route", "add", "default", "via", self.router_backend_addr])
            # Without it a packet to a VIP that XDP passes up would loop LB -> router -> LB
            # until its TTL ran out; like the other labs, the LB itself has no route there.
            cmds.append(["ip", "route", "add", "unreachable", self.vip_net])
        elif ns in self.backend_ns:
            # Replies to the client go back through the LB (routed: straight to the router).
            cmds.append(["ip", "route", "add", "default", "via", self.backend_gw])
        return cmds

    def _nft_script(self) -> str:
        """The router's counters of packets forwarded toward the client, by L2 source."""
        lb_mac = self.lb_macs[self.lb_backend_iface]
        bes = ", ".join(self.backend_macs)
        # The forward hook still sees the Ethernet header a frame arrived with, so "who put
        # it on the wire" is its source MAC, whatever its IP source says.
        return f"""
table ip {NFT_TABLE} {{
    counter via_lb {{ }}
    counter from_backends {{ }}
    counter other {{ }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        oifname "eth0" ether saddr {lb_mac} counter name via_lb accept
        oifname "eth0" ether saddr {{ {bes} }} counter name from_backends accept
        oifname "eth0" counter name other accept
    }}
}}
"""

    def router_counts(self) -> dict[str, dict[str, int]]:
        """Packets and bytes (IP lengths) the router forwarded toward the client, by sender.

        ``via_lb``: frames from the LB's MAC; ``from_backends``: from any backend's MAC;
        ``other``: from anything else. Routed topology only.
        """
        ns = self._router()
        out = self.run(ns, "nft", "-j", "list", "counters", "table", "ip", NFT_TABLE).stdout
        counts = {}
        for item in json.loads(out)["nftables"]:
            c = item.get("counter")
            if c and c.get("table") == NFT_TABLE:
                counts[c["name"]] = {"packets": int(c["packets"]), "bytes": int(c["bytes"])}
        return {name: counts[name] for name in ROUTER_COUNTERS}

    def reset_router_counts(self) -> None:
        """Zero the router's counters (see router_counts)."""
        ns = self._router()
        self._sh(ns, [["nft", "reset", "counter", "ip", NFT_TABLE, n] for n in ROUTER_COUNTERS])

    def _router(self) -> str:
        if self.router_ns is None:
            raise ValueError(f"the {self.topology} lab has no router (topology 'routed' has)")
        return self.router_ns

    def _attach_xdp(self) -> None:
        self.xdp_prog_ids = xdp_attach_pass(self.xdp_peers)
        self._save_state()

    def stop_backend(self, backend: int | str) -> None:
        """Stop every service of one backend (as if its server died); see start_backend."""
        name = self._backend_name(backend)
        pid = self.backend_pids.pop(name)
        kill_pids({pid})
        self._save_state()

    def start_backend(self, backend: int | str) -> None:
        """(Re)start the services of one backend and wait until they listen."""
        self._start_backends(only=[self._backend_name(backend)])

    def _start_backends(self, timeout: float = 20, only: Sequence[str] | None = None) -> None:
        procs: dict[str, subprocess.Popen] = {}
        for name, ns, addr in zip(
            self.backend_names, self.backend_ns, self.backend_addrs, strict=True
        ):
            if only is not None and name not in only:
                continue
            (self.runtime_dir / f"{name}.ready").unlink(missing_ok=True)
            with open(self.runtime_dir / f"{name}.err", "wb") as err:  # the child keeps a copy
                procs[name] = self.popen(
                    ns, sys.executable, str(BACKEND_SERVER), "--name", name, "--addr", addr,
                    "--log", str(self.runtime_dir / f"{name}.log"),
                    "--ready", str(self.runtime_dir / f"{name}.ready"),
                    "--http-ports", ",".join(map(str, self.http_ports)),
                    "--udp-ports", ",".join(map(str, self.udp_ports)),
                    "--echo-ports", ",".join(map(str, self.echo_ports)),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                )  # fmt: skip
            self.backend_pids[name] = procs[name].pid
        self._save_state()
        deadline = time.monotonic() + timeout
        waiting = set(procs)
        while waiting:
            for name in sorted(waiting):
                if (self.runtime_dir / f"{name}.ready").exists():
                    waiting.discard(name)
                elif procs[name].poll() is not None:
                    err = (self.runtime_dir / f"{name}.err").read_text(errors="replace")
                    raise RuntimeError(f"backend {name} exited {procs[name].returncode}: {err}")
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"backends not listening after {timeout}s: {sorted(waiting)}")
            time.sleep(0.02)

    def _save_state(self) -> None:
        state = {
            "prefix": self.prefix,
            "topology": self.topology,
            "backends": len(self.backend_names),
            "backend_vips": self.backend_vips,
            "namespaces": self.namespaces,
            "pids": self.backend_pids,
            "xdp": [[ns, i, pid] for (ns, i), pid in self.xdp_prog_ids.items()],
            "created": time.time(),
        }
        tmp = self.runtime_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.rename(self.runtime_dir / "state.json")

    # -- description -----------------------------------------------------------------------

    def describe(self) -> str:
        """A human-readable summary of the lab's names and addresses."""
        lines = [
            f"lab {self.prefix!r} ({self.topology}, {len(self.backend_names)} backends)",
            f"  client  {self.client_ns:<14} eth0 {self.client_addr}/24 {self.client_mac}"
            f"  route {self.vip_net}{' and default' if self.routed else ''} via {self.client_gw}",
        ]
        if self.router_ns:
            rm = self.router_macs
            lines += [
                f"  router  {self.router_ns:<14} eth0 {self.router_client_addr}/24 {rm['eth0']}"
                f"  route {self.vip_net} via {self.lb_backend_addr}",
                f"  router  {self.router_ns:<14} eth1 {self.router_backend_addr}/24 {rm['eth1']}"
                f"  nft counters {NFT_TABLE}: {', '.join(ROUTER_COUNTERS)}",
            ]
        for i in self.lb_ifaces:
            addrs = []
            if i == self.lb_client_iface and not self.routed:
                addrs.append(f"{self.lb_client_addr}/24")
            if i == self.lb_backend_iface:
                addrs.append(f"{self.lb_backend_addr}/24")
            route = f"  default via {self.router_backend_addr}" if self.routed else ""
            lines.append(
                f"  lb      {self.lb_ns:<14} {i} {' '.join(addrs)} {self.lb_macs[i]}{route}"
            )
        gw = self.backend_gw
        vips = f"  lo {', '.join(self.backend_vips)} (no ARP)" if self.backend_vips else ""
        for name, ns, addr, m in zip(
            self.backend_names, self.backend_ns, self.backend_addrs, self.backend_macs, strict=True
        ):
            lines.append(f"  {name:<7} {ns:<14} eth0 {addr}/24 {m}  default via {gw}{vips}")
        lines.append(f"  switch  {self.sw_ns:<14} br0")
        peers = ", ".join(f"{ns}/{i}" for ns, i in self.xdp_peers)
        lines.append(f"  XDP_PASS on LB peers: {peers}")
        svc = f"http {list(self.http_ports)}, udp echo {list(self.udp_ports)}"
        lines.append(f"  services: {svc}; logs in {self.runtime_dir}")
        lines.append(f"  agent: {shlex.join(self.nsenter_cmd(self.lb_ns, 'xdplb', '...'))}")
        return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------


def _status(prefix: str | None) -> int:
    prefixes: set[str] = set()
    any_lab = re.compile(rf"(.+)-{ROLE_RE}")
    for n in list_netns():
        m = any_lab.fullmatch(n)
        if m and (RUN_ROOT / m.group(1)).is_dir():
            prefixes.add(m.group(1))
    if RUN_ROOT.is_dir():
        prefixes |= {d.name for d in RUN_ROOT.iterdir() if d.is_dir()}
    if prefix is not None:
        prefixes &= {prefix}
        if not prefixes and lab_namespaces(prefix):
            prefixes.add(prefix)  # namespaces without a runtime dir: a broken lab
    if not prefixes:
        print("no lab" + (f" with prefix {prefix!r}" if prefix else ""))
        return 1 if prefix else 0
    for p in sorted(prefixes):
        try:
            state = json.loads((RUN_ROOT / p / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        names = lab_namespaces(p)
        print(f"lab {p!r}: {state.get('topology', '?')}, {state.get('backends', '?')} backends")
        pids = netns_pids(names)
        for n in names:
            print(f"  netns {n:<16} processes: {sorted(pids[n]) or '-'}")
        missing = set(state.get("namespaces", [])) - set(names)
        if missing:
            print(f"  missing namespaces: {sorted(missing)}")
        for ns, ifname, prog_id in state.get("xdp", []):
            try:
                st = xdp_state(ns, ifname)
            except Exception as e:  # noqa: BLE001 (status must not crash on a broken lab)
                st = f"error {e}"
            if st is not None and not isinstance(st, str):
                st = f"{st.mode} prog {st.prog_id}"
            print(f"  xdp {ns}/{ifname}: {st or 'none'} (lab attached prog {prog_id})")
        for name, pid in state.get("pids", {}).items():
            print(f"  backend {name} pid {pid}: {'up' if _alive(pid) else 'DOWN'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="xdplb network-namespace lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab (replacing one with the same prefix)")
    up.add_argument("topology", choices=TOPOLOGIES)
    up.add_argument("--prefix", default="xl")
    up.add_argument("--backends", type=int, default=2)
    up.add_argument("--backend-vips", default="", metavar="VIP,...",
                    help="addresses for every backend's lo, not answered by ARP (DSR)")
    down = sub.add_parser("down", help="remove a lab and its processes")
    down.add_argument("--prefix", default="xl")
    st = sub.add_parser("status", help="show labs (all, or one prefix)")
    st.add_argument("--prefix")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("lab: must run as root", file=sys.stderr)
        return 1
    if args.cmd == "up":
        vips = [v for v in args.backend_vips.split(",") if v]
        lab = Lab(args.topology, args.backends, args.prefix, backend_vips=vips)
        lab.up()  # the backends run in their own sessions and outlive this process
        print(lab.describe())
        return 0
    if args.cmd == "down":
        with _sigint_deferred():
            teardown_prefix(args.prefix)
        return 0
    return _status(args.prefix)


if __name__ == "__main__":
    sys.exit(main())
