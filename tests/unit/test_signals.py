"""Signals a script or an admin may send a running supervisor.

The supervisor runs in its own process (a real loop, real workers, the
kernel side faked as in test_supervisor.py), logging to stderr as with
``tlshd -s``; the test sends it signals and reads its log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SUPERVISOR = """
import sys
sys.path.insert(0, %r)
from supervisorfakes import FakeNl
from tlshd.shared import config, log
from tlshd.supervisor import netlink_family, netlink_socket
from tlshd.supervisor.arbiter import Supervisor
log.setup(True, debug=False)
s = Supervisor(config.load(sys.argv[1]), netlink_family.FamilyInfo(0x21, 5))
s.scan = lambda: None  # serve the fake namespace only
s.add_namespace("init", sys.argv[1], nlsock=FakeNl())
sys.exit(s.run())
""" % str(HERE)


class Running:
    def __init__(self, tmp_path: Path) -> None:
        conf = tmp_path / "tlshd.conf"
        conf.write_text("[authenticate.client]\n[authenticate.server]\n"
                        "[netns]\nworker_idle_timeout=0\n")
        conf.chmod(0o600)
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)  # a terminal's format
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1,
                 timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log())) < count:
            if self.proc.poll() is not None:
                raise AssertionError("supervisor died (%s):\n%s" % (
                    self.proc.returncode, self.log()))
            if time.monotonic() > deadline:
                raise AssertionError("no %r in:\n%s" % (pattern, self.log()))
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(5)


@pytest.fixture
def running(tmp_path: Path):
    r = Running(tmp_path)
    try:
        r.wait_for(r"tlshd\[\d+\]: Worker \d+ for netns init ready")
        yield r
    finally:
        r.stop()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP],
                         ids=["SIGUSR1", "SIGHUP"])
def test_reload_signal_reloads_and_the_supervisor_lives(running, signum):
    """SIGUSR1 reloads, as in ktls-utils (it used to kill the daemon)."""
    running.proc.send_signal(signum)
    running.wait_for(r"Reloading configuration from ")
    # The successor takes over: a second worker ready.
    running.wait_for(r"Worker \d+ for netns init ready", count=2)
    assert running.proc.poll() is None
    assert running.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGALRM],
                         ids=["SIGUSR2", "SIGALRM"])
def test_stray_signal_is_logged_and_ignored(running, signum):
    name = signal.Signals(signum).name
    running.proc.send_signal(signum)
    running.wait_for(r"tlshd\[\d+\]: warning: %s ignored" % name)
    time.sleep(0.2)
    assert running.proc.poll() is None
    assert "Reloading" not in running.log()
    assert running.stop() == 0


def test_sigpipe_is_ignored(running):
    running.proc.send_signal(signal.SIGPIPE)
    time.sleep(0.5)
    assert running.proc.poll() is None
    assert running.stop() == 0


def test_log_lines_carry_their_severity(running):
    """A terminal sees "error:"/"warning:" after the pid; informational
    lines are unchanged (tests and scripts grep them)."""
    running.proc.send_signal(signal.SIGUSR2)
    running.wait_for(r"SIGUSR2 ignored")
    lines = running.log().splitlines()
    warned = [line for line in lines if "SIGUSR2 ignored" in line]
    assert re.fullmatch(r"tlshd\[\d+\]: warning: SIGUSR2 ignored .*",
                        warned[0]), warned
    assert any(re.fullmatch(r"tlshd\[\d+\]: Worker \d+ for netns init "
                            r"ready: .*", line) for line in lines), lines
