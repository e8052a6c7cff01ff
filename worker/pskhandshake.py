"""TLS 1.3 handshakes with external PSKs (NVMe/TCP), both roles.

OpenSSL picks the cipher suite *before* it looks at a PSK and silently
drops a PSK whose hash differs from the suite's, so every handshake offers
or accepts exactly the suite matching the PSK's hash: TLS_AES_128_GCM_SHA256
for SHA-256, TLS_AES_256_GCM_SHA384 for SHA-384. The hash comes from an
NVMe identity (``NVMe<0|1><R|G><01|02> <hostnqn> <subnqn>...``: 01 SHA-256,
02 SHA-384), otherwise from the key length (48 bytes: SHA-384), as in
ktls-utils. Key exchange is psk_dhe_ke only (OpenSSL's default without
SSL_OP_ALLOW_NO_DHE_KEX); neither end has or accepts a certificate.

Client: OpenSSL offers one external PSK per ClientHello, so the PSKs are
tried in turn until a status other than EACCES (ktls-utils does the same).

Server: the ClientHello is peeked (MSG_PEEK) before OpenSSL reads it; the
identities its pre_shared_key extension offers are looked up in order and
the first known one picks the context. No known identity: a fatal
unknown_psk_identity alert (a ktls-utils client reports EKEYREJECTED, as
ours does) and status ENOKEY.

REMOTE_AUTH on success is the serial of the PSK used (the NVMe host looks
the key up by it). The OpenSSL callbacks are created once (sslbind) and
find per-connection state by the SSL pointer.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import re
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from OpenSSL import SSL

from tlshd.shared.protocol import PskMaterial
from tlshd.worker import sslbind
from tlshd.worker.tlsoutcome import DeadlineExpired, Outcome, failed

log = logging.getLogger(__name__)

SHA256 = "sha256"
SHA384 = "sha384"
# hash -> (the one suite offered, its two-byte id)
SUITE = {
    SHA256: ("TLS_AES_128_GCM_SHA256", b"\x13\x01"),
    SHA384: ("TLS_AES_256_GCM_SHA384", b"\x13\x02"),
}
_NVME_IDENTITY = re.compile(rb"NVMe[01][RG](0[12]) ")

# TLS wire constants (RFC 8446).
CT_ALERT = 21
CT_HANDSHAKE = 22
HS_CLIENT_HELLO = 1
EXT_PRE_SHARED_KEY = 41
ALERT_HANDSHAKE_FAILURE = 40
ALERT_DECODE_ERROR = 50
ALERT_UNKNOWN_PSK_IDENTITY = 115
MAX_RECORD = 1 << 14
MAX_HELLO = 1 << 16  # far above any real ClientHello (PQ ones: ~2 KiB)
# What one peek reads: a ClientHello of MAX_HELLO bytes in full-sized
# records with room to spare.  A hello spread over more, tinier records
# would never be seen whole, so it is refused rather than waited for.
MAX_PEEK = MAX_HELLO + 5 * 8
PEEK_NAP = 0.005  # seconds between peeks at an incomplete ClientHello


# A server's way to find an offered identity's PSK (None: unknown).
FindPsk = Callable[[bytes], PskMaterial | None]


def psk_hash(identity: bytes, key_len: int) -> str:
    """The PSK's hash: from an NVMe identity, else from the key length."""
    m = _NVME_IDENTITY.match(identity)
    if m is not None:
        return SHA384 if m.group(1) == b"02" else SHA256
    return SHA384 if key_len == 48 else SHA256


def hash_of(psk: PskMaterial) -> str:
    return psk_hash(psk.identity, len(psk.secret))


def printable(identity: bytes, limit: int = 400) -> str:
    text = identity[:limit].decode("ascii", "backslashreplace")
    return text + ("..." if len(identity) > limit else "")


# -- the ClientHello, peeked ----------------------------------------------


class HelloIncomplete(Exception):
    """More bytes are needed; ``needed`` is the total to wait for."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("ClientHello truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def vec(self, width: int) -> bytes:
        return self.take(int.from_bytes(self.take(width), "big"))

    def left(self) -> int:
        return len(self.data) - self.pos


def _hello_body(data: bytes) -> bytes:
    """Reassemble the first handshake message from TLS records."""
    hs, pos = b"", 0
    while True:
        if pos + 5 > MAX_PEEK:
            raise ValueError("ClientHello spread over too many records")
        if len(data) < pos + 5:
            raise HelloIncomplete(pos + 5)
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if data[pos] != CT_HANDSHAKE or not 0 < length <= MAX_RECORD:
            raise ValueError("not a TLS handshake record")
        end = pos + 5 + length
        if end > MAX_PEEK:
            raise ValueError("ClientHello spread over too many records")
        if len(data) < end:
            raise HelloIncomplete(end)
        hs, pos = hs + data[pos + 5 : end], end
        if len(hs) >= 4:
            if hs[0] != HS_CLIENT_HELLO:
                raise ValueError("not a ClientHello")
            size = 4 + int.from_bytes(hs[1:4], "big")
            if size > MAX_HELLO:
                raise ValueError("ClientHello too large")
            if len(hs) >= size:
                return hs[4:size]


def offered_identities(data: bytes) -> list[bytes]:
    """The PSK identities a ClientHello (raw records) offers, in order.

    Raises HelloIncomplete when ``data`` ends early, ValueError when it is
    not a well-formed ClientHello.
    """
    r = _Reader(_hello_body(data))
    r.take(2 + 32)  # legacy_version, random
    r.vec(1)  # legacy_session_id
    r.vec(2)  # cipher_suites
    r.vec(1)  # legacy_compression_methods
    if not r.left():
        return []
    exts = _Reader(r.vec(2))
    while exts.left():
        ext_type = int.from_bytes(exts.take(2), "big")
        body = exts.vec(2)
        if ext_type == EXT_PRE_SHARED_KEY:
            ids = _Reader(_Reader(body).vec(2))
            out = []
            while ids.left():
                out.append(ids.vec(2))
                ids.take(4)  # obfuscated_ticket_age
            return out
    return []


def peek_identities(sock: socket.socket, deadline: float) -> list[bytes]:
    """Wait for the whole ClientHello without consuming it.

    Readable data that is still incomplete keeps poll() returning at
    once, so while a ClientHello trickles in (rare: it usually fits one
    segment) the loop naps briefly between peeks. No socket option is
    changed: the socket belongs to the kernel consumer.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    seen = 0
    while True:
        remaining = deadline - time.monotonic()
        events = poller.poll(math.ceil(remaining * 1e3)) if remaining > 0 \
            else []
        if not events:
            raise DeadlineExpired
        data = sock.recv(MAX_PEEK,
                         socket.MSG_PEEK | socket.MSG_DONTWAIT)
        try:
            return offered_identities(data)
        except HelloIncomplete:
            pass
        if len(data) == seen:
            if not data or events[0][1] & (select.POLLRDHUP | select.POLLHUP
                                           | select.POLLERR):
                raise ConnectionResetError(
                    errno.ECONNRESET, "peer closed before its ClientHello"
                )
            time.sleep(PEEK_NAP)
        seen = len(data)


def send_alert(sock: socket.socket, description: int) -> None:
    """Send a fatal plaintext alert (before any ServerHello)."""
    try:
        sock.send(bytes([CT_ALERT, 3, 3, 0, 2, 2, description]),
                  socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except OSError as exc:
        log.debug("cannot send alert %d: %s", description, exc)


# -- handshakes -----------------------------------------------------------


class ContextFactory(Protocol):
    def __call__(self, *, server: bool, suites: bytes) -> SSL.Context: ...


class HandshakeRunner(Protocol):
    def __call__(
        self,
        sock: socket.socket,
        ctx: SSL.Context,
        setup: Callable[[SSL.Connection], None],
        deadline: float,
        *,
        server: bool,
    ) -> Outcome: ...


class PskHandshakes:
    """Prebuilt PSK contexts (one per role and hash) and the drivers."""

    def __init__(self, base: ContextFactory, run: HandshakeRunner) -> None:
        self._run = run
        self._offer: dict[int, PskMaterial] = {}  # client: the PSK to offer
        self._accept: dict[int, PskMaterial] = {}  # server: the PSK looked up
        self._callbacks = sslbind.PskCallbacks(self._on_use, self._on_find)
        self._client = {h: self._context(base, h, False) for h in SUITE}
        self._server = {h: self._context(base, h, True) for h in SUITE}

    def _context(self, base: ContextFactory, hash_name: str,
                 server: bool) -> SSL.Context:
        ctx = base(server=server, suites=SUITE[hash_name][0].encode())
        if server:
            ctx.set_verify(SSL.VERIFY_NONE)
            self._callbacks.install_server(ctx)
        else:
            # No trust anchors: a server answering with a certificate
            # instead of accepting the PSK fails verification.
            ctx.set_verify(SSL.VERIFY_PEER)
            self._callbacks.install_client(ctx)
        return ctx

    def _on_use(self, ssl: int) -> tuple[bytes, bytes, bytes] | None:
        psk = self._offer.get(ssl)
        if psk is None:
            return None
        return psk.identity, psk.secret, SUITE[hash_of(psk)][1]

    def _on_find(self, ssl: int, identity: bytes
                 ) -> tuple[bytes, bytes] | None:
        psk = self._accept.get(ssl)
        if psk is None or psk.identity != identity:
            return None
        return psk.secret, SUITE[hash_of(psk)][1]

    def client(self, sock: socket.socket, psks: Sequence[PskMaterial],
               deadline: float) -> Outcome:
        """Offer each PSK in turn until a status other than EACCES."""
        out = failed(errno.ENOKEY, "no PSK to offer")
        for psk in psks:
            out = self._one(sock, psk, deadline, self._offer, server=False)
            if out.status != errno.EACCES:
                break
        return out

    def server(self, sock: socket.socket, lookup: FindPsk,
               deadline: float) -> Outcome:
        """Accept the first offered identity that ``lookup`` knows."""
        try:
            offered = peek_identities(sock, deadline)
        except DeadlineExpired:
            return failed(errno.ETIMEDOUT, "no ClientHello before deadline")
        except ValueError as exc:
            send_alert(sock, ALERT_DECODE_ERROR)
            return failed(errno.EACCES, f"malformed ClientHello: {exc}")
        except OSError as exc:
            return failed(errno.ETIMEDOUT, f"reading the ClientHello: {exc}")
        if not offered:
            send_alert(sock, ALERT_HANDSHAKE_FAILURE)
            return failed(errno.EACCES, "the client offered no PSK")
        for identity in offered:
            psk = lookup(identity)
            if psk is not None:
                return self._one(sock, psk, deadline, self._accept,
                                 server=True)
        send_alert(sock, ALERT_UNKNOWN_PSK_IDENTITY)
        return failed(errno.ENOKEY, "unknown PSK identity '%s'"
                      % "', '".join(printable(i) for i in offered))

    def _one(self, sock: socket.socket, psk: PskMaterial, deadline: float,
             table: dict[int, PskMaterial], *, server: bool) -> Outcome:
        contexts = self._server if server else self._client
        conns: list[SSL.Connection] = []

        def setup(conn: SSL.Connection) -> None:
            if server:
                conn.set_accept_state()
            else:
                conn.set_connect_state()
            table[sslbind.ssl_pointer(conn)] = psk
            conns.append(conn)

        try:
            hash_name = hash_of(psk)
            out = self._run(sock, contexts[hash_name], setup, deadline,
                            server=server)
            if out.status != 0:
                return out
            if not conns or not sslbind.session_reused(conns[0]):
                return failed(errno.EACCES, "the PSK was not used")
            if not out.group:
                return failed(errno.EACCES, "no (EC)DHE with the PSK")
            return dataclasses.replace(
                out,
                remote_auth=(psk.serial,),
                description=f"(TLS1.3)-(PSK-{hash_name.upper()})"
                f"-({out.group})-({out.cipher})",
            )
        finally:
            for conn in conns:
                key = sslbind.ssl_pointer(conn)
                table.pop(key, None)
                self._callbacks.forget(key)
