"""The systemd unit (packaging/systemd/xdplb@.service): ``systemd-analyze verify`` passes, and
its start, reload, restart and stop commands, run as systemd would (this machine's PID 1 is
not systemd: tests/testkit/unit.py expands them), lose no connection and no drain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from agent_process import XDPLB, status, xdplb
from lab import Lab
from pools import BE1, BE2, BE3, VIP, Vip, pool_yaml
from testkit.streams import Traffic
from testkit.unit import Unit

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "systemd" / "xdplb@.service"
INSTALLED = "/usr/local/bin/xdplb"
INSTANCE = "xlt-svc"


def checkout_unit(tmp: Path, instance: str) -> Path:
    """The unit with the checkout's xdplb for the installed one (what a drop-in overriding
    ExecStart= and ExecReload= would do), named for one instance."""
    text = UNIT.read_text()
    assert INSTALLED in text
    path = tmp / f"xdplb@{instance}.service"
    path.write_text(text.replace(INSTALLED, str(XDPLB)))
    return path


def test_unit_verifies(tmp_path):
    r = subprocess.run(["systemd-analyze", "verify", str(checkout_unit(tmp_path, "verify"))],
                       capture_output=True, text=True, timeout=60)
    # verify only warns (exit 0) about a key it cannot parse: any output is a failure
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r


def pool(backends: tuple[str, ...]) -> str:
    return pool_yaml(Vip("web", 80, backends), Vip("stream", 7000, backends),
                     Vip("echo", 5000, backends, protocol="udp")) + "interfaces:\n  - eth0\n"


class Service:
    """One instance of the unit, run as systemd runs it: the bounding set applied, stderr a
    "journal" stream, READY=1 awaited on our own $NOTIFY_SOCKET, SIGTERM to stop."""

    def __init__(self, unit: Unit, tmp: Path) -> None:
        self.unit = unit
        self.log = tmp / "journal.log"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify.sock"))
        self.notify.settimeout(0.5)
        self.proc: subprocess.Popen | None = None
        self.messages: list[str] = []

    def env(self, **extra: str) -> dict[str, str]:
        return self.unit.environment(
            {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "XDPLB_STRICT")},
            NOTIFY_SOCKET=self.notify.getsockname(), **extra)

    def start(self, timeout: float = 120) -> float:
        """Run ExecStart; seconds until READY=1."""
        t0 = time.monotonic()
        fh = self.log.open("a")
        st = os.fstat(fh.fileno())
        env = self.env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        caps = ",".join(f"+{c}" for c in self.unit.capabilities())
        cmd = ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--no-new-privs",
               *self.unit.command("ExecStart", env)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh)
        fh.close()
        while time.monotonic() - t0 < timeout:
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.text()}"
                continue
            self.messages.append(msg)
            if "READY=1" in msg.splitlines():
                return time.monotonic() - t0
        raise AssertionError(f"no READY=1 within {timeout}s: {self.text()}")

    def reload(self) -> subprocess.CompletedProcess:
        assert self.proc is not None
        env = self.env(MAINPID=str(self.proc.pid))
        return subprocess.run(self.unit.command("ExecReload", env), env=env,
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> int:
        """KillSignal= to the main process, SIGKILL after TimeoutStopSec= (KillMode=mixed)."""
        assert self.proc is not None
        self.proc.send_signal(getattr(signal, self.unit.value("KillSignal") or "SIGTERM"))
        try:
            return self.proc.wait(float((self.unit.value("TimeoutStopSec") or "90").rstrip("s")))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not stop in time: {self.text()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def weights(lab: Lab) -> dict[tuple[int, str], int]:
    (g,) = status(lab)["groups"]
    return {(v["port"], b["address"]): b["weight"] for v in g["vips"] for b in v["backends"]}


def drains_file(lab: Lab) -> set[str]:
    from xdplb.instance import pins, runfiles

    return runfiles.read_drains(pins.group_for(["eth0"], ns=lab.lb_ns))


@pytest.mark.root
def test_unit_start_reload_restart_stop(tmp_path):
    with Lab(topology="one-armed", backends=3, prefix=INSTANCE) as lab:
        etc = tmp_path / "etc"
        (etc / "xdplb").mkdir(parents=True)
        config = etc / "xdplb" / f"{INSTANCE}.yaml"
        config.write_text(pool((BE1, BE2)))
        (etc / "xdplb" / f"{INSTANCE}.env").write_text(f"XDPLB_OPTS=--netns {lab.lb_ns}\n")
        svc = Service(Unit.parse(checkout_unit(tmp_path, INSTANCE), INSTANCE, str(etc)),
                      tmp_path)
        traffic = None
        try:
            ready = svc.start()
            (g,) = status(lab)["groups"]  # READY=1 came once the program was attached
            assert g["interfaces"][0]["attached"] and g["agent"]["pid"] == svc.proc.pid
            traffic = Traffic(lab, VIP, tmp_path / "traffic.jsonl")
            traffic.wait_streams()
            t0 = time.time()

            # Three drains at once, of different VIPs and backends: each one sticks.
            wanted = [("web", BE1), ("stream", BE2), ("echo", BE1)]
            procs = [subprocess.Popen([str(XDPLB), "--netns", lab.lb_ns, "drain", v, b],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for v, b in wanted]
            for p in procs:
                out, err = p.communicate(timeout=60)
                assert p.returncode == 0 and "drained" in out, err
            labels = {f"web/{BE1}:80", f"stream/{BE2}:7000", f"echo/{BE1}:5000"}
            assert drains_file(lab) == labels
            w = weights(lab)
            assert w[(80, BE1)] == w[(7000, BE2)] == w[(5000, BE1)] == 0

            # systemctl reload: ExecReload validates, signals $MAINPID, waits for the answer.
            config.write_text(pool((BE1, BE2, BE3)))
            r = svc.reload()
            assert r.returncode == 0 and "reloaded" in r.stdout, r
            assert (80, BE3) in weights(lab)
            config.write_text(pool((BE1, BE2, BE3)).replace("port: 7000", "port: 70000"))
            r = svc.reload()  # an invalid file fails the reload and changes nothing
            assert r.returncode == 2 and "vips[1].port" in r.stderr, r
            config.write_text(pool((BE1, BE2, BE3)))

            # systemctl restart: stop (the data path stays and balances), then start.
            t_stop = time.monotonic()
            assert svc.stop() == 0
            (g,) = status(lab)["groups"]
            assert g["interfaces"][0]["attached"] and g["agent"] is None
            assert drains_file(lab) == labels
            time.sleep(1)  # nobody home: the program balances on
            again = svc.start()
            outage_s = time.monotonic() - t_stop
            w = weights(lab)
            assert w[(80, BE1)] == w[(7000, BE2)] == w[(5000, BE1)] == 0, w  # drains kept
            assert "adopt" in svc.text() or "attached to eth0" in svc.text()
            time.sleep(2)

            # systemctl stop: the data path stays; only `xdplb detach` removes it.
            assert svc.stop() == 0
            (g,) = status(lab)["groups"]
            assert g["interfaces"][0]["attached"]
            time.sleep(1)
            assert traffic.breaks(t0) == []
            n, failed = traffic.failed_new(t0)
            assert n > 0 and len(failed) <= max(1, n // 50), failed[:5]
            print(f"READY after {ready:.1f}s (first start), {again:.1f}s (restart); agent "
                  f"away {outage_s:.1f}s; {n} new connections, {len(failed)} failed, "
                  f"{len(traffic.wait_streams())} streams, 0 broken")

            # Under journald: a priority prefix and no timestamp of our own.
            lines = [ln for ln in svc.text().splitlines() if ln.startswith("<")]
            assert lines and all(not ln[3:7].isdigit() for ln in lines), lines[:3]
            assert any(ln.startswith("<6>attached to eth0") for ln in lines), lines[:5]

            r = xdplb(lab, "detach", "eth0")
            assert "removed pins" in r.stdout
            assert drains_file(lab) == set()  # detach is what removes the drains
        finally:
            if traffic is not None:
                traffic.stop()
            svc.kill()
            xdplb(lab, "detach", "eth0", check=False)
