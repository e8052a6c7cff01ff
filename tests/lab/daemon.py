"""Our tlshd as the admin starts it, and its log."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from lab.shell import VENV_BIN, ensure_worker_user


def keeps_workers(config_text: str) -> bool:
    """Whether a configuration keeps a worker in every namespace from the
    start (worker_idle_timeout=0), instead of starting them on demand."""
    return re.search(r"^worker_idle_timeout\s*=\s*0*(\.0*)?\s*$",
                     config_text, re.M) is not None


class Tlshd:
    """Our tlshd, started as ``tlshd -s -c FILE`` as the admin would."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.conf = workdir / "tlshd.conf"
        self.logfile = workdir / "tlshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, config_text: str, timeout: float = 120) -> None:
        ensure_worker_user()
        self.conf.write_text(config_text)
        self.log_offset = 0
        self._spawn(timeout)

    def _spawn(self, timeout: float) -> None:
        mark = self.mark() if self.logfile.exists() else 0
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "tlshd"), "-s", "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.wait_for(r"Listening for handshake requests in netns init\b",
                      timeout, mark)
        if keeps_workers(self.conf.read_text()):
            self.wait_for(r"Worker \d+ for netns init ready", timeout, mark)
        else:
            self.wait_for_template(timeout)

    def wait_for_template(self, timeout: float) -> None:
        """Wait until the worker template has imported the TLS stack (its
        title is set after that): from then on, a namespace's first
        request waits only for a fork, not for the imports as well."""
        assert self.proc is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    text = status.read_text()
                    title = (status.parent / "cmdline").read_bytes()
                except OSError:
                    continue
                if (title.startswith(b"tlshd: worker template")
                        and "\nPPid:\t%d\n" % self.proc.pid in text):
                    return
            time.sleep(0.1)
        raise AssertionError("no worker template within %s s" % timeout)

    def kill_and_restart(self, timeout: float = 120) -> tuple[float, float]:
        """SIGKILL the supervisor and start it again at once with the same
        configuration, as systemd's Restart=on-failure does (after its
        RestartSec).  Returns when the new one listens in the initial
        namespace (and, if it keeps workers, its init worker is ready):
        (time of the kill, time ready), time.monotonic()."""
        assert self.proc is not None
        killed = time.monotonic()
        self.proc.kill()
        self.proc.wait()
        self._spawn(timeout)
        return killed, time.monotonic()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def mark(self) -> int:
        """Remember the log's end; ``since`` returns what came after."""
        return len(self.log())

    def since(self, mark: int) -> str:
        return self.log()[mark:]

    def wait_for(self, pattern: str, timeout: float, mark: int = 0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.since(mark)
            m = re.search(pattern, text)
            if m:
                return m.group(0)
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    "tlshd exited (%s):\n%s"
                    % (self.proc.returncode, text[-3000:])
                )
            time.sleep(0.1)
        raise AssertionError(
            "no %r in tlshd's log within %s s:\n%s"
            % (pattern, timeout, self.since(mark)[-3000:])
        )

    def reload(self, config_text: str, timeout: float = 120) -> None:
        mark = self.mark()
        self.conf.write_text(config_text)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_for(r"Reload done", timeout, mark)
        if re.search(r"netns init: starting a worker", self.since(mark)):
            self.wait_for(r"Worker \d+ for netns init ready", timeout, mark)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
