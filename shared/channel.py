"""A SOCK_SEQPACKET channel carrying protocol messages and their fds.

Ownership: ``send`` never takes ownership of the fds it passes (the caller
still closes its copies).  ``recv`` returns fds that the caller owns; they
are close-on-exec (MSG_CMSG_CLOEXEC) so they cannot leak into a process the
caller later spawns.  If anything is wrong with a received datagram, every
fd that came with it is closed before ProtocolError is raised.

socket.recv_fds is not used: it cannot pass MSG_CMSG_CLOEXEC, so the fds it
returns are inheritable, and it hides MSG_CTRUNC.
"""

from __future__ import annotations

import array
import os
import select
import socket

from tlshd.shared import protocol
from tlshd.shared.errors import PeerGone, ProtocolError

_FD_SIZE = array.array("i").itemsize
# Room for more fds than any message may carry, so that a peer sending
# too many is detected (and all of them closed) rather than truncated.
_CMSG_ROOM = socket.CMSG_SPACE(8 * _FD_SIZE)
# A plain int: socket.MsgFlag arithmetic goes through enum.Flag's Python
# code on every message (docs/benchmarks.md: supervisor profile).
_TRUNCATED = int(socket.MSG_TRUNC) | int(socket.MSG_CTRUNC)


def socketpair() -> tuple[socket.socket, socket.socket]:
    """Make a connected pair of close-on-exec SEQPACKET sockets."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Channel:
    """One end of a supervisor-worker channel.

    ``side`` is the end this is.  A channel that knows its side refuses to
    send what that side does not send (ValueError: our own bug) and to
    take in what the other side does not send (ProtocolError, before the
    body is parsed).  Without a side, ``recv`` takes what either side
    sends; ``recv_answer`` is always the supervisor's end.
    """

    def __init__(self, sock: socket.socket,
                 side: protocol.Side | None = None) -> None:
        self.sock = sock
        self.side = side

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: protocol.Message, req_id: int = 0,
             fds: tuple[int, ...] = (), wait: bool = True) -> None:
        """Send one message; raises PeerGone if the other end is closed.

        ``wait=False``: raise BlockingIOError instead of waiting when the
        other end's queue is full (it is not reading); a datagram is sent
        whole or not at all.
        """
        if self.side is not None and msg.SENT_BY is not self.side:
            raise ValueError("the %s does not send %s"
                             % (self.side.value, type(msg).__name__))
        if len(fds) != msg.NFDS:
            raise ValueError("%s needs %d fds" % (type(msg).__name__,
                                                  msg.NFDS))
        data = protocol.encode(msg, req_id)
        anc = []
        if fds:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        array.array("i", fds).tobytes()))
        while True:
            try:
                self.sock.sendmsg([data], anc,
                                  0 if wait else socket.MSG_DONTWAIT)
                return
            except InterruptedError:
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise PeerGone("channel closed") from e

    def writable(self) -> bool:
        """Whether a datagram could be queued now.  An AF_UNIX socket
        shows room again only once the other end has read most of what
        it holds (measured: 37 of 49 queued requests)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        return bool(poller.poll(0))

    def _hung_up(self) -> bool:
        """Tell EOF from an empty datagram: both read as zero bytes, but
        only EOF (the peer closed, or we shut the socket down) also shows
        as POLLRDHUP."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        return bool(poller.poll(0))

    def recv(self) -> tuple[protocol.Message, int, list[int]]:
        """Receive one message: (message, request id, owned fds).

        Raises PeerGone on EOF and ProtocolError on a malformed datagram
        or one the other side does not send.
        """
        peer = None
        if self.side is not None:
            peer = (protocol.Side.WORKER
                    if self.side is protocol.Side.SUPERVISOR
                    else protocol.Side.SUPERVISOR)
        return self._recv(peer)

    def recv_answer(self) -> tuple[protocol.Message, int]:
        """Receive, at the supervisor's end, what a worker or the worker
        template may send: answers and notifications, none with fds
        (tests/unit/test_channel.py holds every such type to NFDS 0).

        Anything the supervisor sends raises ProtocolError, and the fds
        it brought are closed rather than left open in the supervisor.
        """
        msg, req_id, _fds = self._recv(protocol.Side.WORKER)
        return msg, req_id

    def _recv(
        self, sender: protocol.Side | None
    ) -> tuple[protocol.Message, int, list[int]]:
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                protocol.MAX_MSG + 1, _CMSG_ROOM, socket.MSG_CMSG_CLOEXEC
            )
        except ConnectionResetError as e:
            raise PeerGone("channel reset") from e
        fds = _collect_fds(anc)
        if not data and not fds:
            if self._hung_up():
                raise PeerGone("channel closed")
            # A peer that is still there sent a zero-length datagram;
            # taken for EOF, its worker would be left unwatched.
            raise ProtocolError("empty message")
        try:
            if flags & _TRUNCATED:
                raise ProtocolError("truncated message or control data")
            msg, req_id = protocol.decode(data, len(fds), sender)
        except BaseException:
            _close_all(fds)
            raise
        return msg, req_id, fds


def _collect_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    bad = False
    for level, ctype, payload in anc:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
        else:
            bad = True  # SCM_CREDENTIALS or such: nobody sends those here
    if bad:
        _close_all(fds)
        raise ProtocolError("unexpected control message")
    return fds

