"""Host interop of the ML-DSA certificates with Debian trixie's OpenSSL
3.5 command line (``openssl s_client`` / ``s_server`` in the trixie
chroot that tools/setup makes), with and without ``-sigalgs mldsa65``,
against our engine in both roles.  Needs root (chroot) and the chroot;
skipped otherwise."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_pq_certs import Certs

REPO = Path(__file__).resolve().parents[2]
TRIXIE = REPO / ".cache" / "trixie-root"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (TRIXIE / "usr/bin/openssl").exists(),
    reason="needs root and the trixie chroot (tools/setup)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pqcli"))


@pytest.fixture(scope="module")
def inside(certs: Certs) -> Iterator[str]:
    """The certificates, copied where the chroot's openssl sees them."""
    d = TRIXIE / "tmp" / ("tlshd-pq-%d" % os.getpid())
    d.mkdir(parents=True, exist_ok=True)
    for f in certs.p.root.iterdir():
        shutil.copy(f, d / f.name)
    yield "/" + str(d.relative_to(TRIXIE))
    shutil.rmtree(d)


@pytest.fixture
def openssl() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``openssl ARGS`` in the chroot; every one is killed after
    the test if it is still running."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        started.append(subprocess.Popen(
            ["chroot", str(TRIXIE), "openssl", *args], text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("sigalgs", "kind", "subject"), [
    ([], "ml-dsa", "CN=server-pq"),
    (["-sigalgs", "mldsa65"], "ml-dsa", "CN=server-pq"),
    (["-sigalgs", "ecdsa_secp256r1_sha256:rsa_pss_rsae_sha256"],
     "classical", "CN=server-ec"),
])
def test_s_client_against_our_dual_server(
        certs: Certs, inside: str, openssl: Any, sigalgs: list[str],
        kind: str, subject: str) -> None:
    eng = certs.engine()
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    client = openssl("s_client", "-connect", "127.0.0.1:%d" % port,
                     "-tls1_3", "-CAfile", inside + "/trust.pem",
                     "-verify_return_error", "-verify_hostname",
                     "localhost", "-servername", "localhost", *sigalgs)
    conn, _ = ls.accept()
    with conn, ls:
        out = eng.server_handshake(conn, x509=None,
                                   deadline=time.monotonic() + 20)
        text, _ = client.communicate("", timeout=30)
    assert out.status == 0, (out.reason, text)
    assert out.cert_kind == kind
    assert "subject=%s" % subject in text, text
    assert "Verify return code: 0 (ok)" in text, text


@pytest.mark.parametrize(("sigalgs", "server", "client_sigalgs", "signer"),
    [
        ([], "server-pq", [], "ML-DSA-65, mldsa65; client ML-DSA-65"),
        (["-sigalgs", "mldsa65"], "server-pq",
         ["-client_sigalgs", "mldsa65"],
         "ML-DSA-65, mldsa65; client ML-DSA-65"),
        ([], "server-ec", ["-client_sigalgs", "ecdsa_secp256r1_sha256"],
         "ECDSA-SECP256R1, ecdsa_secp256r1_sha256; client ECDSA-SECP256R1"),
    ])
def test_our_dual_client_against_s_server(
        certs: Certs, inside: str, openssl: Any, sigalgs: list[str],
        server: str, client_sigalgs: list[str], signer: str) -> None:
    """s_server requires and verifies a client certificate."""
    eng = certs.engine()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = openssl("s_server", "-accept", "127.0.0.1:%d" % port,
                  "-naccept", "1", "-tls1_3", "-num_tickets", "0",
                  "-cert", "%s/%s.pem" % (inside, server),
                  "-key", "%s/%s.key" % (inside, server),
                  "-CAfile", inside + "/trust.pem", "-Verify", "2",
                  "-verify_return_error", *sigalgs, *client_sigalgs)
    end = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            assert time.monotonic() < end and srv.poll() is None
            time.sleep(0.1)
    with sock:
        out = eng.client_handshake(sock, peername="localhost",
                                   use_certificate=True,
                                   deadline=time.monotonic() + 20)
    text, _ = srv.communicate("", timeout=30)
    assert out.status == 0, (out.reason, text)
    # Which certificate each end used and signed with, from our side;
    # s_server verified ours (-Verify, -verify_return_error).
    assert signer in out.description, out.description
