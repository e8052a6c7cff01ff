"""The peer's record_size_limit (RFC 8449): decoder, bookkeeping, and
in-process handshakes with a client that sends it.

The client is pyOpenSSL with the extension added through OpenSSL's
legacy custom-extension API (lab.peers.RecordLimitClient): that API
still writes it into a TLS 1.3 ClientHello.  kTLS is not on the host, so
the cap itself is checked with a fake socket (test_ktls.py) and in the VM
(tests/kernel/test_record_limit.py).
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lab.peers import RecordLimitClient
from OpenSSL import SSL
from recordlayer import RecordLayer, recv_app_data, send_app_data

from tlshd.worker import recordlimit
from tlshd.worker.ktls import TrafficKeys
from tlshd.worker.recordlimit import PeerLimits, RecordLimitError, peer_limit
from tlshd.worker.tlsengine import Engine, Outcome
from tlshd.worker.tlsoutcome import failed

LIMIT = RecordLimitClient.limit


@pytest.fixture(scope="module")
def rlc() -> RecordLimitClient:
    return RecordLimitClient()


def client_hello(ctx: SSL.Context) -> bytes:
    """The ClientHello message ``ctx`` sends (one record, header off)."""
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    records = conn.bio_read(1 << 16)
    assert records[0] == 22 and int.from_bytes(records[3:5], "big") == (
        len(records) - 5), "expected one handshake record"
    return records[5:]


def ext(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def encrypted_extensions(*exts: bytes) -> bytes:
    block = b"".join(exts)
    body = len(block).to_bytes(2, "big") + block
    return b"\x08" + len(body).to_bytes(3, "big") + body


RSL = recordlimit.EXT_RECORD_SIZE_LIMIT


# -- the decoder ------------------------------------------------------------


def test_openssl_client_hello_with_and_without_the_extension(
        rlc: RecordLimitClient) -> None:
    assert peer_limit(client_hello(rlc.context(LIMIT(512)))) == 512
    plain = SSL.Context(SSL.TLS_CLIENT_METHOD)
    assert peer_limit(client_hello(plain)) is None


@pytest.mark.parametrize("value", [64, 512, 16384, 16385, 65535])
def test_limits_in_encrypted_extensions(value: int) -> None:
    msg = encrypted_extensions(ext(0, b""), ext(RSL, LIMIT(value)),
                               ext(16, b"\x00\x03\x02h2"))
    assert peer_limit(msg) == value
    assert peer_limit(memoryview(msg)) == value


@pytest.mark.parametrize(("msg", "why"), [
    (encrypted_extensions(ext(RSL, LIMIT(63))), "below 64"),
    (encrypted_extensions(ext(RSL, LIMIT(0))), "below 64"),
    (encrypted_extensions(ext(RSL, b"\x02")), "1 bytes, not 2"),
    (encrypted_extensions(ext(RSL, b"\x02\x00\x00")), "3 bytes, not 2"),
    (encrypted_extensions(ext(RSL, LIMIT(512)), ext(RSL, LIMIT(512))),
     "twice"),
    (encrypted_extensions(ext(RSL, LIMIT(512))) + b"\x00", "length"),
    (b"\x08\x00\x00\x05\x00\x04\x00\x1c\x00\x02", "length"),
    (b"\x08\x00\x00\x03\x00\x05\x00", "truncated"),
    (b"\x08\x00\x00\x05\x00\x03\x00\x1c\x00", "truncated"),
])
def test_malformed_messages_are_refused(msg: bytes, why: str) -> None:
    with pytest.raises(RecordLimitError, match=why):
        peer_limit(msg)


def test_bytes_after_the_extension_block_are_refused() -> None:
    good = encrypted_extensions(ext(RSL, LIMIT(512)))
    body = good[4:] + b"\x00"
    msg = b"\x08" + len(body).to_bytes(3, "big") + body
    with pytest.raises(RecordLimitError, match="after the extensions"):
        peer_limit(msg)


def test_every_cut_of_a_client_hello_is_refused(
        rlc: RecordLimitClient) -> None:
    """A message shorter than its header says, or a header fixed to a
    cut body: RecordLimitError, never another exception or a value."""
    hello = client_hello(rlc.context(LIMIT(512)))
    for cut in range(4, len(hello)):
        with pytest.raises(RecordLimitError):
            peer_limit(hello[:cut])
        body = hello[4:cut]
        fixed = hello[:1] + len(body).to_bytes(3, "big") + body
        try:
            assert peer_limit(fixed) in (None, 512)
        except RecordLimitError:
            pass


def test_other_messages_are_not_read() -> None:
    assert peer_limit(b"") is None
    assert peer_limit(b"\x01\x00") is None  # shorter than a header
    assert peer_limit(b"\x0b\x00\x00\x00") is None  # Certificate
    assert peer_limit(b"\x02" + b"\xff" * 40) is None  # ServerHello


def test_client_hello_without_extensions() -> None:
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01"
            + b"\x01\x00")
    assert peer_limit(b"\x01" + len(body).to_bytes(3, "big") + body) is None


# -- PeerLimits: what the engine keeps per connection ----------------------


def ok_outcome() -> Outcome:
    keys = TrafficKeys("TLS_AES_128_GCM_SHA256", b"k" * 32, 0)
    return Outcome(status=0, description="(TLS1.3)-(x)", tx=keys, rx=keys)


def test_apply_puts_the_limit_into_the_tx_keys() -> None:
    limits = PeerLimits()
    limits.observe(7, memoryview(encrypted_extensions(ext(RSL, LIMIT(512)))))
    out = limits.apply(7, ok_outcome())
    assert out.status == 0
    assert out.tx is not None and out.tx.record_limit == 512
    assert out.rx is not None and out.rx.record_limit is None
    assert out.description == "(TLS1.3)-(x) record_size_limit=512"
    # Consumed: a later connection at the same address starts clean.
    assert limits.apply(7, ok_outcome()) == ok_outcome()


def test_malformed_extension_fails_the_handshake() -> None:
    limits = PeerLimits()
    limits.observe(7, memoryview(encrypted_extensions(ext(RSL, LIMIT(1)))))
    out = limits.apply(7, ok_outcome())
    assert out.status == errno.EACCES
    assert "malformed record_size_limit" in out.reason
    assert out.tx is None


def test_failures_and_other_connections_pass_through() -> None:
    limits = PeerLimits()
    limits.observe(7, memoryview(encrypted_extensions(ext(RSL, LIMIT(99)))))
    bad = failed(errno.ETIMEDOUT, "gone")
    assert limits.apply(7, bad) is bad
    assert limits.apply(8, ok_outcome()) == ok_outcome()


def test_later_hello_replaces_a_limit_but_does_not_erase_it() -> None:
    limits = PeerLimits()
    limits.observe(7, memoryview(encrypted_extensions(ext(RSL, LIMIT(99)))))
    limits.observe(7, memoryview(encrypted_extensions(ext(RSL, LIMIT(80)))))
    limits.observe(7, memoryview(encrypted_extensions()))
    limits.observe(7, memoryview(b"\x14\x00\x00\x00"))  # Finished: ignored
    out = limits.apply(7, ok_outcome())
    assert out.tx is not None and out.tx.record_limit == 80


def test_forget_drops_the_limit() -> None:
    limits = PeerLimits()
    limits.observe(7, memoryview(encrypted_extensions(ext(RSL, LIMIT(99)))))
    limits.forget(7)
    assert limits.apply(7, ok_outcome()) == ok_outcome()


# -- in-process handshakes ---------------------------------------------------


class Peer:
    """A pyOpenSSL client sending ``body`` as record_size_limit; after
    the handshake it reads one line (EOF: nothing) and says goodbye."""

    def __init__(self, rlc: RecordLimitClient, body: bytes | None,
                 port: int, ctx: SSL.Context | None = None) -> None:
        self.ctx = ctx or (rlc.context(body) if body is not None
                           else SSL.Context(SSL.TLS_CLIENT_METHOD))
        self.ctx.set_verify(SSL.VERIFY_NONE)
        self.port = port
        self.read = b""
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        s = socket.create_connection(("127.0.0.1", self.port))
        conn = SSL.Connection(self.ctx, s)
        conn.set_connect_state()
        try:
            conn.do_handshake()
            while not self.read.endswith(b"\n"):
                self.read += conn.recv(65536)
            conn.sendall(b"bye")
        except (SSL.Error, OSError) as exc:
            self.error = exc
        finally:
            s.close()


@pytest.fixture
def serve(pki: Any, rlc: RecordLimitClient) -> Iterator[Any]:
    from conftest import listening_socket  # type: ignore[import-not-found]

    ls = listening_socket()
    eng = Engine(pki.client_settings(), pki.settings())
    peers: list[Peer] = []

    def run(body: bytes | None, ctx: SSL.Context | None = None
            ) -> tuple[Outcome, socket.socket, Peer]:
        peers.append(Peer(rlc, body, ls.getsockname()[1], ctx))
        sock, _ = ls.accept()
        out = eng.server_handshake(sock, x509=None,
                                   deadline=time.monotonic() + 10)
        return out, sock, peers[-1]

    yield run
    ls.close()
    for p in peers:
        p.thread.join(10)


def test_server_reads_the_limit_and_peer_takes_full_records(
        serve: Any) -> None:
    """The limit reaches the TX keys; as tlshd did not answer the
    extension, the peer must (and OpenSSL does) accept larger records,
    which is what a kernel without the cap sends."""
    out, sock, peer = serve(LIMIT(512))
    with sock:
        assert out.status == 0, out.reason
        assert out.tx.record_limit == 512
        assert out.description.endswith(" record_size_limit=512")
        line = b"x" * 4000 + b"\n"
        send_app_data(RecordLayer(out.tx.crypto_info()), sock, line)
        try:
            got = recv_app_data(RecordLayer(out.rx.crypto_info()), sock)
        except EOFError:
            peer.thread.join(10)
            raise AssertionError(peer.error) from None
        assert got == b"bye"
    peer.thread.join(10)
    assert peer.error is None
    assert peer.read == line


def test_server_keeps_the_limit_across_a_hello_retry(
        serve: Any, rlc: RecordLimitClient) -> None:
    """The client's key share is for a group the server does not take
    (brainpool), so the server asks again (HelloRetryRequest) and gets
    a second ClientHello, with the extension again."""
    from OpenSSL._util import lib

    ctx = rlc.context(LIMIT(512))
    assert lib.SSL_CTX_set1_curves_list(
        ctx._context, b"brainpoolP256r1tls13:P-256") == 1
    out, sock, _ = serve(LIMIT(512), ctx=ctx)
    with sock:
        assert out.status == 0, out.reason
        assert out.group == "secp256r1"
        assert out.tx.record_limit == 512


@pytest.mark.parametrize("body", [LIMIT(16385), LIMIT(64)])
def test_server_edge_limits(serve: Any, body: bytes) -> None:
    out, sock, _ = serve(body)
    with sock:
        assert out.status == 0, out.reason
        assert out.tx.record_limit == int.from_bytes(body, "big")


@pytest.mark.parametrize("body", [LIMIT(63), b"\x02", b"\x02\x00\x00"])
def test_server_refuses_a_malformed_limit(serve: Any, body: bytes) -> None:
    out, sock, _ = serve(body)
    sock.close()
    assert out.status == errno.EACCES
    assert "malformed record_size_limit" in out.reason


def test_server_without_the_extension(serve: Any) -> None:
    out, sock, _ = serve(None)
    sock.close()
    assert out.status == 0, out.reason
    assert out.tx.record_limit is None
    assert "record_size_limit" not in out.description
