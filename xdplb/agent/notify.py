"""systemd's service notification (``sd_notify``): one datagram to ``$NOTIFY_SOCKET``.

Under ``Type=notify`` systemd considers the service started when ``READY=1`` arrives, so
the agent sends it once the program is attached and its signal handlers are installed (a
``systemctl reload`` before that would kill it: SIGHUP's default action). Without the
variable (a shell, a test) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("xdplb")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False when not under it
    or when the socket refuses (the service then times out, which systemd reports)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # an abstract socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(fields).encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", addr, e)
        return False
    return True
