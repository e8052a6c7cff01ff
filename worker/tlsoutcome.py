"""Per-handshake bookkeeping and the mapping of results to errno.

A :class:`HandshakeState` collects what OpenSSL's callbacks report during one
handshake: traffic secrets (keylog), record counts after each side's
Finished (message callback), alerts, and the first certificate
verification failure. :func:`success` turns a completed handshake into an
:class:`Outcome` with kTLS keys; :func:`classify` maps a failed one to the
status tlshd would send (ktls-utils ``handshake.c``): verification
failures and alerts EACCES, premature termination ETIMEDOUT (the kernel
consumer retries), unknown_psk_identity EKEYREJECTED, local errors EIO.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from OpenSSL import SSL, crypto

from tlshd.shared import uapi
from tlshd.worker import ktls, sslbind, tlscreds, verify
from tlshd.worker.ktls import TrafficKeys

HS_NEW_SESSION_TICKET = 4
HS_CERTIFICATE_VERIFY = 15
HS_FINISHED = 20
# TLS SignatureScheme names (IANA registry), for the logs.
_SCHEMES = {
    0x0401: "rsa_pkcs1_sha256",
    0x0501: "rsa_pkcs1_sha384",
    0x0601: "rsa_pkcs1_sha512",
    0x0403: "ecdsa_secp256r1_sha256",
    0x0503: "ecdsa_secp384r1_sha384",
    0x0603: "ecdsa_secp521r1_sha512",
    0x0804: "rsa_pss_rsae_sha256",
    0x0805: "rsa_pss_rsae_sha384",
    0x0806: "rsa_pss_rsae_sha512",
    0x0807: "ed25519",
    0x0808: "ed448",
    0x0809: "rsa_pss_pss_sha256",
    0x080A: "rsa_pss_pss_sha384",
    0x080B: "rsa_pss_pss_sha512",
    0x081A: "ecdsa_brainpoolP256r1tls13_sha256",
    0x081B: "ecdsa_brainpoolP384r1tls13_sha384",
    0x081C: "ecdsa_brainpoolP512r1tls13_sha512",
    0x0904: "mldsa44",
    0x0905: "mldsa65",
    0x0906: "mldsa87",
}
_ALERT_CLOSE_NOTIFY = 0
_ALERT_UNKNOWN_PSK_IDENTITY = 115
_ALERT_NAMES = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
}
_CIPHER_SHORT = {
    "TLS_AES_128_GCM_SHA256": "AES-128-GCM",
    "TLS_AES_256_GCM_SHA384": "AES-256-GCM",
    "TLS_CHACHA20_POLY1305_SHA256": "CHACHA20-POLY1305",
    "TLS_AES_128_CCM_SHA256": "AES-128-CCM",
}
# Socket errors that mean the peer or the network went away: like GnuTLS's
# premature termination they map to ETIMEDOUT, which asks the kernel
# consumer to retry.
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)


@dataclass
class Outcome:
    """The result of one handshake; ``status`` 0 or a positive errno."""

    status: int
    remote_auth: tuple[int, ...] = ()
    cipher: str = ""
    group: str = ""
    description: str = ""
    peer_subject: str | None = None
    reason: str = ""
    tx: TrafficKeys | None = None
    rx: TrafficKeys | None = None
    # Authenticated by a session-reuse PSK (sessionreuse.py), not by
    # certificates.
    resumed: bool = False
    # The server certificate's kind (tlscreds.KIND_*; "" without one)
    # and the signature scheme of its CertificateVerify.
    cert_kind: str = ""
    signature: str = ""


# The log texts of a certificate (its key description and subject) are
# built through a cryptography object, which costs a conversion per
# certificate per handshake (about 25 ms each under emulation); our own
# certificate and a recurring peer's are the same every time, so keep the
# texts by DER.  0 switches the cache off (bench/engine_ab.py compares).
CERT_TEXT_CACHE_SIZE = 64
_cert_texts: dict[bytes, tuple[str, str | None]] = {}


def cert_texts(cert: crypto.X509 | None) -> tuple[str, str | None]:
    """Return (key description, subject) of ``cert`` for the logs."""
    if cert is None:
        return tlscreds.key_description(None), None
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    texts = _cert_texts.get(der)
    if texts is None:
        texts = (tlscreds.key_description(cert), verify.subject_text(cert))
        if CERT_TEXT_CACHE_SIZE:
            if len(_cert_texts) >= CERT_TEXT_CACHE_SIZE:
                _cert_texts.clear()
            _cert_texts[der] = texts
    return texts


def failed(status: int, reason: str) -> Outcome:
    """Return a failure outcome."""
    return Outcome(status=status, reason=reason)


# The keylog labels success() reads.
KEPT_SECRETS = frozenset((b"CLIENT_TRAFFIC_SECRET_0",
                          b"SERVER_TRAFFIC_SECRET_0"))


@dataclass
class HandshakeState:
    """What the OpenSSL callbacks learn during one handshake."""

    secrets: dict[str, bytes] = field(default_factory=dict)
    # Records sent / received after our own / the peer's Finished: the
    # sequence numbers the kernel must continue from.
    tx_records: int | None = None
    rx_records: int | None = None
    tickets_sent: int = 0
    alert_received: int | None = None
    alert_sent: int | None = None
    verify_failure: str | None = None
    # Signature schemes of our own and the peer's CertificateVerify.
    own_scheme: int | None = None
    peer_scheme: int | None = None

    def observe(self, write_p: bool, content_type: int, data: bytes) -> None:
        """Account for one message-callback event."""
        if content_type == sslbind.SSL3_RT_HEADER:
            if write_p and self.tx_records is not None:
                self.tx_records += 1
            elif not write_p and self.rx_records is not None:
                self.rx_records += 1
        elif content_type == sslbind.SSL3_RT_HANDSHAKE and data:
            # The record header callback precedes the messages it
            # carries, so counting starts with the record after Finished.
            if data[0] == HS_FINISHED:
                if write_p and self.tx_records is None:
                    self.tx_records = 0
                elif not write_p and self.rx_records is None:
                    self.rx_records = 0
            elif data[0] == HS_NEW_SESSION_TICKET and write_p:
                self.tickets_sent += 1
            elif data[0] == HS_CERTIFICATE_VERIFY and len(data) >= 6:
                scheme = int.from_bytes(data[4:6], "big")
                if write_p:
                    self.own_scheme = scheme
                else:
                    self.peer_scheme = scheme
        elif content_type == sslbind.SSL3_RT_ALERT and len(data) >= 2:
            if write_p and self.alert_sent is None:
                self.alert_sent = data[1]
            elif not write_p and self.alert_received is None:
                self.alert_received = data[1]

    def record_keylog(self, line: bytes, client_random: bytes | None) -> None:
        """Keep a keylog secret if it belongs to this connection.

        Only the application traffic secrets are kept (kTLS needs nothing
        else): the handshake and exporter secrets are neither decoded nor
        held in memory.
        """
        parts = line.split()
        if len(parts) != 3 or parts[0] not in KEPT_SECRETS:
            return
        try:
            random = bytes.fromhex(parts[1].decode("ascii"))
            secret = bytes.fromhex(parts[2].decode("ascii"))
        except ValueError:
            return
        if random == client_random:
            self.secrets[parts[0].decode("ascii", "replace")] = secret


class DeadlineExpired(Exception):
    """The handshake did not finish before its deadline."""


def success(conn: SSL.Connection, s: HandshakeState, *,
            server: bool) -> Outcome:
    """Check a completed handshake and collect its keys."""
    version = conn.get_protocol_version_name()
    cipher = conn.get_cipher_name() or ""
    group = conn.get_group_name() or ""
    if version != "TLSv1.3":
        return failed(errno.EIO, f"negotiated {version}, not TLSv1.3")
    if cipher not in ktls.SUITES:
        return failed(errno.EIO, f"negotiated {cipher}, not kTLS-capable")
    pending = conn.pending()
    if pending:
        return failed(errno.EIO, f"OpenSSL holds {pending} unread bytes")
    client = s.secrets.get("CLIENT_TRAFFIC_SECRET_0")
    srv = s.secrets.get("SERVER_TRAFFIC_SECRET_0")
    if client is None or srv is None:
        return failed(errno.EIO, "traffic secrets missing from the keylog")
    if s.tx_records is None or s.rx_records is None:
        return failed(errno.EIO, "Finished messages were not seen")
    mine, theirs = (srv, client) if server else (client, srv)
    peer = conn.get_peer_certificate()
    server_cert = conn.get_certificate() if server else peer
    remote_auth: tuple[int, ...] = ()
    if server and peer is not None and s.verify_failure is None:
        remote_auth = (uapi.TLS_X509_PEERID,)
    # A session-reuse PSK authenticated it: no certificate was sent.
    reused = sslbind.session_reused(conn)
    server_scheme, client_scheme = (
        (s.own_scheme, s.peer_scheme) if server
        else (s.peer_scheme, s.own_scheme))
    # Each certificate's texts once (a DER conversion and a lookup each).
    server_texts = cert_texts(server_cert)
    client_cert = peer if server else conn.get_certificate()
    client_texts = cert_texts(client_cert) if client_cert is not None else None
    peer_texts = client_texts if server else server_texts
    signer = _signer(server_texts, server_scheme)
    if client_texts is not None and client_scheme is not None:
        signer += "; client " + _signer(client_texts, client_scheme)
    description = (
        f"(TLS1.3)-({group})-({signer})"
        f"-({_CIPHER_SHORT.get(cipher, cipher)})"
    )
    return Outcome(
        status=0,
        remote_auth=remote_auth,
        cipher=cipher,
        group=group,
        description=description,
        peer_subject=peer_texts[1] if peer_texts is not None else None,
        tx=TrafficKeys(cipher, mine, s.tx_records),
        rx=TrafficKeys(cipher, theirs, s.rx_records),
        cert_kind="" if reused or server_cert is None else _kind(server_texts),
        signature=scheme_name(server_scheme),
    )


def _kind(texts: tuple[str, str | None]) -> str:
    """tlscreds.KIND_* of a certificate, from its cert_texts()."""
    if texts[0].startswith(tlscreds.ML_DSA_PREFIX):
        return tlscreds.KIND_ML_DSA
    return tlscreds.KIND_CLASSICAL


def scheme_name(scheme: int | None) -> str:
    """The IANA name of a TLS SignatureScheme, for the logs."""
    if scheme is None:
        return ""
    return _SCHEMES.get(scheme, f"0x{scheme:04x}")


def _signer(texts: tuple[str, str | None], scheme: int | None) -> str:
    """"<key description>, <signature scheme>" of one end, from its
    certificate's cert_texts()."""
    text = texts[0]
    return f"{text}, {scheme_name(scheme)}" if scheme is not None else text


def _alert_text(code: int) -> str:
    return f"{_ALERT_NAMES.get(code, 'alert')} ({code})"


def _ssl_error_text(exc: SSL.Error) -> str:
    parts = []
    for item in exc.args[0] if exc.args else ():
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
        else:
            parts.append(str(item))
    return "; ".join(p for p in parts if p) or type(exc).__name__


def classify(s: HandshakeState, exc: BaseException) -> Outcome:
    """Map a failed handshake to tlshd's errno conventions."""
    if isinstance(exc, DeadlineExpired):
        return failed(errno.ETIMEDOUT, "handshake deadline expired")
    if s.verify_failure is not None:
        return failed(errno.EACCES, s.verify_failure)
    if s.alert_received is not None:
        code = s.alert_received
        if code == _ALERT_UNKNOWN_PSK_IDENTITY:
            return failed(
                errno.EKEYREJECTED,
                f"peer rejected the PSK identity: alert {_alert_text(code)}",
            )
        if code == _ALERT_CLOSE_NOTIFY:
            return failed(
                errno.ETIMEDOUT,
                "peer closed the connection during the handshake"
                " (close_notify)",
            )
        return failed(errno.EACCES, f"peer sent alert {_alert_text(code)}")
    if isinstance(exc, SSL.SysCallError):
        code, text = (*exc.args, None, "")[:2]
        if code == -1 or code in _NETWORK_ERRNOS:
            return failed(
                errno.ETIMEDOUT,
                f"peer closed the connection during the handshake ({text})",
            )
        return failed(errno.EIO, f"socket error during the handshake: {text}")
    if isinstance(exc, SSL.Error):
        text = _ssl_error_text(exc)
        if "unexpected eof" in text:
            return failed(
                errno.ETIMEDOUT, f"peer closed the connection ({text})"
            )
        if s.alert_sent is not None:
            text += f"; sent alert {_alert_text(s.alert_sent)}"
        return failed(errno.EACCES, f"TLS handshake failed: {text}")
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return failed(errno.ETIMEDOUT, f"network error: {exc}")
    return failed(errno.EIO, f"local error: {exc}")
