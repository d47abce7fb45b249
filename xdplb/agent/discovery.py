"""Backends from DNS (``backends_from``): the agent's queries, on a thread of their own.

Each ``backends_from`` VIP is asked for again after min(TTL, ``refresh``) (at least
``TTL_MIN``), with dnspython, never from a cache. Every query is bounded by
``QUERY_TIMEOUT`` (the SRV targets' address queries share that budget), so the thread never
hangs; results are posted to the agent's event queue and applied by its main thread, as
health results are. What an answer means (``xdplb/config/discovery.py``):

- records: the new set, applied as a reload diff when it differs from the last;
- NXDOMAIN, or NOERROR without records: an authoritative "none", the pool is emptied;
- a timeout, SERVFAIL, REFUSED or any other failure: the last set stays, the failure is
  logged and counted (``dns_failures``).

The first query of a source (at attach, or when a reload adds or changes it) is made at once,
in the caller's thread, so that the agent never starts or reloads into a pool it knows nothing
about (``first_answers``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from xdplb.config import Backend, Config, Vip
from xdplb.config.discovery import DnsDiscovery, Record, to_backends

log = logging.getLogger("xdplb.discovery")

QUERY_TIMEOUT = 2.0  # seconds, for one source's query and its SRV targets' together
TTL_MIN = 1.0  # a TTL of 0 must not make the agent query in a loop
FAILURE_RETRY = 5.0  # a failed query is asked again after min(refresh, this)


class DnsFailure(Exception):
    """No usable answer (timeout, SERVFAIL, REFUSED, ...): the last set stays."""


@dataclass(frozen=True)
class Answer:
    """An authoritative answer: its endpoints (none for NXDOMAIN or an empty NOERROR)."""

    records: tuple[Record, ...]
    ttl: float | None  # None: nothing to cache (an empty answer)
    summary: str  # "3 records, TTL 5s" / "NXDOMAIN"


Outcome = Answer | DnsFailure


def _resolver(src: DnsDiscovery) -> dns.resolver.Resolver:
    res = dns.resolver.Resolver(configure=src.resolver is None)
    if src.resolver is not None:
        res.nameservers = [str(src.resolver)]
    res.cache = None  # every query asks the server: a change must be seen within its TTL
    return res


def _server(name: object) -> str:
    return re.sub(r"^Do53:(.*)@53$", r"\1", str(name))


def _resolve(res: dns.resolver.Resolver, name: str | dns.name.Name, rdtype: str,
             deadline: float) -> dns.resolver.Answer | None:
    """One query; None for an authoritative "no such records" (NXDOMAIN, NODATA)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DnsFailure(f"no answer within {QUERY_TIMEOUT:g}s")
    res.timeout = res.lifetime = left
    try:
        answer = res.resolve(name, rdtype, search=False, raise_on_no_answer=False,
                             lifetime=left)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.NoNameservers as e:  # SERVFAIL, REFUSED, ... from every server
        errors = e.kwargs.get("errors") or []
        # dnspython names a server "Do53:10.0.0.53@53": the address is what the config says
        raise DnsFailure("; ".join(f"{_server(err[0])} answered {err[3]}" for err in errors)
                         or "no server answered") from None
    except dns.exception.Timeout:
        raise DnsFailure(f"no answer within {QUERY_TIMEOUT:g}s") from None
    except dns.exception.DNSException as e:
        raise DnsFailure(str(e) or type(e).__name__) from None
    return answer if answer.rrset is not None else None


def lookup(src: DnsDiscovery, vip_port: int, timeout: float = QUERY_TIMEOUT) -> Answer:
    """Ask ``src`` for the endpoints it names now; DnsFailure when there is no answer."""
    res = _resolver(src)
    deadline = time.monotonic() + timeout
    answer = _resolve(res, src.name, src.type, deadline)
    if answer is None:
        return Answer((), None, "no such name (NXDOMAIN) or no records")
    assert answer.rrset is not None
    ttl = float(answer.rrset.ttl)
    if src.type == "A":
        port = src.port or vip_port
        records = tuple(Record(0, rr.address, port) for rr in answer.rrset)
        return Answer(records, ttl, f"{len(records)} addresses, TTL {ttl:g}s")
    out: list[Record] = []
    # Addresses the server sent along (additional section), else asked for per target.
    extra = {rrset.name: rrset for rrset in answer.response.additional
             if rrset.rdtype == dns.rdatatype.A}
    for rr in answer.rrset:
        if rr.target == dns.name.root:  # "." : the service is decidedly not available there
            continue
        rrset = extra.get(rr.target)
        if rrset is None:
            target = _resolve(res, rr.target, "A", deadline)
            if target is None:
                log.warning("SRV target %s of %s has no address; left out", rr.target, src.name)
                continue
            rrset = target.rrset
        ttl = min(ttl, float(rrset.ttl))
        out += [Record(rr.priority, a.address, rr.port, rr.weight) for a in rrset]
    return Answer(tuple(out), ttl, f"{len(answer.rrset)} SRV records, {len(out)} addresses, "
                  f"TTL {ttl:g}s")


def next_query_in(src: DnsDiscovery, outcome: Outcome) -> float:
    """Seconds until ``src`` is asked again: min(TTL, refresh), not below TTL_MIN; after a
    failure min(refresh, FAILURE_RETRY)."""
    if isinstance(outcome, DnsFailure):
        return min(src.refresh, FAILURE_RETRY)
    return max(TTL_MIN, min(src.refresh, outcome.ttl if outcome.ttl is not None
                            else src.refresh))


@dataclass
class Source:
    """One ``backends_from`` VIP as the agent knows it: what it asks, what it has."""

    dns: DnsDiscovery
    vip_port: int
    backends: tuple[Backend, ...] = ()
    failures: int = 0
    failing: str | None = None  # the current run of failures' last reason
    last_answer: str | None = None
    last_ok: float | None = None
    last_error: dict[str, Any] | None = None
    next_query: float | None = None  # unix time
    left_out: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.dns.name, "type": self.dns.type,
                "resolver": str(self.dns.resolver) if self.dns.resolver else None,
                "refresh": self.dns.refresh, "backends": len(self.backends),
                "dns_failures": self.failures, "failing": self.failing,
                "last_answer": self.last_answer, "last_ok": self.last_ok,
                "last_error": self.last_error, "next_query": self.next_query,
                "left_out": self.left_out}


def _sources(cfg: Config) -> dict[str, Vip]:
    return {v.name: v for v in cfg.vips if v.backends_from is not None}


class Discovery:
    """The ``backends_from`` VIPs of the running config, and the thread that queries them.
    ``post(vip name, dns source, outcome)`` is called from that thread; the agent applies it
    with ``result`` and ``commit`` on its own thread."""

    def __init__(self, post: Callable[[str, DnsDiscovery, Outcome], None],
                 query: Callable[[DnsDiscovery, int], Answer] = lookup) -> None:
        self.post = post
        self.query = query
        self.sources: dict[str, Source] = {}
        self._due: dict[str, tuple[float, DnsDiscovery, int]] = {}  # vip -> (monotonic, ...)
        self._cv = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    # --- the agent's thread ---------------------------------------------------------------

    def first_answers(self, cfg: Config) -> dict[str, Source]:
        """The sources ``cfg`` needs: the known ones kept as they are, new or changed ones
        asked now. Raises DnsFailure naming the VIP, name and resolver when one has no answer:
        the caller then changes nothing. Nothing here changes until ``use``."""
        out: dict[str, Source] = {}
        for name, vip in _sources(cfg).items():
            assert vip.backends_from is not None
            src = vip.backends_from.dns
            known = self.sources.get(name)
            if known is not None and known.dns == src and known.vip_port == vip.port:
                out[name] = known
                continue
            try:
                answer = self.query(src, vip.port)
            except DnsFailure as e:
                raise DnsFailure(f"VIP {name}: backends_from {src.describe()} failed: {e}; "
                                 "the first query must be answered (retry when the resolver "
                                 "answers)") from None
            source = Source(src, vip.port)
            source.backends, source.left_out = to_backends(answer.records, vip)
            self._answered(source, answer)
            out[name] = source
        return out

    def use(self, sources: dict[str, Source]) -> None:
        """Make ``sources`` (from ``first_answers``) the running ones and schedule them."""
        now = time.monotonic()
        with self._cv:
            for name in set(self._due) - set(sources):
                del self._due[name]
            for name, s in sources.items():
                if self.sources.get(name) is not s:
                    delay = s.next_query - time.time() if s.next_query else 0.0
                    self._due[name] = (now + max(0.0, delay), s.dns, s.vip_port)
            self.sources = sources
            self._cv.notify()
        if self._due and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dns", daemon=True)
            self._thread.start()

    def found(self) -> dict[str, tuple[Backend, ...]]:
        return {name: s.backends for name, s in self.sources.items()}

    def result(self, name: str, src: DnsDiscovery, outcome: Outcome, vip: Vip
               ) -> tuple[Backend, ...] | None:
        """Take an outcome of the thread's: the new backends of ``name`` when they differ
        from the last set (to be applied, then ``commit``ted), else None (a failure,
        counted; the same set; or an answer for a source no longer configured)."""
        s = self.sources.get(name)
        if s is None or s.dns != src:
            return None
        if isinstance(outcome, DnsFailure):
            self.failed(name, str(outcome))
            return None
        if s.failing is not None:
            log.warning("VIP %s: %s answers again (%s)", name, src.describe(), outcome.summary)
        self._answered(s, outcome)
        backends, left_out = to_backends(outcome.records, vip)
        if left_out != s.left_out:
            for why in left_out:
                log.warning("VIP %s: discovered backend left out: %s", name, why)
        s.left_out = left_out
        return backends if backends != s.backends else None

    def commit(self, name: str, backends: tuple[Backend, ...]) -> None:
        if (s := self.sources.get(name)) is not None:
            s.backends = backends

    def failed(self, name: str, reason: str) -> None:
        """Count a failure of ``name``'s discovery; its last set stays."""
        s = self.sources[name]
        s.failures += 1
        s.last_error = {"message": reason, "time": time.time()}
        s.next_query = time.time() + next_query_in(s.dns, DnsFailure())
        (log.warning if s.failing != reason else log.info)(
            "VIP %s: %s failed: %s; keeping the last %d backends (dns_failures %d)",
            name, s.dns.describe(), reason, len(s.backends), s.failures)
        s.failing = reason

    def _answered(self, s: Source, answer: Answer) -> None:
        s.failing = None
        s.last_answer, s.last_ok = answer.summary, time.time()
        s.next_query = time.time() + next_query_in(s.dns, answer)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: s.as_dict() for name, s in self.sources.items()}

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(QUERY_TIMEOUT + 3)

    # --- the query thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped:
                    now = time.monotonic()
                    due = min(self._due.items(), key=lambda kv: kv[1][0], default=None)
                    if due is not None and due[1][0] <= now:
                        break
                    self._cv.wait(None if due is None else due[1][0] - now)
                if self._stopped:
                    return
                name, (_, src, port) = due
            try:
                outcome: Outcome = self.query(src, port)
            except DnsFailure as e:
                outcome = e
            except Exception as e:  # a bug must not end discovery: counted as a failure
                log.exception("DNS query for %s failed", src.name)
                outcome = DnsFailure(f"{type(e).__name__}: {e}")
            with self._cv:
                if self._due.get(name, (0, None))[1] == src:  # not reconfigured meanwhile
                    self._due[name] = (time.monotonic() + next_query_in(src, outcome), src, port)
            try:
                self.post(name, src, outcome)
            except Exception:
                log.exception("posting a DNS result failed")
