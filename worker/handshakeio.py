"""Drive a non-blocking TLS handshake: on a kernel socket to a deadline,
or between two in-memory connections (the engine's start-up self-test).

The socket stays owned by the caller; :func:`disable_nagle` and
:func:`restore_socket` bracket a handshake so that the caller gets it back
in blocking mode with its TCP_NODELAY setting restored.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import time

from OpenSSL import SSL

from tlshd.worker.tlsoutcome import DeadlineExpired
from tlshd.worker.verify import EngineError

log = logging.getLogger(__name__)


def pump_memory_handshake(cli: SSL.Connection, srv: SSL.Connection) -> None:
    done: set[int] = set()
    for _ in range(16):
        for i, conn in enumerate((cli, srv)):
            if i in done:
                continue
            try:
                conn.do_handshake()
                done.add(i)
            except SSL.WantReadError:
                pass
        moved = _shuttle(cli, srv) + _shuttle(srv, cli)
        if len(done) == 2 and not moved:
            return
    raise EngineError("self-test handshake did not complete")


def _shuttle(src: SSL.Connection, dst: SSL.Connection) -> int:
    try:
        data = src.bio_read(1 << 16)
    except SSL.WantReadError:
        return 0
    dst.bio_write(data)
    return len(data)


def drive(conn: SSL.Connection, sock: socket.socket, deadline: float) -> None:
    """Step the non-blocking handshake until done or past ``deadline``.

    OpenSSL writes each record of a flight with its own send(); with
    TCP_NODELAY each would leave as a segment of its own and wake the
    peer once per record.  The socket is corked while OpenSSL writes and
    uncorked (flushed) whenever it waits for the peer or is done, so a
    flight leaves in as few segments as its size allows, as GnuTLS sends
    it.
    """
    poller = select.poll()
    fd = sock.fileno()
    corked = _cork(sock, 1)
    try:
        while True:
            try:
                conn.do_handshake()
                return
            except SSL.WantReadError:
                events = select.POLLIN
            except SSL.WantWriteError:
                events = select.POLLOUT
            if corked:
                _cork(sock, 0)  # the flight is written: send it
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExpired
            poller.register(fd, events)
            # Readiness or an error condition both mean "try again":
            # OpenSSL then reports EOF or a socket error itself.
            poller.poll(math.ceil(remaining * 1000))
            poller.unregister(fd)
            if corked:
                _cork(sock, 1)
    finally:
        if corked:
            # Never leave the kernel's socket corked: its own sends would
            # wait up to 200 ms.
            _cork(sock, 0)


def _cork(sock: socket.socket, on: int) -> bool:
    """Set TCP_CORK; False where it cannot be (not a TCP socket)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)
    except OSError:
        return False
    return True


def disable_nagle(sock: socket.socket) -> int | None:
    """Turn on TCP_NODELAY; return the old value (None if not TCP).

    The kernel's NFS and NVMe sockets already have it on: then it is
    left alone (and restore_socket has nothing to put back)."""
    try:
        old = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        if not old:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return None
    return old


def restore_socket(sock: socket.socket, nodelay: int | None) -> None:
    try:
        sock.setblocking(True)
        if nodelay == 0:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    except OSError as exc:
        # The peer may have reset the connection; the outcome says so.
        log.debug("cannot restore socket options: %s", exc)
