#!/usr/bin/env python3
"""Backend services of the xdplb namespace lab (stdlib only).

One process per backend namespace serves:

- HTTP on every ``--http-port`` (default 80 and 8080):
  ``GET /`` -> ``backend=<name> addr=<addr> client=<peer ip>:<peer port>``;
  ``GET /bytes?n=N`` -> N bytes of `pattern` (header ``X-SHA256``);
  ``POST /echo`` -> the request body (header ``X-SHA256`` of it);
  ``GET /healthz`` -> 200 ``ok``.
  Every response carries ``X-Backend: <name>``.
- TCP echo on every ``--echo-port`` (default 7000): sends ``backend=<name>\n`` on accept,
  then echoes every byte back, for as long as the client likes (long-lived connections).
- UDP echo on every ``--udp-port`` (default 5000 and 5001): replies
  ``<name> <client ip>:<client port> `` followed by the payload, from the address the datagram
  was sent to. A payload ``size=N`` asks for an answer of N bytes (that reply, then
  `pattern` bytes): large answers, which the backend's kernel fragments (DNS with EDNS).

Every request is logged as one JSON object per line to ``--log``; ``--ready`` is written once
every socket listens.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

HTTP_PORTS = (80, 8080)
UDP_PORTS = (5000, 5001)
ECHO_PORTS = (7000,)
MAX_BYTES = 1 << 30  # /bytes limit: keeps a typo from streaming forever
MAX_UPLOAD = 256 << 20
MAX_UDP_ANSWER = 65507  # the largest UDP payload over IPv4

# A prime period, so that segments delivered at the wrong offset cannot look right by accident.
PATTERN_PERIOD = 65521

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python 3.11 lacks the constant
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr


@functools.cache
def _pattern_block() -> bytes:
    out = bytearray()
    i = 0
    while len(out) < PATTERN_PERIOD:
        out += hashlib.sha256(b"xdplb-lab %d" % i).digest()
        i += 1
    return bytes(out[:PATTERN_PERIOD])


def pattern_chunks(n: int, chunk: int = 1 << 16) -> Iterator[bytes]:
    """Yield the first n bytes of the deterministic test pattern, in chunks."""
    block = _pattern_block()
    doubled = block + block  # any window of up to PATTERN_PERIOD bytes is one slice
    off = 0
    while off < n:
        size = min(chunk, n - off, PATTERN_PERIOD)
        start = off % PATTERN_PERIOD
        yield doubled[start : start + size]
        off += size


def pattern(n: int) -> bytes:
    """The first n bytes of the deterministic test pattern served by ``GET /bytes?n=N``."""
    return b"".join(pattern_chunks(n))


@functools.lru_cache(maxsize=64)
def pattern_sha256(n: int) -> str:
    """Hex sha256 of `pattern` (n)."""
    h = hashlib.sha256()
    for c in pattern_chunks(n, 1 << 20):
        h.update(c)
    return h.hexdigest()


class RequestLog:
    """Thread-safe JSON-lines request log, flushed per line so tests can read it at once."""

    def __init__(self, path: Path, backend: str) -> None:
        self._f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (process-long)
        self._lock = threading.Lock()
        self.backend = backend

    def write(self, **rec: object) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "backend": self.backend, **rec})
        with self._lock:
            self._f.write(line + "\n")


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler; the server object carries name, addr and the log."""

    protocol_version = "HTTP/1.1"  # keep-alive, so load balancer tests see long flows
    server_version = "xdplb-lab"
    sys_version = ""
    timeout = 60  # idle keep-alive connections must not pin threads forever
    server: LabHTTPServer

    def version_string(self) -> str:
        return self.server_version

    # -- plumbing --------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str = "text/plain", **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.name)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        local = self.connection.getsockname()
        self.server.log.write(
            proto="tcp",
            service="http",
            client=self.client_address[0],
            cport=self.client_address[1],
            local=local[0],
            lport=local[1],
            request=self.requestline,
            status=int(code) if str(code).isdigit() else code,
        )

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        # The stdlib writes to stderr; errors go to the JSON log instead.
        self.server.log.write(
            proto="tcp",
            service="http",
            client=self.client_address[0],
            cport=self.client_address[1],
            error=format % args,
        )

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_UPLOAD:
                    raise ValueError("upload too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_UPLOAD:
            raise ValueError("upload too large")
        return self.rfile.read(n)

    # -- methods ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/":
            ip, port = self.client_address[:2]
            body = f"backend={self.server.name} addr={self.server.addr} client={ip}:{port}\n"
            self._send(200, body.encode())
        elif url.path == "/healthz":
            self._send(200, b"ok\n")
        elif url.path == "/bytes":
            self._bytes(url.query)
        else:
            self._send(404, b"not found\n")

    do_HEAD = do_GET

    def _bytes(self, query: str) -> None:
        try:
            n = int(parse_qs(query).get("n", ["0"])[0])
            if not 0 <= n <= MAX_BYTES:
                raise ValueError
        except ValueError:
            self._send(400, f"n must be 0..{MAX_BYTES}\n".encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.send_header("X-Backend", self.server.name)
        self.send_header("X-SHA256", pattern_sha256(n))
        self.end_headers()
        if self.command == "HEAD":
            return
        for c in pattern_chunks(n):
            self.wfile.write(c)

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/echo":
            self._send(404, b"not found\n")
            return
        try:
            body = self._read_body()
        except ValueError as e:
            self.close_connection = True
            self._send(400, f"{e}\n".encode())
            return
        sha = hashlib.sha256(body).hexdigest()
        self._send(200, body, "application/octet-stream", X_SHA256=sha)


class LabHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with the backend identity attached."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # load tests open many connections at once

    def __init__(self, port: int, name: str, addr: str, log: RequestLog) -> None:
        self.name, self.addr, self.log = name, addr, log
        super().__init__(("0.0.0.0", port), Handler)

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        # Resets and broken pipes are normal when tests abort transfers; log them quietly.
        exc = sys.exc_info()[1]
        self.log.write(
            proto="tcp",
            service="http",
            client=client_address[0],
            cport=client_address[1],
            error=repr(exc),
        )


def udp_echo(sock: socket.socket, name: str, log: RequestLog) -> None:
    """Serve UDP echo forever, replying from the destination address of each datagram."""
    lport = sock.getsockname()[1]
    while True:
        data, anc, _flags, peer = sock.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO.size))
        local = None
        for level, ctype, cdata in anc:
            if level == socket.IPPROTO_IP and ctype == IP_PKTINFO:
                local = _PKTINFO.unpack(cdata[: _PKTINFO.size])[2]  # header destination
        reply = f"{name} {peer[0]}:{peer[1]} ".encode() + data
        if data.startswith(b"size=") and data[5:].strip().isdigit():
            want = min(int(data[5:]), MAX_UDP_ANSWER)
            reply = (reply + pattern(max(want - len(reply), 0)))[:want]
        # With the reply sent from the address the client targeted (e.g. a VIP on lo in
        # DSR setups), the client's socket accepts it; the routing default may differ.
        anc_out = []
        if local is not None:
            anc_out = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, local, b"\0" * 4))]
        try:
            sock.sendmsg([reply], anc_out, 0, peer)
        except OSError as e:
            log.write(proto="udp", service="udp-echo", client=peer[0], cport=peer[1], error=str(e))
            continue
        log.write(
            proto="udp",
            service="udp-echo",
            client=peer[0],
            cport=peer[1],
            local=socket.inet_ntoa(local) if local else None,
            lport=lport,
            len=len(data),
        )


def tcp_echo(sock: socket.socket, name: str, log: RequestLog) -> None:
    """Accept forever; each connection announces the backend, then echoes until closed."""

    def serve(conn: socket.socket, peer: tuple[str, int]) -> None:
        log.write(proto="tcp", service="tcp-echo", client=peer[0], cport=peer[1],
                  lport=sock.getsockname()[1])
        with conn:
            try:
                conn.sendall(f"backend={name}\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    while True:
        conn, peer = sock.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()


def _ports(s: str) -> list[int]:
    return [int(p) for p in s.split(",") if p]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="backend name, e.g. be1")
    ap.add_argument("--addr", required=True, help="backend address reported in GET /")
    ap.add_argument("--log", required=True, type=Path, help="JSON-lines request log")
    ap.add_argument("--ready", type=Path, help="file written once every socket listens")
    ap.add_argument("--http-ports", type=_ports, default=list(HTTP_PORTS))
    ap.add_argument("--udp-ports", type=_ports, default=list(UDP_PORTS))
    ap.add_argument("--echo-ports", type=_ports, default=list(ECHO_PORTS))
    args = ap.parse_args(argv)

    log = RequestLog(args.log, args.name)
    for port in args.http_ports:
        srv = LabHTTPServer(port, args.name, args.addr, log)
        threading.Thread(target=srv.serve_forever, name=f"http-{port}", daemon=True).start()
    for port in args.udp_ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind(("0.0.0.0", port))
        threading.Thread(
            target=udp_echo, args=(sock, args.name, log), name=f"udp-{port}", daemon=True
        ).start()
    for port in args.echo_ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(128)
        threading.Thread(
            target=tcp_echo, args=(sock, args.name, log), name=f"echo-{port}", daemon=True
        ).start()
    pattern_sha256(0)  # build the pattern block before the first request

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.ready:
        tmp = args.ready.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.rename(args.ready)  # atomic: the lab never reads a half-written file
    while not stop.wait(3600):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
