"""Locks between xdplb processes: one owner per interface, one control command at a time.

- Ownership: a running agent holds ``/run/xdplb/owners/<netns>/<iface>.lock`` (``flock``)
  for each of its interfaces for as long as it runs. A second ``attach`` of any of them
  cannot take it and is refused, naming the owner the file describes; the kernel drops the
  lock when the agent dies (``kill -9`` too), so a stale file never blocks a new agent.
  The owner unlinks its files on exit; a taker checks that the file it locked is still the
  one at the path, so unlinking cannot let two processes hold one interface.
- Control: ``reload``, ``drain`` and ``undrain`` of an instance take ``control.lock`` in its
  run directory, so that two of them neither lose each other's drain list write nor read
  each other's answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdplb.instance import pins, runfiles

OWNERS_DIR = "owners"
CONTROL_LOCK = "control.lock"


class Busy(RuntimeError):
    """The lock is held by another process; ``holder`` is what it published, if anything."""

    def __init__(self, what: str, holder: dict[str, Any] | None) -> None:
        super().__init__(what)
        self.holder = holder


def owner_path(iface: str, ns: str | None = None) -> Path:
    return runfiles.RUN_ROOT / OWNERS_DIR / (ns or pins.netns_name()) / f"{iface}.lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path`` (created if needed), or None if held."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous owner unlinked it after we opened it: take the new one


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Ownership:
    """The ownership locks of an agent's interfaces; ``release()`` on exit."""

    fds: dict[Path, int]

    def release(self) -> None:
        for path, fd in self.fds.items():
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
            for d in (path.parent, path.parent.parent):  # owners/<netns>, owners: if empty
                with contextlib.suppress(OSError):
                    d.rmdir()
        self.fds = {}


def take_interfaces(ifaces: list[str], info: dict[str, Any]) -> Ownership:
    """Own every interface of ``ifaces`` or none: raises Busy naming the running owner."""
    held = Ownership({})
    for name in ifaces:
        path = owner_path(name)
        fd = _try_lock(path)
        if fd is None:
            held.release()
            raise Busy(name, _read(path))
        held.fds[path] = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**info, "pid": os.getpid(), "iface": name}).encode(), 0)
    return held


def owner(iface: str, ns: str | None = None) -> dict[str, Any] | None:
    """What the running agent owning ``iface`` published (``{"pid", "ifaces", "config"}``),
    or None when no agent holds it."""
    path = owner_path(iface, ns)
    if not path.exists():
        return None
    fd = _try_lock(path)
    if fd is not None:  # nobody holds it: a file left by a crashed agent
        os.close(fd)
        return None
    return _read(path) or {}


@contextlib.contextmanager
def control(group: pins.PinGroup, timeout: float = 60.0) -> Iterator[None]:
    """Serialize control commands (reload, drain) of one instance."""
    path = runfiles.run_dir(group) / CONTROL_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another xdplb command held {path} for {timeout:g}s"
                                       ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing drops the lock
