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
import gc
import logging
import os
import socket
import sys
import threading

import setproctitle

from tlshd.shared import config, keys, linux, protocol
from tlshd.shared import log as tlshd_log
from tlshd.shared.channel import Channel
from tlshd.shared.errors import ConfigError, PeerGone
from tlshd.worker import sandbox
from tlshd.worker.serve import ChannelLogHandler, Server
from tlshd.worker.tlsengine import (
    CredentialError,
    Engine,
    ReuseSettings,
    RoleSettings,
)

log = logging.getLogger("tlshd.worker")


def _parse_args(argv: list[str]) -> argparse.Namespace:
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
    return p.parse_args(argv)


def _settings(role: config.RoleConfig) -> RoleSettings:
    return RoleSettings(truststore=role.truststore, crl=role.crl,
                        certificate=role.certificate,
                        private_key=role.private_key,
                        ciphersuites=role.ciphersuites)


def load_engine(path: str) -> Engine:
    cfg = config.load(path)
    reuse = (ReuseSettings(lifetime=cfg.session_lifetime,
                           cache_size=cfg.session_cache_size)
             if cfg.session_reuse else None)
    return Engine(_settings(cfg.client), _settings(cfg.server), reuse=reuse)


def check(path: str) -> int:
    """Load ``path`` and every credential it names, as a worker would."""
    try:
        load_engine(path)
    except (ConfigError, CredentialError) as e:
        print("%s: %s" % (path, e))
        return os.EX_CONFIG
    print("%s: ok" % path)
    return 0


def boot(args: argparse.Namespace, channel: Channel,
         lock: threading.Lock) -> tuple[Server, protocol.Hello]:
    """Steps 2-4: enter the namespace, load, start the pool, lock down.

    Raises ConfigError or CredentialError when the configuration or a
    credential is unusable.  Shared with the kernel tests' sandbox probe,
    which must boot exactly as a worker does.
    """
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
    engine = load_engine(args.config)
    server = Server(channel, lock, engine, args.threads)
    hello = sandbox.lock_down(args.uid, args.gid, 64 + 2 * args.threads)
    return server, hello


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
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.check:
        return check(args.config)
    if args.channel_fd is None:
        raise SystemExit("tlshd-worker: --channel-fd is required")
    args.channel_fd = _low_fd(args.channel_fd)
    if args.netns_fd is not None:
        args.netns_fd = _low_fd(args.netns_fd)
    setproctitle.setproctitle("tlshd: worker [netns %s]" % args.label)
    channel = Channel(socket.socket(fileno=args.channel_fd))
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
    return 0
