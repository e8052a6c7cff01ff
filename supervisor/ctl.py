"""``tlshdctl``: ask a running tlshd how its namespaces are doing, have
it reload its configuration, or register a container's namespace
(``netns add|remove``, see tlshd.supervisor.registry)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from tlshd.supervisor.paths import CONTROL_SOCKET as DEFAULT_PATH

COMMANDS = ("status", "status-json", "metrics", "reload", "netns")
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


def netns_command(prog: str, rest: list[str]) -> str:
    """The control command for ``netns add|remove ...``."""
    p = argparse.ArgumentParser(
        prog=prog + " netns",
        description="Register a network namespace (a container's) to be "
                    "served with its own configuration, or remove the "
                    "registration.  It is dropped by itself when PATH no "
                    "longer leads to the namespace.")
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("--path", help="the namespace: /proc/PID/ns/net, "
                   "/run/netns/NAME, /var/run/docker/netns/ID, ...")
    p.add_argument("--config", help="add: the configuration file that "
                   "serves it (root-owned, like the main one)")
    p.add_argument("--name", help="its label in the log and in status "
                   "(add: default the file's name); remove: which one")
    p.add_argument("--source", default="tlshdctl",
                   help="add: who registers it, shown in status (an OCI "
                        "hook gives the container id)")
    p.add_argument("--allow-userns", action="store_true",
                   help="add: serve it even if a user namespace other than "
                        "tlshd's owns it (its root can then send netlink "
                        "messages to tlshd)")
    args = p.parse_args(rest)
    if args.action == "remove":
        if (args.name is None) == (args.path is None):
            p.error("remove takes --name or --path")
        req = {"name": args.name} if args.name else {"path": args.path}
        return "netns-remove " + json.dumps(req)
    if args.path is None or args.config is None:
        p.error("add takes --path and --config")
    req = {"path": args.path, "config": args.config, "source": args.source,
           "allow_userns": args.allow_userns}
    if args.name:
        req["name"] = args.name
    return "netns-add " + json.dumps(req)


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
                    "report when every namespace has taken it up.  Or "
                    "register a container's network namespace with its "
                    "own configuration (netns add|remove).")
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
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="netns: add|remove and its options (tlshdctl "
                        "netns -h)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command
    if command == "netns":
        command = netns_command(p.prog, args.rest)
    elif args.rest:
        p.error("unexpected %s" % " ".join(args.rest))
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
