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

import errno
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass

from tlshd.shared import protocol, uapi
from tlshd.shared.channel import Channel
from tlshd.shared.errors import PeerGone
from tlshd.worker import ktls, pskkeys
from tlshd.worker.rekey import KtlsSession, RekeyError, Secrets
from tlshd.worker.sessions import SessionTable
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


def run_handshake(engine: Engine, request: protocol.HandshakeRequest,
                  sock: socket.socket,
                  lookups: pskkeys.SupervisorLookups | None = None,
                  req_id: int = 0) -> Outcome | int:
    """Run the handshake the kernel asked for; an int is a local failure.

    ``lookups``: how a server PSK handshake asks the supervisor for keys.
    """
    deadline = time.monotonic() + request.timeout_ms / 1000.0
    # Python ignores SO_PROTOCOL on socket objects it wraps; ask the kernel.
    proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    if proto != socket.IPPROTO_TCP:
        log.error("Unsupported socket protocol %d", proto)
        return errno.EOPNOTSUPP
    # The certificate and key the consumer passed as kernel keys, which
    # the supervisor read for us.
    x509 = ((request.x509_cert, request.x509_key) if request.x509_cert
            else None)
    if request.auth_mode == uapi.AuthMode.PSK:
        lookup = (None if lookups is None
                  else lookups.for_request(req_id, deadline))
        return pskkeys.psk_handshake(engine, request, sock, deadline,
                                     lookup)
    if request.msg_type == uapi.MsgType.CLIENTHELLO:
        if request.auth_mode in (uapi.AuthMode.UNAUTH, uapi.AuthMode.X509):
            return engine.client_handshake(
                sock, peername=request.peername, x509=x509,
                use_certificate=request.auth_mode == uapi.AuthMode.X509,
                deadline=deadline)
    elif request.msg_type == uapi.MsgType.SERVERHELLO:
        if request.auth_mode == uapi.AuthMode.X509:
            return engine.server_handshake(sock, x509=x509,
                                           deadline=deadline)
    log.error("Unsupported handshake: message type %d, auth mode %d",
              request.msg_type, request.auth_mode)
    return errno.EIO


def run_key_update(sessions: SessionTable | None,
                   request: protocol.HandshakeRequest,
                   sock: socket.socket) -> tuple[int, str]:
    """Re-key a kTLS socket for the kernel: (status, failure reason).

    SEND: send a KeyUpdate and move TX on.  RECEIVED: the consumer read
    the peer's KeyUpdate; move RX on.  RECEIVED_REQUEST_UPDATE: both, RX
    first (RFC 8446 4.6.3: answer before sending more data).
    """
    if sessions is None:
        return errno.EOPNOTSUPP, "re-key upcall not enabled"
    kind = request.key_update
    try:
        with sessions.use(request.session_id) as slot:
            session = KtlsSession(sock, slot.secrets)
            try:
                if kind in (uapi.KeyUpdateType.RECEIVED,
                            uapi.KeyUpdateType.RECEIVED_REQUEST_UPDATE):
                    session.update_rx()
                if kind in (uapi.KeyUpdateType.SEND,
                            uapi.KeyUpdateType.RECEIVED_REQUEST_UPDATE):
                    session.send_key_update(False)
            finally:
                slot.secrets = session.secrets()
            log.info("Session %08x re-keyed (%s): TX generation %d, RX "
                     "generation %d", request.session_id,
                     uapi.KeyUpdateType(kind).name,
                     session.tx_generation, session.rx_generation)
    except KeyError:
        return errno.ENOKEY, "session %08x unknown or expired" % (
            request.session_id)
    except (OSError, RekeyError) as e:
        return errno.EIO, "re-key failed: %s" % e
    return 0, ""


def handle_key_update(sessions: SessionTable | None,
                      job: Job) -> protocol.HandshakeAnswer:
    """Run one key update job to its answer; always closes the fd."""
    sock = socket.socket(fileno=job.fd)
    try:
        status, reason = run_key_update(sessions, job.request, sock)
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


def handle(engine: Engine, job: Job,
           sessions: SessionTable | None = None,
           lookups: pskkeys.SupervisorLookups | None = None
           ) -> protocol.HandshakeAnswer:
    """Run one job to its answer; always closes the job's fd.

    With ``sessions`` and a request that asks for it, a successful
    handshake's secrets are kept for later re-keys and the answer names
    their session id.
    """
    if job.request.msg_type in uapi.KEY_UPDATE_MSGS:
        return handle_key_update(sessions, job)
    sock = socket.socket(fileno=job.fd)
    peer = _peer_address(sock)
    name = job.request.peername or peer
    remote_auth: tuple[int, ...] = ()
    reason = ""
    session_id = 0
    reused = False
    try:
        result = run_handshake(engine, job.request, sock, lookups,
                               job.req_id)
        if isinstance(result, int):
            status = result
            reason = "local failure: %s" % os.strerror(status)
        else:
            reason = result.reason
            status, remote_auth = result.status, result.remote_auth
            if status == 0 and (result.tx is None or result.rx is None):
                log.error("Handshake succeeded without traffic secrets")
                status, remote_auth = errno.EIO, ()
            if status == 0 and result.tx and result.rx:
                try:
                    ktls.install(sock, result.tx, result.rx)
                except OSError as e:
                    log.error("Failed to install kTLS keys: %s", e)
                    status, remote_auth = errno.EIO, ()
                    reason = "kTLS install failed: %s" % e
            if (status == 0 and sessions is not None
                    and job.request.keep_secrets and result.tx and result.rx):
                session_id = sessions.add(Secrets(
                    result.cipher, result.tx.secret, result.rx.secret))
            if status == 0:
                reused = result.resumed
                # Debug, as ktls-utils logs them (loglevel >= 1): at
                # loglevel 0 each would be one more channel message and
                # supervisor log write per handshake (docs/benchmarks.md).
                log.debug("Session description: %s", result.description)
                if result.peer_subject:
                    log.debug("Peer certificate: %s", result.peer_subject)
            elif result.reason:
                log.error("Handshake with '%s' (%s): %s", name, peer,
                          result.reason)
    except Exception:
        log.exception("Handshake with '%s' (%s) crashed", name, peer)
        status, remote_auth = errno.EIO, ()
        reason = "internal error"
    finally:
        sock.close()
    log.info("Handshake with '%s' (%s) %s", name, peer,
             ("succeeded (session reuse)" if reused else "succeeded")
             if status == 0 else
             "failed: %s" % errno.errorcode.get(status, str(status)))
    return protocol.HandshakeAnswer(
        status=status, remote_auth=remote_auth,
        reason="" if status == 0 else reason[:protocol.MAX_REASON],
        session_id=session_id if status == 0 else 0)


class Server:
    """The worker's request loop and its handshake thread pool."""

    def __init__(self, channel: Channel, lock: threading.Lock,
                 engine: Engine, threads: int) -> None:
        self.channel = channel
        self.engine = engine
        self.lock = lock
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        # Secrets of sessions the kernel may ask to re-key; only this
        # process ever holds them.
        self.sessions = SessionTable()
        self.lookups = pskkeys.SupervisorLookups(self.send)
        self.pool = [
            threading.Thread(target=self._work, name="handshake-%d" % i,
                             daemon=True)
            for i in range(threads)
        ]
        for t in self.pool:
            t.start()

    def send(self, msg: protocol.Message, req_id: int = 0) -> None:
        with self.lock:
            self.channel.send(msg, req_id)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            answer = handle(self.engine, job, self.sessions, self.lookups)
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
            self.jobs.put(Job(req_id, msg, fds[0]))
