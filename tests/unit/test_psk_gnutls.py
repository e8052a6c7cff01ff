"""External-PSK interop with GnuTLS (gnutls-serv / gnutls-cli), SHA-256.

ktls-utils' tlshd is GnuTLS, so NVMe peers often are. GnuTLS 3.7.9 has
no SHA-384 PSKs (its binder is always SHA-256) and ``--pskpasswd`` splits
``identity:hexkey`` at the first ':', so the identities here are NVMe-
shaped but without colons in the NQNs. Every success is proven on records
GnuTLS itself sealed or opened.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from recordlayer import (
    CT_APPLICATION_DATA,
    RecordLayer,
    read_record,
    recv_app_data,
    send_app_data,
)
from test_tlsengine_gnutls import GnutlsClient, GnutlsServer

from tlshd.shared.config import RoleConfig
from tlshd.shared.protocol import PskMaterial
from tlshd.worker.tlsengine import Engine


def material(serial: int, identity: bytes, secret: bytes) -> PskMaterial:
    return PskMaterial(serial=serial, identity=identity, secret=secret)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("gnutls-serv") is None
        or shutil.which("gnutls-cli") is None,
        reason="gnutls-bin is not installed",
    ),
    pytest.mark.not_applicable,
]

IDENTITY = b"NVMe0R01 nqn.2014-08.org.example.host nqn.2014-08.org.example.sub"
# tlshd's PSK priority for a SHA-256 PSK: psk_dhe_ke, no tickets.
PSK_PRIORITY = (
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:%NO_TICKETS:-KX-ALL:+ECDHE-PSK:+DHE-PSK"
)


@pytest.fixture(scope="module")
def eng() -> Engine:
    return Engine(RoleConfig(), RoleConfig())


@pytest.fixture
def psk_server(tmp_path: Path) -> Any:
    servers: list[GnutlsServer] = []

    def start(key: bytes) -> GnutlsServer:
        table = tmp_path / "psk.txt"
        table.write_text(f"{IDENTITY.decode()}:{key.hex()}\n")
        servers.append(GnutlsServer(
            ["--pskpasswd", str(table), "--priority", PSK_PRIORITY]))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def test_our_client_against_gnutls_serv(eng: Engine, psk_server: Any) -> None:
    key = os.urandom(32)
    server = psk_server(key)
    with server.connect() as sock:
        out = eng.psk.client(
            sock, psks=[material(0x1234, IDENTITY, key)],
            deadline=time.monotonic() + 10)
        assert out.status == 0, out.reason
        assert out.cipher == "TLS_AES_128_GCM_SHA256"
        assert out.remote_auth == (0x1234,)
        assert out.tx.seq == 0 and out.rx.seq == 0
        tx = RecordLayer(out.tx.crypto_info())
        rx = RecordLayer(out.rx.crypto_info())
        for msg in (b"psk record one\n", b"psk record two\n"):
            send_app_data(tx, sock, msg)
            assert rx.open(read_record(sock)) == (CT_APPLICATION_DATA, msg)


@pytest.mark.parametrize("wrong", ["key", "identity"])
def test_gnutls_serv_refuses_wrong_psk(
    eng: Engine, psk_server: Any, wrong: str
) -> None:
    """GnuTLS 3.7.9 answers an unknown identity and a wrong key alike,
    with illegal_parameter (not unknown_psk_identity): EACCES."""
    key = os.urandom(32)
    server = psk_server(key)
    offered = (material(1, IDENTITY, os.urandom(32)) if wrong == "key"
               else material(1, IDENTITY + b"-other", key))
    with server.connect() as sock:
        out = eng.psk.client(sock, psks=[offered],
                                       deadline=time.monotonic() + 10)
    print(wrong, errno.errorcode[out.status], out.reason)
    assert out.status == errno.EACCES
    assert "illegal_parameter" in out.reason


def gnutls_cli(port: int, key: bytes, priority: str = PSK_PRIORITY,
               identity: bytes = IDENTITY) -> GnutlsClient:
    return GnutlsClient(port, ["--pskusername", identity.decode(),
                               "--pskkey", key.hex(), "--priority",
                               priority])


def test_gnutls_cli_against_our_server(eng: Engine) -> None:
    """gnutls-cli lists AES-256-GCM first; the server's ClientHello peek
    picks the SHA-256 suite the PSK needs (else OpenSSL drops the PSK)."""
    from conftest import listening_socket  # type: ignore[import-not-found]

    key = os.urandom(32)
    ls = listening_socket()
    cli = gnutls_cli(ls.getsockname()[1], key)
    try:
        ls.settimeout(10)
        sock, _ = ls.accept()
        with sock:
            out = eng.psk.server(
                sock, lookup={IDENTITY: material(77, IDENTITY, key)}.get,
                deadline=time.monotonic() + 10)
            assert out.status == 0, out.reason
            assert out.cipher == "TLS_AES_128_GCM_SHA256"
            assert out.remote_auth == (77,)
            tx = RecordLayer(out.tx.crypto_info())
            rx = RecordLayer(out.rx.crypto_info())
            send_app_data(tx, sock, b"hello from the PSK server\n")
            cli.send_line(b"hello from gnutls-cli\n")
            assert recv_app_data(rx, sock) == b"hello from gnutls-cli\n"
    finally:
        ls.close()
        stdout, stderr = cli.finish()
    assert "hello from the PSK server" in stdout, (stdout, stderr)


@pytest.mark.parametrize(
    ("case", "status", "cli_alert"),
    [("unknown", errno.ENOKEY, "[115]"),
     ("wrong-key", errno.EACCES, "[51]"),
     ("psk_ke-only", errno.EACCES, "[40]")],
)
def test_gnutls_cli_refused(
    eng: Engine, case: str, status: int, cli_alert: str
) -> None:
    """Unknown identity: alert unknown_psk_identity (115); wrong key:
    the binder fails (decrypt_error); psk_ke without (EC)DHE: refused."""
    from conftest import listening_socket

    key = os.urandom(32)
    table = {} if case == "unknown" else {IDENTITY: material(5, IDENTITY, key)}
    priority = (PSK_PRIORITY.replace("+ECDHE-PSK:+DHE-PSK", "+PSK")
                if case == "psk_ke-only" else PSK_PRIORITY)
    ls = listening_socket()
    cli = gnutls_cli(ls.getsockname()[1],
                     os.urandom(32) if case == "wrong-key" else key,
                     priority)
    try:
        ls.settimeout(10)
        sock, _ = ls.accept()
        with sock:
            out = eng.psk.server(sock, lookup=table.get,
                                           deadline=time.monotonic() + 10)
    finally:
        ls.close()
        stdout, stderr = cli.finish()
    print(case, errno.errorcode[out.status], out.reason)
    assert out.status == status
    assert f"Received alert {cli_alert}" in stdout + stderr, (stdout, stderr)
