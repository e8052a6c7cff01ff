"""Trust stores, CRLs and peer-name checks for the TLS engine.

Everything here runs either at configuration load (reading files, before
the sandbox) or inside a handshake on peer-controlled data (formatting a
verification failure); the latter touches no files and needs no
privileges.

Trust anchors are always loaded eagerly from a bundle *file*: OpenSSL
consults a hashed CA *directory* lazily during verification, which would
open files from inside the sandbox.
"""

from __future__ import annotations

# IDNA peer names need these codecs: load them now, not on first use
# inside a handshake (the worker is sandboxed by then).
import encodings.idna
import encodings.punycode  # noqa: F401
import ipaddress
import os
import re
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL, crypto

from tlshd.worker import sslbind

# Bundle files of the common distributions, tried in order when no trust
# store is configured. SSL_CERT_FILE, if set, comes first.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Gentoo, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+
    "/etc/ssl/cert.pem",  # Alpine
)

_CERT_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----")
_CRL_PEM = re.compile(
    rb"-----BEGIN X509 CRL-----\r?\n.+?\r?\n-----END X509 CRL-----", re.S
)


# What cryptography raises for certificate or CRL bytes it cannot parse: a
# bad encoding, or (found by fuzzing) a version field out of range.
BAD_CERT = (ValueError, x509.InvalidVersion)


class EngineError(Exception):
    """The TLS engine cannot be set up as configured."""


class CredentialError(EngineError):
    """A configured credential file cannot be used; the message names it."""


def read_file(path: str, what: str) -> bytes:
    """Return the contents of ``path``, or raise CredentialError."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CredentialError(f"cannot read {what} {path}: {reason}") from exc


def load_pem_certificates(path: str, what: str) -> list[x509.Certificate]:
    """Parse every certificate in a PEM file; at least one is required."""
    data = read_file(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except BAD_CERT as exc:
        raise CredentialError(
            f"{what} {path} holds no valid PEM certificate: {exc}"
        ) from exc
    return certs


def system_bundle() -> str | None:
    """Return the first existing system CA bundle file, or None."""
    candidates = [os.environ.get("SSL_CERT_FILE", ""), *SYSTEM_BUNDLES]
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    return None


def load_trust(ctx: SSL.Context, truststore: str | None) -> int:
    """Add trust anchors to ``ctx``; return how many were loaded.

    ``truststore`` None means the system bundle; a missing system bundle
    leaves the store empty (every verification then fails with "unable to
    get local issuer certificate") rather than failing the configuration
    of a role that may never be used. The file is parsed by OpenSSL, which
    skips nothing and, unlike cryptography, still accepts the odd legacy
    root in distribution bundles (e.g. a non-positive serial number).
    """
    path = truststore if truststore is not None else system_bundle()
    if path is None:
        return 0
    data = read_file(path, "trust store")
    count = len(_CERT_PEM.findall(data))
    if count == 0:
        raise CredentialError(f"trust store {path} holds no PEM certificate")
    try:
        ctx.load_verify_locations(path)
    except SSL.Error as exc:
        raise CredentialError(f"trust store {path}: {exc}") from exc
    return count


def load_crl(ctx: SSL.Context, path: str) -> int:
    """Add every CRL in PEM file ``path`` and enable leaf CRL checking."""
    data = read_file(path, "CRL file")
    blocks = _CRL_PEM.findall(data)
    if not blocks:
        raise CredentialError(f"CRL file {path} holds no PEM CRL")
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover
        raise CredentialError("OpenSSL context has no certificate store")
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
            # OpenSSL re-parses the CRL here and may refuse what
            # cryptography took (a bad string type; found by fuzzing).
            store.add_crl(crl)
        except (*BAD_CERT, crypto.Error) as exc:
            raise CredentialError(f"CRL file {path}: {exc}") from exc
    store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    return len(blocks)


@dataclass(frozen=True)
class PeerName:
    """The name a server certificate must match.

    Exactly one of ``ip`` (packed address) and ``dns`` (ASCII A-label
    form) is set. ``dns`` is also what goes into SNI; an IP literal is
    never sent as SNI (RFC 6066 section 3).
    """

    text: str
    ip: bytes | None = None
    dns: bytes | None = None


def parse_peername(peername: str) -> PeerName:
    """Classify a kernel-supplied peer name; ValueError if unusable."""
    text = peername.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return PeerName(text=peername, ip=addr.packed)
    name = text.rstrip(".") if text.endswith(".") else text
    if not name or len(name) > 253 or "\x00" in name:
        raise ValueError(f"peer name {peername!r} is not a host name")
    try:
        dns = name.encode("ascii")
    except UnicodeEncodeError:
        try:
            dns = name.encode("idna")
        except UnicodeError as exc:
            raise ValueError(
                f"peer name {peername!r} is not a valid IDNA name"
            ) from exc
    return PeerName(text=peername, dns=dns.lower())


def set_expected_name(conn: SSL.Connection, name: PeerName) -> None:
    """Bind certificate verification (and SNI for DNS) to ``name``."""
    if name.ip is not None:
        sslbind.set_expected_ip(conn, name.ip)
    elif name.dns is not None:
        sslbind.set_expected_host(conn, name.dns)
        conn.set_tlsext_host_name(name.dns)


def subject_text(cert: crypto.X509 | None) -> str | None:
    """Return an RFC 4514 subject string for logs, or None."""
    if cert is None:
        return None
    try:
        return cert.to_cryptography().subject.rfc4514_string()
    except ValueError:
        return "(unparsable subject)"


def describe_failure(cert: crypto.X509, errnum: int, depth: int) -> str:
    """Format one verification error like a tlshd log line."""
    return (
        f"certificate verify failed: depth={depth} err={errnum}"
        f" ({sslbind.verify_error_string(errnum)})"
        f" subject={subject_text(cert)}"
    )
