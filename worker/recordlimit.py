"""The peer's TLS record size limit (RFC 8449), honoured by kTLS.

A peer with small buffers (an embedded NVMe target, say) sends the
``record_size_limit`` extension: a client in its ClientHello, a server in
its EncryptedExtensions.  OpenSSL does not know the extension, and
cryptography's bindings export only the legacy custom-extension API,
which OpenSSL applies to TLS 1.2 and below: in a TLS 1.3 handshake a
server's parse callback is never called and nothing can be added to
EncryptedExtensions, and a client that offers the extension that way
fails with "bad extension" when the server answers it (tried with
gnutls-serv).  So tlshd cannot send a limit of its own, in either role,
and a server never learns that the client would have offered one.

What it can do is read the peer's limit from the handshake message the
OpenSSL message callback shows (decrypted, whole) and cap the records
kTLS sends: smaller records are always allowed.  :class:`PeerLimits`
keeps the limit per connection; the engine hands it on in the TX
:class:`~tlshd.worker.ktls.TrafficKeys`, and
:func:`tlshd.worker.ktls.install` sets ``TLS_TX_MAX_PAYLOAD_LEN``.

A malformed extension (a body that is not two bytes, a value below 64,
the extension twice) is a fatal error in RFC 8449 and RFC 8446: OpenSSL
has finished by the time it could be refused, so the handshake's outcome
becomes EACCES and the consumer drops the connection.  A value above
the TLS 1.3 maximum (2^14 + 1) means no limit: a server must accept it,
and a client may (tlshd.worker.ktls.tx_max_payload).
"""

from __future__ import annotations

import dataclasses
import errno

from tlshd.worker.tlsoutcome import Outcome, failed

EXT_RECORD_SIZE_LIMIT = 28
HS_CLIENT_HELLO = 1
HS_ENCRYPTED_EXTENSIONS = 8
MIN_LIMIT = 64


class RecordLimitError(ValueError):
    """The message or its record_size_limit extension is malformed."""


class _Reader:
    """Bounded reads from one handshake message (never past its end)."""

    def __init__(self, data: memoryview, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def uint(self, width: int) -> int:
        self.skip(width)
        return int.from_bytes(self.data[self.pos - width : self.pos], "big")

    def skip(self, n: int) -> None:
        if self.end - self.pos < n:
            raise RecordLimitError("truncated")
        self.pos += n

    def vector(self, width: int) -> _Reader:
        """The length-prefixed vector that comes next, as its own reader."""
        n = self.uint(width)
        self.skip(n)
        return _Reader(self.data, self.pos - n, self.pos)

    def left(self) -> int:
        return self.end - self.pos


def peer_limit(message: memoryview | bytes) -> int | None:
    """The record_size_limit a whole handshake message carries.

    ``message`` is one handshake message with its 4-byte header. Only a
    ClientHello or an EncryptedExtensions is read: None for any other
    type, or when the extension is absent. Raises RecordLimitError when
    the message's framing or the extension is malformed.
    """
    view = memoryview(message)
    if len(view) < 4 or view[0] not in (HS_CLIENT_HELLO,
                                        HS_ENCRYPTED_EXTENSIONS):
        return None
    r = _Reader(view, 0, len(view))
    msg_type = r.uint(1)
    if r.uint(3) != r.left():
        raise RecordLimitError("handshake length does not match")
    if msg_type == HS_CLIENT_HELLO:
        r.skip(2 + 32)  # legacy_version, random
        r.vector(1)  # legacy_session_id
        r.vector(2)  # cipher_suites
        r.vector(1)  # legacy_compression_methods
        if r.left() == 0:
            return None  # no extensions at all (not TLS 1.3)
    exts = r.vector(2)
    if r.left():
        raise RecordLimitError("bytes after the extensions")
    return _find_limit(exts)


def _find_limit(exts: _Reader) -> int | None:
    found: int | None = None
    while exts.left():
        ext_type = exts.uint(2)
        body = exts.vector(2)
        if ext_type != EXT_RECORD_SIZE_LIMIT:
            continue
        if found is not None:
            raise RecordLimitError("record_size_limit sent twice")
        if body.left() != 2:
            raise RecordLimitError(
                f"record_size_limit body of {body.left()} bytes, not 2")
        found = body.uint(2)
        if found < MIN_LIMIT:
            raise RecordLimitError(
                f"record_size_limit {found} is below {MIN_LIMIT}")
    return found


class PeerLimits:
    """Each connection's peer limit, from the OpenSSL message callback.

    Keyed by SSL pointer, like the engine's handshake states; an entry
    exists only for a peer that sent the extension (or a malformed one),
    and the engine drops it when the handshake ends.
    """

    def __init__(self) -> None:
        self._seen: dict[int, int | str] = {}

    def observe(self, ssl: int, message: memoryview) -> None:
        """sslbind's received-message handler; never raises.

        After a HelloRetryRequest the second ClientHello's extension
        replaces the first's; a second ClientHello without one (which
        RFC 8446 forbids) keeps it: a smaller record is always
        allowed."""
        if not message or message[0] not in (HS_CLIENT_HELLO,
                                             HS_ENCRYPTED_EXTENSIONS):
            return
        try:
            limit: int | str | None = peer_limit(message)
        except RecordLimitError as exc:
            limit = str(exc)
        if limit is not None:
            self._seen[ssl] = limit

    def forget(self, ssl: int) -> None:
        self._seen.pop(ssl, None)

    def apply(self, ssl: int, out: Outcome) -> Outcome:
        """``out`` with the peer's limit in its TX keys and description,
        or EACCES for a malformed extension; unchanged without one."""
        seen = self._seen.pop(ssl, None)
        if seen is None or out.status != 0 or out.tx is None:
            return out
        if isinstance(seen, str):
            return failed(errno.EACCES,
                          f"peer sent a malformed record_size_limit: {seen}")
        return dataclasses.replace(
            out,
            tx=dataclasses.replace(out.tx, record_limit=seen),
            description=f"{out.description} record_size_limit={seen}")
