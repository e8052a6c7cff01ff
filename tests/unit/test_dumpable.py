"""The root processes are not dumpable (issue 15 part 4).

A non-dumpable process writes no core file, and only a process with
CAP_SYS_PTRACE may ptrace it or read its /proc/PID/{mem,environ,...}:
its /proc/PID entries belong to root.  Shown with the processes running
as uid 65534, so that "belongs to root" and "another process of the same
uid cannot read it" tell dumpable and non-dumpable apart.  (The workers:
tests/unit/test_sandbox.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest

from tlshd.shared.channel import socketpair

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to run as uid 65534")
NOBODY = 65534


def wait_for_title(pid: int, title: bytes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            if f.read().startswith(title):
                return
        time.sleep(0.05)
    raise AssertionError("no process title %r" % title)


def assert_not_dumpable(proc: subprocess.Popen[bytes]) -> None:
    pid = proc.pid
    owner = os.stat("/proc/%d/environ" % pid).st_uid
    assert owner == 0, "/proc/%d belongs to uid %d: dumpable" % (pid, owner)
    # The attack: another process of its uid reads its environment.
    r = subprocess.run(["cat", "/proc/%d/environ" % pid], user=NOBODY,
                       group=NOBODY, capture_output=True, check=False)
    assert r.returncode != 0, "uid %d read /proc/%d/environ" % (NOBODY, pid)
    assert b"Permission denied" in r.stderr
    assert proc.poll() is None  # all along: not another process's pid


def test_worker_template_is_not_dumpable():
    ours, theirs = socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlshd.worker.template", "--channel-fd",
         str(theirs.fileno())], pass_fds=[theirs.fileno()], user=NOBODY,
        group=NOBODY, extra_groups=[], stdin=subprocess.DEVNULL, cwd="/")
    theirs.close()
    try:
        wait_for_title(proc.pid, b"tlshd: worker template")
        assert_not_dumpable(proc)
    finally:
        ours.close()  # EOF: the template exits
        proc.wait(30)


def test_supervisor_is_not_dumpable():
    # A configuration file that is a FIFO: the supervisor waits in open()
    # until the test is done looking at it.  (pytest's tmp_path is out of
    # uid 65534's reach.)
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        fifo = os.path.join(tmp, "config")
        os.mkfifo(fifo, 0o644)
        run_supervisor(fifo, os.path.join(tmp, "ctl"))


def run_supervisor(fifo: str, ctl: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlshd.supervisor", "-s", "-c", fifo,
         "--control-socket", ctl],
        user=NOBODY, group=NOBODY, extra_groups=[],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd="/")
    try:
        wait_for_title(proc.pid, b"tlshd: supervisor")
        assert_not_dumpable(proc)
    finally:
        proc.kill()
        proc.wait(30)
