"""ML-DSA-65 and P-256 certificates for the post-quantum tests: CAs of
either kind, leaves of either kind under either, and CRLs."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)
Key = ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey


def new_key(pq: bool) -> Key:
    if pq:
        return mldsa.MLDSA65PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _hash(key: Key) -> hashes.SHA256 | None:
    # ML-DSA signs the message itself: no separate digest.
    if isinstance(key, mldsa.MLDSA65PrivateKey):
        return None
    return hashes.SHA256()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Ca:
    key: Key
    cert: x509.Certificate
    pem: Path


@dataclass
class Pair:
    cert: Path  # leaf, then the CA (a full chain file)
    key: Path
    serial: int


class PqPki:
    """Files under ``root``; every leaf names localhost and 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.now = datetime.datetime.now(datetime.UTC)

    def ca(self, name: str, *, pq: bool) -> Ca:
        key = new_key(pq)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - DAY)
            .not_valid_after(self.now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                           True)
            .sign(key, _hash(key))
        )
        pem = self.root / f"{name}.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Ca(key, cert, pem)

    def leaf(self, name: str, ca: Ca, *, pq: bool,
             dns: str = "localhost",
             not_after: datetime.timedelta = 30 * DAY) -> Pair:
        key = new_key(pq)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(self.now - 2 * DAY)
            .not_valid_after(self.now + not_after)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(dns),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.ExtendedKeyUsage([
                ExtendedKeyUsageOID.SERVER_AUTH,
                ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca.key, _hash(ca.key))
        )
        cert_path = self.root / f"{name}.pem"
        key_path = self.root / f"{name}.key"
        cert_path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + ca.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key_path.chmod(0o600)
        return Pair(cert_path, key_path, serial)

    def crl(self, name: str, ca: Ca, revoked: tuple[int, ...]) -> Path:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.cert.subject)
            .last_update(self.now - DAY)
            .next_update(self.now + 7 * DAY)
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(self.now - DAY).build())
        path = self.root / f"{name}.crl.pem"
        path.write_bytes(builder.sign(ca.key, _hash(ca.key)).public_bytes(
            serialization.Encoding.PEM))
        return path

    def bundle(self, name: str, *cas: Ca) -> Path:
        path = self.root / f"{name}.pem"
        path.write_bytes(b"".join(
            c.cert.public_bytes(serialization.Encoding.PEM) for c in cas))
        return path
