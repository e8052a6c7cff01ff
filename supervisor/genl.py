"""The supervisor's handshake netlink sockets: READY, ACCEPT and DONE.

This is the only module that imports pyroute2, and it uses it only at
start-up, to resolve the ``handshake`` family, its ``tlshd`` group and the
kernel's per-operation policy (CTRL_CMD_GETPOLICY).  The hot path is a
plain AF_NETLINK socket and the strict codec in ``upcall``.

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
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from tlshd.shared import uapi
from tlshd.shared.errors import ConfigError, ProtocolError
from tlshd.supervisor import upcall

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
GENL_ADMIN_PERM = 0x1
# enum netlink_attribute_type (<linux/netlink.h>): CTRL_CMD_GETPOLICY's
# NL_POLICY_TYPE_ATTR_TYPE values.
NL_ATTR_TYPE_U32 = 4
NL_ATTR_TYPE_STRING = 11
NL_ATTR_TYPE_NUL_STRING = 12
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
SO_DOMAIN = getattr(socket, "SO_DOMAIN", 39)
SO_PROTOCOL = getattr(socket, "SO_PROTOCOL", 38)


@dataclass(frozen=True)
class FamilyInfo:
    """What the running kernel offers: ids, op flags, DONE's attributes."""

    family_id: int
    group_id: int
    op_flags: dict[int, int] = field(default_factory=dict)
    done_attrs: frozenset[int] = frozenset()
    # DONE's policy: attribute number -> NL_ATTR_TYPE_*, when known.
    done_attr_types: dict[int, int] = field(default_factory=dict)

    @property
    def done_session_id_attr(self) -> int | None:
        """DONE's SESSION_ID attribute number, if this kernel has one.

        The proposed KeyUpdate series numbers it 4, a u32; the NFSD tree
        uses 4 for the string TAG.  Only a u32 at 4 counts.  ACCEPT's
        reply attributes are not in any policy, so this is also the test
        for the whole re-key upcall.
        """
        attr = uapi.HANDSHAKE_A_DONE_SESSION_ID
        if self.done_attr_types.get(attr) == NL_ATTR_TYPE_U32:
            return attr
        return None

    @property
    def rekey_upcall(self) -> bool:
        return self.done_session_id_attr is not None

    def rekey_status(self, ktls_rekey: bool) -> str:
        """The start-up line about the re-key upcall."""
        upcall = ("DONE has a u32 SESSION_ID (attribute %d)"
                  % uapi.HANDSHAKE_A_DONE_SESSION_ID if self.rekey_upcall
                  else "DONE policy has no SESSION_ID")
        tx = ("kTLS can re-key" if ktls_rekey
              else "kTLS cannot re-key: no Tls*Rekey* counters")
        ok = self.rekey_upcall and ktls_rekey
        return "Kernel re-key upcall: %s (%s; %s)" % (
            "supported" if ok else "not supported", upcall, tx)

    def describe(self) -> str:
        def perm(op: int) -> str:
            flags = self.op_flags.get(op)
            if flags is None:
                return "absent"
            return "admin" if flags & GENL_ADMIN_PERM else "any"

        return ("family id %d, group tlshd id %d, ACCEPT %s, DONE %s, "
                "DONE attributes %s"
                % (self.family_id, self.group_id,
                   perm(uapi.HANDSHAKE_CMD_ACCEPT),
                   perm(uapi.HANDSHAKE_CMD_DONE),
                   sorted(self.done_attrs) or "unknown"))

    def capabilities(self) -> str:
        """The tlshd-worded capability line, from the real policy."""
        def has(attr: int) -> str:
            return "supported" if attr in self.done_attrs else "unsupported"

        # DONE attribute 4 is "tag" in the NFSD development tree, but the
        # u32 session id of the proposed KeyUpdate series.
        tags = ("unsupported" if self.rekey_upcall
                else has(uapi.HANDSHAKE_A_DONE_TAG))
        return ("session_tags=%s remote_peerids=%s"
                % (tags, has(uapi.HANDSHAKE_A_DONE_REMOTE_AUTH)))


def _get(msg: Any, name: str, default: Any = None) -> Any:
    return msg.get_attr(name, default)


def _done_policy(replies: tuple[Any, ...]) -> dict[int, int]:
    """DONE's "do" policy: attribute number -> NL_ATTR_TYPE_* (0 if the
    kernel did not say)."""
    done_policy_idx = None
    policies: dict[int, dict[int, int]] = {}
    for msg in replies:
        oppol = _get(msg, "CTRL_ATTR_OP_POLICY")
        if oppol is not None:
            for name, value in oppol["attrs"]:
                if name == "OP(%d)" % uapi.HANDSHAKE_CMD_DONE:
                    done_policy_idx = value.get_attr("CTRL_ATTR_POLICY_DO")
        pol = _get(msg, "CTRL_ATTR_POLICY")
        if pol is not None:
            for pname, pvalue in pol["attrs"]:
                idx = int(pname[len("POLICY("):-1])
                for aname, avalue in pvalue["attrs"]:
                    kind = avalue.get_attr("NL_POLICY_TYPE_ATTR_TYPE")
                    policies.setdefault(idx, {})[
                        int(aname[len("ATTR("):-1])] = int(kind or 0)
    if done_policy_idx is None:
        return {}
    return dict(policies.get(done_policy_idx, {}))


def unavailable_message(e: Exception) -> str:
    """Why the handshake family could not be resolved, for an admin."""
    code = getattr(e, "code", None)
    if not isinstance(code, int):
        code = getattr(e, "errno", None)
    if code == errno.ENOENT:
        why = ('this kernel has no "%s" netlink family'
               % uapi.HANDSHAKE_FAMILY_NAME)
    else:
        why = "cannot ask the kernel for it: %s" % (
            os.strerror(code) if isinstance(code, int) and code > 0 else e)
    tls = ("" if os.path.isdir("/sys/module/tls") else
           "; the tls module (CONFIG_TLS) is not loaded either, and kTLS "
           "needs it")
    return ("Kernel handshake service is not available: %s.  tlshd needs "
            "Linux 6.4 or later built with CONFIG_NET_HANDSHAKE=y%s"
            % (why, tls))


def probe_family() -> FamilyInfo:
    """Resolve the handshake family in the current network namespace.

    Raises ConfigError when the kernel has no handshake family (too old, or
    CONFIG_NET_HANDSHAKE off).
    """
    from pyroute2.netlink import genlmsg
    from pyroute2.netlink.generic import GenericNetlinkSocket

    nl = GenericNetlinkSocket()
    try:
        try:
            # bind() registers the nlctrl decoder, then resolves the family.
            nl.bind(uapi.HANDSHAKE_FAMILY_NAME, genlmsg)
            fam = nl.discovery(uapi.HANDSHAKE_FAMILY_NAME)
        except Exception as e:
            raise ConfigError(unavailable_message(e)) from e
        family_id = int(_get(fam, "CTRL_ATTR_FAMILY_ID"))
        groups = {
            g.get_attr("CTRL_ATTR_MCAST_GRP_NAME"):
                g.get_attr("CTRL_ATTR_MCAST_GRP_ID")
            for g in _get(fam, "CTRL_ATTR_MCAST_GROUPS", [])
        }
        if uapi.HANDSHAKE_MCGRP_TLSHD not in groups:
            raise ConfigError("handshake family has no 'tlshd' group")
        op_flags = {
            int(op.get_attr("CTRL_ATTR_OP_ID")):
                int(op.get_attr("CTRL_ATTR_OP_FLAGS"))
            for op in _get(fam, "CTRL_ATTR_OPS", [])
        }
        try:
            done_types = _done_policy(nl.policy(uapi.HANDSHAKE_FAMILY_NAME))
        except Exception as e:  # kernels before 5.10 have no GETPOLICY
            log.warning("Cannot read the handshake policy: %s", e)
            done_types = {}
        return FamilyInfo(family_id, int(groups[uapi.HANDSHAKE_MCGRP_TLSHD]),
                          op_flags, frozenset(done_types), done_types)
    finally:
        nl.close()


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
    if expected is not None and fd != expected:
        return "fd %d, but the kernel installs at %d" % (fd, expected)
    try:
        st = os.fstat(fd)
    except OSError as e:
        return "fd %d: %s" % (fd, e.strerror)
    if not stat.S_ISSOCK(st.st_mode):
        return "fd %d is not a socket" % fd
    sock = socket.socket(fileno=os.dup(fd))
    try:
        domain = sock.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
        proto = sock.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL)
    except OSError as e:
        return "fd %d: %s" % (fd, e.strerror)
    finally:
        sock.close()
    if domain not in (socket.AF_INET, socket.AF_INET6):
        return "fd %d is not an IP socket (domain %d)" % (fd, domain)
    if proto != socket.IPPROTO_TCP:
        return "fd %d is not a TCP socket (protocol %d)" % (fd, proto)
    return None


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

    def _note(self, msg: upcall.NlMsg) -> None:
        """Remember a READY notification."""
        if msg.type == self.family.family_id:
            try:
                cmd, _ = upcall.genl_payload(msg)
            except ProtocolError:
                return
            if cmd == uapi.HANDSHAKE_CMD_READY:
                self.ready = True

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
                    continue
                raise
            if data is None:
                continue
            try:
                for msg in upcall.split_messages(data):
                    self._note(msg)
            except ProtocolError as e:
                log.warning("Ignoring malformed netlink datagram: %s", e)
        # (A slice cut short by an empty queue counts one read too many.)
        self.flooded = (reads == MAX_DRAIN
                        and self.foreign - foreign > MAX_DRAIN // 2)
        ready, self.ready = self.ready, False
        return ready

    def _transact(self, data: bytes, seq: int) -> list[upcall.NlMsg]:
        """Send one request; return the messages answering it."""
        self.txn.send(data)
        answers: list[upcall.NlMsg] = []
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
            for msg in upcall.split_messages(datagram):
                if msg.seq != seq:
                    continue  # a late answer to an earlier request
                answers.append(msg)
                if msg.type in (upcall.NLMSG_ERROR, upcall.NLMSG_DONE):
                    return answers
                if not msg.flags & 0x2:  # not NLM_F_MULTI: a lone reply
                    return answers
        raise TimeoutError("no netlink answer from the kernel after %d "
                           "datagrams" % MAX_TRANSACT_READS)

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0x7FFFFFFF or 1
        return self.seq

    def accept(self) -> upcall.AcceptedRequest | None:
        """ACCEPT one pending request; None when none is pending.

        The returned request's ``sockfd`` is now an fd of this process:
        checked to be the TCP socket the kernel has just installed.
        """
        seq = self._next_seq()
        expected = lowest_free_fd(self.txn.fileno())
        answers = self._transact(
            upcall.encode_accept(self.family.family_id, seq), seq)
        for msg in answers:
            if msg.type == upcall.NLMSG_ERROR:
                err = upcall.netlink_error(msg)
                if err in (errno.EAGAIN, 0):
                    return None
                raise OSError(err, "ACCEPT failed: %s" % errno.errorcode.get(
                    err, str(err)))
            if msg.type == self.family.family_id:
                _cmd, attrs = upcall.genl_payload(msg)
                try:
                    req = upcall.decode_accept_attrs(attrs, rekey=self.rekey)
                except ProtocolError as e:
                    fd = upcall.salvage_sockfd(attrs)
                    if fd is not None and check_sockfd(fd, expected):
                        fd = None  # not ours to answer or close
                    raise AcceptFailed(str(e), fd) from e
                why = check_sockfd(req.sockfd, expected)
                if why is not None:
                    raise AcceptFailed("SOCKFD refused: %s" % why, None)
                return req
        return None

    def done(self, sockfd: int, status: int,
             remote_auth: tuple[int, ...], session_id: int = 0) -> int:
        """Send DONE for ``sockfd``; return the kernel's errno (0 = ok).

        ``session_id`` goes out only if the kernel's DONE policy has it.
        """
        seq = self._next_seq()
        attr = self.family.done_session_id_attr if self.rekey else None
        answers = self._transact(
            upcall.encode_done(self.family.family_id, seq, sockfd, status,
                               remote_auth, session_id, attr), seq)
        for msg in answers:
            if msg.type == upcall.NLMSG_ERROR:
                return upcall.netlink_error(msg)
        return 0
