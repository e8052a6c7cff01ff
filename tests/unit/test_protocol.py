"""The supervisor-worker protocol: round trips and strict decoding."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlshd.shared import protocol
from tlshd.shared.errors import ProtocolError

PSK = protocol.PskMaterial(serial=7, identity=b"NVMe0R01 host subsys",
                           secret=b"k" * 32)
REQ = protocol.HandshakeRequest(
    msg_type=1, auth_mode=3, timeout_ms=15000, peername="server.example",
    psks=(PSK, protocol.PskMaterial(serial=8, identity=b"x" * 4096,
                                    secret=b"s" * 48)),
    x509_cert=b"\x30" * 900, x509_key=b"\x30\x82" * 600)


@pytest.mark.parametrize("msg,nfds", [
    (REQ, 1),
    (protocol.HandshakeAnswer(status=13, remote_auth=(0xFFFFFFFF,)), 0),
    (protocol.HandshakeAnswer(status=13, remote_auth=(),
                              reason="certificate has expired"), 0),
    (protocol.Hello(pid=5, uid=998, gid=998, cap_eff=0, no_new_privs=1,
                    seccomp=2), 0),
    (protocol.LogRecord(level=40, text="Handshake with 'x' failed"), 0),
    (protocol.PskLookup(identity=b"NVMe1R02 " + b"\xff" * 300), 0),
    (protocol.PskFound(psk=PSK), 0),
    (protocol.PskFound(psk=None), 0),
])
def test_round_trip(msg, nfds):
    data = protocol.encode(msg, req_id=42)
    decoded, req_id = protocol.decode(data, nfds)
    assert decoded == msg
    assert req_id == 42


def test_peername_none_survives():
    msg = protocol.HandshakeRequest(
        msg_type=2, auth_mode=3, timeout_ms=1, peername=None)
    assert protocol.decode(protocol.encode(msg), 1)[0] == msg


def test_wrong_fd_count_rejected():
    with pytest.raises(ProtocolError, match="fds"):
        protocol.decode(protocol.encode(REQ), 0)
    ans = protocol.HandshakeAnswer(status=0, remote_auth=())
    with pytest.raises(ProtocolError, match="fds"):
        protocol.decode(protocol.encode(ans), 1)


def test_trailing_bytes_rejected():
    data = protocol.encode(protocol.HandshakeAnswer(status=0,
                                                    remote_auth=()))
    hdr = protocol.HEADER.unpack_from(data)
    body = data[protocol.HEADER.size:] + b"\0"
    bad = protocol.HEADER.pack(hdr[0], hdr[1], hdr[2], len(body),
                               hdr[4]) + body
    with pytest.raises(ProtocolError, match="trailing"):
        protocol.decode(bad, 0)


def test_length_mismatch_rejected():
    data = protocol.encode(REQ) + b"x"
    with pytest.raises(ProtocolError, match="length"):
        protocol.decode(data, 1)


def test_unknown_type_version_magic_rejected():
    body = b""
    for magic, version, mtype, what in [
        (0x1234, 1, 5, "magic"),
        (protocol.MAGIC, 9, 5, "version"),
        (protocol.MAGIC, protocol.PROTOCOL_VERSION, 99, "unknown"),
    ]:
        data = protocol.HEADER.pack(magic, version, mtype, 0, 0) + body
        with pytest.raises(ProtocolError, match=what):
            protocol.decode(data, 0)


def _answer_frame(status: int, resumed: int) -> bytes:
    # status, no REMOTE_AUTH, no reason, no session id, no kind, resumed
    body = struct.pack("!IBHIBB", status, 0, 0, 0, 0, resumed)
    return protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION,
                                protocol.Msg.HANDSHAKE_ANS,
                                len(body), 1) + body


def test_status_beyond_max_errno_rejected():
    with pytest.raises(ProtocolError, match="errno"):
        protocol.decode(_answer_frame(5000, 0), 0)


def test_session_reuse_flag_is_strict():
    ok, _ = protocol.decode(_answer_frame(0, 1), 0)
    assert isinstance(ok, protocol.HandshakeAnswer) and ok.resumed
    for status, resumed in ((0, 2), (13, 1)):
        with pytest.raises(ProtocolError, match="session reuse flag"):
            protocol.decode(_answer_frame(status, resumed), 0)


def test_bad_log_level_rejected():
    msg = protocol.LogRecord(level=33, text="x")
    with pytest.raises(ProtocolError):
        protocol.decode(protocol.encode(msg), 0)


@settings(max_examples=500)
@given(st.binary(max_size=300), st.integers(0, 2))
def test_decoder_raises_only_protocol_error(data, nfds):
    try:
        protocol.decode(data, nfds)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from(list(protocol.Msg)),
       st.integers(0, 2 ** 64 - 1))
def test_decoder_on_valid_headers(body, mtype, req_id):
    data = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION,
                                mtype, len(body), req_id) + body
    nfds = 1 if mtype == protocol.Msg.HANDSHAKE_REQ else 0
    try:
        msg, rid = protocol.decode(data, nfds)
    except ProtocolError:
        return
    assert rid == req_id
    # Whatever decodes must encode back to the same bytes.
    assert protocol.encode(msg, rid) == data
