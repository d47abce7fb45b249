"""Health checker: concurrency (a slow backend delays nobody else) and rise/fall, on loopback."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from xdplb.agent.health import HealthChecker, Result, Target
from xdplb.config import HealthCheck


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/healthz" else 503
        self.send_response(code)
        self.end_headers()

    def log_message(self, *a) -> None:
        pass


@pytest.fixture
def servers():
    ThreadingHTTPServer.request_queue_size = 512  # a backlog of 5 is a toy server's
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    # Accepts connections and never answers: the slow backend.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(512)
    closed = socket.socket()  # bound, not listening: connection refused
    closed.bind(("127.0.0.1", 0))
    yield http.server_address[1], silent.getsockname()[1], closed.getsockname()[1]
    http.shutdown()
    silent.close()
    closed.close()


def hc(**kw) -> HealthCheck:
    base = {"type": "http", "path": "/healthz", "interval": 0.3, "timeout": 0.25,
            "rise": 2, "fall": 2}
    return HealthCheck(**{**base, **kw})


def test_many_backends_one_slow_delays_nobody(servers):
    ok_port, silent_port, closed_port = servers
    changes: list[tuple[str, bool, str]] = []
    hcheck = HealthChecker(lambda k, up, why: changes.append((k, up, why)))
    try:
        targets = [Target(f"web/ok{i}", "127.0.0.1", ok_port, hc()) for i in range(200)]
        targets += [Target(f"web/slow{i}", "127.0.0.1", silent_port, hc()) for i in range(50)]
        targets.append(Target("web/refused", "127.0.0.1", closed_port, hc(type="tcp")))
        targets.append(Target("web/404", "127.0.0.1", ok_port, hc(path="/nope")))
        hcheck.set_targets(targets)
        time.sleep(2.0)
        snap = hcheck.snapshot()
        now = time.time()
        for i in range(200):
            r = snap[f"web/ok{i}"]
            assert r["state"] == "up" and r["last"]["ok"]
            assert now - r["last"]["time"] < 0.3 + 0.5  # checked on schedule
        down = {k for k, up, _ in changes if not up}
        assert {f"web/slow{i}" for i in range(50)} <= down
        assert {"web/refused", "web/404"} <= down
        assert "timed out" in snap["web/slow0"]["last"]["detail"]
        assert "503" in snap["web/404"]["last"]["detail"]
        assert not any(k.startswith("web/ok") for k in down)
        assert hcheck.down() == down
    finally:
        hcheck.stop()


def test_rise_and_fall_hysteresis():
    hcheck = HealthChecker(lambda *a: None)
    try:
        t = Target("v/b", "127.0.0.1", 1, hc())
        with hcheck._lock:
            hcheck._targets[t.key] = t
        hcheck.results["v/b"] = Result()
        rec = hcheck._record
        assert rec("v/b", False, "x", 2, 3) is None
        assert rec("v/b", False, "x", 2, 3) is None
        assert rec("v/b", True, "ok", 2, 3) is None  # a success resets the failure run
        assert rec("v/b", False, "x", 2, 3) is None
        assert rec("v/b", False, "x", 2, 3) is None
        change = rec("v/b", False, "boom", 2, 3)
        assert change == (False, "3 consecutive failures (last: boom)")
        assert rec("v/b", True, "ok", 2, 3) is None
        assert rec("v/b", True, "ok", 2, 3)[0] is True
    finally:
        hcheck.stop()
