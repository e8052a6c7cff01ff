"""The supervisor's handshake netlink sockets: READY, ACCEPT and DONE.

Plain AF_NETLINK sockets: what the family's ids are comes from
tlshd.supervisor.netlink_family (probed once at start-up), the bytes on
the wire from the strict codec in tlshd.supervisor.netlink_codec.

A netlink socket serves the network namespace it was created in, so the
caller creates one HandshakeSocket per served namespace while inside it.

Only the kernel is heard.  Whoever holds CAP_NET_ADMIN over a served
namespace's user namespace (the root of an unprivileged container) can
find our port ids in its /proc/net/netlink and send to them, or multicast
to the tlshd group.  So:

- each namespace has two sockets, both connected to the kernel (port 0),
  which makes the kernel refuse other senders' unicasts (ECONNREFUSED):
  one joins the tlshd group and only hears READY; the other joins no
  group and carries ACCEPT and DONE, so that nothing but the kernel's
  answers ever reaches it, and a flood of multicasts cannot push those
  answers out of a full receive buffer;
- every datagram's source port is checked (multicasts to the group still
  arrive from anyone allowed to send them) and the work per wake-up is
  bounded;
- the SOCKFD of an ACCEPT reply must be the TCP socket the kernel has
  just installed in our fd table.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import time

from tlshd.shared import uapi
from tlshd.shared.errors import ProtocolError
from tlshd.supervisor import netlink_codec
from tlshd.supervisor.netlink_family import FamilyInfo

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
# How long to wait for the kernel's answer to ACCEPT or DONE.  Both are
# synchronous "do" operations, so the answer is normally queued before
# sendmsg returns; the timeout only guards against a wedged kernel.
TRANSACT_TIMEOUT = 2.0
# Datagrams read per drain() call: a flood in one namespace must not hold
# the loop (every other namespace waits meanwhile).  What is left stays
# queued and the selector reports the socket again on the next step.
MAX_DRAIN = 64
# Datagrams read while waiting for the kernel's answer to one ACCEPT or
# DONE.  Only stale answers (to a request that timed out) can come first.
MAX_TRANSACT_READS = 64
RCVBUF = 1 << 20
# How often the "dropped datagrams not from the kernel" line may repeat.
FOREIGN_LOG_INTERVAL = 10.0


class AcceptFailed(Exception):
    """An ACCEPT reply could not be used.

    ``sockfd`` is set only when it is certainly the socket the kernel
    installed for us: we then still owe it a DONE.
    """

    def __init__(self, reason: str, sockfd: int | None) -> None:
        super().__init__(reason)
        self.sockfd = sockfd


def lowest_free_fd(any_fd: int) -> int:
    """The fd number the kernel would install next in this process.

    ACCEPT installs the handshake's socket at the lowest free number
    (get_unused_fd_flags), and the supervisor is single-threaded, so the
    number free just before ACCEPT is the one its reply must name.
    """
    fd = fcntl.fcntl(any_fd, fcntl.F_DUPFD_CLOEXEC, 0)
    os.close(fd)
    return fd


def check_sockfd(fd: int, expected: int | None) -> str | None:
    """Why ``fd`` is not a handshake socket the kernel just gave us
    (None: it is).  ``expected``: the lowest free fd before ACCEPT."""
    return inspect_sockfd(fd, expected)[0]


def inspect_sockfd(fd: int, expected: int | None) -> tuple[str | None, str]:
    """check_sockfd's answer, and the socket's peer address ("unknown"
    if it has none), for the log lines: read now, while the connection
    surely has its peer."""
    if expected is not None and fd != expected:
        return "fd %d, but the kernel installs at %d" % (fd, expected), ""
    # A socket object on the fd itself (not a dup) reads the domain and
    # protocol as it is made (SO_DOMAIN, SO_PROTOCOL); detach() then
    # leaves the fd open.
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        if e.errno == errno.ENOTSOCK:
            return "fd %d is not a socket" % fd, ""
        return "fd %d: %s" % (fd, e.strerror), ""
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return ("fd %d is not an IP socket (domain %d)"
                    % (fd, sock.family)), ""
        if sock.proto != socket.IPPROTO_TCP:
            return ("fd %d is not a TCP socket (protocol %d)"
                    % (fd, sock.proto)), ""
        try:
            return None, str(sock.getpeername()[0])
        except OSError:
            return None, "unknown"
    finally:
        sock.detach()


def _kernel_socket() -> socket.socket:
    """A generic netlink socket that only the kernel can unicast to."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                         NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        sock.connect((0, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HandshakeSocket:
    """A namespace's handshake netlink sockets: READY in, ACCEPT and DONE.

    Create it while the calling thread is inside the namespace to serve.
    ``fileno()`` is the READY socket's, for the caller's selector.
    """

    def __init__(self, family: FamilyInfo, label: str = "") -> None:
        self.family = family
        self.label = label
        self.txn = _kernel_socket()
        try:
            self.sock = _kernel_socket()
        except BaseException:
            self.txn.close()
            raise
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                 RCVBUF)
            # Until this membership exists the kernel fails this namespace's
            # consumers at once with ESRCH.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP,
                                 family.group_id)
        except BaseException:
            self.close()
            raise
        self.seq = 0
        self.ready = False
        # READYs read since the last ACCEPT loop: the kernel multicasts one
        # per request it queues, after queueing it, so that many ACCEPTs
        # empty the queue without one more that only hears EAGAIN.  None:
        # unknown (READYs lost to an overrun, or requests queued before
        # this socket joined the group): ACCEPT until EAGAIN.  Only the
        # kernel's datagrams count (port 0), never another sender's.
        self.readies: int | None = None
        # Decode and send the re-key upcall's attributes when this kernel
        # has them (their numbers mean something else on other kernels).
        self.rekey = family.rekey_upcall
        # Datagrams dropped because the kernel did not send them.
        self.foreign = 0
        # The last drain() read a full slice, mostly not from the kernel:
        # someone in the namespace is flooding the socket.
        self.flooded = False
        self._foreign_logged = 0
        self._foreign_log_at = 0.0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        self.txn.close()

    def leave_group(self) -> None:
        """Stop receiving READY; the socket can still send DONE."""
        self.sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP,
                             self.family.group_id)

    def _recv(self, sock: socket.socket) -> bytes | None:
        """One datagram from the kernel; None if another sender's.

        Raises BlockingIOError when nothing is queued.
        """
        data, (port, _groups) = sock.recvfrom(65536)
        if port == 0:
            return data
        self.foreign += 1
        now = time.monotonic()
        if now >= self._foreign_log_at:
            log.warning("Dropped %d netlink message(s) not sent by the "
                        "kernel%s (last from port %d)",
                        self.foreign - self._foreign_logged,
                        " in netns %s" % self.label if self.label else "",
                        port)
            self._foreign_logged = self.foreign
            self._foreign_log_at = now + FOREIGN_LOG_INTERVAL
        return None

    def _note(self, msg: netlink_codec.NlMsg) -> None:
        """Remember a READY notification."""
        if msg.type == self.family.family_id:
            try:
                cmd, _ = netlink_codec.genl_payload(msg)
            except ProtocolError:
                return
            if cmd == uapi.HANDSHAKE_CMD_READY:
                self.ready = True
                if self.readies is not None:
                    self.readies += 1

    def drain(self) -> bool:
        """Read queued notifications; True if ACCEPT should run.

        Reads at most MAX_DRAIN datagrams.  An ENOBUFS overrun means
        READY notifications were lost, so it too asks for an ACCEPT loop.
        """
        foreign, reads = self.foreign, 0
        for _ in range(MAX_DRAIN):
            reads += 1
            try:
                data = self._recv(self.sock)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.ready = True
                    self.readies = None
                    continue
                raise
            if data is None:
                continue
            try:
                for msg in netlink_codec.split_messages(data):
                    self._note(msg)
            except ProtocolError as e:
                log.warning("Ignoring malformed netlink datagram: %s", e)
        # (A slice cut short by an empty queue counts one read too many.)
        self.flooded = (reads == MAX_DRAIN
                        and self.foreign - foreign > MAX_DRAIN // 2)
        ready, self.ready = self.ready, False
        return ready

    def note_pending(self) -> None:
        """Requests may be queued whose READYs were not counted: the
        next ACCEPT loop runs until EAGAIN."""
        self.ready = True
        self.readies = None

    def take_readies(self) -> int | None:
        """How many ACCEPTs the READYs read so far call for (None: until
        EAGAIN); the count starts again from 0."""
        n, self.readies = self.readies, 0
        return n

    def _transact(self, data: bytes, seq: int) -> list[netlink_codec.NlMsg]:
        """Send one request; return the messages answering it."""
        self.txn.send(data)
        answers: list[netlink_codec.NlMsg] = []
        for _ in range(MAX_TRANSACT_READS):
            # The kernel answers ACCEPT and DONE within send(): try the
            # (non-blocking) receive first and wait only if it has not.
            try:
                datagram = self._recv(self.txn)
            except BlockingIOError:
                r, _, _ = select.select([self.txn], [], [],
                                        TRANSACT_TIMEOUT)
                if not r:
                    raise TimeoutError(
                        "no netlink answer from the kernel") from None
                continue
            if datagram is None:
                continue
            for msg in netlink_codec.split_messages(datagram):
                if msg.seq != seq:
                    continue  # a late answer to an earlier request
                answers.append(msg)
                if msg.type in (netlink_codec.NLMSG_ERROR,
                                netlink_codec.NLMSG_DONE):
                    return answers
                if not msg.flags & 0x2:  # not NLM_F_MULTI: a lone reply
                    return answers
        raise TimeoutError("no netlink answer from the kernel after %d "
                           "datagrams" % MAX_TRANSACT_READS)

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0x7FFFFFFF or 1
        return self.seq

    def accept(self) -> netlink_codec.AcceptedRequest | None:
        """ACCEPT one pending request; None when none is pending.

        The returned request's ``sockfd`` is now an fd of this process:
        checked to be the TCP socket the kernel has just installed.
        """
        seq = self._next_seq()
        expected = lowest_free_fd(self.txn.fileno())
        answers = self._transact(
            netlink_codec.encode_accept(self.family.family_id, seq), seq)
        for msg in answers:
            if msg.type == netlink_codec.NLMSG_ERROR:
                err = netlink_codec.netlink_error(msg)
                if err in (errno.EAGAIN, 0):
                    return None
                raise OSError(err, "ACCEPT failed: %s" % errno.errorcode.get(
                    err, str(err)))
            if msg.type == self.family.family_id:
                _cmd, attrs = netlink_codec.genl_payload(msg)
                try:
                    req = netlink_codec.decode_accept_attrs(
                        attrs, rekey=self.rekey)
                except ProtocolError as e:
                    fd = netlink_codec.salvage_sockfd(attrs)
                    if fd is not None and check_sockfd(fd, expected):
                        fd = None  # not ours to answer or close
                    raise AcceptFailed(str(e), fd) from e
                why, address = inspect_sockfd(req.sockfd, expected)
                if why is not None:
                    raise AcceptFailed("SOCKFD refused: %s" % why, None)
                return req.replace(peer_address=address)
        return None

    def done(self, sockfd: int, status: int,
             remote_auth: tuple[int, ...], session_id: int = 0) -> int:
        """Send DONE for ``sockfd``; return the kernel's errno (0 = ok).

        ``session_id`` goes out only if the kernel's DONE policy has it.
        """
        seq = self._next_seq()
        attr = self.family.done_session_id_attr if self.rekey else None
        answers = self._transact(
            netlink_codec.encode_done(self.family.family_id, seq, sockfd,
                                      status, remote_auth, session_id, attr),
            seq)
        for msg in answers:
            if msg.type == netlink_codec.NLMSG_ERROR:
                return netlink_codec.netlink_error(msg)
        return 0
