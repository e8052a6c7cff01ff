"""Typed wrappers for the few OpenSSL calls pyOpenSSL does not expose.

``OpenSSL._util.lib`` and ``ffi`` (cryptography's cffi bindings) are
untyped and private; every use in the worker goes through this module so
the rest stays under ``mypy --strict`` and a binding change breaks in one
place. pyOpenSSL's private ``Context._context`` / ``Connection._ssl``
pointers are reached here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

# Content types the message callback reports besides the TLS ones
# (<openssl/ssl3.h>): a record header, and TLS 1.3's inner content type.
SSL3_RT_CHANGE_CIPHER_SPEC = 20
SSL3_RT_ALERT = 21
SSL3_RT_HANDSHAKE = 22
SSL3_RT_APPLICATION_DATA = 23
SSL3_RT_HEADER = 256
SSL3_RT_INNER_CONTENT_TYPE = 257

X509_V_ERR_UNABLE_TO_GET_CRL = int(_lib.X509_V_ERR_UNABLE_TO_GET_CRL)
X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS = int(
    _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS
)
X509_CHECK_FLAG_NEVER_CHECK_SUBJECT = int(
    _lib.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT
)

# The content types the message handlers are given (all others are
# dropped in the callback itself).
_USED_TYPES = frozenset((SSL3_RT_HEADER, SSL3_RT_HANDSHAKE, SSL3_RT_ALERT))

# (ssl pointer, write_p, content_type, first bytes) -> None; must not
# raise.  The handler sees only record headers (no bytes), handshake
# messages and alerts, and at most MSG_PREFIX bytes of each message: the
# handshake type, the alert level and description, a CertificateVerify's
# signature scheme (after the 4-byte handshake header); a certificate
# message is not copied whole just to read its first byte.
MsgHandler = Callable[[int, bool, int, bytes], None]
MSG_PREFIX = 6
# (ssl pointer, one whole received handshake message) -> None; must not
# raise.  The view is OpenSSL's buffer, released when the call returns:
# the handler copies what it keeps (tlshd.worker.recordlimit).
ReceivedHandler = Callable[[int, memoryview], None]


class MsgCallback:
    """An SSL_CTX message callback that forwards to a Python function.

    The cffi callback object is created here, once, so no executable
    trampoline is allocated per handshake (the worker is sandboxed by
    then). Keep this object alive as long as any context uses it.
    """

    def __init__(self, handler: MsgHandler,
                 received: ReceivedHandler | None = None) -> None:
        self._handler = handler

        def _trampoline(
            write_p: int,
            version: int,
            content_type: int,
            buf: Any,
            length: int,
            ssl: Any,
            arg: Any,
        ) -> None:
            del version, arg
            # About a third of the calls (TLS 1.3's inner content types,
            # ChangeCipherSpec) say nothing the handlers use: return
            # before any conversion.  A record header's bytes are not
            # needed either, only that it was seen.
            if content_type not in _USED_TYPES:
                return
            key = int(_ffi.cast("uintptr_t", ssl))
            data = (bytes(_ffi.buffer(buf, min(length, MSG_PREFIX)))
                    if length and content_type != SSL3_RT_HEADER else b"")
            self._handler(key, bool(write_p), content_type, data)
            if (received is not None and not write_p and length
                    and content_type == SSL3_RT_HANDSHAKE):
                with memoryview(_ffi.buffer(buf, length)) as view:
                    received(key, view)

        self._c_callback: Any = _ffi.callback(
            "void(int, int, int, const void *, size_t, SSL *, void *)",
            _trampoline,
            onerror=_ignore_callback_error,
        )

    def install(self, ctx: SSL.Context) -> None:
        """Set this callback on ``ctx`` (copied into each new SSL)."""
        _lib.SSL_CTX_set_msg_callback(ctx._context, self._c_callback)


def _ignore_callback_error(
    exc_type: object, exc_value: object, traceback: object
) -> None:
    # An exception cannot cross into OpenSSL; the handler is written not
    # to raise, and a failure here only loses bookkeeping that the engine
    # cross-checks (missing counts or secrets give EIO).
    return None


def ssl_pointer(conn: SSL.Connection) -> int:
    """Return the address of the connection's SSL object (a dict key)."""
    return int(_ffi.cast("uintptr_t", conn._ssl))


def set_expected_host(conn: SSL.Connection, name: bytes) -> None:
    """Make verification require DNS name ``name`` in a subjectAltName.

    No partial wildcards, and never the subject's CN: OpenSSL otherwise
    falls back to the CN when a certificate has no DNS SAN, which RFC 9525
    (section 6.3) forbids.
    """
    param = _lib.SSL_get0_param(conn._ssl)
    _lib.X509_VERIFY_PARAM_set_hostflags(
        param,
        X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS
        | X509_CHECK_FLAG_NEVER_CHECK_SUBJECT,
    )
    if _lib.X509_VERIFY_PARAM_set1_host(param, name, len(name)) != 1:
        _lib.ERR_clear_error()
        raise ValueError(f"cannot set expected host name {name!r}")


def set_expected_ip(conn: SSL.Connection, packed: bytes) -> None:
    """Make verification require an IP address SAN equal to ``packed``."""
    param = _lib.SSL_get0_param(conn._ssl)
    if _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed)) != 1:
        _lib.ERR_clear_error()
        raise ValueError("cannot set expected IP address")


def verify_error_string(code: int) -> str:
    """Return OpenSSL's text for an X509_V_ERR_* code."""
    text = _lib.X509_verify_cert_error_string(code)
    if text == _ffi.NULL:
        return f"verify error {code}"
    return str(_ffi.string(text).decode("ascii", "replace"))


# -- TLS 1.3 external PSKs ------------------------------------------------

TLS1_3_VERSION = int(_lib.TLS1_3_VERSION)

# (ssl pointer) -> (identity, key, 2-byte suite id) of the PSK to offer,
# or None to offer none.
PskUseHandler = Callable[[int], tuple[bytes, bytes, bytes] | None]
# (ssl pointer, offered identity) -> (key, 2-byte suite id) or None.
PskFindHandler = Callable[[int, bytes], tuple[bytes, bytes] | None]


class PskCallbacks:
    """The TLS 1.3 psk_use_session / psk_find_session callbacks.

    pyOpenSSL has no PSK API; these are cryptography's bindings for
    ``SSL_CTX_set_psk_{use,find}_session_callback``. Unlike the legacy
    PSK callbacks they take identities of any length (NVMe identities
    exceed 255 bytes) and SHA-384 PSKs. A PSK is handed to OpenSSL as an
    ``SSL_SESSION`` (key, TLS 1.3 suite whose hash the PSK uses) that
    OpenSSL then owns. The cffi callbacks are created here, once.
    """

    def __init__(self, use: PskUseHandler, find: PskFindHandler) -> None:
        self._use = use
        self._find = find
        # Identity buffers must outlive the callback: OpenSSL copies the
        # identity only after it returns.
        self._identities: dict[int, Any] = {}

        def _use_cb(ssl: Any, md: Any, id_out: Any, idlen_out: Any,
                    sess_out: Any) -> int:
            del md  # a single suite is offered, so it always matches
            key = int(_ffi.cast("uintptr_t", ssl))
            sess_out[0] = _ffi.NULL
            psk = self._use(key)
            if psk is None:
                return 1
            identity, secret, suite = psk
            sess = _new_session(ssl, secret, suite)
            if sess is None:
                return 0
            buf = _ffi.new("unsigned char[]", identity)
            self._identities[key] = buf
            id_out[0] = buf
            idlen_out[0] = len(identity)
            sess_out[0] = sess
            return 1

        def _find_cb(ssl: Any, identity: Any, length: int,
                     sess_out: Any) -> int:
            sess_out[0] = _ffi.NULL
            found = self._find(int(_ffi.cast("uintptr_t", ssl)),
                               bytes(_ffi.buffer(identity, length)))
            if found is None:
                return 1  # unknown here: continue without this PSK
            sess = _new_session(ssl, *found)
            if sess is None:
                return 0
            sess_out[0] = sess
            return 1

        self._c_use: Any = _ffi.callback(
            # As declared by the bindings (no const).
            "int(SSL *, EVP_MD *, unsigned char **, size_t *,"
            " SSL_SESSION **)",
            _use_cb, error=0, onerror=_ignore_callback_error)
        self._c_find: Any = _ffi.callback(
            "int(SSL *, unsigned char *, size_t, SSL_SESSION **)",
            _find_cb, error=0, onerror=_ignore_callback_error)

    def install_client(self, ctx: SSL.Context) -> None:
        _lib.SSL_CTX_set_psk_use_session_callback(ctx._context, self._c_use)

    def install_server(self, ctx: SSL.Context) -> None:
        _lib.SSL_CTX_set_psk_find_session_callback(
            ctx._context, self._c_find)

    def forget(self, ssl: int) -> None:
        """Drop what was kept for connection ``ssl`` (after its handshake)."""
        self._identities.pop(ssl, None)


def _new_session(ssl: Any, secret: bytes, suite: bytes) -> Any:
    """An SSL_SESSION carrying an external PSK, or None on failure."""
    cipher = _lib.SSL_CIPHER_find(ssl, suite)
    if cipher == _ffi.NULL:
        return None
    sess = _lib.Cryptography_SSL_SESSION_new()
    if sess == _ffi.NULL:
        return None
    if (_lib.SSL_SESSION_set1_master_key(sess, secret, len(secret)) != 1
            or _lib.SSL_SESSION_set_cipher(sess, cipher) != 1
            or _lib.SSL_SESSION_set_protocol_version(
                sess, TLS1_3_VERSION) != 1):
        _lib.SSL_SESSION_free(sess)
        return None
    return sess


def session_reused(conn: SSL.Connection) -> bool:
    """True if the handshake was authenticated by a PSK (TLS 1.3)."""
    return bool(_lib.SSL_session_reused(conn._ssl))
