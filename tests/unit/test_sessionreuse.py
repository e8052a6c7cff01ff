"""Session reuse between engines (``[authenticate] session_reuse``).

kTLS is not on the host, so the keys and sequence numbers are proven with
the user-space record layer, as in test_tlsengine.  A reused session
exchanges nothing after the handshake, so every sequence number is 0.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from OpenSSL import SSL
from test_tlsengine import prove_pair

from tlshd.shared.uapi import TLS_X509_PEERID
from tlshd.worker.sessionreuse import (
    REUSE_ALPN,
    ClientCache,
    PeerKey,
    ReuseSettings,
    ServerTable,
    derive,
    peer_key,
)
from tlshd.worker.tlsengine import Engine, Outcome

REUSE = ReuseSettings(lifetime=60, cache_size=8)


@dataclass
class Pair:
    client: Outcome
    server: Outcome
    csock: socket.socket
    ssock: socket.socket


class FixedPortRunner:
    """Like conftest's run_pair, but every pair connects to one listening
    port: a peer is its address and port, as an NFS server's is."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = []

    def __call__(self, client_engine: Engine, server_engine: Engine, *,
                 timeout: float = 10.0,
                 server_kw: dict[str, Any] | None = None,
                 **client_kw: Any) -> Pair:
        csock = socket.create_connection(self.listener.getsockname())
        ssock, _ = self.listener.accept()
        self.sockets += [csock, ssock]
        client_kw.setdefault("peername", "localhost")
        client_kw.setdefault("use_certificate", False)
        result: dict[str, Any] = {}

        def serve() -> None:
            result["server"] = server_engine.server_handshake(
                ssock, deadline=time.monotonic() + timeout,
                **(server_kw or {"x509": None}))

        thread = threading.Thread(target=serve)
        thread.start()
        client = client_engine.client_handshake(
            csock, deadline=time.monotonic() + timeout, **client_kw)
        if client.status:
            csock.shutdown(socket.SHUT_RDWR)
        thread.join(timeout + 5)
        assert not thread.is_alive()
        return Pair(client, result["server"], csock, ssock)

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.listener.close()


@pytest.fixture
def run_pair() -> Iterator[FixedPortRunner]:
    runner = FixedPortRunner()
    yield runner
    runner.close()


def fresh(pki: Any, reuse: ReuseSettings | None = REUSE, **kw: Any
          ) -> Engine:
    return Engine(pki.client_settings(**kw), pki.settings(**kw),
                  reuse=reuse)


def seqs(pair: Any) -> tuple[int, int, int, int]:
    c, s = pair.client, pair.server
    assert c.tx and c.rx and s.tx and s.rx
    return c.tx.seq, c.rx.seq, s.tx.seq, s.rx.seq


def ok(pair: Any) -> Any:
    assert pair.client.status == 0, pair.client.reason
    assert pair.server.status == 0, pair.server.reason
    return pair


def test_full_then_reused(pki: Any, run_pair: Any) -> None:
    eng = fresh(pki)
    first = ok(run_pair(eng, eng))
    assert not first.client.resumed and not first.server.resumed
    assert seqs(first) == (0, 0, 0, 0)
    prove_pair(first)
    assert eng.reuse is not None and len(eng.reuse.client) == 1
    assert eng.reuse is not None and len(eng.reuse.server) == 1

    second = ok(run_pair(eng, eng))
    assert second.client.resumed and second.server.resumed
    assert "session reuse PSK" in second.client.description
    # No certificate was sent: not counted as a certificate handshake.
    assert first.server.cert_kind == "classical"
    assert second.client.cert_kind == second.server.cert_kind == ""
    # Nothing is sent after the handshake, reused or not.
    assert seqs(second) == (0, 0, 0, 0)
    prove_pair(second)
    # New keys (psk_dhe_ke: a fresh key exchange) and a new PSK.
    assert second.client.group
    assert second.client.rx and first.client.rx
    assert second.client.rx.secret != first.client.rx.secret
    assert second.client.tx and first.client.tx
    assert second.client.tx.secret != first.client.tx.secret
    assert second.client.peer_subject == first.client.peer_subject
    assert len(eng.reuse.server) == 2
    third = ok(run_pair(eng, eng))
    assert third.client.resumed and third.server.resumed


@pytest.mark.parametrize("suite", ["TLS_AES_128_GCM_SHA256",
                                   "TLS_CHACHA20_POLY1305_SHA256"])
def test_reuse_with_sha256_suites(pki: Any, run_pair: Any,
                                  suite: str) -> None:
    eng = fresh(pki, ciphersuites=suite)
    ok(run_pair(eng, eng))
    pair = ok(run_pair(eng, eng))
    assert pair.server.resumed and pair.client.cipher == suite
    prove_pair(pair)


def test_reused_mtls_keeps_remote_auth(pki: Any, run_pair: Any) -> None:
    eng = fresh(pki)
    for resumed in (False, True):
        pair = ok(run_pair(eng, eng, use_certificate=True))
        assert pair.server.resumed == resumed
        assert pair.server.remote_auth == (TLS_X509_PEERID,)
        assert pair.server.peer_subject == "CN=client.example"
        prove_pair(pair)


def test_not_offered_to_other_name_or_credentials(pki: Any,
                                                  run_pair: Any) -> None:
    eng = fresh(pki)
    ok(run_pair(eng, eng))
    # Same address, verified against another name: full handshake.
    other = ok(run_pair(eng, eng, peername="server.example"))
    assert not other.client.resumed and not other.server.resumed
    # Same name, now with the client certificate: full handshake, and
    # nfsd gets the certificate's REMOTE_AUTH.
    mtls = ok(run_pair(eng, eng, use_certificate=True))
    assert not mtls.server.resumed
    assert mtls.server.remote_auth == (TLS_X509_PEERID,)
    # An anonymous reuse never carries that REMOTE_AUTH.
    anon = ok(run_pair(eng, eng))
    assert anon.server.resumed and anon.server.remote_auth == ()


def test_other_engine_never_offers_it(pki: Any, run_pair: Any) -> None:
    """Two workers (namespaces) are two engines: b has nothing of a's."""
    server = fresh(pki)
    a, b = fresh(pki), fresh(pki)
    ok(run_pair(a, server))
    assert ok(run_pair(a, server)).server.resumed
    pair = ok(run_pair(b, server))
    assert not pair.server.resumed and not pair.client.resumed
    assert b.reuse is not None and b.reuse.client.hits == 0


def test_server_that_forgot_falls_back_to_certificates(
        pki: Any, run_pair: Any) -> None:
    client, server = fresh(pki), fresh(pki)
    ok(run_pair(client, server))
    restarted = fresh(pki)  # same credentials, empty table
    pair = ok(run_pair(client, restarted))
    assert not pair.client.resumed and not pair.server.resumed
    assert pair.client.peer_subject == "CN=server"
    prove_pair(pair)
    # ...and the client now holds the restarted server's PSK.
    assert ok(run_pair(client, restarted)).server.resumed


def test_peer_that_keeps_nothing_costs_nothing(pki: Any,
                                               run_pair: Any) -> None:
    """A server with the switch off ignores the ALPN protocol: the client
    keeps nothing, offers nothing, and never waits."""
    client = fresh(pki)
    server = fresh(pki, reuse=None)
    for _ in range(2):
        start = time.monotonic()
        pair = ok(run_pair(client, server, timeout=20))
        assert time.monotonic() - start < 5
        assert not pair.client.resumed
        assert seqs(pair) == (0, 0, 0, 0)
        prove_pair(pair)
    assert client.reuse is not None and len(client.reuse.client) == 0


def test_switch_off_client(pki: Any, run_pair: Any) -> None:
    client, server = fresh(pki, reuse=None), fresh(pki)
    for _ in range(2):
        pair = ok(run_pair(client, server))
        assert not pair.server.resumed
    assert server.reuse is not None and len(server.reuse.server) == 0


def test_kernel_certificate_server_does_not_reuse(pki: Any,
                                                  run_pair: Any) -> None:
    eng = fresh(pki)
    der = pki.pki.leaf("der-srv", dns=("localhost",)).der_pair
    for _ in range(2):
        pair = ok(run_pair(eng, eng, server_kw={"x509": der}))
        assert not pair.server.resumed
    assert eng.reuse is not None and len(eng.reuse.server) == 0


def test_expired_entries_are_not_offered(pki: Any, run_pair: Any) -> None:
    eng = fresh(pki, reuse=ReuseSettings(lifetime=0.5, cache_size=4))
    ok(run_pair(eng, eng))
    time.sleep(0.6)
    assert not ok(run_pair(eng, eng)).server.resumed


# -- pieces -----------------------------------------------------------------


def key(n: int) -> PeerKey:
    return PeerKey("127.0.0.%d" % n, 2049, "localhost", "anonymous")


def test_table_expires_and_is_bounded() -> None:
    now = [0.0]
    table: ClientCache = ClientCache(size=2, lifetime=10,
                                     clock=lambda: now[0])
    e1, e2, e3 = (object() for _ in range(3))
    table.put(key(1), e1)  # type: ignore[arg-type]
    table.put(key(2), e2)  # type: ignore[arg-type]
    assert table.get(key(1)) is e1
    table.put(key(3), e3)  # type: ignore[arg-type]
    assert table.get(key(1)) is None  # least recently stored went
    assert table.get(key(3)) is e3
    now[0] = 9.9
    assert table.get(key(2)) is e2
    now[0] = 10.0
    assert table.get(key(2)) is None
    table.put(key(3), e1)  # type: ignore[arg-type]
    now[0] = 19.0
    assert table.get(key(3)) is e1
    assert len(table) == 1
    with pytest.raises(ValueError):
        ServerTable(size=0)


def test_peer_key() -> None:
    assert peer_key(("10.0.0.1", 2049), "srv", "anonymous") == PeerKey(
        "10.0.0.1", 2049, "srv", "anonymous")
    assert peer_key(("::1", 2049, 0, 0), "srv", "configured") == PeerKey(
        "::1", 2049, "srv", "configured")
    assert peer_key("/run/sock", "srv", "anonymous") is None


def test_both_ends_derive_the_same_psk(pki: Any) -> None:
    """The exporter gives both ends one identity and secret, different
    for every session, with the suite's hash length."""
    from tlshd.worker import handshakeio, tlscreds

    ident = tlscreds.ephemeral_identity()
    results = []
    for suite in (b"TLS_AES_256_GCM_SHA384", b"TLS_AES_128_GCM_SHA256",
                  b"TLS_AES_256_GCM_SHA384"):
        sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ident.use_in_context(sctx)
        cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        cctx.set_tls13_ciphersuites(suite)
        cctx.set_alpn_protos([REUSE_ALPN])
        srv, cli = SSL.Connection(sctx, None), SSL.Connection(cctx, None)
        srv.set_accept_state()
        cli.set_connect_state()
        handshakeio.pump_memory_handshake(cli, srv)
        name = suite.decode()
        a, b = derive(cli, name), derive(srv, name)
        assert a is not None and a == b
        assert a.secret == b.secret
        assert len(a.secret) == (48 if "384" in name else 32)
        assert a.identity.startswith(b"tlshd-reuse ")
        results.append(a)
    assert len({r.identity for r in results}) == 3
    assert len({r.secret for r in results}) == 3
    assert derive(SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None),
                  "TLS_NULL") is None
