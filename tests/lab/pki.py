"""Throwaway certificates: CAs, leaves and the PEM files tlshd reads.

Keys are P-256 ECDSA (cheap under TCG), or ML-DSA-65 where asked for
(``pq=True``, the post-quantum tests); leaves carry both EKUs so one
certificate serves either end of a handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
Key = ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey


def new_key(pq: bool = False) -> Key:
    if pq:
        return mldsa.MLDSA65PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def digest(key: Key) -> hashes.SHA256 | None:
    """The hash to sign with: none for ML-DSA, which signs the message."""
    if isinstance(key, mldsa.MLDSA65PrivateKey):
        return None
    return hashes.SHA256()


@dataclass
class Issuer:
    name: x509.Name
    key: Key
    cert: x509.Certificate


def make_ca(cn: str, pq: bool = False) -> Issuer:
    key = new_key(pq)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, digest(key))
    )
    return Issuer(name, key, cert)


def make_leaf(
    ca: Issuer,
    cn: str,
    dns: list[str],
    ips: list[str],
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    pq: bool = False,
) -> tuple[x509.Certificate, Key]:
    key = new_key(pq)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                ]
            ),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=False
        )
    return builder.sign(ca.key, digest(ca.key)), key


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_key(path: Path, key: Key) -> None:
    """The private key as unencrypted PKCS#8, readable by root only."""
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.chmod(0o600)


class Pki:
    """Certificates written as PEM files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = make_ca("tlshd-test-ca")
        self.other_ca = make_ca("tlshd-other-ca")
        self.write_ca("ca", self.ca)
        self.write_ca("other-ca", self.other_ca)
        local = (["localhost"], ["127.0.0.1", "::1"])
        self.leaf("server", self.ca, *local)
        self.leaf("client", self.ca, *local)
        self.leaf("untrusted", self.other_ca, *local)
        self.leaf("dns-only", self.ca, ["localhost"], [])
        self.leaf("wrong-name", self.ca, ["other.example"], ["127.0.0.2"])
        self.leaf(
            "expired",
            self.ca,
            *local,
            not_before=NOW - 10 * DAY,
            not_after=NOW - DAY,
        )
        self.leaf(
            "not-yet-valid",
            self.ca,
            *local,
            not_before=NOW + DAY,
            not_after=NOW + 10 * DAY,
        )

    def write_ca(self, name: str, ca: Issuer) -> None:
        write_cert(self.root / ("%s.pem" % name), ca.cert)

    def leaf(
        self,
        name: str,
        ca: Issuer,
        dns: list[str],
        ips: list[str],
        pq: bool = False,
        **kw: datetime.datetime,
    ) -> None:
        cert, key = make_leaf(ca, name, dns, ips, pq=pq, **kw)
        write_cert(self.root / ("%s.pem" % name), cert)
        write_key(self.root / ("%s.key" % name), key)

    def add_pq(self) -> None:
        """ML-DSA-65 CAs and leaves, next to the classical ones:
        pq-ca.pem (and both-ca.pem, trusting it and ca.pem), pq-server
        and pq-client under it, and bad ones: pq-untrusted (under an
        ML-DSA CA nobody trusts), pq-expired, pq-wrong-name; each .pem
        holds the leaf, then its CA.  Sets ``pq_ca``; idempotent."""
        if getattr(self, "pq_ca", None) is not None:
            return
        self.pq_ca = pq_ca = make_ca("tlshd-test-pq-ca", pq=True)
        other = make_ca("tlshd-other-pq-ca", pq=True)
        self.write_ca("pq-ca", pq_ca)
        (self.root / "both-ca.pem").write_bytes(
            (self.root / "ca.pem").read_bytes()
            + (self.root / "pq-ca.pem").read_bytes())
        local = (["localhost"], ["127.0.0.1", "::1"])
        for name, ca, names, kw in (
                ("pq-server", pq_ca, local, {}),
                ("pq-client", pq_ca, local, {}),
                ("pq-untrusted", other, local, {}),
                ("pq-wrong-name", pq_ca, (["other.example"], ["127.0.0.2"]),
                 {}),
                ("pq-expired", pq_ca, local,
                 {"not_before": NOW - 10 * DAY, "not_after": NOW - DAY})):
            self.leaf(name, ca, *names, pq=True, **kw)
            with open(self.root / ("%s.pem" % name), "ab") as f:
                f.write(ca.cert.public_bytes(serialization.Encoding.PEM))

    def path(self, name: str) -> str:
        return str(self.root / name)

    def config(
        self,
        server: str = "server",
        client: str = "client",
        client_ca: str = "ca",
        server_ca: str = "ca",
        extra_client: str = "",
        extra_server: str = "",
        timeout: float | None = None,
        idle_timeout: float | None = 0,
    ) -> str:
        """A main configuration.  ``idle_timeout``: [netns]
        worker_idle_timeout; 0 (the default here, not tlshd's): a worker
        from the start, as most tests want one before their first mount;
        None: no [netns] section (tlshd's default, workers on demand)."""
        lines = ["[debug]", "loglevel=1", "tls=0", "nl=0", "[authenticate]"]
        if timeout is not None:
            lines.append("handshake_timeout=%s" % timeout)
        lines += [
            "[authenticate.client]",
            "x509.truststore=%s" % self.path(client_ca + ".pem"),
        ]
        if client:
            lines += [
                "x509.certificate=%s" % self.path(client + ".pem"),
                "x509.private_key=%s" % self.path(client + ".key"),
            ]
        lines += [
            extra_client,
            "[authenticate.server]",
            "x509.truststore=%s" % self.path(server_ca + ".pem"),
            "x509.certificate=%s" % self.path(server + ".pem"),
            "x509.private_key=%s" % self.path(server + ".key"),
            extra_server,
        ]
        if idle_timeout is not None:
            lines += ["[netns]", "worker_idle_timeout=%s" % idle_timeout]
        return "\n".join(lines) + "\n"


def write_credentials(d: Path, name: str, ips: list[str]) -> Issuer:
    """A CA of its own and a server and a client certificate for
    localhost, 127.0.0.1, ::1 and ``ips``, written to ``d`` as ca.pem,
    server.pem/.key and client.pem/.key; returns the CA."""
    ca = make_ca("ca-%s" % name)
    write_cert(d / "ca.pem", ca.cert)
    for leaf in ("server", "client"):
        cert, key = make_leaf(ca, "%s-%s" % (leaf, name), ["localhost"],
                              ["127.0.0.1", "::1", *ips])
        write_cert(d / ("%s.pem" % leaf), cert)
        write_key(d / ("%s.key" % leaf), key)
    return ca


def authenticate_lines(d: Path) -> list[str]:
    """The [authenticate.client] and [authenticate.server] sections for
    the files write_credentials put in ``d``."""
    lines = []
    for role in ("client", "server"):
        lines += [
            "[authenticate.%s]" % role,
            "x509.truststore=%s" % (d / "ca.pem"),
            "x509.certificate=%s" % (d / ("%s.pem" % role)),
            "x509.private_key=%s" % (d / ("%s.key" % role)),
        ]
    return lines


class NsCreds:
    """A namespace's own CA, server and client certificates, and config."""

    def __init__(self, root: Path, name: str, ips: list[str]) -> None:
        self.name = name
        self.dir = root / "creds" / name
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        self.ca = write_credentials(self.dir, name, ips)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def config(self, extra: str = "") -> str:
        lines = ["[debug]", "loglevel=1", "[authenticate]",
                 *authenticate_lines(self.dir)]
        return "\n".join(lines) + "\n" + extra
