"""The worker template: fork workers from an already-imported TLS stack.

Exec'ing a fresh Python for each namespace's worker costs tens of MiB per
namespace (every worker imports pyOpenSSL and cryptography on its own).
This process is exec'd once by the supervisor, imports everything a worker
needs, and then only forks: each SPAWN_REQ becomes a worker that shares
the imported code copy-on-write.

It never reads a configuration or a credential, so a fork inherits nothing
of any namespace; the forked worker boots exactly as an exec'd one does
(tlshd.worker.main: enter the namespace, load its own credentials, drop to
the worker user, lock down).  What is the same for every worker is done
here once, before the first fork: the imports, and a TLS engine of its own
(no credentials; the system's public CA bundle, never used to serve) whose
construction sets OpenSSL up and runs its one-off check, an in-memory
handshake, so that the forked workers inherit OpenSSL's initialised state
and skip that check.
OpenSSL reseeds its random generator in a forked child.

Workers are double-forked so that they are re-parented to the supervisor,
which is a child subreaper: it reaps them and watches them through pidfds
like any other worker.  The template runs as root because a new worker
must still enter its namespace and read its credentials.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys

from tlshd.worker import sslconf

sslconf.use_worker_config()

import setproctitle  # noqa: E402

from tlshd.shared import linux, protocol  # noqa: E402
from tlshd.shared.channel import Channel  # noqa: E402
from tlshd.shared.config import RoleConfig  # noqa: E402
from tlshd.shared.errors import PeerGone  # noqa: E402
from tlshd.worker import main as worker_main  # noqa: E402
from tlshd.worker import tlsengine  # noqa: E402

# The template's own engine (no credentials), see main().
_engine: tlsengine.Engine | None = None


def _worker_args(req: protocol.SpawnRequest, netns_fd: int,
                 channel_fd: int) -> worker_main.WorkerArgs:
    """The worker a SPAWN_REQ asks for (NO_ID: keep our uid and gid)."""
    drop = req.uid != protocol.NO_ID and req.gid != protocol.NO_ID
    return worker_main.WorkerArgs(
        config=req.config_path, channel_fd=channel_fd, netns_fd=netns_fd,
        label=req.label, uid=req.uid if drop else None,
        gid=req.gid if drop else None, debug=bool(req.debug))


def _become_worker(req: protocol.SpawnRequest, fds: list[int],
                   own_channel: int) -> None:
    """In the grandchild: drop the template's fd and run a worker."""
    os.close(own_channel)
    code = 70  # EX_SOFTWARE, if the worker raised
    try:
        code = worker_main.run(_worker_args(req, fds[0], fds[1]))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def spawn(req: protocol.SpawnRequest, fds: list[int],
          own_channel: int) -> int:
    """Double-fork a worker; return its pid (re-parented to the
    supervisor by the time this returns)."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(r)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _become_worker(req, fds, own_channel)
            os.write(w, pid.to_bytes(4, "little"))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read(4)
    os.waitpid(middle, 0)  # the worker is now an orphan: the supervisor's
    if len(data) != 4:
        raise OSError("worker fork failed")
    return int.from_bytes(data, "little")


def serve(channel: Channel) -> int:
    while True:
        try:
            msg, req_id, fds = channel.recv()
        except PeerGone:
            return 0
        try:
            if not isinstance(msg, protocol.SpawnRequest):
                print("tlshd worker template: unexpected %s"
                      % type(msg).__name__, file=sys.stderr)
                return 70
            pid = spawn(msg, fds, channel.fileno())
        finally:
            for fd in fds:
                os.close(fd)
        channel.send(protocol.SpawnAnswer(pid=pid), req_id)


def main() -> int:
    p = argparse.ArgumentParser(prog="tlshd-worker-template")
    p.add_argument("--channel-fd", type=int, required=True)
    args = p.parse_args()
    # Root, and the parent of every worker until it drops to the worker
    # user: no core dump, and no ptrace or /proc/PID/mem by that user
    # (exec made us dumpable again).  Before the title, which tests wait
    # for.  Each forked worker inherits it until its own lock-down.
    linux.set_dumpable(False)
    setproctitle.setproctitle("tlshd: worker template")
    # Each worker's first Engine would do this (docstring): do it once.
    # Its warnings (no system CA bundle) are no one's concern here: each
    # worker's own engine gives them again, through its channel.
    logging.getLogger().addHandler(logging.NullHandler())
    # Kept, not freed: every worker allocates into the memory the
    # template has freed, and each page it writes there becomes its own
    # copy.  Freeing the engine left holes that cost each worker about
    # 0.5 MiB (docs/benchmarks.md, PSS per active worker).
    global _engine
    _engine = tlsengine.Engine(RoleConfig(), RoleConfig())
    # Everything imported so far lives as long as any worker: move it out
    # of the collector's reach, so that no worker's full collection walks
    # (or copy-on-write dirties) the imported TLS stack.
    gc.collect()
    gc.freeze()
    return serve(Channel(socket.socket(fileno=args.channel_fd),
                         protocol.Side.WORKER))


if __name__ == "__main__":
    sys.exit(main())
