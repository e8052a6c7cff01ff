"""``tlshdctl``: ask a running tlshd how its namespaces are doing."""

from __future__ import annotations

import argparse
import socket
import sys

from tlshd.supervisor.control import DEFAULT_PATH

COMMANDS = ("status", "status-json", "metrics")


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tlshdctl",
        description="Show the state of a running tlshd: per network "
                    "namespace, its worker, handshake counts, last failure "
                    "and certificates; or the same as Prometheus metrics.")
    p.add_argument("-S", "--socket", default=DEFAULT_PATH,
                   help="control socket (default %(default)s)")
    p.add_argument("command", choices=COMMANDS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = query(args.socket, args.command)
    except OSError as e:
        print("tlshdctl: cannot reach tlshd at %s: %s"
              % (args.socket, e.strerror or e), file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    sys.stdout.write(out)
    return 1 if out.startswith("error:") else 0


if __name__ == "__main__":
    sys.exit(main())
