"""Active health checks (TCP connect or HTTP GET), concurrent, with rise/fall hysteresis.

Every backend has its own asyncio task on one event-loop thread, so hundreds of backends are
checked on schedule and a slow or silent one only ever costs its own timeout. A backend
starts ``up`` (traffic flows from the moment of attach) and goes down after ``fall``
consecutive failures; a down backend comes back after ``rise`` consecutive successes. Each
state change is reported to the agent through a callback, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xdplb.config import HealthCheck
from xdplb.model.hashing import murmur3_32

log = logging.getLogger("xdplb.health")


@dataclass(frozen=True)
class Target:
    key: str  # "<vip name>/<addr>:<port>"
    address: str
    port: int
    check: HealthCheck


@dataclass
class Result:
    state: str = "up"  # up | down
    since: float = field(default_factory=time.time)
    ok_run: int = 0
    fail_run: int = 0
    last_ok: bool | None = None
    last_time: float | None = None
    last_detail: str = "not checked yet"
    passed: bool = False  # a check has succeeded (a node announces nothing before: bgp.py)

    def as_dict(self) -> dict:
        return {
            "state": self.state,
            "since": self.since,
            "passed": self.passed,
            "last": {"ok": self.last_ok, "time": self.last_time, "detail": self.last_detail},
        }


async def probe(t: Target) -> tuple[bool, str]:
    """One check of one backend: (success, what happened)."""
    c = t.check
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(t.address, t.port), timeout=c.timeout
        )
    except TimeoutError:
        return False, f"tcp connect timed out after {c.timeout:g}s"
    except OSError as e:
        return False, f"tcp connect failed: {e.strerror or e}"
    try:
        if c.type != "http":
            return True, f"tcp connect ok in {1000 * (time.monotonic() - start):.1f} ms"
        left = max(0.001, c.timeout - (time.monotonic() - start))
        req = (f"GET {c.path} HTTP/1.0\r\nHost: {t.address}\r\n"
               "User-Agent: xdplb-health\r\nConnection: close\r\n\r\n")
        writer.write(req.encode())
        try:
            await asyncio.wait_for(writer.drain(), timeout=left)
            line = await asyncio.wait_for(reader.readline(), timeout=left)
        except TimeoutError:
            return False, f"http response timed out after {c.timeout:g}s"
        except OSError as e:
            return False, f"http request failed: {e.strerror or e}"
        parts = line.decode(errors="replace").split()
        if len(parts) < 2 or not parts[1].isdigit():
            return False, f"bad http status line {line[:60]!r}"
        code = int(parts[1])
        ok = code in c.expect_status if c.expect_status else 200 <= code <= 399
        return ok, f"http {c.path} -> {code}"
    finally:
        writer.close()
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(writer.wait_closed(), timeout=0.5)


class HealthChecker:
    """Runs checks for a changing set of targets; ``on_change(key, up, reason)`` is called
    from the checker thread on every state change."""

    def __init__(self, on_change: Callable[[str, bool, str], None]) -> None:
        self.on_change = on_change
        self.results: dict[str, Result] = {}
        self._targets: dict[str, Target] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop.run_forever, name="health",
                                        daemon=True)
        self._thread.start()

    def set_targets(self, targets: list[Target]) -> None:
        """Check exactly these targets from now on; unchanged ones keep their state."""
        new = {t.key: t for t in targets}
        with self._lock:
            for key in list(self._targets):
                if key not in new or new[key] != self._targets[key]:
                    self._loop.call_soon_threadsafe(self._cancel, key)
                    del self._targets[key]
                    if key not in new:
                        self.results.pop(key, None)
            for key, t in new.items():
                if key not in self._targets:
                    self._targets[key] = t
                    self.results.setdefault(key, Result())
                    self._loop.call_soon_threadsafe(self._spawn, t)

    def down(self) -> set[str]:
        with self._lock:
            return {k for k, r in self.results.items() if r.state == "down"}

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {k: r.as_dict() for k, r in self.results.items()}

    def stop(self) -> None:
        """Cancel every check, wait for them to unwind (sockets closed), end the thread."""
        async def _cancel_all() -> None:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop)
        with contextlib.suppress(Exception):
            fut.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        # Whatever is still pending (a check spawned meanwhile, a slow unwind) is finished here,
        # on this thread, so no coroutine is left to be closed by the garbage collector.
        if not self._thread.is_alive():
            left = asyncio.all_tasks(self._loop)
            for task in left:
                task.cancel()
            if left:
                self._loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            self._loop.close()

    def _spawn(self, t: Target) -> None:
        self._tasks[t.key] = self._loop.create_task(self._run(t))

    def _cancel(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task:
            task.cancel()

    async def _run(self, t: Target) -> None:
        c = t.check
        # Spread the checks over the interval (stable per backend) instead of firing all of
        # them at once: hundreds of simultaneous connects are a burst for the backends.
        await asyncio.sleep(c.interval * (murmur3_32(t.key.encode()) % 1000) / 1000)
        while True:
            started = time.monotonic()
            ok, detail = await probe(t)
            change = self._record(t.key, ok, detail, c.rise, c.fall)
            if change is not None:
                up, reason = change
                try:
                    self.on_change(t.key, up, reason)
                except Exception:  # the agent's problem must not stop the checks
                    log.exception("health change handler failed")
            await asyncio.sleep(max(0.0, c.interval - (time.monotonic() - started)))

    def _record(self, key: str, ok: bool, detail: str, rise: int, fall: int
                ) -> tuple[bool, str] | None:
        with self._lock:
            r = self.results.get(key)
            if r is None:
                return None
            r.last_ok, r.last_time, r.last_detail = ok, time.time(), detail
            if ok:
                r.ok_run, r.fail_run, r.passed = r.ok_run + 1, 0, True
                if r.state == "down" and r.ok_run >= rise:
                    r.state, r.since = "up", time.time()
                    return True, f"{rise} consecutive successes ({detail})"
            else:
                r.ok_run, r.fail_run = 0, r.fail_run + 1
                if r.state == "up" and r.fail_run >= fall:
                    r.state, r.since = "down", time.time()
                    return False, f"{fall} consecutive failures (last: {detail})"
            return None
