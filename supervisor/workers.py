"""Worker processes: spawn, watch through a pidfd, signal, reap.

Workers are exec'd (never a bare fork of the supervisor) so that no key
material, netlink socket or other namespace's state is inherited; only
their channel end is passed, and every other fd is closed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tlshd.shared.channel import Channel, socketpair

log = logging.getLogger(__name__)

# The worker's environment: nothing from ours but the locale basics.
_ENV_KEEP = ("LANG", "LC_ALL", "PATH")


@dataclass(eq=False)
class Worker:
    """A running worker and the requests it holds."""

    label: str
    proc: subprocess.Popen[bytes]
    channel: Channel
    pidfd: int
    started: float
    ready: bool = False
    retiring: bool = False
    inflight: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL through the pidfd: immune to pid reuse."""
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> int:
        """Collect the exit status; call once the pidfd is readable."""
        code = self.proc.wait()
        os.close(self.pidfd)
        self.channel.close()
        return code


def spawn_worker(label: str, config_path: str, debug: bool,
                 nsfd: int | None = None,
                 ids: tuple[int, int] | None = None) -> Worker:
    """Start a worker for one namespace.

    It enters ``nsfd`` (a network namespace fd, passed to it) and, once its
    credentials are loaded, drops to the ``ids`` (uid, gid).
    """
    ours, theirs = socketpair()
    argv = [sys.executable, "-m", "tlshd.worker",
            "--channel-fd", str(theirs.fileno()),
            "--config", config_path, "--label", label]
    pass_fds = [theirs.fileno()]
    if nsfd is not None:
        argv += ["--netns-fd", str(nsfd)]
        pass_fds.append(nsfd)
    if ids is not None:
        argv += ["--uid", str(ids[0]), "--gid", str(ids[1])]
    if debug:
        argv.append("--debug")
    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    try:
        proc = subprocess.Popen(argv, pass_fds=pass_fds,
                                close_fds=True, env=env,
                                stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    pidfd = os.pidfd_open(proc.pid)
    log.debug("Started worker %d for netns %s", proc.pid, label)
    return Worker(label, proc, Channel(ours), pidfd, time.monotonic())
