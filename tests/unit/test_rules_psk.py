"""PSK server rules: every identity the client offers is tried, in
order, until one is known; a ClientHello is read within its limits."""

import errno
import os
import socket
import struct
import time

import pytest

from tlshd.shared import config, protocol
from tlshd.worker import pskhandshake as pskmod
from tlshd.worker import tlsengine


def make_psk(serial, identity, secret):
    return protocol.PskMaterial(serial=serial, identity=identity,
                                secret=secret)


@pytest.fixture(scope="module")
def eng():
    return tlsengine.Engine(config.RoleConfig(), config.RoleConfig())


def vec(width, data):
    return len(data).to_bytes(width, "big") + data


def ext(ext_type, body):
    return struct.pack("!H", ext_type) + vec(2, body)


def client_hello(identities):
    """A TLS 1.3 ClientHello offering ``identities`` (binders are
    zeros: good enough for what is read before OpenSSL runs)."""
    ids = b"".join(vec(2, i) + b"\0\0\0\0" for i in identities)
    binders = b"".join(vec(1, b"\0" * 32) for _ in identities)
    exts = (ext(43, vec(1, b"\x03\x04"))  # supported_versions
            + ext(45, vec(1, b"\x01"))  # psk_dhe_ke
            + ext(10, vec(2, b"\x00\x1d"))  # x25519
            + ext(51, vec(2, b"\x00\x1d" + vec(2, os.urandom(32))))
            + ext(41, vec(2, ids) + vec(2, binders)))  # last, as required
    body = (b"\x03\x03" + os.urandom(32) + vec(1, b"") + vec(2, b"\x13\x01")
            + vec(1, b"\0") + vec(2, exts))
    hs = b"\x01" + vec(3, body)
    return b"\x16\x03\x01" + vec(2, hs)


def test_offered_identities_in_order():
    ids = [b"first", b"second", b"x" * 300]
    assert pskmod.offered_identities(client_hello(ids)) == ids
    assert pskmod.offered_identities(client_hello([])) == []


def test_hello_split_over_records_is_reassembled():
    record = client_hello([b"a", b"b"])
    hs = record[5:]
    split = b"".join(b"\x16\x03\x03" + vec(2, hs[i : i + 7])
                     for i in range(0, len(hs), 7))
    assert pskmod.offered_identities(split) == [b"a", b"b"]
    with pytest.raises(pskmod.HelloIncomplete):
        pskmod.offered_identities(split[:-1])


@pytest.mark.parametrize("name,data", [
    ("not a handshake record", b"\x17" + client_hello([b"a"])[1:]),
    ("empty record", b"\x16\x03\x01\x00\x00"),
    ("record over 2^14", b"\x16\x03\x01" + struct.pack(
        "!H", (1 << 14) + 1) + b"\x01" * ((1 << 14) + 1)),
    ("not a ClientHello", b"\x16\x03\x01" + vec(2, b"\x02" + vec(3, b""))),
    ("ClientHello over 64 KiB", b"\x16\x03\x01" + vec(
        2, b"\x01" + (1 << 16).to_bytes(3, "big") + b"\0" * 100)),
])
def test_bad_hellos_are_refused(name, data):
    with pytest.raises(ValueError):
        pskmod.offered_identities(data)


def test_hello_cut_short_waits_for_the_rest():
    data = client_hello([b"abc"])
    with pytest.raises(pskmod.HelloIncomplete) as exc:
        pskmod.offered_identities(data[:-40])
    assert exc.value.needed == len(data)
    with pytest.raises(pskmod.HelloIncomplete) as exc:
        pskmod.offered_identities(data[:3])
    assert exc.value.needed == 5


def test_truncated_identity_vector_is_a_decode_error():
    good = client_hello([b"abc"])
    hs = bytearray(good[5:])
    # Claim one byte more in the identity's length than there is.
    pos = hs.index(b"\x00\x03abc")
    hs[pos + 1] = 0xFF
    with pytest.raises(ValueError):
        pskmod.offered_identities(b"\x16\x03\x01" + vec(2, bytes(hs)))


def serve(eng, hello, table, timeout=3.0):
    looked_up = []

    def lookup(identity):
        looked_up.append(identity)
        return table.get(identity)

    c, s = socket.socketpair()
    with c, s:
        c.sendall(hello)
        c.shutdown(socket.SHUT_WR)
        out = eng.psk.server(
            s, lookup=lookup, deadline=time.monotonic() + timeout)
    return out, looked_up


def test_server_picks_the_identity_it_has(eng):
    """Offered [unknown, known, also known]: the server looks up the
    first two and takes the second (the handshake then fails on the
    fake binder, which is not ENOKEY)."""
    known = make_psk(5, b"known", b"k" * 32)
    also = make_psk(6, b"also", b"a" * 32)
    out, looked_up = serve(
        eng, client_hello([b"unknown", b"known", b"also"]),
        {b"known": known, b"also": also})
    assert looked_up == [b"unknown", b"known"]
    assert out.status != errno.ENOKEY
    assert out.status != 0


def test_server_with_no_known_identity_names_them_all(eng):
    out, looked_up = serve(eng, client_hello([b"one", b"two"]), {})
    assert looked_up == [b"one", b"two"]
    assert out.status == errno.ENOKEY
    assert "'one', 'two'" in out.reason


def test_server_refuses_a_hello_without_psk(eng):
    out, looked_up = serve(eng, client_hello([]), {})
    assert out.status == errno.EACCES
    assert looked_up == []


def test_hash_follows_nvme_identity_then_key_length():
    assert pskmod.psk_hash(b"NVMe1R02 h s", 32) == pskmod.SHA384
    assert pskmod.psk_hash(b"NVMe0G01 h s", 48) == pskmod.SHA256
    assert pskmod.psk_hash(b"NVMe2R02 h s", 32) == pskmod.SHA256
    assert pskmod.psk_hash(b"xNVMe0R02 h s", 32) == pskmod.SHA256
    assert pskmod.psk_hash(b"NVMe0R02h", 32) == pskmod.SHA256
    assert pskmod.psk_hash(b"other", 48) == pskmod.SHA384
    assert pskmod.psk_hash(b"other", 47) == pskmod.SHA256


def test_printable_cuts_long_identities():
    assert pskmod.printable(b"a\xff") == "a\\xff"
    assert pskmod.printable(b"a" * 400) == "a" * 400
    assert pskmod.printable(b"a" * 401) == "a" * 400 + "..."


def records(hs, size=1 << 14):
    return b"".join(b"\x16\x03\x03" + vec(2, hs[i : i + size])
                    for i in range(0, len(hs), size))


def test_hello_of_max_size_over_four_records_is_read():
    """64 KiB is the limit, inclusive; one byte more is refused."""
    base = client_hello([b"id"])[5:]
    for extra, ok in ((0, True), (1, False)):
        pad = pskmod.MAX_HELLO - len(base) - 4 + extra
        body = base[4:]
        exts_at = 2 + 32 + 1 + 4 + 2
        exts = body[exts_at + 2 :]
        padded = ext(21, b"\0" * pad) + exts  # padding first, PSK last
        body = body[:exts_at] + vec(2, padded)
        hs = b"\x01" + vec(3, body)
        assert len(hs) == pskmod.MAX_HELLO + extra
        if ok:
            assert pskmod.offered_identities(records(hs)) == [b"id"]
        else:
            with pytest.raises(ValueError):
                pskmod.offered_identities(records(hs))


def test_psk_repr_hides_the_secret():
    psk = make_psk(5, b"ident", b"SECRET-BYTES" * 3)
    assert b"SECRET-BYTES" not in repr(psk).encode()


@pytest.mark.parametrize("hello,alert", [
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", 50),
    (None, 40),
    ([b"nobody-knows-me"], 115),
])
def test_server_alerts_say_why(eng, hello, alert):
    """A refused ClientHello gets the RFC 8446 alert for its reason:
    decode_error (50), handshake_failure (40), unknown_psk_identity
    (115)."""
    if hello is None:
        hello = client_hello([])
    elif isinstance(hello, list):
        hello = client_hello(hello)
    c, s = socket.socketpair()
    with c, s:
        c.sendall(hello)
        eng.psk.server(s, lookup=lambda i: None,
                       deadline=time.monotonic() + 3)
        c.settimeout(3)
        assert c.recv(7) == bytes([21, 3, 3, 0, 2, 2, alert])
