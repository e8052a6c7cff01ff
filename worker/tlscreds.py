"""Certificates and private keys for the TLS engine.

PEM files from the configuration are read once, when the engine is built
(before the sandbox). DER certificates and keys handed over per request
(from kernel key serials) are parsed in memory. Keys are parsed with
cryptography first: it refuses an encrypted key instead of letting OpenSSL
prompt for a passphrase on a terminal, and it reads PKCS#8, PKCS#1 and
SEC1 alike. The key then reaches pyOpenSSL as PKCS#8 DER, which also
covers key types pyOpenSSL cannot convert directly (ML-DSA).

A role may have two configured pairs (ktls-utils 1.3's ``x509.pq.*``): an
ML-DSA one and a classical one. Both go on one context, each in its own
OpenSSL certificate slot (one per key type) with its own chain, and
OpenSSL picks per handshake by the peer's signature algorithms
(docs/security.md, "Post-quantum certificates").
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InternalError, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    ec,
    ed448,
    ed25519,
    mldsa,
    rsa,
)
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from tlshd.shared.config import RoleConfig
from tlshd.worker import verify
from tlshd.worker.verify import (
    CredentialError,
    load_pem_certificates,
    read_file,
)

log = logging.getLogger(__name__)

# The public keys of the certificates x509.pq.certificate may name.
ML_DSA_KEYS = (
    mldsa.MLDSA44PublicKey,
    mldsa.MLDSA65PublicKey,
    mldsa.MLDSA87PublicKey,
)
# Certificate kinds, as the logs and the metrics name them.
KIND_ML_DSA = "ml-dsa"
KIND_CLASSICAL = "classical"
# How key_description begins for an ML-DSA key.
ML_DSA_PREFIX = "ML-DSA-"

# What cryptography raises for key bytes it cannot use: ValueError (not
# DER/PEM), TypeError (encrypted), UnsupportedAlgorithm (unknown key type
# or curve) and, found by fuzzing, InternalError when OpenSSL refuses a
# key it has parsed (an Ed25519 key of the wrong length).
_BAD_KEY = (ValueError, TypeError, UnsupportedAlgorithm, InternalError)

# What pyOpenSSL's use_privatekey accepts without a deprecation warning.
_UsableKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


@dataclass(frozen=True)
class Identity:
    """A certificate chain (leaf first) and the leaf's private key.

    ``key`` is a cryptography key where pyOpenSSL can take one, else a
    PKey loaded from DER (ML-DSA). ``path`` is the PEM file the chain
    came from (None for a kernel-supplied DER certificate).
    """

    chain: tuple[x509.Certificate, ...]
    key: _UsableKey | crypto.PKey
    path: str | None = None

    @property
    def kind(self) -> str:
        """KIND_ML_DSA or KIND_CLASSICAL, by the leaf's key."""
        return certificate_kind(self.chain[0])

    def use_in_context(self, ctx: SSL.Context) -> None:
        """Install this identity as the context's certificate and key."""
        ctx.use_certificate(self.chain[0])
        for extra in self.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(self.key)
        ctx.check_privatekey()

    def add_to_context(self, ctx: SSL.Context) -> None:
        """Add this identity next to others of other key types.

        OpenSSL keeps one certificate per key type; the chain read from
        the file goes with this certificate only (add_extra_chain_cert
        would send it with every one), and is read again by OpenSSL, so
        the key is checked against it once more.
        """
        if self.path is None:
            raise CredentialError("a second identity needs its PEM file")
        ctx.use_certificate_chain_file(self.path)
        ctx.use_privatekey(self.key)
        ctx.check_privatekey()

    def use_in_connection(self, conn: SSL.Connection) -> None:
        """Install this identity on a single connection."""
        conn.use_certificate(self.chain[0])
        conn.use_privatekey(self.key)


def _build(chain: list[x509.Certificate], key: PrivateKeyTypes) -> Identity:
    try:
        cert_key = chain[0].public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        # A key type or curve cryptography does not know (fuzzing).
        raise ValueError(f"the certificate's key is unusable: {exc}") from exc
    if cert_key != key.public_key():
        raise ValueError("the private key does not match the certificate")
    try:
        for cert in chain:
            # pyOpenSSL hands each certificate to OpenSSL, which parses it
            # again and may refuse what cryptography took (an invalid
            # UTF8String; found by fuzzing): fail the load, not the
            # engine's set-up or a handshake.
            crypto.X509.from_cryptography(cert)
    except crypto.Error as exc:
        raise ValueError(f"OpenSSL refused the certificate: {exc}") from exc
    usable: _UsableKey | crypto.PKey
    if isinstance(
        key,
        (
            ec.EllipticCurvePrivateKey,
            rsa.RSAPrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        usable = key
    else:
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        usable = crypto.load_privatekey(crypto.FILETYPE_ASN1, der)
    return Identity(chain=tuple(chain), key=usable)


def load_pem_identity(cert_path: str, key_path: str) -> Identity:
    """Load a PEM chain and PEM key from files; CredentialError if bad."""
    chain = load_pem_certificates(cert_path, "certificate file")
    data = read_file(key_path, "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except _BAD_KEY as exc:
        raise CredentialError(
            f"private key file {key_path} is not a usable unencrypted PEM"
            f" private key: {exc}"
        ) from exc
    try:
        return _with_path(_build(chain, key), cert_path)
    except (ValueError, crypto.Error) as exc:
        raise CredentialError(
            f"private key file {key_path} cannot be used with certificate"
            f" file {cert_path}: {exc}"
        ) from exc


def _with_path(identity: Identity, path: str) -> Identity:
    return Identity(chain=identity.chain, key=identity.key, path=path)


def load_der_identity(cert_der: bytes, key_der: bytes) -> Identity:
    """Parse a DER certificate and DER private key; ValueError if bad."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except verify.BAD_CERT as exc:
        raise ValueError(f"certificate is not valid DER: {exc}") from exc
    try:
        key = serialization.load_der_private_key(key_der, password=None)
    except _BAD_KEY as exc:
        raise ValueError(f"private key is not usable DER: {exc}") from exc
    try:
        return _build([cert], key)
    except crypto.Error as exc:
        raise ValueError(f"OpenSSL rejected the key: {exc}") from exc


def certificate_kind(cert: x509.Certificate) -> str:
    """KIND_ML_DSA if ``cert``'s key is ML-DSA, else KIND_CLASSICAL."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return KIND_CLASSICAL
    return KIND_ML_DSA if isinstance(key, ML_DSA_KEYS) else KIND_CLASSICAL


def key_description(cert: crypto.X509 | None) -> str:
    """Describe a certificate's signature key, e.g. "ECDSA-SECP256R1"."""
    if cert is None:
        return "no certificate"
    try:
        key = cert.to_cryptography().public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA-{key.curve.name.upper()}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-PSS-{key.key_size}"
    if isinstance(key, ML_DSA_KEYS):
        return ML_DSA_PREFIX + type(key).__name__[5:7]
    name = type(key).__name__.removesuffix("PublicKey").lstrip("_")
    return name.upper() or "unknown key"


def ephemeral_identity() -> Identity:
    """Return a throwaway self-signed P-256 identity (for self-tests)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlshd")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(minutes=5))
        .sign(key, hashes.SHA256())
    )
    return _build([cert], key)


def role_identity(role: RoleConfig, name: str) -> Identity | None:
    """The configured certificate and key of one role, if set."""
    return _pair(role.certificate, role.private_key, f"{name} certificate")


def _pair(cert: str | None, key: str | None, what: str) -> Identity | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise CredentialError(
            f"{what} and private key must be set together"
        )
    return load_pem_identity(cert, key)


def role_pq_identity(role: RoleConfig, name: str) -> Identity | None:
    """The role's x509.pq.* pair, if set and ML-DSA.

    Unreadable or mismatched files are a CredentialError, as for the
    classical pair. A pair whose key is not ML-DSA is skipped with an
    error in the log, as ktls-utils does: the classical pair still
    serves every peer.
    """
    pq = _pair(role.pq_certificate, role.pq_private_key,
               f"{name} x509.pq.certificate")
    if pq is None or pq.kind == KIND_ML_DSA:
        return pq
    log.error(
        "%s x509.pq.certificate %s has a %s key, not ML-DSA: IGNORED, no"
        " post-quantum certificate is presented",
        name, role.pq_certificate, key_description(
            crypto.X509.from_cryptography(pq.chain[0])),
    )
    return None


def role_identities(role: RoleConfig, name: str) -> list[Identity]:
    """Every usable configured identity of one role, ML-DSA first."""
    found = [role_pq_identity(role, name), role_identity(role, name)]
    return [i for i in found if i is not None]


def install_identities(ctx: SSL.Context, identities: list[Identity]) -> None:
    """Install one identity, or several of different key types (OpenSSL
    then picks per handshake by the peer's signature algorithms)."""
    for identity in identities:
        try:
            if len(identities) == 1:
                identity.use_in_context(ctx)
            else:
                identity.add_to_context(ctx)
        except SSL.Error as exc:
            raise CredentialError(
                f"{identity.path}: OpenSSL rejected the certificate or"
                f" its key: {exc}"
            ) from exc
