"""The table of in-flight requests: the one place a request lives.

A request is ACCEPTed in a namespace (``submit``), waits there until the
namespace's worker is ready (pending), is handed to that worker
(``dispatch``: dispatched), and ends with exactly one DONE to the kernel
(``complete``, ``expire``, ``fail_all``), which also removes it from the
table.  Nothing outside this module keeps a request: who holds which
request is asked here (``pending``, ``held``, ``held_by``).

DONE is sent only from here, through the ``send_done`` callable the table
is given: a request completed twice is a bug (AssertionError), never a
second DONE for an fd the kernel may have reused.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tlshd.shared import protocol, uapi
from tlshd.shared.errors import PeerGone, ProtocolError
from tlshd.supervisor import (
    keymaterial,
    netlink_codec,
    netlink_socket,
)
from tlshd.supervisor.namespace import Namespace
from tlshd.supervisor.workers import Worker

log = logging.getLogger(__name__)

# What the supervisor reads from kernel keys for one request: the x.509
# certificate and key (DER, empty: none) and a client's PSKs.
KeyMaterial = tuple[bytes, bytes, tuple[protocol.PskMaterial, ...]]

# A request's own TIMEOUT is shortened by this much (at most a tenth of it).
TIMEOUT_MARGIN = 0.5
# The worker enforces each deadline itself and answers ETIMEDOUT; this much
# later the supervisor stops waiting for a worker that is stuck.
DEADLINE_GRACE = 1.0
# How soon requests a worker could not take (its channel full) are handed
# to it again.
STALL_RETRY = 0.02

# (netlink socket, sockfd, status, remote_auth, session_id); the callee
# closes the sockfd.
SendDone = Callable[
    [netlink_socket.HandshakeSocket, int, int, tuple[int, ...], int], None]


def send_done(nlsock: netlink_socket.HandshakeSocket, sockfd: int, status: int,
              remote_auth: tuple[int, ...], session_id: int) -> None:
    """DONE for ``sockfd`` on ``nlsock``, then close our copy of it."""
    try:
        if session_id:
            err = nlsock.done(sockfd, status, remote_auth,
                              session_id=session_id)
        else:
            err = nlsock.done(sockfd, status, remote_auth)
        if err:
            log.error("DONE for fd %d refused by the kernel: %s", sockfd,
                      os.strerror(err))
    except (OSError, TimeoutError, ProtocolError) as e:
        log.error("DONE for fd %d failed: %s", sockfd, e)
    finally:
        os.close(sockfd)


def request_timeout(ns: Namespace,
                    req: netlink_codec.AcceptedRequest) -> float:
    """Seconds ``req`` may take: its own TIMEOUT, or the role's default."""
    if req.timeout_ms:
        # The consumer (NVMe: 10 s) cancels at its TIMEOUT, counted from
        # its submit, a little before our ACCEPT: answer a bit earlier,
        # so that it hears our ETIMEDOUT rather than its own timer.
        timeout = req.timeout_ms / 1000.0
        return timeout - min(TIMEOUT_MARGIN, timeout / 10)
    if req.msg_type == uapi.MsgType.CLIENTHELLO:
        return ns.cfg.client_handshake_timeout
    return ns.cfg.handshake_timeout


@dataclass(eq=False)
class Request:
    """An ACCEPTed request the supervisor still owes a DONE.

    Pending while ``worker`` is None, dispatched to ``worker`` after.
    """

    req_id: int
    ns: Namespace
    sockfd: int
    request: netlink_codec.AcceptedRequest
    deadline: float
    worker: Worker | None = None
    lookups: int = 0  # PSK_LOOKUPs answered for it (MAX_LOOKUPS at most)
    # Key serials handed to its worker (client PSKs, PSKs found by a
    # lookup): the only ones its answer may name as the peer's identity.
    handed: set[int] = field(default_factory=set)

    def wakeup(self) -> float:
        """When the loop must look at it (its deadline, plus the grace a
        worker gets to answer with its own ETIMEDOUT)."""
        return self.deadline + (DEADLINE_GRACE if self.worker else 0.0)


class Requests:
    """Every in-flight request, by id, in the order they were ACCEPTed."""

    def __init__(self, keep_secrets: bool,
                 done: SendDone = send_done) -> None:
        self._done = done
        self._table: dict[int, Request] = {}
        # Requests whose deadline passed while a worker held them, and
        # that worker: its late answer is expected, not a violation.
        self._late: dict[int, Worker] = {}
        self._next_id = 1
        # Workers keep each session's secrets for re-keying (see main).
        self.keep_secrets = keep_secrets
        # Workers whose channel was full at the last hand-over (the worker
        # is not reading: busy, stuck, or compromised), with their
        # namespace.  The supervisor never waits on a worker: their
        # requests stay pending, handed over in order by retry_stalled(),
        # and end by their deadline if the worker never reads again.
        # By id(): a worker is compared by identity here.
        self._stalled: dict[int, tuple[Worker, Namespace]] = {}

    # ---- what is in the table --------------------------------------------

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._table.values()))

    def get(self, req_id: int) -> Request | None:
        return self._table.get(req_id)

    def busy_workers(self) -> set[Worker]:
        """The workers that hold a request."""
        return {r.worker for r in self._table.values()
                if r.worker is not None}

    def pending(self, ns: Namespace) -> list[Request]:
        return [r for r in self._table.values()
                if r.ns is ns and r.worker is None]

    def held_by(self, worker: Worker) -> list[Request]:
        return [r for r in self._table.values() if r.worker is worker]

    def held(self, worker: Worker, req_id: int) -> Request | None:
        """Request ``req_id`` if ``worker`` holds it, else None."""
        req = self._table.get(req_id)
        return req if req is not None and req.worker is worker else None

    def is_late(self, worker: Worker, req_id: int) -> bool:
        """Whether ``worker`` held ``req_id`` when its deadline passed."""
        return self._late.get(req_id) is worker

    def answered_late(self, req_id: int) -> None:
        """The late answer to ``req_id`` came: nothing more is expected."""
        self._late.pop(req_id, None)

    def owns_fd(self, sockfd: int) -> bool:
        return any(r.sockfd == sockfd for r in self._table.values())

    def next_wakeup(self) -> float | None:
        times = [r.wakeup() for r in self._table.values()]
        if self._stalled:
            times.append(time.monotonic() + STALL_RETRY)
        return min(times, default=None)

    # ---- state changes --------------------------------------------------

    def submit(self, ns: Namespace, accepted: netlink_codec.AcceptedRequest,
               timeout: float | None = None) -> Request:
        """Enter an ACCEPTed request, due in ``timeout`` s (default: see
        request_timeout).  It is handed to the namespace's worker if that
        is ready, failed if the namespace is held, else left pending."""
        if timeout is None:
            timeout = request_timeout(ns, accepted)
        req = Request(self._next_id, ns, accepted.sockfd, accepted,
                      time.monotonic() + timeout)
        self._next_id += 1
        self._table[req.req_id] = req
        log.debug("Accepted request %d in netns %s: fd %d, type %d, auth "
                  "%d, peer %r, timeout %.1f s", req.req_id, ns.label,
                  accepted.sockfd, accepted.msg_type, accepted.auth_mode,
                  accepted.peername, timeout)
        if ns.held:
            log.error("Netns %s has no usable configuration", ns.label)
            self.complete(req, errno.EIO, ())
        elif ns.worker is not None and ns.worker.ready:
            self.dispatch(req, ns.worker)
        return req

    def refuse(self, ns: Namespace, sockfd: int, status: int) -> None:
        """DONE for an fd an unusable ACCEPT reply named, unless a live
        request owns it (then it is never answered or closed here)."""
        if not self.owns_fd(sockfd):
            self._done(ns.nlsock, sockfd, status, (), 0)

    def dispatch(self, req: Request, worker: Worker) -> None:
        """Hand pending ``req`` to ``worker`` (with the keys it names);
        if that fails, complete it.  If the worker's channel is full, the
        request stays pending (see ``_stalled``)."""
        assert req.worker is None and req.req_id in self._table
        if id(worker) in self._stalled:
            return  # after the requests that wait already, in order
        if not self._hand(req, worker):
            log.warning("Worker %d for netns %s is not reading its requests;"
                        " request %d waits until it does (or its deadline)",
                        worker.pid, req.ns.label, req.req_id)
            self._stalled[id(worker)] = (worker, req.ns)

    def _hand(self, req: Request, worker: Worker) -> bool:
        """Send pending ``req`` to ``worker``, or complete it if that
        fails; False (still pending) if the worker's channel is full."""
        material = self._key_material(req)
        if material is None:
            return True
        cert, key, psks = material
        remaining = max(1, int((req.deadline - time.monotonic()) * 1000))
        accepted = req.request
        try:
            msg = protocol.HandshakeRequest(
                msg_type=accepted.msg_type, auth_mode=accepted.auth_mode,
                timeout_ms=remaining, peername=accepted.peername,
                keep_secrets=self.keep_secrets,
                key_update=accepted.key_update,
                session_id=accepted.session_id,
                x509_cert=cert, x509_key=key, psks=psks,
            )
            worker.channel.send(msg, req.req_id, (req.sockfd,), wait=False)
        except BlockingIOError:
            return False
        except ValueError as e:  # material too large for one message
            log.error("Cannot hand request %d to worker %d: %s", req.req_id,
                      worker.pid, e)
            self.complete(req, errno.EINVAL, (), str(e))
            return True
        except (PeerGone, OSError) as e:
            log.error("Cannot hand request %d to worker %d: %s", req.req_id,
                      worker.pid, e)
            self.complete(req, errno.EIO, ())
            return True
        req.worker = worker
        worker.last_busy = time.monotonic()
        req.handed.update(p.serial for p in psks)
        return True

    def _key_material(self, req: Request) -> KeyMaterial | None:
        """Read the kernel keys ``req`` names, for the worker (which can
        read none); None after completing the request if that fails."""
        accepted = req.request
        # Serials are read only from the keyrings its namespace may use.
        scope = keymaterial.Scope(accepted.keyring or 0, req.ns.initial,
                                  req.ns.cfg.keyrings)
        try:
            cert, key = keymaterial.x509_from_keys(accepted.certs, scope)
        except OSError as e:
            log.error("Failed to read certificate keys for request %d in "
                      "netns %s: %s", req.req_id, req.ns.label, e)
            self.complete(req, errno.ENOKEY, (),
                          "certificate keys unreadable")
            return None
        psks: list[protocol.PskMaterial] = []
        if (accepted.auth_mode == uapi.AuthMode.PSK
                and accepted.msg_type == uapi.MsgType.CLIENTHELLO):
            psks, skipped = keymaterial.client_psks(accepted.peerids,
                                                    scope)
            for why in skipped:
                log.error("Cannot use PSK %s [netns %s]", why, req.ns.label)
        return cert, key, tuple(psks)

    def retry_stalled(self) -> None:
        """Hand the requests that wait for a full channel to its worker
        again, in order, until it is full again; a worker no longer its
        namespace's leaves them to the next one (WorkerPool.ready).  While
        the channel shows no room, nothing is tried: no kernel keys are
        read again and no line is logged (a worker that never reads would
        otherwise make the supervisor do both every STALL_RETRY)."""
        for key, (worker, ns) in list(self._stalled.items()):
            if ns.worker is not worker or not worker.ready:
                del self._stalled[key]
                continue
            if not worker.channel.writable():
                continue
            del self._stalled[key]
            for req in self.pending(ns):
                if not self._hand(req, worker):
                    self._stalled[key] = (worker, ns)
                    break

    def expire(self, now: float) -> list[Worker]:
        """Complete overdue requests with ETIMEDOUT; return the workers
        that held any (they may now be idle)."""
        released = []
        for req in list(self._table.values()):
            if now < req.wakeup():
                continue
            log.error("Handshake request %d in netns %s timed out",
                      req.req_id, req.ns.label)
            if req.worker is not None:
                self._late[req.req_id] = req.worker
                released.append(req.worker)
            self.complete(req, errno.ETIMEDOUT, (), "deadline passed")
        return released

    def complete(self, req: Request, status: int,
                 remote_auth: tuple[int, ...], reason: str = "",
                 session_id: int = 0, cert_kind: str = "") -> None:
        """Send the one DONE ``req`` is owed and forget it everywhere;
        count a success by ``cert_kind`` (messages.CERT_KINDS)."""
        if self._table.pop(req.req_id, None) is None:
            raise AssertionError("request %d completed twice" % req.req_id)
        ns = req.ns
        if req.worker is not None:
            req.worker.last_busy = time.monotonic()
            if session_id:
                req.worker.sessions += 1
        if status == 0:
            ns.succeeded += 1
            if cert_kind:
                ns.by_certificate[cert_kind] = (
                    ns.by_certificate.get(cert_kind, 0) + 1)
        else:
            ns.failed += 1
            ns.last_failure = "%s: %s" % (
                errno.errorcode.get(status, str(status)), reason or "?")
        self._done(ns.nlsock, req.sockfd, status, remote_auth, session_id)

    def fail_all(self, status: int, reason: str = "", *,
                 namespace: Namespace | None = None,
                 worker: Worker | None = None,
                 pending_only: bool = False) -> int:
        """Complete every request of ``namespace`` / held by ``worker``
        (every request, if neither is given) with ``status``; with
        ``pending_only``, only those not dispatched yet.  For a
        ``worker``, its late answers are no longer expected either (it
        is gone).  Returns how many were completed."""
        if worker is not None:
            self._late = {k: w for k, w in self._late.items()
                          if w is not worker}
        chosen = [r for r in self._table.values()
                  if (namespace is None or r.ns is namespace)
                  and (worker is None or r.worker is worker)
                  and not (pending_only and r.worker is not None)]
        for req in chosen:
            self.complete(req, status, (), reason)
        return len(chosen)
