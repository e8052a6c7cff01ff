"""Interoperability with real GnuTLS (gnutls-serv / gnutls-cli).

ktls-utils' tlshd is built on GnuTLS, so the kernel's peers are often
GnuTLS. Our client talks to ``gnutls-serv --echo`` and ``gnutls-cli``
talks to our server; each side's keys are then proven on records that
GnuTLS itself sealed or opened. Debian: ``apt-get install gnutls-bin``.
"""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from recordlayer import (
    CT_APPLICATION_DATA,
    CT_HANDSHAKE,
    RecordLayer,
    read_record,
    recv_app_data,
    send_app_data,
)

from tlshd.shared.uapi import TLS_X509_PEERID
from tlshd.worker.tlsengine import Engine

pytestmark = [
    pytest.mark.skipif(
        shutil.which("gnutls-serv") is None
        or shutil.which("gnutls-cli") is None,
        reason="gnutls-bin is not installed",
    ),
    # Not every image has gnutls-bin; skipping is not a kernel regression.
    pytest.mark.not_applicable,
]

# The priority ktls-utils builds: TLS 1.3 only, no tickets.
TLSHD_PRIORITY = "NORMAL:-COMP-ALL:-VERS-ALL:+VERS-TLS1.3:%NO_TICKETS"
SUITES = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GnutlsServer:
    """gnutls-serv --echo on a random loopback port, always killed."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["gnutls-serv", "--echo", "-p", str(self.port), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        # Poll the listen table rather than connecting: a probe connection
        # would be a failed handshake in the server's log.
        want = f":{self.port:04X} "
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else b""
                raise RuntimeError(f"gnutls-serv exited: {out!r}")
            with open("/proc/net/tcp") as f:
                for line in f:
                    fields = line.split()
                    if want.strip() in fields[1] and fields[3] == "0A":
                        return
            time.sleep(0.02)
        raise RuntimeError("gnutls-serv did not start listening")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> str:
        self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        return out.decode(errors="replace")


@pytest.fixture
def gnutls_serv(pki: Any) -> Iterator[Any]:
    servers: list[GnutlsServer] = []

    def start(
        *, priority: str = TLSHD_PRIORITY, mtls: bool = False,
        extra: tuple[str, ...] | list[str] = ()
    ) -> GnutlsServer:
        args = [*extra,
            "--x509certfile",
            str(pki.server.cert),
            "--x509keyfile",
            str(pki.server.key),
            "--priority",
            priority,
        ]
        if mtls:
            args += [
                "--x509cafile",
                str(pki.ca),
                "--require-client-cert",
                "--verify-client-cert",
            ]
        else:
            args += ["--disable-client-cert"]
        servers.append(GnutlsServer(args))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def handshake_client(eng: Engine, sock: socket.socket, **kw: Any) -> Any:
    kw.setdefault("use_certificate", False)
    return eng.client_handshake(
        sock,
        peername="localhost",
        x509=None,
        deadline=time.monotonic() + 10,
        **kw,
    )


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("mtls", [False, True], ids=["anon", "mtls"])
def test_our_client_against_gnutls_serv(
    pki: Any, gnutls_serv: Any, suite: str, mtls: bool
) -> None:
    eng = Engine(pki.client_settings(ciphersuites=suite), pki.settings())
    server = gnutls_serv(mtls=mtls)
    with server.connect() as sock:
        out = handshake_client(eng, sock, use_certificate=mtls)
        assert out.status == 0, out.reason
        assert out.cipher == suite
        assert out.tx.seq == 0 and out.rx.seq == 0
        tx = RecordLayer(out.tx.crypto_info())
        rx = RecordLayer(out.rx.crypto_info())
        for msg in (b"first record through our TX key\n", b"second\n"):
            send_app_data(tx, sock, msg)
            # With %NO_TICKETS the echo is the very next RX record.
            content_type, echoed = rx.open(read_record(sock))
            assert (content_type, echoed) == (CT_APPLICATION_DATA, msg)


def test_gnutls_tickets_arrive_as_rx_records(
    pki: Any, gnutls_serv: Any
) -> None:
    """Without %NO_TICKETS gnutls-serv sends two NewSessionTickets after
    the handshake; a client cannot stop them. They are RX records 0 and 1
    (kTLS would hand them up as control records) and the echo is 2."""
    eng = Engine(pki.client_settings(), pki.settings())
    server = gnutls_serv(priority="NORMAL:-VERS-ALL:+VERS-TLS1.3")
    with server.connect() as sock:
        out = handshake_client(eng, sock)
        assert out.status == 0, out.reason
        assert out.rx.seq == 0
        tx = RecordLayer(out.tx.crypto_info())
        rx = RecordLayer(out.rx.crypto_info())
        send_app_data(tx, sock, b"ping\n")
        seen = []
        while True:
            content_type, content = rx.open(read_record(sock))
            seen.append((rx.seq - 1, content_type, content[:1]))
            if content_type == CT_APPLICATION_DATA:
                break
        assert seen == [
            (0, CT_HANDSHAKE, b"\x04"),
            (1, CT_HANDSHAKE, b"\x04"),
            (2, CT_APPLICATION_DATA, b"p"),
        ]


def test_our_client_refuses_tls12_gnutls_serv(
    pki: Any, gnutls_serv: Any
) -> None:
    eng = Engine(pki.client_settings(), pki.settings())
    server = gnutls_serv(priority="NORMAL:-VERS-ALL:+VERS-TLS1.2")
    with server.connect() as sock:
        out = handshake_client(eng, sock)
    assert out.status == errno.EACCES
    assert "alert handshake_failure" in out.reason


def test_our_client_rejects_gnutls_serv_with_wrong_name(
    pki: Any, gnutls_serv: Any
) -> None:
    eng = Engine(pki.client_settings(), pki.settings())
    server = gnutls_serv()
    with server.connect() as sock:
        out = eng.client_handshake(
            sock,
            peername="wrong.example",
            x509=None,
            use_certificate=False,
            deadline=time.monotonic() + 10,
        )
    assert out.status == errno.EACCES
    assert "hostname mismatch" in out.reason


class GnutlsClient:
    """gnutls-cli connecting to our listener; stdin/stdout are pipes."""

    def __init__(self, port: int, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            ["gnutls-cli", "-p", str(port), "127.0.0.1", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def send_line(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def finish(self) -> tuple[str, str]:
        try:
            out, err = self.proc.communicate(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate(timeout=10)
        return out.decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("mtls", [False, True], ids=["anon", "mtls"])
def test_gnutls_cli_against_our_server(
    pki: Any, suite: str, mtls: bool
) -> None:
    from conftest import listening_socket  # type: ignore[import-not-found]

    eng = Engine(pki.client_settings(), pki.settings(ciphersuites=suite))
    ls = listening_socket()
    args = ["--x509cafile", str(pki.ca), "--priority", TLSHD_PRIORITY]
    if mtls:
        args += [
            "--x509certfile",
            str(pki.client.cert),
            "--x509keyfile",
            str(pki.client.key),
        ]
    cli = GnutlsClient(ls.getsockname()[1], args)
    try:
        ls.settimeout(10)
        sock, _ = ls.accept()
        with sock:
            out = eng.server_handshake(
                sock, x509=None, deadline=time.monotonic() + 10
            )
            assert out.status == 0, out.reason
            assert out.cipher == suite
            assert out.tx.seq == 0 and out.rx.seq == 0
            assert out.remote_auth == (
                (TLS_X509_PEERID,) if mtls else ()
            )
            if mtls:
                assert out.peer_subject == "CN=client.example"
            tx = RecordLayer(out.tx.crypto_info())
            rx = RecordLayer(out.rx.crypto_info())
            send_app_data(tx, sock, b"hello from the tlshd server\n")
            cli.send_line(b"hello from gnutls-cli\n")
            assert recv_app_data(rx, sock) == b"hello from gnutls-cli\n"
    finally:
        ls.close()
        stdout, stderr = cli.finish()
    assert "hello from the tlshd server" in stdout, (stdout, stderr)


# -- record_size_limit (RFC 8449) ---------------------------------------------


def test_gnutls_cli_record_size_limit_reaches_our_tx_keys(pki: Any) -> None:
    """gnutls-cli --recordsize 512 sends record_size_limit 513 (TLS 1.3
    counts the content type byte); our server puts it into the TX keys,
    where kTLS caps records at 512 bytes of data.  GnuTLS holds the peer
    to its limit even though tlshd could not answer the extension: a
    larger record ends the session, which is what a kernel without the
    cap would send (hence tlshd's warning there)."""
    from conftest import listening_socket  # type: ignore[import-not-found]

    eng = Engine(pki.client_settings(), pki.settings())
    ls = listening_socket()
    args = ["--x509cafile", str(pki.ca), "--priority", TLSHD_PRIORITY,
            "--recordsize", "512"]
    cli = GnutlsClient(ls.getsockname()[1], args)
    fits = b"f" * 499 + b"\n"
    try:
        ls.settimeout(10)
        sock, _ = ls.accept()
        with sock:
            out = eng.server_handshake(
                sock, x509=None, deadline=time.monotonic() + 10
            )
            assert out.status == 0, out.reason
            assert out.tx.record_limit == 513
            assert "record_size_limit=513" in out.description
            tx = RecordLayer(out.tx.crypto_info())
            rx = RecordLayer(out.rx.crypto_info())
            send_app_data(tx, sock, fits)
            cli.send_line(b"hello from gnutls-cli\n")
            assert recv_app_data(rx, sock) == b"hello from gnutls-cli\n"
            send_app_data(tx, sock, b"y" * 3000 + b"\n")
            stdout, stderr = cli.finish()
    finally:
        ls.close()
        cli.finish()
    assert fits.decode() in stdout, (stdout[-300:], stderr[-300:])
    assert "y" * 100 not in stdout
    assert "illegal length" in stderr, stderr[-300:]


def test_gnutls_serv_never_sends_its_limit_to_our_client(
    pki: Any, gnutls_serv: Any
) -> None:
    """A server may send record_size_limit only if the client offered
    it; ours cannot (OpenSSL, see tlshd.worker.recordlimit), so a
    gnutls-serv with --recordsize 512 keeps its limit to itself."""
    eng = Engine(pki.client_settings(), pki.settings())
    server = gnutls_serv(extra=["--recordsize", "512"])
    with server.connect() as sock:
        out = handshake_client(eng, sock)
        assert out.status == 0, out.reason
        assert out.tx.record_limit is None
        tx = RecordLayer(out.tx.crypto_info())
        rx = RecordLayer(out.rx.crypto_info())
        send_app_data(tx, sock, b"ping\n")
        assert rx.open(read_record(sock)) == (CT_APPLICATION_DATA, b"ping\n")
