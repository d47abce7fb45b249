"""Without root: the interface ownership locks, the control lock, sd_notify and the journald
log format (the agent's service plumbing; tests/test_service.py runs the real thing)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest

from xdplb.agent.notify import notify
from xdplb.cli.journal import JournalFormatter, under_journald
from xdplb.instance import locks, pins, runfiles


@pytest.fixture
def run_root(tmp_path, monkeypatch):
    monkeypatch.setattr(runfiles, "RUN_ROOT", tmp_path / "run")
    return tmp_path / "run"


def test_one_owner_per_interface(run_root):
    first = locks.take_interfaces(["xa0", "xa1"], {"ifaces": ["xa0", "xa1"], "config": "p"})
    with pytest.raises(locks.Busy) as e:
        locks.take_interfaces(["xb0", "xa1"], {"ifaces": ["xb0", "xa1"]})
    assert str(e.value) == "xa1" and e.value.holder["pid"] == os.getpid()
    assert locks.owner("xb0") is None  # a refused take holds nothing
    assert locks.owner("xa0")["ifaces"] == ["xa0", "xa1"]
    first.release()
    assert locks.owner("xa0") is None and not (run_root / locks.OWNERS_DIR).exists()
    locks.take_interfaces(["xb0", "xa1"], {}).release()


def test_a_stale_lock_file_blocks_nobody(run_root):
    path = locks.owner_path("xc0")
    path.parent.mkdir(parents=True)
    path.write_text('{"pid": 1}')  # left by an agent killed -9: nobody holds the lock
    assert locks.owner("xc0") is None
    locks.take_interfaces(["xc0"], {}).release()


def test_control_commands_run_one_at_a_time(run_root):
    group = pins.PinGroup(pins.BPFFS / pins.ROOT_NAME / "v" / "ns" / "eth0")
    inside, overlap = [], []

    def command(i: int) -> None:
        with locks.control(group):
            overlap.append(len(inside))
            inside.append(i)
            time.sleep(0.05)
            inside.remove(i)

    threads = [threading.Thread(target=command, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [0, 0, 0, 0]


def test_sd_notify(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False  # not under systemd: nothing to do
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "n.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
        assert notify("READY=1", "STATUS=ok")
        assert s.recv(100) == b"READY=1\nSTATUS=ok"


def test_journald_lines(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not under_journald()  # set, but for another stream than our stderr
    rec = logging.LogRecord("xdplb", logging.ERROR, "f", 1, "bad\nfile:3: x", None, None)
    assert JournalFormatter("%(message)s").format(rec) == "<3>bad\n<3>file:3: x"
