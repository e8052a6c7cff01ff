"""Serve handshake requests: channel in, thread pool, answers out.

The main thread only reads the channel and queues work; a fixed pool of
threads, started before the sandbox is applied (so no thread is ever
created afterwards), runs the handshakes.  Concurrency is required, not an
optimisation: an NFS mount over loopback makes the client end wait for the
server end, and both are served by the same namespace's worker.

Ownership: a queued request owns its fd; the thread that runs it closes
the fd (its copy; the supervisor keeps its own until DONE) before it
answers.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import socket
import threading
from dataclasses import dataclass

from tlshd.shared import protocol, uapi
from tlshd.shared.channel import Channel
from tlshd.shared.errors import PeerGone
from tlshd.worker import dispatch, ktls
from tlshd.worker.psklookups import SupervisorLookups
from tlshd.worker.rekey import KtlsSocket, RekeyError, Secrets
from tlshd.worker.rekeytable import RekeyTable
from tlshd.worker.tlsengine import Engine, Outcome

log = logging.getLogger(__name__)



@dataclass
class Job:
    req_id: int
    request: protocol.HandshakeRequest
    fd: int


class ChannelLogHandler(logging.Handler):
    """Forward log records to the supervisor, which owns syslog."""

    def __init__(self, channel: Channel, lock: threading.Lock) -> None:
        super().__init__()
        self.channel = channel
        # Not "lock": logging.Handler already has one of its own.
        self.send_lock = lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            level = min(max(record.levelno // 10 * 10, 10), 50)
            with self.send_lock:
                self.channel.send(protocol.LogRecord(level=level, text=text))
        except Exception:  # never let logging kill a handshake thread
            self.handleError(record)


def _peer_address(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "unknown"
    return str(addr[0]) if isinstance(addr, tuple) else str(addr)


def run_key_update(rekeys: RekeyTable | None,
                   request: protocol.HandshakeRequest,
                   sock: socket.socket) -> tuple[int, str]:
    """Re-key a kTLS socket for the kernel: (status, failure reason).

    SEND: send a KeyUpdate and move TX on.  RECEIVED: the consumer read
    the peer's KeyUpdate; move RX on.  RECEIVED_REQUEST_UPDATE: both, RX
    first (RFC 8446 4.6.3: answer before sending more data).
    """
    if rekeys is None:
        return errno.EOPNOTSUPP, "re-key upcall not enabled"
    kind = request.key_update
    try:
        with rekeys.use(request.session_id) as slot:
            ktls_sock = KtlsSocket(sock, slot.secrets)
            try:
                if kind in (uapi.KeyUpdateType.RECEIVED,
                            uapi.KeyUpdateType.RECEIVED_REQUEST_UPDATE):
                    ktls_sock.update_rx()
                if kind in (uapi.KeyUpdateType.SEND,
                            uapi.KeyUpdateType.RECEIVED_REQUEST_UPDATE):
                    ktls_sock.send_key_update(False)
            finally:
                slot.secrets = ktls_sock.secrets()
            log.info("Session %08x re-keyed (%s): TX generation %d, RX "
                     "generation %d", request.session_id,
                     uapi.KeyUpdateType(kind).name,
                     ktls_sock.tx_generation, ktls_sock.rx_generation)
    except KeyError:
        return errno.ENOKEY, "session %08x unknown or expired" % (
            request.session_id)
    except (OSError, RekeyError) as e:
        return errno.EIO, "re-key failed: %s" % e
    return 0, ""


def handle_key_update(rekeys: RekeyTable | None,
                      job: Job) -> protocol.HandshakeAnswer:
    """Run one key update job to its answer; always closes the fd."""
    sock = socket.socket(fileno=job.fd)
    try:
        status, reason = run_key_update(rekeys, job.request, sock)
    except Exception:
        log.exception("Key update crashed")
        status, reason = errno.EIO, "internal error"
    finally:
        sock.close()
    if status:
        log.error("Key update for session %08x failed: %s",
                  job.request.session_id, reason)
    return protocol.HandshakeAnswer(
        status=status, remote_auth=(), reason=reason[:protocol.MAX_REASON],
        session_id=job.request.session_id if status == 0 else 0)


def install_keys(sock: socket.socket, result: Outcome, job: Job,
                 rekeys: RekeyTable | None) -> tuple[int, str, int]:
    """Hand a successful handshake's keys to kTLS: (status, failure
    reason, session id of the secrets kept for re-keys or 0)."""
    if result.tx is None or result.rx is None:
        log.error("Handshake succeeded without traffic secrets")
        return errno.EIO, result.reason, 0
    try:
        ktls.install(sock, result.tx, result.rx)
    except OSError as e:
        log.error("Failed to install kTLS keys: %s", e)
        return errno.EIO, "kTLS install failed: %s" % e, 0
    session_id = 0
    if rekeys is not None and job.request.keep_secrets:
        session_id = rekeys.add(Secrets(
            result.cipher, result.tx.secret, result.rx.secret))
    # Debug, as ktls-utils logs them (loglevel >= 1): at loglevel 0 each
    # would be one more channel message and supervisor log write per
    # handshake (docs/benchmarks.md).
    log.debug("Session description: %s", result.description)
    if result.peer_subject:
        log.debug("Peer certificate: %s", result.peer_subject)
    return 0, "", session_id


def handle(engine: Engine, job: Job,
           rekeys: RekeyTable | None = None,
           lookups: SupervisorLookups | None = None
           ) -> protocol.HandshakeAnswer:
    """Run one job to its answer; always closes the job's fd.

    With ``rekeys`` and a request that asks for it, a successful
    handshake's secrets are kept for later re-keys and the answer names
    their session id.
    """
    if job.request.msg_type in uapi.KEY_UPDATE_MSGS:
        return handle_key_update(rekeys, job)
    sock = socket.socket(fileno=job.fd)
    # Read now: a failed handshake's peer may have gone by its log line.
    peer = _peer_address(sock)
    who = "'%s' (%s)" % (job.request.peername or peer, peer)
    remote_auth: tuple[int, ...] = ()
    session_id = 0
    reused = False
    cert_kind = ""
    try:
        result = dispatch.run_handshake(engine, job.request, sock, lookups,
                                        job.req_id)
        if isinstance(result, int):
            status = result
            reason = "local failure: %s" % os.strerror(status)
        elif result.status != 0:
            status, reason = result.status, result.reason
            if result.reason:
                log.error("Handshake with %s: %s", who, result.reason)
        else:
            status, reason, session_id = install_keys(sock, result, job,
                                                      rekeys)
            if status == 0:
                remote_auth, reused = result.remote_auth, result.resumed
                cert_kind = result.cert_kind
    except Exception:
        log.exception("Handshake with %s crashed", who)
        status, reason = errno.EIO, "internal error"
    finally:
        sock.close()
    # The completion line ("Handshake with ... succeeded") is the
    # supervisor's, written from this answer: one channel message and
    # one supervisor log write less per handshake.
    return protocol.HandshakeAnswer(
        status=status, remote_auth=remote_auth if status == 0 else (),
        reason="" if status == 0 else reason[:protocol.MAX_REASON],
        session_id=session_id if status == 0 else 0,
        cert_kind=cert_kind if status == 0 else "",
        resumed=reused and status == 0)


class Server:
    """The worker's request loop and its handshake thread pool.

    A request goes to the thread that became idle last (or waits in
    ``backlog`` while every thread is busy).  A queue.Queue would wake
    the thread that has waited longest, so a worker serving one request
    at a time would run them on every thread in turn, and each thread
    dirties its own stack, Python thread state and OpenSSL per-thread
    state (docs/benchmarks.md, PSS per active worker).
    """

    def __init__(self, channel: Channel, lock: threading.Lock,
                 engine: Engine, threads: int) -> None:
        self.channel = channel
        self.engine = engine
        self.lock = lock
        self.idle: list[queue.SimpleQueue[Job]] = []  # last idle at the end
        self.backlog: collections.deque[Job] = collections.deque()
        self.idle_lock = threading.Lock()
        # Secrets of sessions the kernel may ask to re-key; only this
        # process ever holds them.
        self.rekeys = RekeyTable()
        self.lookups = SupervisorLookups(self.send)
        self.pool = [
            threading.Thread(target=self._work, name="handshake-%d" % i,
                             args=(queue.SimpleQueue(),), daemon=True)
            for i in range(threads)
        ]
        for t in self.pool:
            t.start()

    def send(self, msg: protocol.Message, req_id: int = 0) -> None:
        with self.lock:
            self.channel.send(msg, req_id)

    def submit(self, job: Job) -> None:
        """Hand ``job`` to the thread idle last, or queue it."""
        with self.idle_lock:
            if not self.idle:
                self.backlog.append(job)
                return
            inbox = self.idle.pop()
        inbox.put(job)

    def _next(self, inbox: queue.SimpleQueue[Job]) -> Job:
        """The oldest queued job, else the next one handed to us."""
        with self.idle_lock:
            if self.backlog:
                return self.backlog.popleft()
            self.idle.append(inbox)
        return inbox.get()

    def _work(self, inbox: queue.SimpleQueue[Job]) -> None:
        while True:
            job = self._next(inbox)
            answer = handle(self.engine, job, self.rekeys, self.lookups)
            try:
                self.send(answer, job.req_id)
            except PeerGone:
                return

    def serve(self) -> None:
        """Read requests until the supervisor closes the channel."""
        while True:
            try:
                msg, req_id, fds = self.channel.recv()
            except PeerGone:
                return
            if isinstance(msg, protocol.PskFound):
                self.lookups.answer(req_id, msg)
                continue
            if not isinstance(msg, protocol.HandshakeRequest):
                # The supervisor sends only requests and PSK answers;
                # anything else means we no longer understand each other.
                for fd in fds:
                    socket.socket(fileno=fd).close()
                raise SystemExit("unexpected %s from supervisor"
                                 % type(msg).__name__)
            self.submit(Job(req_id, msg, fds[0]))
