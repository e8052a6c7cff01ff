"""``tlshdctl``: ask a running tlshd how its namespaces are doing, or
have it reload its configuration."""

from __future__ import annotations

import argparse
import socket
import sys
import time

from tlshd.supervisor.control import DEFAULT_PATH

COMMANDS = ("status", "status-json", "metrics", "reload")
# How often "reload" asks whether the new workers are up.
RELOAD_POLL = 0.2


def query(path: str, command: str, timeout: float = 5.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def reload(path: str, timeout: float) -> str:
    """Reload, then wait until every namespace has its new worker up (or
    has failed to): the report, or an error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    out = query(path, "reload")
    while out == "pending\n":
        if time.monotonic() >= deadline:
            return ("error: reload not finished after %.0f s; new workers "
                    "are still starting (tlshdctl status)\n" % timeout)
        time.sleep(RELOAD_POLL)
        out = query(path, "reload-status")
    return out


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("tlshd")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tlshdctl",
        description="Show the state of a running tlshd: a summary line, "
                    "then per network namespace its worker, handshake "
                    "counts, last failure and certificates (with many "
                    "namespaces, those that need a look; --netns NAME "
                    "for one); or the same as Prometheus metrics. "
                    "Or reload its configuration, as SIGHUP does, and "
                    "report when every namespace has taken it up.")
    p.add_argument("-S", "--socket", default=DEFAULT_PATH,
                   help="control socket (default %(default)s)")
    p.add_argument("-t", "--timeout", type=float, default=60.0,
                   help="reload: how long to wait for the new workers "
                        "(default %(default)s s)")
    p.add_argument("-n", "--netns", metavar="NAME",
                   help="status: show this namespace (name or inode "
                        "number) in full")
    p.add_argument("-v", "--version", action="version",
                   version="tlshdctl, built from tlshd (Python) %s"
                   % _version())
    p.add_argument("command", choices=COMMANDS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command
    if args.netns is not None:
        if command != "status":
            p.error("--netns goes with status")
        command = "status-netns " + args.netns
    try:
        if command == "reload":
            out = reload(args.socket, args.timeout)
        else:
            out = query(args.socket, command)
    except OSError as e:
        print("tlshdctl: cannot reach tlshd at %s: %s"
              % (args.socket, e.strerror or e), file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    sys.stdout.write(out)
    return 1 if out.startswith("error:") else 0


if __name__ == "__main__":
    sys.exit(main())
