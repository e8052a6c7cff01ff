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

from tlshd.shared import linux, protocol
from tlshd.shared.channel import Channel, socketpair
from tlshd.shared.errors import PeerGone

log = logging.getLogger(__name__)

# The worker's environment: nothing from ours but the locale basics.
_ENV_KEEP = ("LANG", "LC_ALL", "PATH")


@dataclass(eq=False)
class Worker:
    """A running worker and the requests it holds.

    The worker is the supervisor's child: exec'd by it, or forked by the
    worker template and re-parented to it (the supervisor is a child
    subreaper), so ``reap`` can wait for exactly this pid.
    """

    label: str
    pid: int
    channel: Channel
    pidfd: int
    started: float
    ready: bool = False
    retiring: bool = False
    inflight: set[int] = field(default_factory=set)
    returncode: int | None = None

    def kill(self) -> None:
        """SIGKILL through the pidfd: immune to pid reuse."""
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> int:
        """Collect the exit status; call once the pidfd is readable."""
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self.pidfd)
        self.channel.close()
        return self.returncode


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
    # The Popen object is dropped: the pid is reaped by Worker.reap.
    proc.returncode = 0
    log.debug("Started worker %d for netns %s", proc.pid, label)
    return Worker(label, proc.pid, Channel(ours), pidfd, time.monotonic())


SPAWN_TIMEOUT = 10.0


class Template:
    """The worker template process, and forking workers through it."""

    def __init__(self) -> None:
        # Forked workers are re-parented to us; reap them like our own.
        linux.set_child_subreaper()
        ours, theirs = socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tlshd.worker.template",
                 "--channel-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), close_fds=True,
                env={k: os.environ[k] for k in _ENV_KEEP
                     if k in os.environ},
                stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.channel = Channel(ours)
        self.channel.sock.settimeout(SPAWN_TIMEOUT)
        self.next_id = 1

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, label: str, config_path: str, debug: bool, nsfd: int,
              ids: tuple[int, int] | None) -> Worker:
        ours, theirs = socketpair()
        uid, gid = ids if ids is not None else (protocol.NO_ID,
                                                protocol.NO_ID)
        req = protocol.SpawnRequest(label=label, config_path=config_path,
                                    uid=uid, gid=gid, debug=int(debug))
        req_id, self.next_id = self.next_id, self.next_id + 1
        try:
            self.channel.send(req, req_id, (nsfd, theirs.fileno()))
        finally:
            theirs.close()
        try:
            msg, got_id, _ = self.channel.recv()
        except (TimeoutError, PeerGone) as e:
            ours.close()
            self.proc.kill()
            raise OSError("worker template did not answer: %s" % e) from e
        if not isinstance(msg, protocol.SpawnAnswer) or got_id != req_id:
            ours.close()
            self.proc.kill()
            raise OSError("worker template broke the protocol")
        pidfd = os.pidfd_open(msg.pid)
        log.debug("Forked worker %d for netns %s", msg.pid, label)
        return Worker(label, msg.pid, Channel(ours), pidfd, time.monotonic())

    def close(self) -> None:
        self.channel.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
