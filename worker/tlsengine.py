"""TLS 1.3 handshakes on kernel sockets, ending in kTLS traffic keys.

One :class:`Engine` is built per configuration load, before the sandbox:
it reads every credential file then and prebuilds the pyOpenSSL contexts
(client anonymous, client with the configured certificate, server with
and without the configured certificate). A handshake only creates a
``Connection`` on the caller's socket, runs it to completion against a
deadline, and reports an :class:`Outcome`: a positive errno or 0, and on
success both directions' traffic secrets and record sequence numbers,
which :func:`tlshd.worker.ktls.install` turns into kTLS state.

Handshakes may run concurrently in several threads; per-handshake state
lives in a :class:`Session` that the OpenSSL callbacks find through the
connection (keylog, verify) or its SSL pointer (message callback).

The socket stays owned by the caller. The engine never sends close_notify
(the session continues in the kernel) and returns the socket in blocking
mode with its TCP_NODELAY setting restored.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import math
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from OpenSSL import SSL, crypto

from tlshd.worker import ktls, sslbind, tlscreds, verify
from tlshd.worker.ktls import TrafficKeys
from tlshd.worker.psk import Psk, PskHandshakes, PskLookup
from tlshd.worker.resumption import (
    REUSE_ALPN,
    ClientCache,
    ClientEntry,
    PeerKey,
    ReusePsk,
    ReuseSettings,
    ServerEntry,
    ServerTable,
    derive,
    peer_key,
)
from tlshd.worker.sslconf import openssl_conf_path
from tlshd.worker.tlsoutcome import (
    DeadlineExpired,
    Outcome,
    Session,
    classify,
    failed,
    success,
)
from tlshd.worker.verify import CredentialError, EngineError

__all__ = [
    "DEFAULT_CIPHERSUITES",
    "CredentialError",
    "Engine",
    "EngineError",
    "Outcome",
    "Psk",
    "ReuseSettings",
    "RoleSettings",
    "TrafficKeys",
    "openssl_conf_path",
]

log = logging.getLogger(__name__)

# The kTLS-capable suites; AES-256-GCM first, as in GnuTLS's NORMAL.
DEFAULT_CIPHERSUITES = (
    "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
    ":TLS_AES_128_GCM_SHA256"
)


@dataclass(frozen=True)
class RoleSettings:
    """Credentials and policy for one role (client or server).

    ``truststore`` None means the system CA bundle. ``ciphersuites`` is an
    OpenSSL TLS 1.3 suite list limited to kTLS-capable suites; None means
    :data:`DEFAULT_CIPHERSUITES`.
    """

    truststore: str | None = None
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    ciphersuites: str | None = None


def _ciphersuites(value: str | None) -> bytes:
    if value is None:
        return DEFAULT_CIPHERSUITES.encode()
    names = [n.strip() for n in value.split(":") if n.strip()]
    if not names:
        raise CredentialError("ciphersuites setting is empty")
    bad = [n for n in names if n not in ktls.SUITES]
    if bad:
        raise CredentialError(
            f"ciphersuites {', '.join(bad)} cannot be used with kTLS"
            f" (choose from {', '.join(ktls.SUITES)})"
        )
    return ":".join(names).encode()


def _identity(settings: RoleSettings, role: str) -> tlscreds.Identity | None:
    cert, key = settings.certificate, settings.private_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise CredentialError(
            f"{role} certificate and private key must be set together"
        )
    return tlscreds.load_pem_identity(cert, key)


class Engine:
    """Prebuilt TLS contexts plus the handshake drivers."""

    def __init__(self, client: RoleSettings, server: RoleSettings,
                 reuse: ReuseSettings | None = None) -> None:
        """Read every credential file and build the contexts.

        Raises CredentialError naming the file for unusable credentials,
        and EngineError if OpenSSL would send session tickets (OPENSSL_CONF
        was not applied before OpenSSL was first imported).

        ``reuse`` (``[authenticate] session_reuse``) turns on session
        reuse between tlshd workers (tlshd.worker.resumption).
        """
        self._sessions: dict[int, Session] = {}
        self._msg = sslbind.MsgCallback(self._on_message)
        self._reuse = reuse
        self.reuse_client: ClientCache | None = None
        self.reuse_server: ServerTable | None = None
        # Per connection (SSL pointer): the PSK a client offers, the entry
        # a server accepted.
        self._offers: dict[int, ReusePsk] = {}
        self._found: dict[int, ServerEntry] = {}
        self._reuse_cb: sslbind.PskCallbacks | None = None
        if reuse is not None:
            self.reuse_client = ClientCache(reuse.cache_size, reuse.lifetime)
            self.reuse_server = ServerTable(reuse.cache_size, reuse.lifetime)
            self._reuse_cb = sslbind.PskCallbacks(self._reuse_offer,
                                                  self._reuse_lookup)
            log.info("TLS session reuse is on: PSKs live %d s, %d kept"
                     " per role", reuse.lifetime, reuse.cache_size)
        self._client_anon = self._context(client, server=False)
        client_id = _identity(client, "client")
        self._client_x509 = (
            self._context(client, server=False, identity=client_id)
            if client_id is not None
            else None
        )
        self._server_bare = self._context(server, server=True)
        server_id = _identity(server, "server")
        self._server_x509 = (
            self._context(server, server=True, identity=server_id)
            if server_id is not None
            else None
        )
        self._psk = PskHandshakes(self._base_context, self._handshake)
        self._check_no_tickets()

    # -- contexts ---------------------------------------------------------

    def _base_context(self, *, server: bool, suites: bytes) -> SSL.Context:
        method = SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD
        ctx = SSL.Context(method)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_tls13_ciphersuites(suites)
        ctx.set_keylog_callback(self._on_keylog)
        self._msg.install(ctx)
        return ctx

    def _context(
        self,
        settings: RoleSettings,
        *,
        server: bool,
        identity: tlscreds.Identity | None = None,
    ) -> SSL.Context:
        suites = _ciphersuites(settings.ciphersuites)
        ctx = self._base_context(server=server, suites=suites)
        # A server reuses sessions only with the configured certificate:
        # the per-request ones share _server_bare, and a PSK must never
        # stand in for a different server certificate.
        self._reuse_context(ctx, server=server, keep=identity is not None)
        if verify.load_trust(ctx, settings.truststore) == 0:
            log.warning(
                "no trust anchors for the %s role: peer certificates"
                " cannot be verified",
                "server" if server else "client",
            )
        if settings.crl is not None:
            verify.load_crl(ctx, settings.crl)
        # The server asks for a client certificate but does not require
        # one (ktls-utils: GNUTLS_CERT_REQUEST); the consumer decides.
        mode = SSL.VERIFY_PEER
        if server:
            mode |= SSL.VERIFY_CLIENT_ONCE
        ctx.set_verify(mode, self._on_verify)
        if identity is not None:
            try:
                identity.use_in_context(ctx)
            except SSL.Error as exc:
                raise CredentialError(
                    f"{settings.certificate}: OpenSSL rejected the"
                    f" certificate or key {settings.private_key}: {exc}"
                ) from exc
        return ctx

    def _reuse_context(self, ctx: SSL.Context, *, server: bool,
                       keep: bool) -> None:
        cb = self._reuse_cb
        if cb is None:
            return
        if not server:
            ctx.set_alpn_protos([REUSE_ALPN])
            cb.install_client(ctx)
        elif keep:
            ctx.set_alpn_select_callback(_select_reuse_alpn)
            cb.install_server(ctx)
            # A verifying server refuses a PSK session without a session
            # id context ("session id context uninitialized").
            ctx.set_session_id(b"tlshd-reuse")

    def _reuse_offer(self, ssl: int) -> tuple[bytes, bytes, bytes] | None:
        """Client (psk_use_session): the cached PSK for this peer."""
        psk = self._offers.get(ssl)
        if psk is None:
            return None
        return psk.identity, psk.secret, psk.suite

    def _reuse_lookup(self, ssl: int, identity: bytes
                      ) -> tuple[bytes, bytes] | None:
        """Server (psk_find_session): a PSK this worker agreed to keep;
        None lets the handshake go on with certificates."""
        table = self.reuse_server
        entry = table.get(identity) if table is not None else None
        if entry is None:
            return None
        self._found[ssl] = entry
        return entry.psk.secret, entry.psk.suite

    def _check_no_tickets(self) -> None:
        """Run one in-memory handshake and count the tickets sent."""
        suites = DEFAULT_CIPHERSUITES.encode()
        sctx = self._base_context(server=True, suites=suites)
        tlscreds.ephemeral_identity().use_in_context(sctx)
        cctx = self._base_context(server=False, suites=suites)
        cctx.set_verify(SSL.VERIFY_NONE)
        srv = SSL.Connection(sctx, None)
        srv.set_accept_state()
        cli = SSL.Connection(cctx, None)
        cli.set_connect_state()
        session = Session()
        srv.set_app_data(session)
        key = sslbind.ssl_pointer(srv)
        self._sessions[key] = session
        try:
            _pump_memory_handshake(cli, srv)
        finally:
            del self._sessions[key]
        if session.tickets_sent or session.tx_records:
            raise EngineError(
                f"OpenSSL sent {session.tickets_sent} TLS 1.3 session"
                f" tickets; OPENSSL_CONF={openssl_conf_path()} must be set"
                " before OpenSSL is first imported"
            )

    # -- OpenSSL callbacks (must not raise) -------------------------------

    def _on_message(
        self, ssl: int, write_p: bool, content_type: int, data: bytes
    ) -> None:
        session = self._sessions.get(ssl)
        if session is not None:
            session.observe(write_p, content_type, data)

    def _on_keylog(self, conn: SSL.Connection, line: bytes) -> None:
        session = conn.get_app_data()
        if isinstance(session, Session):
            session.record_keylog(line, conn.client_random())

    def _on_verify(
        self,
        conn: SSL.Connection,
        cert: crypto.X509,
        errnum: int,
        depth: int,
        ok: int,
    ) -> bool:
        if ok:
            return True
        if errnum == sslbind.X509_V_ERR_UNABLE_TO_GET_CRL:
            # A CRL file is configured but has no CRL for this issuer.
            # GnuTLS (ktls-utils) checks only the CRLs it has.
            return True
        s = conn.get_app_data()
        if isinstance(s, Session) and s.verify_failure is None:
            s.verify_failure = verify.describe_failure(cert, errnum, depth)
        return False

    # -- handshakes -------------------------------------------------------

    def client_handshake(
        self,
        sock: socket.socket,
        *,
        peername: str | None,
        x509: tuple[bytes, bytes] | None = None,
        use_certificate: bool = False,
        deadline: float,
    ) -> Outcome:
        """Run a TLS 1.3 ClientHello handshake on ``sock``.

        The server certificate is always verified against the client
        trust store and ``peername`` (IP literal or DNS name). With
        ``use_certificate`` the client presents ``x509`` (DER certificate,
        DER private key) or else the configured certificate.
        """
        if not peername:
            return failed(
                errno.EACCES, "no peer name to verify the server against"
            )
        try:
            name = verify.parse_peername(peername)
        except ValueError as exc:
            return failed(errno.EACCES, str(exc))
        ctx = self._client_anon
        per_conn: tlscreds.Identity | None = None
        credential = "anonymous"
        if use_certificate and x509 is not None:
            try:
                per_conn = tlscreds.load_der_identity(*x509)
            except ValueError as exc:
                return failed(errno.EIO, f"client certificate: {exc}")
            credential = "kernel:" + hashlib.sha256(x509[0]).hexdigest()
        elif use_certificate:
            if self._client_x509 is None:
                return failed(errno.EIO, "no client certificate configured")
            ctx = self._client_x509
            credential = "configured"
        cache = self.reuse_client
        key: PeerKey | None = None
        cached: ClientEntry | None = None
        if cache is not None:
            try:
                key = peer_key(sock.getpeername(), peername, credential)
            except OSError:
                key = None
            cached = cache.get(key) if key is not None else None

        def setup(conn: SSL.Connection) -> None:
            conn.set_connect_state()
            verify.set_expected_name(conn, name)
            if per_conn is not None:
                per_conn.use_in_connection(conn)
            if cached is not None:
                self._offers[sslbind.ssl_pointer(conn)] = cached.psk

        def after(conn: SSL.Connection, out: Outcome) -> Outcome:
            if cache is None or key is None:
                return out
            if cached is not None and sslbind.session_reused(conn):
                out = _reused(out, cached.peer_subject, out.remote_auth)
            if conn.get_alpn_proto_negotiated() == REUSE_ALPN:
                psk = derive(conn, out.cipher)
                if psk is not None:
                    cache.put(key, ClientEntry(psk, out.peer_subject))
            elif cached is not None:
                # The peer no longer keeps PSKs for us.
                cache.forget(key)
            return out

        return self._handshake(sock, ctx, setup, deadline, server=False,
                               after=after)

    def server_handshake(
        self,
        sock: socket.socket,
        *,
        x509: tuple[bytes, bytes] | None = None,
        deadline: float,
    ) -> Outcome:
        """Run a TLS 1.3 ServerHello handshake on ``sock``.

        A client certificate is requested, not required; one that is
        presented must verify against the server trust store (and CRL),
        without any name check.
        """
        per_conn: tlscreds.Identity | None = None
        if x509 is not None:
            try:
                per_conn = tlscreds.load_der_identity(*x509)
            except ValueError as exc:
                return failed(errno.EIO, f"server certificate: {exc}")
            ctx = self._server_bare
        elif self._server_x509 is not None:
            ctx = self._server_x509
        else:
            return failed(errno.EIO, "no server certificate configured")

        def setup(conn: SSL.Connection) -> None:
            conn.set_accept_state()
            if per_conn is not None:
                per_conn.use_in_connection(conn)

        def after(conn: SSL.Connection, out: Outcome) -> Outcome:
            table = self.reuse_server
            if table is None:
                return out
            entry = self._found.get(sslbind.ssl_pointer(conn))
            if entry is not None and sslbind.session_reused(conn):
                out = _reused(out, entry.peer_subject, entry.remote_auth)
            if conn.get_alpn_proto_negotiated() == REUSE_ALPN:
                psk = derive(conn, out.cipher)
                if psk is not None:
                    table.put(psk.identity, ServerEntry(
                        psk, out.remote_auth, out.peer_subject))
            return out

        return self._handshake(sock, ctx, setup, deadline, server=True,
                               after=after)

    def client_psk_handshake(
        self, sock: socket.socket, *, psks: Sequence[Psk], deadline: float
    ) -> Outcome:
        """ClientHello with external PSKs, tried in turn (see psk.py)."""
        return self._psk.client(sock, psks, deadline)

    def server_psk_handshake(
        self, sock: socket.socket, *, lookup: PskLookup, deadline: float
    ) -> Outcome:
        """ServerHello for the offered PSK ``lookup`` knows (psk.py)."""
        return self._psk.server(sock, lookup, deadline)

    def _handshake(
        self,
        sock: socket.socket,
        ctx: SSL.Context,
        setup: Callable[[SSL.Connection], None],
        deadline: float,
        *,
        server: bool,
        after: Callable[[SSL.Connection, Outcome], Outcome] | None = None,
    ) -> Outcome:
        """Run one handshake; ``after`` sees a successful outcome while
        the connection still exists (session reuse)."""
        if time.monotonic() >= deadline:
            return failed(errno.ETIMEDOUT, "deadline passed before start")
        session = Session()
        saved_nodelay = _disable_nagle(sock)
        key: int | None = None
        try:
            sock.setblocking(False)
            conn = SSL.Connection(ctx, sock)
            conn.set_app_data(session)
            key = sslbind.ssl_pointer(conn)
            self._sessions[key] = session
            try:
                setup(conn)
            except (SSL.Error, ValueError) as exc:
                # Our own parameters were refused: a local error.
                return failed(errno.EIO, f"connection set-up failed: {exc}")
            _drive(conn, sock, deadline)
            out = success(conn, session, server=server)
            if after is not None and out.status == 0:
                out = after(conn, out)
            return out
        except (DeadlineExpired, SSL.Error, OSError) as exc:
            return classify(session, exc)
        except Exception as exc:
            log.exception("unexpected error during a TLS handshake")
            return failed(errno.EIO, f"internal error: {exc!r}")
        finally:
            if key is not None:
                self._sessions.pop(key, None)
                self._offers.pop(key, None)
                self._found.pop(key, None)
                if self._reuse_cb is not None:
                    self._reuse_cb.forget(key)
            _restore_socket(sock, saved_nodelay)


def _select_reuse_alpn(
    conn: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    """Server: agree to keep a reuse PSK with a client that asks."""
    del conn
    if REUSE_ALPN in offered:
        return REUSE_ALPN
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _reused(out: Outcome, peer_subject: str | None,
            remote_auth: tuple[int, ...]) -> Outcome:
    """A handshake authenticated by a reuse PSK: no certificates were
    exchanged, so the subject and REMOTE_AUTH are the full handshake's."""
    suite = out.description.rsplit("-(", 1)[-1]
    return dataclasses.replace(
        out, resumed=True, peer_subject=peer_subject,
        remote_auth=remote_auth,
        description=f"(TLS1.3)-({out.group})-(session reuse PSK)-({suite}")


def _pump_memory_handshake(cli: SSL.Connection, srv: SSL.Connection) -> None:
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


def _drive(conn: SSL.Connection, sock: socket.socket, deadline: float) -> None:
    """Step the non-blocking handshake until done or past ``deadline``."""
    poller = select.poll()
    fd = sock.fileno()
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            events = select.POLLIN
        except SSL.WantWriteError:
            events = select.POLLOUT
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExpired
        poller.register(fd, events)
        # Readiness or an error condition both mean "try again": OpenSSL
        # then reports EOF or a socket error itself.
        poller.poll(math.ceil(remaining * 1000))
        poller.unregister(fd)


def _disable_nagle(sock: socket.socket) -> int | None:
    """Turn on TCP_NODELAY; return the old value (None if not TCP)."""
    try:
        old = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return None
    return old


def _restore_socket(sock: socket.socket, nodelay: int | None) -> None:
    try:
        sock.setblocking(True)
        if nodelay is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, nodelay)
    except OSError as exc:
        # The peer may have reset the connection; the outcome says so.
        log.debug("cannot restore socket options: %s", exc)
