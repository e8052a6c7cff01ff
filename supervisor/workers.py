"""Worker processes: spawn, watch through a pidfd, signal, reap.

One process each; what a namespace does with its workers (start, retire,
restart) is in workerpool.

A worker is never a bare fork of the supervisor, so that no key
material, netlink socket or other namespace's state is inherited: it is
forked by the worker template (exec'd once, holding nothing but its
channel) or exec'd directly; either way only its channel end is passed,
and every other fd is closed.
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
from tlshd.shared.errors import ProtocolError
from tlshd.supervisor.workerlog import WorkerLog

log = logging.getLogger(__name__)

# The worker's environment: nothing from ours but the locale basics.
_ENV_KEEP = ("LANG", "LC_ALL", "PATH")


@dataclass(eq=False)
class Worker:
    """A running worker process (which requests it holds: see requests).

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
    returncode: int | None = None
    # When it last held a request (idle workers exit, see workerpool).
    last_busy: float = 0.0
    # Sessions whose re-key secrets it keeps (DONE named a session id):
    # the kernel may ask for them any time, so it never idles out.
    sessions: int = 0
    # What it logs goes through here: sanitised and rate-limited.
    logs: WorkerLog = field(init=False)

    def __post_init__(self) -> None:
        self.logs = WorkerLog(self.pid, self.label)

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
        self.logs.close()  # what was dropped, if anything, now
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
    return Worker(label, proc.pid, Channel(ours, protocol.Side.SUPERVISOR),
                  pidfd, time.monotonic())


class Template:
    """The worker template process, which forks workers for us.

    Spawning is asynchronous: ``request`` sends a SPAWN_REQ and returns at
    once; the template's answer (the new worker's pid) arrives on the
    channel, which the supervisor watches, and ``answer`` turns it into a
    Worker.  Until the template has finished importing (seconds under
    emulation), requests simply wait in the channel.
    """

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
        self.channel = Channel(ours, protocol.Side.SUPERVISOR)
        self.next_id = 1
        self.waiting: dict[int, tuple[str, Channel]] = {}

    def fileno(self) -> int:
        return self.channel.fileno()

    def request(self, label: str, config_path: str, debug: bool, nsfd: int,
                ids: tuple[int, int] | None) -> int:
        """Ask for a worker; return the request id its answer will carry."""
        ours, theirs = socketpair()
        uid, gid = ids if ids is not None else (protocol.NO_ID,
                                                protocol.NO_ID)
        req = protocol.SpawnRequest(label=label, config_path=config_path,
                                    uid=uid, gid=gid, debug=int(debug))
        req_id, self.next_id = self.next_id, self.next_id + 1
        try:
            self.channel.send(req, req_id, (nsfd, theirs.fileno()))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.waiting[req_id] = (label, Channel(ours, protocol.Side.SUPERVISOR))
        return req_id

    def answer(self) -> tuple[int, Worker]:
        """Read one answer: (request id, the new worker).

        Raises PeerGone or ProtocolError if the template died or broke the
        protocol; the caller then stops using it.
        """
        msg, req_id = self.channel.recv_answer()
        if not isinstance(msg, protocol.SpawnAnswer) or (
                req_id not in self.waiting):
            raise ProtocolError("unexpected message from worker template")
        label, channel = self.waiting.pop(req_id)
        pidfd = os.pidfd_open(msg.pid)
        log.debug("Forked worker %d for netns %s", msg.pid, label)
        return req_id, Worker(label, msg.pid, channel, pidfd,
                              time.monotonic())

    def close(self) -> None:
        for _, channel in self.waiting.values():
            channel.close()
        self.waiting.clear()
        self.channel.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
