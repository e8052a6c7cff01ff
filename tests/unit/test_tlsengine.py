"""Engine against engine, and engine against plain pyOpenSSL peers.

kTLS is not available on the host, so the keys are proven with the
user-space record layer: a record sealed with one side's TX crypto_info
must open with the other side's RX crypto_info (or be accepted by the
peer's SSL_read), in both directions, at the reported sequence numbers.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any

import pytest
from OpenSSL import SSL
from recordlayer import RecordLayer, recv_app_data, send_app_data

from tlshd.shared.uapi import TLS_X509_PEERID
from tlshd.worker import ktls
from tlshd.worker.tlsengine import (
    Engine,
    Outcome,
)

SUITES = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
]


def layers(out: Outcome) -> tuple[RecordLayer, RecordLayer]:
    assert out.tx is not None and out.rx is not None
    return RecordLayer(out.tx.crypto_info()), RecordLayer(out.rx.crypto_info())


def prove_pair(pair: Any) -> None:
    """Exchange one record each way between the two raw sockets."""
    ctx, crx = layers(pair.client)
    stx, srx = layers(pair.server)
    send_app_data(ctx, pair.csock, b"client to server")
    assert recv_app_data(srx, pair.ssock) == b"client to server"
    send_app_data(stx, pair.ssock, b"server to client")
    assert recv_app_data(crx, pair.csock) == b"server to client"
    # A second record each way checks the sequence numbers advance.
    send_app_data(ctx, pair.csock, b"again")
    assert recv_app_data(srx, pair.ssock) == b"again"
    send_app_data(stx, pair.ssock, b"and back")
    assert recv_app_data(crx, pair.csock) == b"and back"


@pytest.mark.parametrize("suite", SUITES)
def test_anonymous_client(pki: Any, run_pair: Any, suite: str) -> None:
    eng = Engine(pki.client_settings(ciphersuites=suite), pki.settings())
    pair = run_pair(eng, eng)
    assert pair.client.status == 0, pair.client.reason
    assert pair.server.status == 0, pair.server.reason
    assert pair.client.cipher == pair.server.cipher == suite
    assert pair.client.remote_auth == ()
    assert pair.server.remote_auth == ()  # no client certificate
    assert pair.server.peer_subject is None
    assert pair.client.peer_subject == "CN=server"
    assert pair.client.tx is not None and pair.client.rx is not None
    assert (pair.client.tx.seq, pair.client.rx.seq) == (0, 0)
    assert pair.server.tx is not None and pair.server.rx is not None
    assert (pair.server.tx.seq, pair.server.rx.seq) == (0, 0)
    assert pair.client.tx.secret == pair.server.rx.secret
    assert pair.client.rx.secret == pair.server.tx.secret
    assert pair.client.tx.secret != pair.client.rx.secret
    prove_pair(pair)


@pytest.mark.parametrize("suite", SUITES)
def test_mutual_tls(pki: Any, run_pair: Any, suite: str) -> None:
    eng = Engine(pki.client_settings(), pki.settings(ciphersuites=suite))
    pair = run_pair(eng, eng, use_certificate=True)
    assert pair.client.status == 0, pair.client.reason
    assert pair.server.status == 0, pair.server.reason
    assert pair.server.cipher == suite
    assert pair.server.remote_auth == (TLS_X509_PEERID,)
    assert pair.server.peer_subject == "CN=client.example"
    assert pair.client.remote_auth == ()
    prove_pair(pair)


def test_aes_128_ccm_when_configured(pki: Any, run_pair: Any) -> None:
    suite = "TLS_AES_128_CCM_SHA256"
    eng = Engine(
        pki.client_settings(ciphersuites=suite),
        pki.settings(ciphersuites=suite),
    )
    pair = run_pair(eng, eng)
    assert pair.client.status == 0, pair.client.reason
    assert pair.client.cipher == suite
    prove_pair(pair)


def test_default_suite_and_description(engine: Engine, run_pair: Any) -> None:
    pair = run_pair(engine, engine)
    assert pair.client.status == 0, pair.client.reason
    # Our default list puts AES-256-GCM first (the server follows the
    # client's order).
    assert pair.client.cipher == "TLS_AES_256_GCM_SHA384"
    assert pair.client.group
    assert pair.client.description == (
        f"(TLS1.3)-({pair.client.group})"
        "-(ECDSA-SECP256R1, ecdsa_secp256r1_sha256)-(AES-256-GCM)"
    )
    assert pair.server.description == pair.client.description
    assert pair.client.reason == ""


def test_x509_from_kernel_der(pki: Any, run_pair: Any) -> None:
    """Certificates handed over as DER (from key serials) on both ends."""
    other = pki.pki.leaf(
        "der-client", dns=("der.example",), ips=(), client=True
    )
    der_server = pki.pki.leaf("der-server", dns=("localhost",))
    # No configured identities at all: only the DER pairs are presented.
    from tlshd.shared.config import RoleConfig

    bare = RoleConfig(truststore=str(pki.ca))
    eng = Engine(bare, bare)
    pair = run_pair(
        eng,
        eng,
        use_certificate=True,
        x509=other.der_pair,
        server_kw={"x509": der_server.der_pair},
    )
    assert pair.client.status == 0, pair.client.reason
    assert pair.server.status == 0, pair.server.reason
    assert pair.server.peer_subject == "CN=der-client"
    assert pair.client.peer_subject == "CN=der-server"
    assert pair.server.remote_auth == (TLS_X509_PEERID,)
    prove_pair(pair)


def test_x509_client_without_configured_certificate(
    pki: Any, run_pair: Any
) -> None:
    from tlshd.shared.config import RoleConfig

    eng = Engine(RoleConfig(truststore=str(pki.ca)), pki.settings())
    pair = run_pair(eng, eng, use_certificate=True)
    assert pair.client.status == errno.EIO
    assert "no client certificate" in pair.client.reason


def test_server_without_certificate(pki: Any) -> None:
    from tlshd.shared.config import RoleConfig

    eng = Engine(pki.client_settings(), RoleConfig(truststore=str(pki.ca)))
    a, b = socket.socketpair()
    with a, b:
        out = eng.server_handshake(a, x509=None, deadline=time.monotonic() + 5)
    assert out.status == errno.EIO
    assert "no server certificate" in out.reason


def test_bad_der_from_kernel_is_eio(engine: Engine) -> None:
    a, b = socket.socketpair()
    with a, b:
        out = engine.server_handshake(
            a, x509=(b"junk", b"junk"), deadline=time.monotonic() + 5
        )
        assert out.status == errno.EIO
        assert "certificate" in out.reason
        out = engine.client_handshake(
            a,
            peername="localhost",
            x509=(b"junk", b"junk"),
            use_certificate=True,
            deadline=time.monotonic() + 5,
        )
        assert out.status == errno.EIO


def test_mismatched_der_pair_is_eio(engine: Engine, pki: Any) -> None:
    a, b = socket.socketpair()
    with a, b:
        out = engine.server_handshake(
            a,
            x509=(pki.server.cert_der, pki.client.key_der),
            deadline=time.monotonic() + 5,
        )
    assert out.status == errno.EIO
    assert "does not match" in out.reason


def test_socket_left_blocking_with_nagle_restored(
    engine: Engine, run_pair: Any
) -> None:
    pair = run_pair(engine, engine)
    assert pair.client.status == 0
    for sock in (pair.csock, pair.ssock):
        assert sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        # Flights are corked while OpenSSL writes them; the kernel gets
        # its socket back uncorked, or its own sends would wait.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0


def test_never_left_corked_after_a_failure(engine: Engine) -> None:
    """The peer answers the ClientHello with garbage: OpenSSL fails while
    the socket is corked for the next flight, and it is handed back
    uncorked all the same."""
    from conftest import listening_socket  # type: ignore[import-not-found]

    ls = listening_socket()
    csock = socket.create_connection(ls.getsockname())
    ssock, _ = ls.accept()
    ls.close()

    def garbage() -> None:
        ssock.recv(4096)  # the ClientHello
        ssock.sendall(b"\x16\x03\x03\x00\x05hello")

    with csock, ssock:
        t = threading.Thread(target=garbage)
        t.start()
        out = engine.client_handshake(
            csock, peername="localhost", deadline=time.monotonic() + 5
        )
        t.join()
        assert out.status != 0
        assert csock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0


def test_nodelay_preserved_when_set(engine: Engine, pki: Any) -> None:
    from conftest import listening_socket  # type: ignore[import-not-found]

    ls = listening_socket()
    csock = socket.create_connection(ls.getsockname())
    ssock, _ = ls.accept()
    ls.close()
    csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with csock, ssock:
        t = threading.Thread(
            target=engine.server_handshake,
            args=(ssock,),
            kwargs={"deadline": time.monotonic() + 5},
        )
        t.start()
        out = engine.client_handshake(
            csock, peername="localhost", deadline=time.monotonic() + 5
        )
        t.join()
        assert out.status == 0
        assert csock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_concurrent_handshakes_share_one_engine(
    engine: Engine, run_pair: Any
) -> None:
    results: list[Any] = []

    def one() -> None:
        results.append(run_pair(engine, engine, use_certificate=True))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 6
    for pair in results:
        assert pair.client.status == 0, pair.client.reason
        assert pair.server.status == 0, pair.server.reason
        prove_pair(pair)


# -- plain pyOpenSSL peers: the peer's own record layer judges our keys --


def plain_context(pki: Any, *, server: bool) -> SSL.Context:
    ctx = SSL.Context(
        SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD
    )
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if server:
        ctx.use_certificate_chain_file(str(pki.server.cert))
        ctx.use_privatekey_file(str(pki.server.key))
    else:
        ctx.load_verify_locations(str(pki.ca))
        ctx.set_verify(SSL.VERIFY_PEER)
        ctx.use_certificate_chain_file(str(pki.client.cert))
        ctx.use_privatekey_file(str(pki.client.key))
    return ctx


@pytest.mark.parametrize("suite", SUITES)
def test_our_client_against_plain_pyopenssl_server(
    pki: Any, suite: str
) -> None:
    from conftest import listening_socket  # type: ignore[import-not-found]

    eng = Engine(pki.client_settings(ciphersuites=suite), pki.settings())
    ls = listening_socket()
    got: dict[str, Any] = {}

    def peer() -> None:
        s, _ = ls.accept()
        conn = SSL.Connection(plain_context(pki, server=True), s)
        conn.set_accept_state()
        conn.do_handshake()
        got["read"] = conn.recv(100)
        conn.sendall(b"plain server says hi")
        got["sock"] = s

    t = threading.Thread(target=peer)
    t.start()
    csock = socket.create_connection(ls.getsockname())
    with csock:
        out = eng.client_handshake(
            csock, peername="127.0.0.1", deadline=time.monotonic() + 5
        )
        assert out.status == 0, out.reason
        assert out.cipher == suite
        tx, rx = layers(out)
        send_app_data(tx, csock, b"agent client says hi")
        assert recv_app_data(rx, csock) == b"plain server says hi"
        t.join(5)
    assert got["read"] == b"agent client says hi"
    got["sock"].close()
    ls.close()


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("mtls", [False, True])
def test_our_server_against_plain_pyopenssl_client(
    pki: Any, suite: str, mtls: bool
) -> None:
    from conftest import listening_socket  # type: ignore[import-not-found]

    eng = Engine(pki.client_settings(), pki.settings(ciphersuites=suite))
    ls = listening_socket()
    got: dict[str, Any] = {}

    def peer() -> None:
        ctx = plain_context(pki, server=False)
        if not mtls:
            ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
            ctx.load_verify_locations(str(pki.ca))
            ctx.set_verify(SSL.VERIFY_PEER)
        s = socket.create_connection(ls.getsockname())
        conn = SSL.Connection(ctx, s)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        conn.do_handshake()
        conn.sendall(b"plain client says hi")
        got["read"] = conn.recv(100)
        got["sock"] = s

    t = threading.Thread(target=peer)
    t.start()
    ssock, _ = ls.accept()
    with ssock:
        out = eng.server_handshake(
            ssock, x509=None, deadline=time.monotonic() + 5
        )
        assert out.status == 0, out.reason
        assert out.cipher == suite
        assert out.remote_auth == (
            (TLS_X509_PEERID,) if mtls else ()
        )
        tx, rx = layers(out)
        assert recv_app_data(rx, ssock) == b"plain client says hi"
        send_app_data(tx, ssock, b"agent server says hi")
        t.join(5)
    assert got["read"] == b"agent server says hi"
    got["sock"].close()
    ls.close()


def test_engine_counts_tickets_into_the_server_tx_seq(
    engine: Engine, run_pair: Any
) -> None:
    """With NumTickets = 0 (the worker's openssl.cnf) nothing follows the
    server Finished, so both sequence numbers start at 0."""
    pair = run_pair(engine, engine)
    assert pair.server.tx is not None
    assert pair.server.tx.seq == 0
    assert (
        ktls.derive_crypto_info(
            pair.server.tx.cipher, pair.server.tx.secret, 0
        )
        == pair.server.tx.crypto_info()
    )


def test_nothing_is_sent_after_the_handshake(
    engine: Engine, run_pair: Any
) -> None:
    """No tickets, no close_notify: the kernel owns the stream from here."""
    import gc

    pair = run_pair(engine, engine, use_certificate=True)
    assert pair.client.status == 0 and pair.server.status == 0
    gc.collect()  # free the SSL objects; that must not write either
    time.sleep(0.05)
    for sock in (pair.csock, pair.ssock):
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
        sock.setblocking(True)
    prove_pair(pair)


def test_kernel_der_identity_overrides_configured_one(
    engine: Engine, pki: Any, run_pair: Any
) -> None:
    der_server = pki.pki.leaf("der-override", dns=("localhost",))
    der_client = pki.pki.leaf(
        "der-client-override", dns=("dco",), ips=(), client=True
    )
    pair = run_pair(
        engine,
        engine,
        use_certificate=True,
        x509=der_client.der_pair,
        server_kw={"x509": der_server.der_pair},
    )
    assert pair.client.status == 0, pair.client.reason
    assert pair.client.peer_subject == "CN=der-override"
    assert pair.server.peer_subject == "CN=der-client-override"


def test_anonymous_client_ignores_x509(
    engine: Engine, pki: Any, run_pair: Any
) -> None:
    pair = run_pair(
        engine, engine, use_certificate=False, x509=pki.client.der_pair
    )
    assert pair.client.status == 0
    assert pair.server.remote_auth == ()
    assert pair.server.peer_subject is None
