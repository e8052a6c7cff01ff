"""Which handshake a kernel request gets: one table keyed by (message
type, auth mode), as ktls-utils' ``tlshd_service_socket`` switches on the
handshake type and then on the auth mode.

Each row runs one kind of handshake with the engine; a pair not in the
table (a server without authentication, say) fails with EIO, as in
ktls-utils.  Key updates (re-keys) are no handshake: tlshd.worker.serve
sends them elsewhere before they get here.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from tlshd.shared import protocol, uapi
from tlshd.worker.pskhandshake import FindPsk, printable
from tlshd.worker.psklookups import SupervisorLookups
from tlshd.worker.tlsengine import Engine
from tlshd.worker.tlsoutcome import Outcome, failed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One handshake to run: the request, its socket and its deadline.
    ``lookups`` and ``req_id``: how a server PSK handshake asks the
    supervisor for keys (None: it finds none)."""

    request: protocol.HandshakeRequest
    sock: socket.socket
    deadline: float
    lookups: SupervisorLookups | None
    req_id: int

    @property
    def x509(self) -> tuple[bytes, bytes] | None:
        """The certificate and key the consumer passed as kernel keys,
        which the supervisor read for us."""
        r = self.request
        return (r.x509_cert, r.x509_key) if r.x509_cert else None


def _client_x509(engine: Engine, task: Task, use_certificate: bool) -> Outcome:
    return engine.client_handshake(
        task.sock, peername=task.request.peername, x509=task.x509,
        use_certificate=use_certificate, deadline=task.deadline)


def client_unauth(engine: Engine, task: Task) -> Outcome:
    return _client_x509(engine, task, use_certificate=False)


def client_x509(engine: Engine, task: Task) -> Outcome:
    return _client_x509(engine, task, use_certificate=True)


def server_x509(engine: Engine, task: Task) -> Outcome:
    return engine.server_handshake(task.sock, x509=task.x509,
                                   deadline=task.deadline)


def client_psk(engine: Engine, task: Task) -> Outcome:
    """Offer the request's PSKs (read by the supervisor) in turn."""
    psks = task.request.psks
    if not psks:
        return failed(errno.ENOKEY, "no usable PSK (none of the "
                      "request's keys could be read)")
    for psk in psks:
        log.info("Using PSK identity %s", printable(psk.identity))
    return engine.psk.client(task.sock, psks, task.deadline)


def server_psk(engine: Engine, task: Task) -> Outcome:
    """Accept the first offered identity the supervisor knows."""
    lookups = task.lookups
    find: FindPsk = (_nothing if lookups is None
                     else lookups.for_request(task.req_id, task.deadline))
    return engine.psk.server(task.sock, find, task.deadline)


def _nothing(_identity: bytes) -> protocol.PskMaterial | None:
    return None


Handshake = Callable[[Engine, Task], Outcome]
_M, _A = uapi.MsgType, uapi.AuthMode
HANDSHAKES: dict[tuple[int, int], Handshake] = {
    (_M.CLIENTHELLO, _A.UNAUTH): client_unauth,
    (_M.CLIENTHELLO, _A.X509): client_x509,
    (_M.CLIENTHELLO, _A.PSK): client_psk,
    (_M.SERVERHELLO, _A.X509): server_x509,
    (_M.SERVERHELLO, _A.PSK): server_psk,
}


def run_handshake(engine: Engine, request: protocol.HandshakeRequest,
                  sock: socket.socket,
                  lookups: SupervisorLookups | None = None,
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
    handshake = HANDSHAKES.get((request.msg_type, request.auth_mode))
    if handshake is None:
        log.error("Unsupported handshake: message type %d, auth mode %d",
                  request.msg_type, request.auth_mode)
        return errno.EIO
    return handshake(engine, Task(request, sock, deadline, lookups, req_id))
