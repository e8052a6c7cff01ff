"""Every failure returns an Outcome with tlshd's errno and a clear reason.

EACCES: verification failures, alerts, protocol errors; ETIMEDOUT: the
deadline, or the peer going away mid-handshake (GnuTLS's premature
termination in ktls-utils); EKEYREJECTED: alert unknown_psk_identity;
EIO: local problems. Engine() raises CredentialError naming the file.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from recordlayer import CT_ALERT, RecordLayer, read_record

from tlshd.shared.config import RoleConfig
from tlshd.worker import verify
from tlshd.worker.tlsengine import (
    CredentialError,
    Engine,
    Outcome,
)

DAY = datetime.timedelta(days=1)


def client_engine(pki: Any, **kw: Any) -> Engine:
    return Engine(pki.client_settings(**kw), pki.settings())


def server_engine_with(pki: Any, leaf: Any, **kw: Any) -> Engine:
    return Engine(
        pki.client_settings(),
        pki.settings(
            certificate=str(leaf.cert), private_key=str(leaf.key), **kw
        ),
    )


# -- server certificate verification on the client ----------------------


@pytest.mark.parametrize(
    ("leaf_kw", "peername", "code", "text"),
    [
        (
            {"ca": "other"},
            "localhost",
            20,
            "unable to get local issuer certificate",
        ),
        ({}, "other.example", 62, "hostname mismatch"),
        ({}, "127.0.0.2", 64, "IP address mismatch"),
        (
            {"not_after": -DAY, "not_before": -2 * DAY},
            "localhost",
            10,
            "certificate has expired",
        ),
        (
            {"not_before": DAY, "not_after": 2 * DAY},
            "localhost",
            9,
            "certificate is not yet valid",
        ),
        (
            {"dns": ("s*.nfs.example",)},
            "server.nfs.example",
            62,
            "hostname mismatch",
        ),
    ],
    ids=[
        "untrusted-ca",
        "wrong-dns",
        "wrong-ip",
        "expired",
        "not-yet-valid",
        "partial-wildcard",
    ],
)
def test_client_rejects_bad_server_certificate(
    pki: Any,
    run_pair: Any,
    leaf_kw: dict[str, Any],
    peername: str,
    code: int,
    text: str,
) -> None:
    stem = "bad-" + "-".join(sorted(leaf_kw)) + peername
    leaf = pki.pki.leaf(stem, **leaf_kw)
    eng = server_engine_with(pki, leaf)
    pair = run_pair(eng, eng, peername=peername)
    assert pair.client.status == errno.EACCES
    assert f"err={code} ({text}" in pair.client.reason
    assert "depth=0" in pair.client.reason
    assert f"subject=CN={stem}" in pair.client.reason
    assert pair.client.tx is None and pair.client.rx is None
    # The server learns of it through the client's alert.
    assert pair.server.status == errno.EACCES
    assert "peer sent alert" in pair.server.reason


@pytest.mark.parametrize(
    "peername",
    ["127.0.0.1", "localhost", "LOCALHOST", "localhost.", "[127.0.0.1]"],
)
def test_client_accepts_matching_names(
    engine: Engine, run_pair: Any, peername: str
) -> None:
    pair = run_pair(engine, engine, peername=peername)
    assert pair.client.status == 0, pair.client.reason


def test_common_name_alone_does_not_match(pki: Any, run_pair: Any) -> None:
    # No SAN, CN=localhost: OpenSSL's CN fallback would have accepted it.
    leaf = pki.pki.leaf("localhost", dns=(), ips=())
    eng = server_engine_with(pki, leaf)
    pair = run_pair(eng, eng, peername="localhost")
    assert pair.client.status == errno.EACCES
    assert "err=62 (hostname mismatch" in pair.client.reason


def test_full_wildcard_matches(pki: Any, run_pair: Any) -> None:
    leaf = pki.pki.leaf("wild", dns=("*.nfs.example",), ips=())
    eng = server_engine_with(pki, leaf)
    pair = run_pair(eng, eng, peername="server.nfs.example")
    assert pair.client.status == 0, pair.client.reason


@pytest.mark.parametrize("peername", [None, ""])
def test_client_without_peer_name_is_refused(
    engine: Engine, peername: str | None
) -> None:
    a, b = socket.socketpair()
    with a, b:
        out = engine.client_handshake(
            a,
            peername=peername,
            x509=None,
            use_certificate=False,
            deadline=time.monotonic() + 5,
        )
        assert out.status == errno.EACCES
        assert "peer name" in out.reason
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing was sent


def test_crl_revokes_server_certificate(pki: Any, run_pair: Any) -> None:
    leaf = pki.pki.leaf("revoked-server")
    crl = pki.pki.crl("revoked-server", (leaf.serial,))
    eng = Engine(
        pki.client_settings(crl=str(crl)),
        pki.settings(certificate=str(leaf.cert), private_key=str(leaf.key)),
    )
    pair = run_pair(eng, eng)
    assert pair.client.status == errno.EACCES
    assert "err=23 (certificate revoked)" in pair.client.reason
    # Without the CRL the same certificate is fine.
    eng2 = server_engine_with(pki, leaf)
    assert run_pair(eng2, eng2).client.status == 0


def test_crl_not_listing_the_certificate(pki: Any, run_pair: Any) -> None:
    crl = pki.pki.crl("nobody", (12345,))
    eng = client_engine(pki, crl=str(crl))
    pair = run_pair(eng, eng)
    assert pair.client.status == 0, pair.client.reason


def test_crl_for_another_issuer_only(pki: Any, run_pair: Any) -> None:
    """Like GnuTLS: an issuer without a CRL in the file is not an error."""
    crl = pki.pki.crl("other-ca", (1,), ca="other")
    eng = client_engine(pki, crl=str(crl))
    pair = run_pair(eng, eng)
    assert pair.client.status == 0, pair.client.reason


# -- client certificate verification on the server -----------------------


def test_server_rejects_untrusted_client_certificate(
    pki: Any, run_pair: Any
) -> None:
    rogue = pki.pki.leaf(
        "rogue-client", ca="other", dns=("rogue",), ips=(), client=True
    )
    eng = Engine(
        pki.client_settings(
            certificate=str(rogue.cert), private_key=str(rogue.key)
        ),
        pki.settings(),
    )
    pair = run_pair(eng, eng, use_certificate=True)
    assert pair.server.status == errno.EACCES
    assert "err=20" in pair.server.reason
    assert "subject=CN=rogue-client" in pair.server.reason
    assert pair.server.remote_auth == ()
    # TLS 1.3: the client's handshake is complete before the server judges
    # its certificate, so the rejection reaches the client after the
    # hand-over, as an alert record at RX seq 0 (what kTLS would report).
    assert pair.client.status == 0
    rx = RecordLayer(pair.client.rx.crypto_info())
    content_type, alert = rx.open(read_record(pair.csock))
    assert (content_type, alert) == (CT_ALERT, bytes([2, 48]))  # unknown_ca


def test_server_rejects_revoked_client_certificate(
    pki: Any, run_pair: Any
) -> None:
    leaf = pki.pki.leaf("revoked-client", dns=("rc",), ips=(), client=True)
    crl = pki.pki.crl("revoked-client", (leaf.serial,))
    eng = Engine(pki.client_settings(), pki.settings(crl=str(crl)))
    pair = run_pair(eng, eng, use_certificate=True, x509=leaf.der_pair)
    assert pair.server.status == errno.EACCES
    assert "certificate revoked" in pair.server.reason


def test_server_rejects_expired_client_certificate(
    pki: Any, run_pair: Any
) -> None:
    leaf = pki.pki.leaf(
        "old-client",
        dns=("oc",),
        ips=(),
        client=True,
        not_before=-3 * DAY,
        not_after=-DAY,
    )
    pair = run_pair(
        *(2 * [Engine(pki.client_settings(), pki.settings())]),
        use_certificate=True,
        x509=leaf.der_pair,
    )
    assert pair.server.status == errno.EACCES
    assert "certificate has expired" in pair.server.reason


def test_server_accepts_client_without_certificate(
    engine: Engine, run_pair: Any
) -> None:
    """Requiring one is the consumer's business (remote_auth is empty)."""
    pair = run_pair(engine, engine, use_certificate=False)
    assert pair.server.status == 0
    assert pair.server.remote_auth == ()


# -- network failures and deadlines --------------------------------------


class FakePeer:
    """A raw TCP peer running ``script(sock)`` in a thread."""

    def __init__(
        self, script: Callable[[socket.socket], None], *, server: bool = True
    ) -> None:
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(1)
        self.script = script
        self.server = server
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ours: socket.socket | None = None

    def _run(self) -> None:
        if self.server:
            s, _ = self.ls.accept()
        else:
            s = socket.create_connection(self.ls.getsockname())
        try:
            self.script(s)
        finally:
            self.done.wait(30)
            s.close()

    def connect(self) -> socket.socket:
        if self.server:
            self.ours = socket.create_connection(self.ls.getsockname())
        else:
            self.ours, _ = self.ls.accept()
        return self.ours

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.ls.close()
        if self.ours is not None:
            self.ours.close()


@pytest.fixture
def fake_peer() -> Iterator[Callable[..., FakePeer]]:
    peers: list[FakePeer] = []

    def make(script: Callable[[socket.socket], None], **kw: Any) -> FakePeer:
        peers.append(FakePeer(script, **kw))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def read_hello(s: socket.socket) -> None:
    s.settimeout(5)
    assert s.recv(65536)[:1] == b"\x16"


def close_after_hello(s: socket.socket) -> None:
    read_hello(s)
    s.close()


def reset_after_hello(s: socket.socket) -> None:
    read_hello(s)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def alert_after_hello(code: int) -> Callable[[socket.socket], None]:
    def script(s: socket.socket) -> None:
        read_hello(s)
        s.sendall(bytes([21, 3, 3, 0, 2, 2, code]))

    return script


def garbage_after_hello(s: socket.socket) -> None:
    read_hello(s)
    s.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def client_run(
    engine: Engine, sock: socket.socket, timeout: float = 5.0
) -> Outcome:
    return engine.client_handshake(
        sock,
        peername="localhost",
        x509=None,
        use_certificate=False,
        deadline=time.monotonic() + timeout,
    )


@pytest.mark.parametrize(
    ("script", "status", "text"),
    [
        (close_after_hello, errno.ETIMEDOUT, "closed the connection"),
        (reset_after_hello, errno.ETIMEDOUT, "ECONNRESET"),
        (alert_after_hello(115), errno.EKEYREJECTED, "unknown_psk_identity"),
        (alert_after_hello(40), errno.EACCES, "handshake_failure (40)"),
        (alert_after_hello(0), errno.ETIMEDOUT, "close_notify"),
        (garbage_after_hello, errno.EACCES, "wrong version number"),
    ],
    ids=[
        "eof",
        "reset",
        "unknown-psk-identity",
        "handshake-failure",
        "close-notify",
        "garbage",
    ],
)
def test_client_peer_failures(
    engine: Engine, fake_peer: Any, script: Any, status: int, text: str
) -> None:
    peer = fake_peer(script)
    out = client_run(engine, peer.connect())
    assert out.status == status, out.reason
    assert text in out.reason
    assert peer.ours.getblocking()


def test_client_silent_peer_times_out(engine: Engine, fake_peer: Any) -> None:
    peer = fake_peer(read_hello)
    start = time.monotonic()
    out = client_run(engine, peer.connect(), timeout=0.5)
    elapsed = time.monotonic() - start
    assert out.status == errno.ETIMEDOUT
    assert "deadline" in out.reason
    assert 0.4 < elapsed < 5


def test_deadline_already_past(engine: Engine) -> None:
    a, b = socket.socketpair()
    with a, b:
        out = engine.server_handshake(
            a, x509=None, deadline=time.monotonic() - 1
        )
        assert out.status == errno.ETIMEDOUT


def partial_hello_then_close(s: socket.socket) -> None:
    s.sendall(bytes([22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3]))
    s.close()


def silent(s: socket.socket) -> None:
    pass


@pytest.mark.parametrize(
    ("script", "status"),
    [
        (lambda s: s.close(), errno.ETIMEDOUT),
        (partial_hello_then_close, errno.ETIMEDOUT),
        (lambda s: s.sendall(b"GET / HTTP/1.0\r\n\r\n"), errno.EACCES),
    ],
    ids=["close", "partial-hello", "http"],
)
def test_server_peer_failures(
    engine: Engine, fake_peer: Any, script: Any, status: int
) -> None:
    peer = fake_peer(script, server=False)
    out = engine.server_handshake(
        peer.connect(), x509=None, deadline=time.monotonic() + 5
    )
    assert out.status == status, out.reason
    assert out.reason


def test_server_silent_peer_times_out(engine: Engine, fake_peer: Any) -> None:
    peer = fake_peer(silent, server=False)
    start = time.monotonic()
    out = engine.server_handshake(
        peer.connect(), x509=None, deadline=time.monotonic() + 0.3
    )
    assert out.status == errno.ETIMEDOUT
    assert time.monotonic() - start < 5


# -- configuration errors --------------------------------------------------


@pytest.fixture
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64!\n")
    return path


def test_missing_key_file(pki: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(CredentialError, match=re.escape(str(missing))) as info:
        Engine(pki.client_settings(), pki.settings(private_key=str(missing)))
    assert "No such file" in str(info.value)


def test_garbage_key_file(pki: Any, garbage: Path) -> None:
    with pytest.raises(CredentialError, match=re.escape(str(garbage))):
        Engine(pki.client_settings(private_key=str(garbage)), pki.settings())


def test_garbage_certificate_file(pki: Any, garbage: Path) -> None:
    with pytest.raises(CredentialError, match=re.escape(str(garbage))):
        Engine(pki.client_settings(), pki.settings(certificate=str(garbage)))


def test_key_certificate_mismatch(pki: Any) -> None:
    with pytest.raises(CredentialError, match="does not match") as info:
        Engine(
            pki.client_settings(),
            pki.settings(private_key=str(pki.client.key)),
        )
    assert str(pki.client.key) in str(info.value)


def test_encrypted_key_is_refused(pki: Any, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), None)
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CredentialError, match=r"enc\.key"):
        Engine(pki.client_settings(), pki.settings(private_key=str(path)))


def test_certificate_without_key(pki: Any) -> None:
    with pytest.raises(CredentialError, match="together"):
        Engine(pki.client_settings(private_key=None), pki.settings())


def test_missing_and_garbage_truststore(
    pki: Any, tmp_path: Path, garbage: Path
) -> None:
    with pytest.raises(CredentialError, match="trust store"):
        Engine(
            pki.client_settings(truststore=str(tmp_path / "no.pem")),
            pki.settings(),
        )
    with pytest.raises(CredentialError, match=re.escape(str(garbage))):
        Engine(pki.client_settings(), pki.settings(truststore=str(garbage)))


def test_bad_crl_file(pki: Any, garbage: Path, tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="CRL"):
        Engine(pki.client_settings(crl=str(garbage)), pki.settings())
    bad = tmp_path / "bad.crl.pem"
    bad.write_bytes(
        b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"
    )
    with pytest.raises(CredentialError, match=r"bad\.crl\.pem"):
        Engine(pki.client_settings(crl=str(bad)), pki.settings())


@pytest.mark.parametrize(
    "suites",
    [
        "TLS_AES_128_CCM_8_SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        " : ",
        "TLS_AES_128_GCM_SHA256:BOGUS",
    ],
)
def test_unusable_ciphersuites(pki: Any, suites: str) -> None:
    with pytest.raises(CredentialError, match="ciphersuites"):
        Engine(pki.client_settings(ciphersuites=suites), pki.settings())


def test_system_trust_when_no_truststore(pki: Any, run_pair: Any) -> None:
    """No truststore: the system bundle (or SSL_CERT_FILE) is used, so
    our private CA is not trusted."""
    eng = Engine(RoleConfig(), pki.settings())
    pair = run_pair(eng, eng)
    assert pair.client.status == errno.EACCES
    # The server completes its chain from its own trust store, so the
    # client sees our CA as an untrusted self-signed root (19).
    assert "err=19 (self-signed certificate in certificate chain)" in (
        pair.client.reason
    )


def test_ssl_cert_file_overrides_system_bundle(
    pki: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    assert verify.system_bundle() == str(pki.ca)


# -- peer names ---------------------------------------------------------


def test_parse_peername() -> None:
    assert verify.parse_peername("192.0.2.1").ip == bytes([192, 0, 2, 1])
    assert verify.parse_peername("[2001:db8::1]").ip == (
        bytes.fromhex("20010db8") + bytes(11) + b"\x01"
    )
    assert verify.parse_peername("fe80::1%eth0").ip is not None
    name = verify.parse_peername("NFS.Example.ORG.")
    assert (name.dns, name.ip) == (b"nfs.example.org", None)
    assert verify.parse_peername("bücher.example").dns == (
        b"xn--bcher-kva.example"
    )
    for bad in ["", ".", "a\x00b", "x" * 300]:
        with pytest.raises(ValueError):
            verify.parse_peername(bad)


# -- the session-ticket guard ---------------------------------------------


def run_engine_in_subprocess(env: dict[str, str], pki: Any) -> str:
    code = (
        "from tlshd.shared.config import RoleConfig\n"
        "from tlshd.worker.tlsengine import Engine\n"
        f"s = RoleConfig(truststore={str(pki.ca)!r})\n"
        "try:\n"
        "    Engine(s, s)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "else:\n"
        "    print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_engine_refuses_to_start_if_tickets_would_be_sent(pki: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    out = run_engine_in_subprocess(env, pki)
    assert out.startswith("EngineError OpenSSL sent 2 TLS 1.3 session")
    assert "OPENSSL_CONF=" in out


def test_engine_starts_with_the_worker_openssl_conf(pki: Any) -> None:
    from tlshd.worker.sslconf import openssl_conf_path

    env = dict(os.environ, OPENSSL_CONF=openssl_conf_path())
    assert run_engine_in_subprocess(env, pki) == "ok"
