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

# (ssl pointer, write_p, content_type, bytes) -> None; must not raise.
MsgHandler = Callable[[int, bool, int, bytes], None]


class MsgCallback:
    """An SSL_CTX message callback that forwards to a Python function.

    The cffi callback object is created here, once, so no executable
    trampoline is allocated per handshake (the worker is sandboxed by
    then). Keep this object alive as long as any context uses it.
    """

    def __init__(self, handler: MsgHandler) -> None:
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
            data = bytes(_ffi.buffer(buf, length)) if length else b""
            self._handler(
                int(_ffi.cast("uintptr_t", ssl)),
                bool(write_p),
                content_type,
                data,
            )

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
    """Make verification require DNS name ``name`` (no partial wildcards)."""
    param = _lib.SSL_get0_param(conn._ssl)
    _lib.X509_VERIFY_PARAM_set_hostflags(
        param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS
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
