"""The worker's boot sequence, in order.

1. Process title, logging through the channel.
2. Load this namespace's configuration and credentials (before any lock-down,
   while files can still be opened).
3. Start the handshake thread pool.
4. Lock down (sandbox) and report who we run as (HELLO).
5. Serve until the supervisor closes the channel.

Exit codes: EX_CONFIG means the configuration or a credential is unusable;
the supervisor then holds this namespace until it is told to reload.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import socket
import sys
import threading
import time

import setproctitle

from tlshd.shared import config, keys, linux, protocol
from tlshd.shared import log as tlshd_log
from tlshd.shared.channel import Channel
from tlshd.shared.errors import ConfigError, PeerGone
from tlshd.worker import sandbox
from tlshd.worker.serve import ChannelLogHandler, Server
from tlshd.worker.tlsengine import CredentialError, Engine, ReuseSettings

log = logging.getLogger("tlshd.worker")


@dataclasses.dataclass(frozen=True)
class WorkerArgs:
    """How to run one worker: parsed from the command line (an exec'd
    worker, ``python -m tlshd.worker``) or built from a SPAWN_REQ (a
    worker forked by the template, tlshd.worker.template)."""

    config: str
    channel_fd: int | None = None
    netns_fd: int | None = None
    label: str = "init"  # namespace name or inode, for the process title
    uid: int | None = None  # unprivileged user to drop to once loaded
    gid: int | None = None
    threads: int = 16
    debug: bool = False
    check: bool = False  # load, report and exit (tlshd --check-config)


def _parse_args(argv: list[str]) -> WorkerArgs:
    p = argparse.ArgumentParser(prog="tlshd-worker")
    p.add_argument("--channel-fd", type=int)
    p.add_argument("--check", action="store_true",
                   help="load the configuration and credentials, report, "
                        "and exit (tlshd --check-config)")
    p.add_argument("--config", required=True)
    p.add_argument("--label", default="init",
                   help="namespace name or inode, for the process title")
    p.add_argument("--netns-fd", type=int, default=None,
                   help="network namespace to enter before anything else")
    p.add_argument("--uid", type=int, default=None,
                   help="unprivileged user to drop to once loaded")
    p.add_argument("--gid", type=int, default=None)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    return WorkerArgs(config=a.config, channel_fd=a.channel_fd,
                      netns_fd=a.netns_fd, label=a.label, uid=a.uid,
                      gid=a.gid, threads=a.threads, debug=a.debug,
                      check=a.check)


def key_owners(uid: int | None) -> set[int]:
    """Who may own a private key: root, us, the user we drop to."""
    return {0, os.geteuid()} | ({uid} if uid is not None else set())


def load_engine(path: str, uid: int | None = None) -> Engine:
    """The TLS engine for configuration ``path``; warns about private
    keys that the worker user ``uid`` and root do not keep private.
    (The file's own warnings are the supervisor's to log: it has read
    the file before starting this worker.)"""
    cfg = config.load(path, warn=False)
    config.warn_key_files(cfg, key_owners(uid))
    return engine_for(cfg)


def engine_for(cfg: config.Config) -> Engine:
    reuse = (ReuseSettings(lifetime=cfg.session_lifetime,
                           cache_size=cfg.session_cache_size)
             if cfg.session_reuse else None)
    return Engine(cfg.client, cfg.server, reuse=reuse)


class _PrintWarnings(logging.Handler):
    """Check mode: the engine's warnings as ``PATH: warning: ...``."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.WARNING)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        print("%s: warning: %s" % (self.path, record.getMessage()))


def _without_dac_override() -> bool:
    """Root without CAP_DAC_OVERRIDE, as under tlshd.service."""
    if os.geteuid() != 0:
        return False
    try:
        return not int(linux.proc_status().get("CapEff", "0"), 16) & 2
    except (OSError, ValueError):
        return False


def check(path: str, uid: int | None) -> int:
    """Load every credential ``path`` names, as a worker would.

    Prints each problem, one line each, ``warning:`` for those that do
    not stop the worker; tlshd --check-config prints the file's own
    warnings and the verdict.
    """
    root = logging.getLogger()
    root.addHandler(_PrintWarnings(path))
    root.setLevel(logging.WARNING)
    try:
        cfg = config.load(path, warn=False)
        engine_for(cfg)
    except ConfigError as e:
        print(e)
        return os.EX_CONFIG
    except CredentialError as e:
        hint = ""
        if (isinstance(e.__cause__, PermissionError)
                and _without_dac_override()):
            hint = (" (tlshd.service runs without CAP_DAC_OVERRIDE: root "
                    "needs the file's owner, group or other read bit, and "
                    "search bits on its directories)")
        print("%s: %s%s" % (path, e, hint))
        return os.EX_CONFIG
    for problem in config.key_problems(cfg, key_owners(uid)).values():
        print("%s: warning: %s" % (path, problem))
    return 0


def boot(args: WorkerArgs, channel: Channel,
         lock: threading.Lock,
         keep_stdio: bool = False) -> tuple[Server, protocol.Hello]:
    """Steps 2-4: enter the namespace, load, start the pool, lock down.

    Raises ConfigError or CredentialError when the configuration or a
    credential is unusable.  Shared with the kernel tests' sandbox probe,
    which must boot exactly as a worker does (``keep_stdio``: but keeps
    its stdout and stderr to report on).
    """
    steps = [("", time.monotonic())]
    if args.netns_fd is not None:
        # First, while still root: every socket, DNS lookup and keyring
        # search from now on happens in the namespace this worker serves.
        linux.setns(args.netns_fd)
        os.close(args.netns_fd)
    # An empty session keyring of our own: the one inherited from the
    # supervisor links every keyring the daemon uses (.nvme and the
    # consumers' keyrings), which would make this worker possess other
    # namespaces' keys.  The seccomp filter forbids keyctl afterwards.
    try:
        keys.join_session_keyring(None)
    except OSError as e:
        log.warning("Cannot join an empty session keyring (%s); keyctl is "
                    "forbidden once sandboxed all the same", e)
    steps.append(("namespace", time.monotonic()))
    engine = load_engine(args.config, args.uid)
    steps.append(("credentials", time.monotonic()))
    # Before the pool starts: each thread takes its malloc arena with
    # its first allocation and keeps it.
    linux.set_malloc_arena_max(sandbox.MALLOC_ARENAS)
    server = Server(channel, lock, engine, args.threads)
    steps.append(("pool", time.monotonic()))
    if not keep_stdio:
        detach_stdio()
    hello = sandbox.lock_down(args.uid, args.gid, 64 + 2 * args.threads)
    steps.append(("lock-down", time.monotonic()))
    # Where a worker's start goes (bench/startup.py reads it).
    log.debug("Boot %.3f s: %s", steps[-1][1] - steps[0][1], ", ".join(
        "%s %.3f" % (name, t - steps[i][1])
        for i, (name, t) in enumerate(steps[1:])))
    return server, hello


def detach_stdio() -> None:
    """Point fds 0, 1 and 2 at /dev/null.

    They are the supervisor's (exec'd workers) or the template's, and
    lead to its stderr: the journal, or a terminal.  A compromised worker
    must reach them only through the channel, whose log records the
    supervisor sanitises and rate-limits.  Done just before the lock-down:
    until then nothing here has parsed peer data, and a failure to boot
    can still be seen there.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _low_fd(fd: int) -> int:
    """``fd`` moved to the lowest free number (close-on-exec).

    An exec'd worker inherits its fds at the supervisor's numbers, which
    grow with the namespaces served; the sandbox's fd limit
    (RLIMIT_NOFILE) must stay above every open fd, so keep them low."""
    low = os.dup(fd)
    if low < fd:
        os.close(fd)
        return low
    os.close(low)
    return fd


def main(argv: list[str] | None = None) -> int:
    """``python -m tlshd.worker``: parse the command line and run."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.check:
        return check(args.config, args.uid)
    return run(args)


def run(args: WorkerArgs) -> int:
    """Run one worker until its channel closes; returns the exit code.
    The caller (main, or the template's forked child) exits with it."""
    if args.channel_fd is None:
        raise SystemExit("tlshd-worker: --channel-fd is required")
    channel_fd = _low_fd(args.channel_fd)
    netns_fd = None if args.netns_fd is None else _low_fd(args.netns_fd)
    args = dataclasses.replace(args, channel_fd=channel_fd,
                               netns_fd=netns_fd)
    setproctitle.setproctitle("tlshd: worker [netns %s]" % args.label)
    channel = Channel(socket.socket(fileno=channel_fd), protocol.Side.WORKER)
    lock = threading.Lock()  # one sender at a time on the channel
    handler = ChannelLogHandler(channel, lock)
    handler.setFormatter(logging.Formatter("%(message)s"))
    tlshd_log.lean_records(process=False)  # the format is the message
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if args.debug else logging.INFO)

    try:
        server, hello = boot(args, channel, lock)
    except (ConfigError, CredentialError) as e:
        log.error("%s", e)
        return os.EX_CONFIG
    # The engine, its contexts and credentials live as long as this
    # worker: freeze them (and the imports) so that the collections the
    # handshakes' garbage triggers do not walk them again each time.
    gc.collect()
    gc.freeze()
    try:
        server.send(hello)
        server.serve()
    except PeerGone:
        pass
    except Exception:
        # stderr is /dev/null by now: the traceback goes to the
        # supervisor, which logs it as one line.
        log.exception("Worker failed")
        return 70  # EX_SOFTWARE
    return 0
