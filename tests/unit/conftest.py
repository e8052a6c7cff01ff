"""Shared fixtures for the unit tests: OpenSSL set-up, a throwaway PKI,
and a helper that runs both ends of a handshake over loopback TCP.

OpenSSL reads OPENSSL_CONF once, when cryptography is first imported, and
the worker's file (NumTickets = 0) is what makes the engine's sequence
numbers right. So this conftest points the variable at it before any test
module imports OpenSSL. (When the whole tree is collected, a conftest of
another folder may import cryptography first; the engine then refuses to
start with an explicit EngineError instead of computing wrong keys.)

Helper modules in this folder (``recordlayer``) are imported by name: the
folder is put on ``sys.path`` here, since ``tests/`` is not a package.
"""

from __future__ import annotations

import os
import sys

from tlshd.worker import sslconf

if not sslconf.openssl_initialised():
    sslconf.use_worker_config()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datetime
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlshd.shared.config import RoleConfig
from tlshd.worker.tlsengine import Engine, Outcome

DAY = datetime.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Leaf:
    """A certificate and key on disk (PEM) and in memory (DER)."""

    cert: Path
    key: Path
    cert_der: bytes
    key_der: bytes
    serial: int

    @property
    def der_pair(self) -> tuple[bytes, bytes]:
        return (self.cert_der, self.key_der)


@dataclass
class CA:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: Path


@dataclass
class PKI:
    """Throwaway CAs and leaves, all P-256, written under ``root``."""

    root: Path
    cas: dict[str, CA] = field(default_factory=dict)

    def ca(self, name: str) -> CA:
        if name not in self.cas:
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.datetime.now(datetime.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(_name(f"Test CA {name}"))
                .issuer_name(_name(f"Test CA {name}"))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - DAY)
                .not_valid_after(now + 30 * DAY)
                .add_extension(
                    x509.BasicConstraints(ca=True, path_length=None), True
                )
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    True,
                )
                .sign(key, hashes.SHA256())
            )
            pem = self.root / f"ca-{name}.pem"
            pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            self.cas[name] = CA(name, key, cert, pem)
        return self.cas[name]

    def leaf(
        self,
        stem: str,
        *,
        ca: str = "main",
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
        not_before: datetime.timedelta = -DAY,
        not_after: datetime.timedelta = 30 * DAY,
        client: bool = False,
    ) -> Leaf:
        issuer = self.ca(ca)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usage = (
            ExtendedKeyUsageOID.CLIENT_AUTH
            if client
            else (ExtendedKeyUsageOID.SERVER_AUTH)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(issuer.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now + not_before)
            .not_valid_after(now + not_after)
            .add_extension(x509.ExtendedKeyUsage([usage]), False)
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(sans), False
            )
        cert = builder.sign(issuer.key, hashes.SHA256())
        cert_path = self.root / f"{stem}.pem"
        key_path = self.root / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Leaf(
            cert=cert_path,
            key=key_path,
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            key_der=key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
            serial=serial,
        )

    def crl(
        self, stem: str, revoked: tuple[int, ...], ca: str = "main"
    ) -> Path:
        issuer = self.ca(ca)
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(now - DAY)
            .next_update(now + 7 * DAY)
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - DAY)
                .build()
            )
        crl = builder.sign(issuer.key, hashes.SHA256())
        path = self.root / f"{stem}.crl.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path


@dataclass
class StdPKI:
    """The certificates most tests share."""

    pki: PKI
    ca: Path
    server: Leaf
    client: Leaf

    def settings(self, **kw: Any) -> RoleConfig:
        """Settings trusting the main CA with the server leaf as identity."""
        base: dict[str, Any] = {
            "truststore": str(self.ca),
            "certificate": str(self.server.cert),
            "private_key": str(self.server.key),
        }
        base.update(kw)
        return RoleConfig(**base)

    def client_settings(self, **kw: Any) -> RoleConfig:
        base: dict[str, Any] = {
            "truststore": str(self.ca),
            "certificate": str(self.client.cert),
            "private_key": str(self.client.key),
        }
        base.update(kw)
        return RoleConfig(**base)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> StdPKI:
    p = PKI(tmp_path_factory.mktemp("pki"))
    ca = p.ca("main").pem
    server = p.leaf("server", dns=("localhost", "server.example"))
    client = p.leaf(
        "client.example", dns=("client.example",), ips=(), client=True
    )
    return StdPKI(p, ca, server, client)


@pytest.fixture(scope="session")
def engine(pki: StdPKI) -> Engine:
    """Client presents client.example; server presents localhost."""
    return Engine(pki.client_settings(), pki.settings())


def listening_socket() -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    return ls


@dataclass
class Pair:
    client: Outcome
    server: Outcome
    csock: socket.socket
    ssock: socket.socket


class Runner:
    """Run an engine client against an engine server on loopback TCP."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    def __call__(
        self,
        client_engine: Engine,
        server_engine: Engine,
        *,
        timeout: float = 10.0,
        server_kw: dict[str, Any] | None = None,
        **client_kw: Any,
    ) -> Pair:
        ls = listening_socket()
        csock = socket.create_connection(ls.getsockname())
        ssock, _ = ls.accept()
        ls.close()
        self.sockets += [csock, ssock]
        client_kw.setdefault("peername", "localhost")
        client_kw.setdefault("use_certificate", False)
        client_kw.setdefault("x509", None)
        result: dict[str, Outcome] = {}

        def serve() -> None:
            result["server"] = server_engine.server_handshake(
                ssock,
                deadline=time.monotonic() + timeout,
                **(server_kw or {"x509": None}),
            )

        thread = threading.Thread(target=serve)
        thread.start()
        client = client_engine.client_handshake(
            csock, deadline=time.monotonic() + timeout, **client_kw
        )
        if client.status:
            # The server may wait for a Finished that never comes.
            csock.shutdown(socket.SHUT_RDWR)
        thread.join(timeout + 5)
        assert not thread.is_alive()
        return Pair(client, result["server"], csock, ssock)

    def close(self) -> None:
        for s in self.sockets:
            s.close()


@pytest.fixture
def run_pair() -> Iterator[Runner]:
    runner = Runner()
    yield runner
    runner.close()


# The supervisor fixtures several test modules share (bodies in
# supervisorfakes, which also builds variants of them).
@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback TCP server socket for the tests' client connections."""
    from supervisorfakes import tcp_listener
    yield from tcp_listener()


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Any]:
    """A Supervisor serving one namespace through a fake netlink socket:
    (supervisor, FakeNl, Namespace)."""
    from supervisorfakes import serving
    yield from serving(tmp_path)
