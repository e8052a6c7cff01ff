"""KeyUpdate logic on a fake kTLS socket, the worker's session table, and
the worker's handling of the kernel's key update requests.

The real kernel is exercised in tests/kernel/test_rekey.py; here the
socket records what would reach the kernel, and the next-generation keys
are checked against an independent HKDF (cryptography's HKDFExpand) and
the test record layer's reading of the crypto_info blob.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from ktlspeer import KtlsPeer, parse_key_update, split_handshake
from recordlayer import RecordLayer

from tlshd.shared import protocol, tlsstat, uapi
from tlshd.worker import ktls, serve
from tlshd.worker.rekey import (
    KtlsSocket,
    RekeyError,
    Secrets,
    key_update_message,
)
from tlshd.worker.rekeytable import RekeyTable

SOL_TLS, TLS_TX, TLS_RX = 282, 1, 2
SHA = {"TLS_AES_128_GCM_SHA256": hashes.SHA256(),
       "TLS_AES_256_GCM_SHA384": hashes.SHA384(),
       "TLS_CHACHA20_POLY1305_SHA256": hashes.SHA256()}
KEY_LEN = {"TLS_AES_128_GCM_SHA256": 16, "TLS_AES_256_GCM_SHA384": 32,
           "TLS_CHACHA20_POLY1305_SHA256": 32}


def label(secret: bytes, name: bytes, length: int, h: Any) -> bytes:
    full = b"tls13 " + name
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\0"
    return HKDFExpand(h, length, info).derive(secret)


def expected_layer(cipher: str, secret: bytes, generations: int
                   ) -> tuple[bytes, bytes]:
    """(key, iv) after ``generations`` KeyUpdates, independently."""
    h = SHA[cipher]
    for _ in range(generations):
        secret = label(secret, b"traffic upd", h.digest_size, h)
    return label(secret, b"key", KEY_LEN[cipher], h), label(
        secret, b"iv", 12, h)


class FakeKtls:
    """Records setsockopt/sendmsg; recvmsg replays scripted records."""

    def __init__(self, records: list[tuple[int, bytes] | int] = ()) -> None:
        self.records = list(records)
        self.opts: list[tuple[int, int, bytes]] = []
        self.sent: list[tuple[int, bytes]] = []  # (record type, data)

    def fileno(self) -> int:
        return 99

    def gettimeout(self) -> float | None:
        return None

    def setsockopt(self, level: int, opt: int, value: bytes) -> None:
        self.opts.append((level, opt, value))

    def sendmsg(self, buffers: list[bytes], anc: list[Any]) -> int:
        assert anc == [(SOL_TLS, 1, bytes([22]))]
        data = b"".join(buffers)
        self.sent.append((22, data))
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.sent.append((23, data))

    def recvmsg(self, bufsize: int, ancbufsize: int) -> Any:
        assert ancbufsize >= socket.CMSG_SPACE(1)
        item = self.records.pop(0)
        if isinstance(item, int):
            raise OSError(item, "scripted")
        kind, data = item
        anc = [] if kind == 23 else [(SOL_TLS, 2, bytes([kind]))]
        return data[:bufsize], anc, 0, None


def session(cipher: str = "TLS_AES_128_GCM_SHA256",
            records: list[tuple[int, bytes] | int] = ()
            ) -> tuple[KtlsPeer, FakeKtls, Secrets]:
    n = SHA[cipher].digest_size
    secrets = Secrets(cipher, bytes(range(n)), bytes(range(100, 100 + n)))
    sock = FakeKtls(records)
    return KtlsPeer(sock, secrets), sock, secrets  # type: ignore[arg-type]


# ---------------------------------------------------- KeyUpdate messages


def test_key_update_message_bytes() -> None:
    assert key_update_message(False) == bytes.fromhex("1800000100")
    assert key_update_message(True) == bytes.fromhex("1800000101")
    assert parse_key_update(bytes.fromhex("1800000100")) is False
    assert parse_key_update(bytes.fromhex("1800000101")) is True


@pytest.mark.parametrize("raw", [
    "1800000102",  # request_update 2
    "18000001",  # no body
    "180000020000",  # length 2
    "1400000100",  # Finished type
    "180000010000",  # trailing byte
])
def test_malformed_key_update_rejected(raw: str) -> None:
    with pytest.raises(RekeyError):
        parse_key_update(bytes.fromhex(raw))


def test_split_handshake_keeps_partial_tail() -> None:
    ku = key_update_message(False)
    msgs, tail = split_handshake(ku + ku[:3])
    assert msgs == [ku] and tail == ku[:3]
    with pytest.raises(RekeyError):
        split_handshake(bytes([4, 0xFF, 0xFF, 0xFF]))


# ------------------------------------------------------------- sessions


@pytest.mark.parametrize("cipher", sorted(SHA))
def test_send_key_update_then_next_tx_key(cipher: str) -> None:
    s, sock, secrets = session(cipher)
    for gen in (1, 2, 3):
        s.send_key_update(request_update=gen == 2)
        assert sock.sent[-1] == (22, key_update_message(gen == 2))
        level, opt, info = sock.opts[-1]
        assert (level, opt) == (SOL_TLS, TLS_TX)
        layer = RecordLayer(info)
        assert layer.seq == 0  # a new generation starts at record 0
        key, iv = expected_layer(cipher, secrets.tx, gen)
        assert layer.iv == iv
        assert info == ktls.derive_crypto_info(
            cipher, s.secrets().tx, 0)
        assert key in info
    assert (s.tx_generation, s.rx_generation) == (3, 0)
    assert s.secrets().rx == secrets.rx
    # Secrets never reach a log line through repr.
    assert secrets.tx.hex() not in repr(s.secrets())
    assert "tx=" not in repr(s.secrets()) and "rx=" not in repr(s)


def test_recv_handles_key_update_and_answers_request() -> None:
    ku_req = key_update_message(True)
    s, sock, secrets = session(records=[
        (23, b"before"), (22, ku_req), (23, b"after")])
    assert s.recv(100) == b"before"
    assert s.recv(100) == b"after"
    # RX moved on first, then our answer went out and TX moved on.
    assert [o[1] for o in sock.opts] == [TLS_RX, TLS_TX]
    assert sock.sent == [(22, key_update_message(False))]
    _, iv = expected_layer("TLS_AES_128_GCM_SHA256", secrets.rx, 1)
    assert RecordLayer(sock.opts[0][2]).iv == iv
    assert (s.tx_generation, s.rx_generation) == (1, 1)


def test_recv_skips_tickets_and_reassembles_split_key_update() -> None:
    ku = key_update_message(False)
    ticket = bytes([4, 0, 0, 3, 1, 2, 3])
    s, sock, _ = session(records=[
        (22, ticket), (22, ku[:2]), (22, ku[2:]), (23, b"data")])
    assert s.recv(100) == b"data"
    assert [o[1] for o in sock.opts] == [TLS_RX]
    assert s.rx_generation == 1 and sock.sent == []


@pytest.mark.parametrize("records", [
    [(22, key_update_message(False) + key_update_message(False))],
    [(22, key_update_message(False) + bytes([4, 0, 0, 0]))],
    [(22, bytes([13, 0, 0, 0]))],  # CertificateRequest: not supported
    [(21, bytes([2, 40]))],  # fatal alert
    [(20, b"\x01")],  # change_cipher_spec after the handshake
    [errno.EKEYEXPIRED],  # the kernel saw a KeyUpdate we did not
])
def test_recv_protocol_errors(records: list[Any]) -> None:
    s, _, _ = session(records=records)
    with pytest.raises(RekeyError):
        s.recv(100)


def test_close_notify_is_eof() -> None:
    s, _, _ = session(records=[(21, bytes([1, 0]))])
    assert s.recv(100) == b""


def test_socket_with_timeout_refused() -> None:
    # Python polls before a timed read; the kernel's poll hides a received
    # KeyUpdate that waits to be read.
    with socket.socket() as sock:
        sock.settimeout(5)
        with pytest.raises(ValueError, match="blocking"):
            KtlsSocket(sock, Secrets("TLS_AES_128_GCM_SHA256", b"a" * 32,
                                      b"b" * 32))


def test_unknown_cipher_refused() -> None:
    with pytest.raises(ValueError):
        KtlsSocket(FakeKtls(), Secrets("TLS_NULL", b"", b""))  # type: ignore[arg-type]


# ---------------------------------------------------------- the table


def test_session_ids_random_nonzero_and_unique() -> None:
    ids = iter([0, 7, 7, 9])
    table = RekeyTable(new_id=lambda: next(ids))
    sec = Secrets("TLS_AES_128_GCM_SHA256", b"a" * 32, b"b" * 32)
    assert table.add(sec) == 7
    assert table.add(sec) == 9
    assert len(table) == 2
    assert table.forget(7) and not table.forget(7)


def test_session_table_bounded_lru() -> None:
    table = RekeyTable(max_sessions=2)
    sec = Secrets("TLS_AES_128_GCM_SHA256", b"a" * 32, b"b" * 32)
    a, b = table.add(sec), table.add(sec)
    with table.use(a):
        pass  # a is now the most recently used
    c = table.add(sec)
    assert a in table and c in table and b not in table


def test_session_table_expires_idle_entries() -> None:
    now = [0.0]
    table = RekeyTable(max_idle=100, clock=lambda: now[0])
    sec = Secrets("TLS_AES_128_GCM_SHA256", b"a" * 32, b"b" * 32)
    sid = table.add(sec)
    now[0] = 99
    with table.use(sid) as slot:
        assert slot.secrets == sec
    now[0] = 198  # 99 s after the last use: still there
    with table.use(sid):
        pass
    now[0] = 400
    with pytest.raises(KeyError), table.use(sid):
        pass
    assert len(table) == 0


# ------------------------------------------- the worker's key update path


def request(msg_type: int, key_update: int = 0, session_id: int = 0,
            keep: bool = False) -> protocol.HandshakeRequest:
    return protocol.HandshakeRequest(
        msg_type=msg_type, auth_mode=uapi.AuthMode.PSK, timeout_ms=1000,
        peername=None, keep_secrets=keep,
        key_update=key_update, session_id=session_id)


@pytest.mark.parametrize(("kind", "opts", "sent"), [
    (uapi.KeyUpdateType.SEND, [TLS_TX], 1),
    (uapi.KeyUpdateType.RECEIVED, [TLS_RX], 0),
    (uapi.KeyUpdateType.RECEIVED_REQUEST_UPDATE, [TLS_RX, TLS_TX], 1),
])
def test_run_key_update(kind: int, opts: list[int], sent: int) -> None:
    table = RekeyTable()
    sec = Secrets("TLS_AES_256_GCM_SHA384", b"t" * 48, b"r" * 48)
    sid = table.add(sec)
    sock = FakeKtls()
    status, reason = serve.run_key_update(
        table, request(uapi.MsgType.CLIENTKEYUPDATE, kind, sid),
        sock)  # type: ignore[arg-type]
    assert (status, reason) == (0, "")
    assert [o[1] for o in sock.opts] == opts
    assert len(sock.sent) == sent
    with table.use(sid) as slot:  # the table follows the kernel
        assert slot.secrets.tx_generation == (TLS_TX in opts)
        assert slot.secrets.rx_generation == (TLS_RX in opts)
        assert (slot.secrets.tx != sec.tx) == (TLS_TX in opts)


def test_run_key_update_unknown_session_is_enokey() -> None:
    status, _ = serve.run_key_update(
        RekeyTable(), request(uapi.MsgType.SERVERKEYUPDATE,
                                uapi.KeyUpdateType.SEND, 5),
        FakeKtls())  # type: ignore[arg-type]
    assert status == errno.ENOKEY


def test_run_key_update_kernel_refusal_is_eio() -> None:
    class Old(FakeKtls):
        def setsockopt(self, level: int, opt: int, value: bytes) -> None:
            raise OSError(errno.EBUSY, "6.12")

    table = RekeyTable()
    sid = table.add(Secrets("TLS_AES_128_GCM_SHA256", b"a" * 32, b"b" * 32))
    status, reason = serve.run_key_update(
        table, request(uapi.MsgType.CLIENTKEYUPDATE,
                       uapi.KeyUpdateType.RECEIVED, sid),
        Old())  # type: ignore[arg-type]
    assert status == errno.EIO and "re-key failed" in reason


def test_handle_key_update_answers_with_session_id() -> None:
    a, b = socket.socketpair()
    b.close()
    table = RekeyTable()
    sid = table.add(Secrets("TLS_AES_128_GCM_SHA256", b"a" * 32, b"b" * 32))
    job = serve.Job(1, request(uapi.MsgType.CLIENTKEYUPDATE,
                               uapi.KeyUpdateType.RECEIVED, sid), a.detach())
    # A socketpair has no kTLS: the kernel refuses, the answer says EIO.
    answer = serve.handle(None, job, table)  # type: ignore[arg-type]
    assert answer.status == errno.EIO and answer.session_id == 0
    job = serve.Job(2, request(uapi.MsgType.CLIENTKEYUPDATE,
                               uapi.KeyUpdateType.RECEIVED, sid),
                    socket.socket().detach())
    assert serve.handle(None, job, None).status == errno.EOPNOTSUPP  # type: ignore[arg-type]


def test_tls_stat_probe(tmp_path: Any) -> None:
    old = tmp_path / "old"
    old.write_text("TlsCurrTxSw                     \t0\n"
                   "TlsDecryptError                 \t0\n")
    new = tmp_path / "new"
    new.write_text(old.read_text() + "TlsRxRekeyOk\t3\nTlsTxRekeyOk\t4\n")
    assert not tlsstat.rekey_supported(str(old))
    assert tlsstat.rekey_supported(str(new))
    assert not tlsstat.rekey_supported(str(tmp_path / "missing"))
    assert tlsstat.read(str(new))["TlsTxRekeyOk"] == 4
