"""Post-quantum (ML-DSA) certificates next to classical ones.

Both pairs of a role sit on one OpenSSL context, one per key type, each
with its own chain.  These tests pin how OpenSSL then chooses (by the
peer's signature algorithms, in the peer's order of preference) in both
roles, against our own engine and plain pyOpenSSL peers restricted with
SSL_CTX_set1_sigalgs_list; and that ML-DSA chains, mixed ones included,
are verified by the same rules as classical ones.
"""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib
from pqpki import DAY, Pair, PqPki

from tlshd.shared import config
from tlshd.shared.config import RoleConfig
from tlshd.shared.uapi import TLS_X509_PEERID
from tlshd.worker.tlsengine import CredentialError, Engine, Outcome

CLASSICAL_ONLY = b"ecdsa_secp256r1_sha256:rsa_pss_rsae_sha256:ed25519"


class Certs:
    """An ML-DSA CA and a P-256 CA, both trusted, with dual leaves."""

    def __init__(self, root: Path) -> None:
        self.p = PqPki(root)
        self.pq_ca = self.p.ca("pq-ca", pq=True)
        self.ec_ca = self.p.ca("ec-ca", pq=False)
        self.trust = self.p.bundle("trust", self.pq_ca, self.ec_ca)
        self.server_pq = self.p.leaf("server-pq", self.pq_ca, pq=True)
        self.server_ec = self.p.leaf("server-ec", self.ec_ca, pq=False)
        self.client_pq = self.p.leaf("client-pq", self.pq_ca, pq=True)
        self.client_ec = self.p.leaf("client-ec", self.ec_ca, pq=False)

    def role(self, classical: Pair | None, pq: Pair | None,
             **kw: Any) -> RoleConfig:
        values: dict[str, Any] = {"truststore": str(self.trust)}
        if classical is not None:
            values.update(certificate=str(classical.cert),
                          private_key=str(classical.key))
        if pq is not None:
            values.update(pq_certificate=str(pq.cert),
                          pq_private_key=str(pq.key))
        values.update(kw)
        return RoleConfig(**values)

    def engine(self) -> Engine:
        """Dual certificates in both roles."""
        return Engine(self.role(self.client_ec, self.client_pq),
                      self.role(self.server_ec, self.server_pq))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pq"))


@pytest.fixture(scope="module")
def dual(certs: Certs) -> Engine:
    return certs.engine()


def plain_context(certs: Certs, *, server: bool,
                  sigalgs: bytes | None = None,
                  identity: Pair | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server
                      else SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(certs.trust))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    if sigalgs is not None:
        assert lib.SSL_CTX_set1_sigalgs_list(ctx._context, sigalgs) == 1
    if identity is not None:
        ctx.use_certificate_chain_file(str(identity.cert))
        ctx.use_privatekey_file(str(identity.key))
    return ctx


def against_plain_client(eng: Engine, ctx: SSL.Context) -> tuple[
        Outcome, str]:
    """Our server against a plain client: (outcome, server subject the
    client saw)."""
    a, b = socket.socketpair()
    seen: dict[str, Any] = {}

    def client() -> None:
        conn = SSL.Connection(ctx, b)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        try:
            conn.do_handshake()
            cert = conn.get_peer_certificate(as_cryptography=True)
            seen["subject"] = cert.subject.rfc4514_string() if cert else ""
        except SSL.Error as exc:
            seen["subject"] = f"failed: {exc}"
            b.shutdown(socket.SHUT_RDWR)

    t = threading.Thread(target=client)
    t.start()
    with a, b:
        out = eng.server_handshake(a, x509=None,
                                   deadline=time.monotonic() + 10)
        t.join(10)
    return out, seen["subject"]


def against_plain_server(eng: Engine, ctx: SSL.Context) -> tuple[
        Outcome, str]:
    """Our mTLS client against a plain server that asks for a client
    certificate: (outcome, client subject the server saw)."""
    a, b = socket.socketpair()
    seen: dict[str, Any] = {}
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                   lambda *a: bool(a[-1]))

    def server() -> None:
        conn = SSL.Connection(ctx, b)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            cert = conn.get_peer_certificate(as_cryptography=True)
            seen["subject"] = cert.subject.rfc4514_string() if cert else ""
        except SSL.Error as exc:
            seen["subject"] = f"failed: {exc}"

    t = threading.Thread(target=server)
    t.start()
    with a, b:
        out = eng.client_handshake(a, peername="localhost",
                                   use_certificate=True,
                                   deadline=time.monotonic() + 10)
        t.join(10)
    return out, seen["subject"]


# -- the server's choice ---------------------------------------------------

def test_engines_with_dual_certificates_use_ml_dsa_both_ways(
        dual: Engine, run_pair: Any) -> None:
    pair = run_pair(dual, dual, use_certificate=True)
    assert pair.client.status == 0, pair.client.reason
    assert pair.server.status == 0, pair.server.reason
    assert pair.client.peer_subject == "CN=server-pq"
    assert pair.server.peer_subject == "CN=client-pq"
    assert pair.server.remote_auth == (TLS_X509_PEERID,)
    for out in (pair.client, pair.server):
        assert (out.cert_kind, out.signature) == ("ml-dsa", "mldsa65")
        assert out.description == (
            f"(TLS1.3)-({out.group})-(ML-DSA-65, mldsa65; client"
            " ML-DSA-65, mldsa65)-(AES-256-GCM)")


@pytest.mark.parametrize(("sigalgs", "subject", "kind", "scheme"), [
    # OpenSSL's default list names ML-DSA first.
    (None, "CN=server-pq", "ml-dsa", "mldsa65"),
    (b"mldsa65", "CN=server-pq", "ml-dsa", "mldsa65"),
    (b"mldsa65:" + CLASSICAL_ONLY, "CN=server-pq", "ml-dsa", "mldsa65"),
    (CLASSICAL_ONLY, "CN=server-ec", "classical", "ecdsa_secp256r1_sha256"),
    # ML-DSA, but not the parameter set of our key.
    (b"mldsa44:mldsa87:" + CLASSICAL_ONLY, "CN=server-ec", "classical",
     "ecdsa_secp256r1_sha256"),
    # OpenSSL follows the client's order of preference: a client that
    # prefers ECDSA gets the classical certificate.
    (CLASSICAL_ONLY + b":mldsa65", "CN=server-ec", "classical",
     "ecdsa_secp256r1_sha256"),
])
def test_server_presents_ml_dsa_only_to_clients_that_take_it(
        certs: Certs, dual: Engine, sigalgs: bytes | None, subject: str,
        kind: str, scheme: str) -> None:
    ctx = plain_context(certs, server=False, sigalgs=sigalgs)
    out, seen = against_plain_client(dual, ctx)
    assert out.status == 0, out.reason
    assert seen == subject
    assert (out.cert_kind, out.signature) == (kind, scheme)


def test_each_certificate_goes_with_its_own_chain(
        certs: Certs, dual: Engine) -> None:
    """Each leaf is sent with its own CA only, not with the other
    pair's (a chain added to the context would go with both)."""
    for sigalgs, ca in ((None, certs.pq_ca), (CLASSICAL_ONLY, certs.ec_ca)):
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_verify(SSL.VERIFY_NONE)
        if sigalgs is not None:
            assert lib.SSL_CTX_set1_sigalgs_list(ctx._context, sigalgs)
        chains: list[list[str]] = []
        a, b = socket.socketpair()

        def client(ctx: SSL.Context = ctx, b: socket.socket = b,
                   chains: list[list[str]] = chains) -> None:
            conn = SSL.Connection(ctx, b)
            conn.set_connect_state()
            conn.do_handshake()
            chain = conn.get_peer_cert_chain(as_cryptography=True) or []
            chains.append([c.subject.rfc4514_string() for c in chain])

        t = threading.Thread(target=client)
        t.start()
        with a, b:
            out = dual.server_handshake(a, x509=None,
                                        deadline=time.monotonic() + 10)
            t.join(10)
        assert out.status == 0, out.reason
        assert chains[0][1:] == [ca.cert.subject.rfc4514_string()]


def test_ml_dsa_only_server_refuses_a_classical_client(
        certs: Certs) -> None:
    eng = Engine(certs.role(None, None),
                 certs.role(None, certs.server_pq))
    out, seen = against_plain_client(
        eng, plain_context(certs, server=False, sigalgs=CLASSICAL_ONLY))
    assert out.status == errno.EACCES
    assert seen.startswith("failed")
    out, seen = against_plain_client(
        eng, plain_context(certs, server=False))
    assert out.status == 0 and seen == "CN=server-pq"


# -- the client's choice ---------------------------------------------------

@pytest.mark.parametrize(("sigalgs", "subject", "scheme"), [
    (None, "CN=client-pq", "mldsa65"),
    (CLASSICAL_ONLY, "CN=client-ec", "ecdsa_secp256r1_sha256"),
    # The server's CertificateRequest order decides: ECDSA first.
    (CLASSICAL_ONLY + b":mldsa65", "CN=client-ec",
     "ecdsa_secp256r1_sha256"),
])
def test_client_presents_ml_dsa_only_if_the_request_allows_it(
        certs: Certs, dual: Engine, sigalgs: bytes | None, subject: str,
        scheme: str) -> None:
    ctx = plain_context(certs, server=True, sigalgs=sigalgs,
                        identity=certs.server_ec)
    out, seen = against_plain_server(dual, ctx)
    assert out.status == 0, out.reason
    assert seen == subject
    key = "ML-DSA-65" if "pq" in subject else "ECDSA-SECP256R1"
    assert out.description.endswith(f"; client {key}, {scheme})"
                                    "-(AES-256-GCM)")
    assert out.cert_kind == "classical"  # the server's certificate


# -- verification of ML-DSA and mixed chains --------------------------------

@pytest.fixture(scope="module")
def chains(certs: Certs) -> dict[str, Pair]:
    p = certs.p
    return {
        "pq-under-ec": p.leaf("pq-under-ec", certs.ec_ca, pq=True),
        "ec-under-pq": p.leaf("ec-under-pq", certs.pq_ca, pq=False),
        "pq-expired": p.leaf("pq-expired", certs.pq_ca, pq=True,
                             not_after=-DAY),
        "pq-wrong-name": p.leaf("pq-wrong-name", certs.pq_ca, pq=True,
                                dns="other.example"),
        "pq-untrusted": p.leaf("pq-untrusted",
                               p.ca("pq-other-ca", pq=True), pq=True),
    }


def _client_sees(certs: Certs, server: RoleConfig, client: RoleConfig,
                 run_pair: Callable[..., Any], peername: str = "localhost"
                 ) -> tuple[Outcome, Outcome]:
    pair = run_pair(Engine(client, certs.role(None, None)),
                    Engine(certs.role(None, None), server),
                    peername=peername)
    return pair.client, pair.server


@pytest.mark.parametrize("name", ["pq-under-ec", "ec-under-pq"])
def test_mixed_chains_verify(certs: Certs, chains: dict[str, Pair],
                             run_pair: Any, name: str) -> None:
    leaf = chains[name]
    server = (certs.role(None, leaf) if name.startswith("pq")
              else certs.role(leaf, None))
    client, _ = _client_sees(certs, server, certs.role(None, None),
                             run_pair)
    assert client.status == 0, client.reason
    assert client.peer_subject == f"CN={name}"


@pytest.mark.parametrize(("name", "peername", "why"), [
    ("pq-expired", "localhost", "err=10"),
    ("pq-wrong-name", "localhost", "err=62"),
    ("pq-untrusted", "localhost", "err=19"),  # its CA is sent, untrusted
    ("pq-under-ec", "127.0.0.2", "err=64"),
])
def test_bad_ml_dsa_chains_are_refused(
        certs: Certs, chains: dict[str, Pair], run_pair: Any, name: str,
        peername: str, why: str) -> None:
    server = certs.role(None, chains[name])
    client, _ = _client_sees(certs, server, certs.role(None, None),
                             run_pair, peername=peername)
    assert client.status == errno.EACCES
    assert why in client.reason


def test_revoked_ml_dsa_leaf_is_refused(certs: Certs, run_pair: Any
                                        ) -> None:
    leaf = certs.p.leaf("pq-revoked", certs.pq_ca, pq=True)
    crl = certs.p.crl("pq-ca", certs.pq_ca, (leaf.serial,))
    server = certs.role(None, leaf)
    client, _ = _client_sees(certs, server,
                             certs.role(None, None, crl=str(crl)), run_pair)
    assert client.status == errno.EACCES
    assert "err=23" in client.reason  # certificate revoked
    # Not revoked: the same CRL lets the others through.
    client, _ = _client_sees(certs, certs.role(None, certs.server_pq),
                             certs.role(None, None, crl=str(crl)), run_pair)
    assert client.status == 0, client.reason


def test_server_verifies_an_ml_dsa_client_chain(
        certs: Certs, chains: dict[str, Pair], run_pair: Any) -> None:
    client_role = certs.role(None, chains["pq-untrusted"])
    eng_c = Engine(client_role, certs.role(None, None))
    eng_s = Engine(certs.role(None, None),
                   certs.role(certs.server_ec, None))
    pair = run_pair(eng_c, eng_s, use_certificate=True)
    assert pair.server.status == errno.EACCES
    assert "err=19" in pair.server.reason  # its own CA, untrusted


# -- configuration ---------------------------------------------------------

def test_a_classical_key_in_the_pq_slot_is_skipped_loudly(
        certs: Certs, caplog: pytest.LogCaptureFixture, run_pair: Any
) -> None:
    with caplog.at_level(logging.ERROR):
        eng = Engine(certs.role(None, None),
                     certs.role(certs.server_ec, certs.client_ec))
    assert any("not ML-DSA: IGNORED" in r.getMessage()
               and r.levelno == logging.ERROR for r in caplog.records)
    pair = run_pair(Engine(certs.role(None, None), certs.role(None, None)),
                    eng)
    assert pair.client.peer_subject == "CN=server-ec"


def test_a_mismatched_pq_pair_is_a_credential_error(certs: Certs) -> None:
    bad = Pair(certs.server_pq.cert, certs.client_pq.key, 0)
    with pytest.raises(CredentialError, match="does not match"):
        Engine(certs.role(None, None), certs.role(certs.server_ec, bad))
    with pytest.raises(CredentialError, match="set together"):
        Engine(certs.role(None, None),
               certs.role(None, None,
                          pq_certificate=str(certs.server_pq.cert)))


def test_config_reads_the_pq_keys_without_warning(tmp_path: Path) -> None:
    cfg = config.parse(
        "[authenticate.server]\n"
        "x509.pq.certificate=/etc/tlshd/pq.pem\n"
        "x509.pq.private_key=/etc/tlshd/pq.key\n", "/etc/t")
    assert cfg.warnings == ()
    assert cfg.server.pq_certificate == "/etc/tlshd/pq.pem"
    assert cfg.server.pq_private_key == "/etc/tlshd/pq.key"
    with pytest.raises(config.ConfigError, match="absolute"):
        config.parse("[authenticate.client]\nx509.pq.certificate=pq.pem\n")


# -- tlshd --check-config ----------------------------------------------------

def check_config(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlshd.supervisor", "--check-config", "-c",
         str(conf)], capture_output=True, text=True, timeout=120,
        check=False)


def _config(tmp_path: Path, certs: Certs, pq: Pair) -> Path:
    conf = tmp_path / "config"
    conf.write_text(
        "[sandbox]\nuser=nobody\n[authenticate.server]\n"
        f"x509.truststore={certs.trust}\n"
        f"x509.certificate={certs.server_ec.cert}\n"
        f"x509.private_key={certs.server_ec.key}\n"
        f"x509.pq.certificate={pq.cert}\n"
        f"x509.pq.private_key={pq.key}\n")
    return conf


def test_check_config_accepts_a_dual_pair(tmp_path: Path,
                                          certs: Certs) -> None:
    r = check_config(_config(tmp_path, certs, certs.server_pq))
    assert r.returncode == 0, r.stdout + r.stderr
    # (Only warnings: the test files are under /tmp.)
    assert "1 configuration file(s) checked, 0 with problems" in r.stdout
    assert "ML-DSA" not in r.stdout


def test_check_config_flags_a_classical_pq_pair(tmp_path: Path,
                                                certs: Certs) -> None:
    conf = _config(tmp_path, certs, certs.client_ec)
    r = check_config(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"{conf}:7: [authenticate.server] x509.pq.certificate "
            f"{certs.client_ec.cert} has a EC key, not ML-DSA: tlshd "
            "ignores this pair") in r.stdout
    # The worker that loads it says what the daemon will do.
    assert "not ML-DSA: IGNORED" in r.stdout


def test_check_config_flags_a_mismatched_pq_pair(tmp_path: Path,
                                                 certs: Certs) -> None:
    bad = Pair(certs.server_pq.cert, certs.client_pq.key, 0)
    r = check_config(_config(tmp_path, certs, bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "does not match the certificate" in r.stdout
