"""Run one attempt inside a worker sandbox, booted as a real worker is.

    python tests/lab/worker_probe.py --netns /run/netns/a \\
        --config CONF --uid U --gid G [--seccomp-log] \
        read-file PATH | read-key SERIAL | search-psk IDENTITY

Run as root.  First what the supervisor does before it spawns a worker
(join a session keyring of its own and link into it the daemon's
keyrings: workers inherit it, so this decides what a worker possesses);
then tlshd.worker.main.boot(), the same function a serving worker boots
through (setns into the namespace, load that namespace's configuration
and credentials, start the thread pool, lock down: uid, rlimits,
no_new_privs, seccomp); then the one attempt.

Output, one line each: ``HELLO uid=.. gid=.. cap_eff=.. no_new_privs=..
seccomp=..``, ``TRY <what>``, and ``ALLOWED <n> bytes`` or ``DENIED
<errno name>`` (``search-psk``: ``FOUND <serial>`` or ``DENIED ...``,
a ``keyctl search`` for a ``psk`` key from the worker's session keyring
down).  The seccomp filter kills the process on a forbidden system call
(opening a file, any keyctl): then the exit status is -SIGSYS and no
result line follows.  One attempt per run for that reason.
``--seccomp-log`` boots with the filter in log-only mode
(TLSHD_SECCOMP_LOG=1), to show what the layers underneath it (uid,
keyring possession) do on their own.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import threading

# As in python -m tlshd.worker: before anything loads OpenSSL.
from tlshd.worker import sslconf

sslconf.use_worker_config()

from tlshd.shared import config, keys, protocol  # noqa: E402
from tlshd.shared.channel import Channel, socketpair  # noqa: E402
from tlshd.supervisor import keyrings  # noqa: E402
from tlshd.worker import main as worker_main  # noqa: E402
from tlshd.worker import sandbox  # noqa: E402


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--netns", required=True, help="nsfs path to enter")
    p.add_argument("--config", required=True)
    p.add_argument("--daemon-config", default=None,
                   help="the main configuration ([authenticate] keyrings)")
    p.add_argument("--uid", required=True)
    p.add_argument("--gid", required=True)
    p.add_argument("--seccomp-log", action="store_true")
    p.add_argument("action", choices=("read-file", "read-key",
                                      "search-psk"))
    p.add_argument("target")
    args = p.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="probe: %(message)s")

    if args.seccomp_log:
        os.environ[sandbox.SECCOMP_LOG_ENV] = "1"
    named = ()
    if args.daemon_config:
        named = config.load(args.daemon_config).keyrings
    keyrings.setup_session_keyring(named)

    nsfd = os.open(args.netns, os.O_RDONLY | os.O_CLOEXEC)
    _ours, theirs = socketpair()  # _ours: keep the peer end open
    wargs = worker_main._parse_args([
        "--channel-fd", str(theirs.fileno()), "--config", args.config,
        "--label", "probe", "--netns-fd", str(nsfd),
        "--uid", args.uid, "--gid", args.gid])
    # stdio: our report goes to stdout, where a worker has /dev/null.
    channel = Channel(theirs, protocol.Side.WORKER)
    _server, hello = worker_main.boot(wargs, channel, threading.Lock(),
                                      keep_stdio=True)
    _say("HELLO uid=%d gid=%d cap_eff=%x no_new_privs=%d seccomp=%d"
         % (hello.uid, hello.gid, hello.cap_eff, hello.no_new_privs,
            hello.seccomp))
    _say("TRY %s %s" % (args.action, args.target))
    try:
        if args.action == "search-psk":
            serial = keys.search(keys.KEY_SPEC_SESSION_KEYRING,
                                 keys.PSK_KEY_TYPE, args.target)
            _say("FOUND %d" % serial)
            os._exit(0)
        if args.action == "read-key":
            data = keys.read(int(args.target, 0))
        else:
            with open(args.target, "rb") as f:
                data = f.read()
    except OSError as e:
        _say("DENIED %s" % errno.errorcode.get(e.errno or 0, str(e.errno)))
    else:
        _say("ALLOWED %d bytes" % len(data))
    # The pool threads never end on their own, and nothing else is owed.
    os._exit(0)


if __name__ == "__main__":
    main()
