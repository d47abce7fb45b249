#!/usr/bin/env python3
"""Steady lab traffic through a VIP, for tests of changes under load (stdlib only).

- ``--streams K`` long-lived TCP connections to VIP:``--stream-port`` (the backends' TCP echo
  service): each reads the backend's banner, then sends a numbered chunk every
  ``--stream-interval`` seconds and checks the echo byte for byte. Data flows both ways for
  the whole run; any error, mismatch or stall over ``--stall`` seconds breaks the stream.
- ``--rate R`` new HTTP connections per second to VIP:``--http-port``, each recording which
  backend answered (or the error).

Everything is appended as JSON lines to ``--log``: {"ev": "new", "t", "sport", "backend"|"error"},
{"ev": "stream", "id", "backend"} at connect, {"ev": "break", "t", "id", "backend", "error"},
and {"ev": "beat", "t", "id", "backend", "bytes"} every second. Stops after ``--duration``
seconds (bounded) or on SIGTERM, then writes {"ev": "end", "streams": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

LOCK = threading.Lock()


def emit(fh, **rec) -> None:
    rec.setdefault("t", time.time())
    with LOCK:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()


def read_line(sock: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed before banner")
        buf += chunk
    return buf.decode().strip()


def stream(i: int, a: argparse.Namespace, stop: threading.Event, fh, final: dict) -> None:
    backend = None
    total = 0
    try:
        s = socket.create_connection((a.vip, a.stream_port), timeout=a.stall)
        backend = read_line(s).removeprefix("backend=")
        emit(fh, ev="stream", id=i, backend=backend)
        seq = 0
        last_beat = time.time()
        while not stop.is_set():
            payload = f"{i}:{seq}:".encode().ljust(1024, b"x")
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(len(payload) - len(got))
                if not chunk:
                    raise ConnectionError("closed by peer")
                got += chunk
            if got != payload:
                raise ValueError(f"echo mismatch at seq {seq}")
            total += len(payload)
            seq += 1
            if time.time() - last_beat >= 1:
                emit(fh, ev="beat", id=i, backend=backend, bytes=total)
                last_beat = time.time()
            stop.wait(a.stream_interval)
        s.close()
        final[i] = {"backend": backend, "bytes": total, "broken": False}
    except (OSError, ValueError) as e:
        emit(fh, ev="break", id=i, backend=backend, error=str(e), bytes=total)
        final[i] = {"backend": backend, "bytes": total, "broken": True, "error": str(e)}


def new_connections(a: argparse.Namespace, stop: threading.Event, fh) -> None:
    req = f"GET / HTTP/1.0\r\nHost: {a.vip}\r\n\r\n".encode()
    while not stop.is_set():
        start = time.time()
        try:
            with socket.create_connection((a.vip, a.http_port), timeout=2) as s:
                sport = s.getsockname()[1]
                s.sendall(req)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            body = data.decode(errors="replace")
            name = body.split("backend=", 1)[1].split()[0] if "backend=" in body else None
            emit(fh, ev="new", t=start, sport=sport, backend=name,
                 **({} if name else {"error": body[:80]}))
        except OSError as e:
            emit(fh, ev="new", t=start, backend=None, error=str(e))
        stop.wait(max(0.0, 1.0 / a.rate - (time.time() - start)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vip", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-port", type=int, default=7000)
    ap.add_argument("--stream-interval", type=float, default=0.02)
    ap.add_argument("--stall", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--http-port", type=int, default=80)
    ap.add_argument("--duration", type=float, default=300.0)
    a = ap.parse_args()
    a.duration = min(a.duration, 900.0)  # bounded whatever the caller asks
    a.rate = max(0.1, min(a.rate, 200.0))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    final: dict[int, dict] = {}
    with open(a.log, "a") as fh:
        threads = [threading.Thread(target=stream, args=(i, a, stop, fh, final))
                   for i in range(a.streams)]
        threads.append(threading.Thread(target=new_connections, args=(a, stop, fh)))
        for t in threads:
            t.start()
        stop.wait(a.duration)
        stop.set()
        for t in threads:
            t.join(a.stall + 5)
        emit(fh, ev="end", streams=final, pid=os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
