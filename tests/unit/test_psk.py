"""TLS 1.3 external-PSK handshakes (NVMe/TCP), both roles, on loopback.

Our client against our server; every success is proven on records: what
one side seals with its kTLS TX keys the other side opens with its RX keys,
in both directions. The ClientHello peek and parser are tested on real
ClientHellos, fragmented and dribbled in.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from typing import Any

import pytest
from recordlayer import RecordLayer, recv_app_data, send_app_data

from tlshd.shared.config import RoleConfig
from tlshd.shared.protocol import PskMaterial
from tlshd.worker import pskhandshake as pskmod
from tlshd.worker.tlsengine import Engine, Outcome


def material(serial: int, identity: bytes, secret: bytes) -> PskMaterial:
    return PskMaterial(serial=serial, identity=identity, secret=secret)

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0c4a3fd2-7a3b-4f0e-9a52-6b1f0d0e1a"
SUBNQN = "nqn.2014-08.org.example:" + "s" * 199  # 223 bytes


def identity(hh: str, long: bool = True) -> bytes:
    host, sub = (HOSTNQN, SUBNQN) if long else ("h", "s")
    return f"NVMe0R{hh} {host} {sub}".encode()


@pytest.fixture(scope="module")
def eng() -> Engine:
    return Engine(RoleConfig(), RoleConfig())


def pair() -> tuple[socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    ls.close()
    return c, s


class Run:
    """Client and server PSK handshakes on one loopback connection."""

    def __init__(self, eng: Engine, psks: list[PskMaterial],
                 table: dict[bytes, PskMaterial], timeout: float = 10) -> None:
        self.looked_up: list[bytes] = []

        def lookup(ident: bytes) -> PskMaterial | None:
            self.looked_up.append(ident)
            return table.get(ident)

        self.csock, self.ssock = pair()
        result: dict[str, Outcome] = {}

        def serve() -> None:
            result["s"] = eng.psk.server(
                self.ssock, lookup=lookup,
                deadline=time.monotonic() + timeout)

        t = threading.Thread(target=serve)
        t.start()
        self.client = eng.psk.client(
            self.csock, psks=psks, deadline=time.monotonic() + timeout)
        if self.client.status:
            self.csock.shutdown(socket.SHUT_RDWR)
        t.join(timeout + 5)
        self.server = result["s"]

    def prove_keys(self) -> None:
        """Records sealed with one side's TX open with the other's RX."""
        c, s = self.client, self.server
        assert c.tx and c.rx and s.tx and s.rx
        assert (c.tx.seq, c.rx.seq, s.tx.seq, s.rx.seq) == (0, 0, 0, 0)
        ctx, crx = RecordLayer(c.tx.crypto_info()), RecordLayer(
            c.rx.crypto_info())
        stx, srx = RecordLayer(s.tx.crypto_info()), RecordLayer(
            s.rx.crypto_info())
        for i in range(2):
            send_app_data(ctx, self.csock, b"host to target %d" % i)
            assert recv_app_data(srx, self.ssock) == b"host to target %d" % i
            send_app_data(stx, self.ssock, b"target to host %d" % i)
            assert recv_app_data(crx, self.csock) == b"target to host %d" % i

    def close(self) -> None:
        self.csock.close()
        self.ssock.close()


@pytest.mark.parametrize("long_id", [True, False], ids=["301B-id", "short"])
@pytest.mark.parametrize(
    ("hh", "size", "suite"),
    [("01", 32, "TLS_AES_128_GCM_SHA256"),
     ("02", 48, "TLS_AES_256_GCM_SHA384")],
    ids=["sha256", "sha384"],
)
def test_psk_handshake_and_key_proof(
    eng: Engine, hh: str, size: int, suite: str, long_id: bool
) -> None:
    ident = identity(hh, long_id)
    key = os.urandom(size)
    r = Run(eng, [material(0x1111, ident, key)],
            {ident: material(0x2222, ident, key)})
    try:
        assert r.client.status == 0, r.client.reason
        assert r.server.status == 0, r.server.reason
        if long_id:
            assert len(ident) > 255
        for out in (r.client, r.server):
            assert out.cipher == suite
            assert out.group  # psk_dhe_ke: (EC)DHE happened
            assert out.peer_subject is None
        # REMOTE_AUTH is the serial of the PSK each end used.
        assert r.client.remote_auth == (0x1111,)
        assert r.server.remote_auth == (0x2222,)
        assert f"PSK-SHA{'256' if hh == '01' else '384'}" in (
            r.client.description)
        r.prove_keys()
    finally:
        r.close()


def test_hash_selection() -> None:
    assert pskmod.psk_hash(b"NVMe0R01 h s", 48) == "sha256"
    assert pskmod.psk_hash(b"NVMe1G02 h s digest", 32) == "sha384"
    assert pskmod.psk_hash(b"not-nvme", 48) == "sha384"
    assert pskmod.psk_hash(b"not-nvme", 32) == "sha256"
    assert pskmod.psk_hash(b"NVMe0R03 h s", 32) == "sha256"


def test_wrong_key_fails_on_both_ends(eng: Engine) -> None:
    ident = identity("01")
    r = Run(eng, [material(1, ident, os.urandom(32))],
            {ident: material(2, ident, os.urandom(32))})
    r.close()
    print("wrong key: client", errno.errorcode[r.client.status],
          r.client.reason, "| server", errno.errorcode[r.server.status],
          r.server.reason)
    assert r.client.status == errno.EACCES
    assert "decrypt_error" in r.client.reason
    assert r.server.status == errno.EACCES
    assert r.client.remote_auth == r.server.remote_auth == ()


def test_unknown_identity(eng: Engine) -> None:
    ident = identity("02")
    r = Run(eng, [material(1, ident, os.urandom(48))], {})
    r.close()
    print("unknown identity: client", errno.errorcode[r.client.status],
          r.client.reason, "| server", errno.errorcode[r.server.status],
          r.server.reason)
    # The server alerts unknown_psk_identity; the client maps it to
    # EKEYREJECTED (ktls-utils), which makes the NVMe host drop the PSK.
    assert r.client.status == errno.EKEYREJECTED
    assert "unknown_psk_identity" in r.client.reason
    assert r.server.status == errno.ENOKEY
    assert ident.decode() in r.server.reason
    assert r.looked_up == [ident]


def test_client_stops_at_first_status_other_than_eacces(eng: Engine) -> None:
    unknown, known = identity("01"), identity("01", long=False)
    key = os.urandom(32)
    r = Run(eng, [material(1, unknown, key), material(2, known, key)],
            {known: material(3, known, key)})
    r.close()
    assert r.client.status == errno.EKEYREJECTED
    assert r.looked_up == [unknown]  # the second PSK was never offered


def test_no_psk_to_offer(eng: Engine) -> None:
    c, s = pair()
    with c, s:
        out = eng.psk.client(c, psks=[],
                                       deadline=time.monotonic() + 5)
    assert out.status == errno.ENOKEY


def test_certificate_client_gets_an_alert(eng: Engine, pki: Any) -> None:
    """A client offering no PSK (x.509) is refused with an alert."""
    x509 = Engine(pki.client_settings(), pki.settings())
    c, s = pair()
    result: dict[str, Outcome] = {}

    def serve() -> None:
        result["s"] = eng.psk.server(
            s, lookup=lambda i: None, deadline=time.monotonic() + 10)

    t = threading.Thread(target=serve)
    t.start()
    with c, s:
        out = x509.client_handshake(c, peername="localhost", x509=None,
                                    deadline=time.monotonic() + 10)
        t.join(15)
    assert result["s"].status == errno.EACCES
    assert "offered no PSK" in result["s"].reason
    assert out.status == errno.EACCES
    assert "handshake_failure" in out.reason


def test_server_deadline_without_client_hello(eng: Engine) -> None:
    c, s = pair()
    with c, s:
        start = time.monotonic()
        out = eng.psk.server(s, lookup=lambda i: None,
                                       deadline=start + 0.5)
        assert time.monotonic() - start < 3
    assert out.status == errno.ETIMEDOUT


def test_server_peer_closes_mid_hello(eng: Engine) -> None:
    c, s = pair()
    with c, s:
        c.sendall(b"\x16\x03\x01\x02\x00\x01")  # a record header, 1 byte
        c.close()
        out = eng.psk.server(s, lookup=lambda i: None,
                                       deadline=time.monotonic() + 5)
    assert out.status == errno.ETIMEDOUT


def test_server_rejects_garbage(eng: Engine) -> None:
    c, s = pair()
    with c, s:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        out = eng.psk.server(s, lookup=lambda i: None,
                                       deadline=time.monotonic() + 5)
        c.settimeout(5)
        alert = c.recv(7)
    assert out.status == errno.EACCES
    assert alert == bytes([21, 3, 3, 0, 2, 2, pskmod.ALERT_DECODE_ERROR])


# -- the ClientHello peek -------------------------------------------------


def captured_client_hello(eng: Engine, ident: bytes) -> bytes:
    """The raw ClientHello our client sends (the server just reads it)."""
    c, s = pair()
    with c, s:
        t = threading.Thread(target=eng.psk.client, args=(c,),
                             kwargs={"psks": [material(1, ident, b"k" * 32)],
                                     "deadline": time.monotonic() + 1})
        t.start()
        s.settimeout(5)
        data = s.recv(5)
        length = int.from_bytes(data[3:5], "big")
        while len(data) < 5 + length:
            data += s.recv(5 + length - len(data))
        t.join(5)
    return data


def fragment(record: bytes, size: int) -> bytes:
    body = record[5:]
    out = b""
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += record[:3] + len(chunk).to_bytes(2, "big") + chunk
    return out


def test_offered_identities_from_real_and_fragmented_hellos(
    eng: Engine,
) -> None:
    ident = identity("01")
    hello = captured_client_hello(eng, ident)
    assert pskmod.offered_identities(hello) == [ident]
    split = fragment(hello, 100)
    assert split.count(b"\x16\x03\x01") >= len(hello) // 100
    assert pskmod.offered_identities(split) == [ident]
    with pytest.raises(pskmod.HelloIncomplete) as more:
        pskmod.offered_identities(split[:150])
    assert more.value.needed == 2 * 105
    with pytest.raises(ValueError):
        pskmod.offered_identities(b"\x17" + hello[1:])
    with pytest.raises(ValueError):
        pskmod.offered_identities(hello[:5] + b"\x02" + hello[6:])


def test_peek_waits_for_a_dribbled_hello(
    eng: Engine,
) -> None:
    ident = identity("02")
    hello = fragment(captured_client_hello(eng, ident), 300)
    c, s = pair()
    with c, s:
        def dribble() -> None:
            for i in range(0, len(hello), 400):
                c.sendall(hello[i : i + 400])
                time.sleep(0.05)

        t = threading.Thread(target=dribble)
        t.start()
        got = pskmod.peek_identities(s, time.monotonic() + 10)
        t.join()
        assert got == [ident]
        # Nothing was consumed: OpenSSL will read the same ClientHello.
        s.settimeout(5)
        data = b""
        while len(data) < len(hello):
            data += s.recv(len(hello))
        assert data == hello


# -- no file opens, no imports during PSK handshakes (the sandbox) --------

_recording = threading.Event()
_events: list[tuple[str, str]] = []


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _recording.is_set() and event in ("open", "import"):
        _events.append((event, repr(args[0])[:120]))


sys.addaudithook(_hook)


def test_psk_handshakes_neither_open_files_nor_import(eng: Engine) -> None:
    ident = identity("01")
    key = os.urandom(32)
    Run(eng, [material(1, ident, key)],
        {ident: material(2, ident, key)}).close()
    _recording.set()
    try:
        runs = [
            Run(eng, [material(1, ident, key)],
                {ident: material(2, ident, key)}),
            Run(eng, [material(1, ident, key)], {}),
            Run(eng, [material(1, ident, key)],
                {ident: material(2, ident, os.urandom(32))}),
        ]
    finally:
        _recording.clear()
    for r in runs:
        r.close()
    assert _events == []
    assert [r.client.status for r in runs] == [
        0, errno.EKEYREJECTED, errno.EACCES]
