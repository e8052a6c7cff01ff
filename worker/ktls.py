"""Program TLS 1.3 traffic keys into a TCP socket (kernel TLS).

After a user-space handshake the worker hands each direction's traffic
secret to the kernel: ``setsockopt(IPPROTO_TCP, TCP_ULP, "tls")`` attaches
the TLS upper-layer protocol, then ``setsockopt(SOL_TLS, TLS_TX/TLS_RX)``
takes a ``tls12_crypto_info_*`` struct (``include/uapi/linux/tls.h``) with
the AEAD key, the IV split into salt and explicit part, and the sequence
number of the next record in that direction.

This module uses only the standard library (``hmac``/``hashlib`` for
HKDF-Expand-Label, RFC 8446 section 7.1), so it can be imported before
OpenSSL is initialised and costs nothing in the sandbox.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import socket
import struct
from dataclasses import dataclass

# Re-exported: the kTLS socket options are defined once, in shared/uapi.
from tlshd.shared.uapi import SOL_TLS as SOL_TLS
from tlshd.shared.uapi import TCP_ULP as TCP_ULP
from tlshd.shared.uapi import TLS_ULP_NAME as TLS_ULP_NAME

# <netinet/tcp.h>, <linux/tls.h>: kernel names so one grep covers C and Python.
SOL_TCP = socket.IPPROTO_TCP
TLS_TX = 1
TLS_RX = 2
TLS_TX_ZEROCOPY_RO = 3
TLS_RX_EXPECT_NO_PAD = 4
TLS_TX_MAX_PAYLOAD_LEN = 5
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304

TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_AES_CCM_128 = 53
TLS_CIPHER_CHACHA20_POLY1305 = 54

# TLS 1.3 record nonces are always 12 bytes (RFC 8446 section 5.3).
IV_LEN = 12

# A TLS 1.3 record's plaintext: 2^14 bytes of content plus the content
# type byte.  A peer's record_size_limit this large or larger caps nothing.
TLS13_MAX_RECORD_LIMIT = (1 << 14) + 1

log = logging.getLogger(__name__)
# False once this process's kernel refused TLS_TX_MAX_PAYLOAD_LEN as an
# unknown option (before Linux 6.19): no later socket is asked again.
_max_payload_known = True


@dataclass(frozen=True, slots=True)
class _Suite:
    cipher_type: int
    key_len: int
    hash_name: str
    layout: struct.Struct
    split_iv: bool  # True: salt = iv[0:4], iv = iv[4:12] (AES); False: 12 B


_AES_128 = struct.Struct("=HH8s16s4s8s")  # tls12_crypto_info_aes_gcm_128
_AES_256 = struct.Struct("=HH8s32s4s8s")  # tls12_crypto_info_aes_gcm_256
_CHACHA = struct.Struct("=HH12s32s8s")  # tls12_crypto_info_chacha20_poly1305

SUITES: dict[str, _Suite] = {
    "TLS_AES_128_GCM_SHA256": _Suite(
        TLS_CIPHER_AES_GCM_128, 16, "sha256", _AES_128, True
    ),
    "TLS_AES_256_GCM_SHA384": _Suite(
        TLS_CIPHER_AES_GCM_256, 32, "sha384", _AES_256, True
    ),
    "TLS_CHACHA20_POLY1305_SHA256": _Suite(
        TLS_CIPHER_CHACHA20_POLY1305, 32, "sha256", _CHACHA, False
    ),
    # Same layout as AES-GCM-128 (tls12_crypto_info_aes_ccm_128).
    "TLS_AES_128_CCM_SHA256": _Suite(
        TLS_CIPHER_AES_CCM_128, 16, "sha256", _AES_128, True
    ),
}


@dataclass(frozen=True)
class TrafficKeys:
    """One direction's TLS 1.3 application traffic state.

    ``secret`` is the current ``*_application_traffic_secret_N``; keep it
    for the life of the connection if KeyUpdate is ever to be serviced
    (the kernel hands back key and IV, never the secret). ``seq`` is the
    number of the next record in this direction.  ``record_limit`` is
    the peer's RFC 8449 record_size_limit (TX only; None: not sent),
    see tlshd.worker.recordlimit.
    """

    cipher: str
    secret: bytes
    seq: int
    record_limit: int | None = None

    def __repr__(self) -> str:
        # Never let a traffic secret reach a log line by accident.
        return (f"TrafficKeys(cipher={self.cipher!r}, seq={self.seq},"
                f" record_limit={self.record_limit})")

    def crypto_info(self) -> bytes:
        """Return the kernel crypto_info blob for these keys."""
        return derive_crypto_info(self.cipher, self.secret, self.seq)


def _suite(cipher: str) -> _Suite:
    try:
        return SUITES[cipher]
    except KeyError:
        msg = f"cipher suite {cipher!r} is not kTLS-capable"
        raise ValueError(msg) from None


def hash_name(cipher: str) -> str:
    """Return the hashlib name of the suite's hash ("sha256", "sha384")."""
    return _suite(cipher).hash_name


def _hkdf_expand(prk: bytes, info: bytes, length: int, hash: str) -> bytes:
    # RFC 5869 section 2.3.
    digest_len = hashlib.new(hash).digest_size
    if length > 255 * digest_len:
        raise ValueError("HKDF-Expand length too large")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), hash)
        out += block
        counter += 1
    return out[:length]


def expand_label(
    secret: bytes, label: bytes | str, context: bytes, length: int, hash: str
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 section 7.1).

    ``label`` is given without the "tls13 " prefix; ``hash`` is a hashlib
    name such as "sha256".
    """
    if isinstance(label, str):
        label = label.encode("ascii")
    full = b"tls13 " + label
    if len(full) > 255 or len(context) > 255 or not 0 < length < 65536:
        raise ValueError("HKDF-Expand-Label argument out of range")
    info = (
        length.to_bytes(2, "big")
        + bytes([len(full)])
        + full
        + bytes([len(context)])
        + context
    )
    return _hkdf_expand(secret, info, length, hash)


def traffic_key_iv(cipher: str, secret: bytes) -> tuple[bytes, bytes]:
    """Return (key, 12-byte iv) for a traffic secret (RFC 8446 7.3)."""
    suite = _suite(cipher)
    _check_secret(suite, secret)
    key = expand_label(secret, b"key", b"", suite.key_len, suite.hash_name)
    iv = expand_label(secret, b"iv", b"", IV_LEN, suite.hash_name)
    return key, iv


def _check_secret(suite: _Suite, secret: bytes) -> None:
    want = hashlib.new(suite.hash_name).digest_size
    if len(secret) != want:
        raise ValueError(
            f"traffic secret is {len(secret)} bytes, the suite's hash"
            f" needs {want}"
        )


def derive_crypto_info(cipher: str, secret: bytes, seq: int) -> bytes:
    """Build the ``tls12_crypto_info_*`` blob for ``setsockopt(SOL_TLS)``.

    Raises ValueError for suites kTLS cannot take or malformed input.
    """
    suite = _suite(cipher)
    if not 0 <= seq < 1 << 64:
        raise ValueError("record sequence number out of range")
    key, iv = traffic_key_iv(cipher, secret)
    rec_seq = seq.to_bytes(8, "big")
    if suite.split_iv:
        return suite.layout.pack(
            TLS_1_3_VERSION, suite.cipher_type, iv[4:], key, iv[:4], rec_seq
        )
    return suite.layout.pack(
        TLS_1_3_VERSION, suite.cipher_type, iv, key, rec_seq
    )


def next_secret(cipher: str, secret: bytes) -> bytes:
    """Return the next-generation traffic secret (RFC 8446 section 7.2).

    After a KeyUpdate the new keys are derived from this secret and the
    record sequence number restarts at 0.
    """
    suite = _suite(cipher)
    _check_secret(suite, secret)
    length = hashlib.new(suite.hash_name).digest_size
    return expand_label(secret, b"traffic upd", b"", length, suite.hash_name)


def install(sock: socket.socket, tx: TrafficKeys, rx: TrafficKeys) -> None:
    """Attach the "tls" ULP to ``sock`` and program both directions.

    Order: ULP, TX, the peer's record size cap (if any), RX.  ktls-utils
    sets the cap before TX, but the kernel accepts the smallest TLS 1.3
    value (63) only once TX has told it the version (seen on 7.3); no
    record can be pending yet, so the cap still covers every record.
    Both blobs are built before the first setsockopt so a bad suite
    fails before the socket is touched. OSError propagates; the socket
    is unusable after a partial install and the caller reports EIO.
    """
    tx_info = tx.crypto_info()
    rx_info = rx.crypto_info()
    sock.setsockopt(SOL_TCP, TCP_ULP, TLS_ULP_NAME)
    sock.setsockopt(SOL_TLS, TLS_TX, tx_info)
    if tx.record_limit is not None:
        cap_tx_records(sock, tx.record_limit)
    sock.setsockopt(SOL_TLS, TLS_RX, rx_info)


def tx_max_payload(limit: int) -> int | None:
    """``TLS_TX_MAX_PAYLOAD_LEN`` for a TLS 1.3 peer's record size limit,
    or None when the limit caps nothing.  The limit counts the content
    type byte of TLSInnerPlaintext (RFC 8449 section 4); the kernel's
    value does not."""
    if limit >= TLS13_MAX_RECORD_LIMIT:
        return None
    return limit - 1


def cap_tx_records(sock: socket.socket, limit: int) -> bool:
    """Keep kTLS's TLS 1.3 records within the peer's ``limit``.

    Returns False when the kernel cannot (no ``TLS_TX_MAX_PAYLOAD_LEN``,
    before Linux 6.19): the session goes on with full-size records.  As
    tlshd cannot answer the extension (tlshd.worker.recordlimit), RFC 8449
    lets the peer receive them, and a lenient one does; a strict one
    (GnuTLS) ends the session at the first larger record, hence a
    warning rather than a refusal that would fail the lenient ones too.
    Any other refusal raises OSError.
    """
    global _max_payload_known
    payload = tx_max_payload(limit)
    if payload is None:
        return True
    if _max_payload_known:
        try:
            sock.setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN,
                            struct.pack("=H", payload))
            return True
        except OSError as exc:
            if exc.errno != errno.ENOPROTOOPT:
                raise
            _max_payload_known = False
    log.warning("The peer asked for records of at most %d bytes; this"
                " kernel cannot cap kTLS records (TLS_TX_MAX_PAYLOAD_LEN,"
                " Linux 6.19), so they may be up to 16384 bytes", limit)
    return False
