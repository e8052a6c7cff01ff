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
lives in a :class:`HandshakeState` that the OpenSSL callbacks find through
the connection (keylog, verify) or its SSL pointer (message callback).
External-PSK handshakes live in tlshd.worker.pskhandshake and session
reuse in tlshd.worker.sessionreuse; both run through :meth:`Engine.run`.
Which handshake a kernel request gets is decided in
tlshd.worker.dispatch.

The socket stays owned by the caller. The engine never sends close_notify
(the session continues in the kernel) and returns the socket in blocking
mode with its TCP_NODELAY setting restored.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

from OpenSSL import SSL, crypto

from tlshd.shared.config import RoleConfig
from tlshd.worker import handshakeio, ktls, sslbind, tlscreds, verify
from tlshd.worker.ktls import TrafficKeys
from tlshd.worker.pskhandshake import PskHandshakes
from tlshd.worker.recordlimit import PeerLimits
from tlshd.worker.sessionreuse import ReuseSettings, SessionReuse
from tlshd.worker.sslconf import openssl_conf_path
from tlshd.worker.tlsoutcome import (
    KEPT_SECRETS,
    DeadlineExpired,
    HandshakeState,
    Outcome,
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
    "ReuseSettings",
    "TrafficKeys",
    "openssl_conf_path",
]

log = logging.getLogger(__name__)
# OpenSSL sends no tickets: checked by this process's first Engine, or
# inherited from the worker template's (the configuration is global).
_tickets_checked = False

# The keylog labels HandshakeState.record_keylog keeps, each with the
# space that ends it.
_KEPT_PREFIXES = tuple(label + b" " for label in KEPT_SECRETS)

# The kTLS-capable suites; AES-256-GCM first, as in GnuTLS's NORMAL.
DEFAULT_CIPHERSUITES = (
    "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
    ":TLS_AES_128_GCM_SHA256"
)


class Hooks(Protocol):
    """What a handshake adds around the common driver (session reuse)."""

    def setup(self, conn: SSL.Connection) -> None: ...

    def after(self, conn: SSL.Connection, out: Outcome) -> Outcome: ...


def _ciphersuites(value: str | None) -> bytes:
    """``x509.ciphersuites`` as OpenSSL takes it; None means
    :data:`DEFAULT_CIPHERSUITES`."""
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


class Engine:
    """Prebuilt TLS contexts plus the certificate handshake drivers."""

    def __init__(self, client: RoleConfig, server: RoleConfig,
                 reuse: ReuseSettings | None = None) -> None:
        """Read every credential file and build the contexts.

        ``truststore`` None means the system CA bundle. Raises
        CredentialError naming the file for unusable credentials, and
        EngineError if OpenSSL would send session tickets (OPENSSL_CONF
        was not applied before OpenSSL was first imported).

        ``reuse`` (``[authenticate] session_reuse``) turns on session
        reuse between tlshd workers (tlshd.worker.sessionreuse).
        """
        self._states: dict[int, HandshakeState] = {}
        self._limits = PeerLimits()
        self._msg = sslbind.MsgCallback(self._on_message, self._limits.observe)
        self.reuse = SessionReuse(reuse) if reuse is not None else None
        self._client_anon = self._context(client, server=False)
        client_ids = tlscreds.role_identities(client, "client")
        self._client_x509 = (
            self._context(client, server=False, identities=client_ids)
            if client_ids
            else None
        )
        self._server_bare = self._context(server, server=True)
        server_ids = tlscreds.role_identities(server, "server")
        self._server_x509 = (
            self._context(server, server=True, identities=server_ids)
            if server_ids
            else None
        )
        self.psk = PskHandshakes(self._base_context, self.run)
        if not _tickets_checked:
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
        role: RoleConfig,
        *,
        server: bool,
        identities: list[tlscreds.Identity] | None = None,
    ) -> SSL.Context:
        suites = _ciphersuites(role.ciphersuites)
        ctx = self._base_context(server=server, suites=suites)
        if self.reuse is not None:
            # A server reuses sessions only with the configured
            # certificate: the per-request ones share _server_bare.
            self.reuse.install(ctx, server=server, keep=bool(identities))
        if verify.load_trust(ctx, role.truststore) == 0:
            log.warning(
                "no trust anchors for the %s role: peer certificates"
                " cannot be verified",
                "server" if server else "client",
            )
        if role.crl is not None:
            verify.load_crl(ctx, role.crl)
        # The server asks for a client certificate but does not require
        # one (ktls-utils: GNUTLS_CERT_REQUEST); the consumer decides.
        mode = SSL.VERIFY_PEER
        if server:
            mode |= SSL.VERIFY_CLIENT_ONCE
        ctx.set_verify(mode, self._on_verify)
        if identities:
            tlscreds.install_identities(ctx, identities)
        return ctx

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
        state = HandshakeState()
        srv.set_app_data(state)
        key = sslbind.ssl_pointer(srv)
        self._states[key] = state
        try:
            handshakeio.pump_memory_handshake(cli, srv)
        finally:
            del self._states[key]
        if state.tickets_sent or state.tx_records:
            raise EngineError(
                f"OpenSSL sent {state.tickets_sent} TLS 1.3 session"
                f" tickets; OPENSSL_CONF={openssl_conf_path()} must be set"
                " before OpenSSL is first imported"
            )
        global _tickets_checked
        _tickets_checked = True

    # -- OpenSSL callbacks (must not raise) -------------------------------

    def _on_message(
        self, ssl: int, write_p: bool, content_type: int, data: bytes
    ) -> None:
        state = self._states.get(ssl)
        if state is not None:
            state.observe(write_p, content_type, data)

    def _on_keylog(self, conn: SSL.Connection, line: bytes) -> None:
        # Five lines per handshake; only the two traffic secrets are kept,
        # so the others are dropped before client_random() is read.
        if not line.startswith(_KEPT_PREFIXES):
            return
        state = conn.get_app_data()
        if isinstance(state, HandshakeState):
            state.record_keylog(line, conn.client_random())

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
        if isinstance(s, HandshakeState) and s.verify_failure is None:
            s.verify_failure = verify.describe_failure(cert, errnum, depth)
        return False

    # -- certificate handshakes -------------------------------------------

    def _client_credentials(
        self, x509: tuple[bytes, bytes] | None, use_certificate: bool
    ) -> tuple[SSL.Context, tlscreds.Identity | None, str] | Outcome:
        """(context, per-connection identity, credential name for session
        reuse), or the failure."""
        if use_certificate and x509 is not None:
            try:
                per_conn = tlscreds.load_der_identity(*x509)
            except ValueError as exc:
                return failed(errno.EIO, f"client certificate: {exc}")
            credential = "kernel:" + hashlib.sha256(x509[0]).hexdigest()
            return self._client_anon, per_conn, credential
        if use_certificate:
            if self._client_x509 is None:
                return failed(errno.EIO, "no client certificate configured")
            return self._client_x509, None, "configured"
        return self._client_anon, None, "anonymous"

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
        creds = self._client_credentials(x509, use_certificate)
        if isinstance(creds, Outcome):
            return creds
        ctx, per_conn, credential = creds
        hooks: Hooks | None = None
        if self.reuse is not None:
            try:
                hooks = self.reuse.for_client(sock.getpeername(), peername,
                                              credential)
            except OSError:
                hooks = None

        def setup(conn: SSL.Connection) -> None:
            conn.set_connect_state()
            verify.set_expected_name(conn, name)
            if per_conn is not None:
                per_conn.use_in_connection(conn)

        return self.run(sock, ctx, setup, deadline, server=False,
                        hooks=hooks)

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

        hooks = self.reuse.for_server() if self.reuse is not None else None
        return self.run(sock, ctx, setup, deadline, server=True,
                        hooks=hooks)

    # -- the driver every handshake runs through --------------------------

    def run(
        self,
        sock: socket.socket,
        ctx: SSL.Context,
        setup: Callable[[SSL.Connection], None],
        deadline: float,
        *,
        server: bool,
        hooks: Hooks | None = None,
    ) -> Outcome:
        """Run one handshake; ``hooks.after`` sees a successful outcome
        while the connection still exists (session reuse)."""
        if time.monotonic() >= deadline:
            return failed(errno.ETIMEDOUT, "deadline passed before start")
        state = HandshakeState()
        saved_nodelay = handshakeio.disable_nagle(sock)
        key: int | None = None
        try:
            sock.setblocking(False)
            conn = SSL.Connection(ctx, sock)
            conn.set_app_data(state)
            key = sslbind.ssl_pointer(conn)
            self._states[key] = state
            try:
                setup(conn)
                if hooks is not None:
                    hooks.setup(conn)
            except (SSL.Error, ValueError) as exc:
                # Our own parameters were refused: a local error.
                return failed(errno.EIO, f"connection set-up failed: {exc}")
            handshakeio.drive(conn, sock, deadline)
            out = success(conn, state, server=server)
            if hooks is not None and out.status == 0:
                out = hooks.after(conn, out)
            return self._limits.apply(key, out)
        except (DeadlineExpired, SSL.Error, OSError) as exc:
            return classify(state, exc)
        except Exception as exc:
            log.exception("unexpected error during a TLS handshake")
            return failed(errno.EIO, f"internal error: {exc!r}")
        finally:
            if key is not None:
                self._states.pop(key, None)
                self._limits.forget(key)
                if self.reuse is not None:
                    self.reuse.forget(key)
            handshakeio.restore_socket(sock, saved_nodelay)
