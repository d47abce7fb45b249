"""A real DNS server in a lab namespace, for ``backends_from`` tests: dnsmasq (Debian's
dnsmasq-base, scripts/setup.sh) on an address of its own, serving SRV and A records from a
file the test writes.

    dns = DnsServer(lab, lab.backend_ns[2], "10.20.0.53", tmp)
    dns.serve(Zone(srv={"_http._tcp.web.lab": [Srv("be1.web.lab", 80, 10, 3)]},
                   a={"be1.web.lab": ["10.20.0.11"]}, ttl=2))
    dns.refuse()   # answers REFUSED to everything
    dns.stop()     # not there: queries time out

dnsmasq re-reads only its hosts files on SIGHUP, not SRV records, so ``serve`` restarts it
(a few milliseconds without a server). The process is the lab's (``Lab.popen``): the lab's
teardown kills it whatever happens to the test, as it kills everything in its namespaces.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab import Lab


@dataclass(frozen=True)
class Srv:
    """One SRV record's data: target, port, priority, weight."""

    target: str
    port: int
    priority: int = 10
    weight: int = 1


@dataclass(frozen=True)
class Zone:
    """What the server answers: SRV and A records by name, and names it has but with no
    address (their A query is answered NOERROR without records). Any other name under
    ``domain`` is NXDOMAIN."""

    srv: Mapping[str, Sequence[Srv]] = field(default_factory=dict)
    a: Mapping[str, Sequence[str]] = field(default_factory=dict)
    no_address: Sequence[str] = ()
    ttl: int = 2
    domain: str = "lab"

    def conf(self) -> str:
        lines = [f"local=/{self.domain}/", f"local-ttl={self.ttl}"]
        lines += [f"srv-host={name},{r.target},{r.port},{r.priority},{r.weight}"
                  for name, records in self.srv.items() for r in records]
        lines += [f"host-record={name},{addr}" for name, addrs in self.a.items() for addr in addrs]
        lines += [f'txt-record={name},"no address here"' for name in self.no_address]
        return "\n".join(lines) + "\n"


class DnsServer:
    """dnsmasq in ``ns`` on ``address`` (added to its eth0 as a /32 of the lab's subnet)."""

    def __init__(self, lab: Lab, ns: str, address: str, tmp: Path, dev: str = "eth0") -> None:
        self.lab, self.ns, self.address = lab, ns, address
        self.conf = tmp / "dnsmasq.conf"
        self.log = tmp / "dnsmasq.log"
        self.proc: subprocess.Popen | None = None
        lab.run(ns, "ip", "addr", "add", f"{address}/24", "dev", dev)

    def serve(self, zone: Zone) -> None:
        """Answer from ``zone`` from now on (restarts the server)."""
        self._start(zone.conf())

    def refuse(self) -> None:
        """Answer REFUSED to every query: no records and no upstream server to ask."""
        self._start("")

    def _start(self, conf: str) -> None:
        self.stop()
        self.conf.write_text(conf)
        with self.log.open("a") as log:
            self.proc = self.lab.popen(
                self.ns, "dnsmasq", "--keep-in-foreground", "--user=root", "--no-resolv",
                "--no-hosts", "--bind-interfaces", f"--listen-address={self.address}",
                "--except-interface=lo", "--pid-file=", "--log-queries", "--log-facility=-",
                f"--conf-file={self.conf}", stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while f"{self.address}:53" not in self.lab.run(self.ns, "ss", "-ulnH").stdout:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """No server: queries to the address time out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
