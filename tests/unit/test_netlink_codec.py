"""The handshake netlink codec: ACCEPT decoding, DONE encoding."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from supervisorfakes import attr, s32, u32

from tlshd.shared import uapi
from tlshd.shared.errors import ProtocolError
from tlshd.supervisor import netlink_codec


def accept_attrs(**over):
    parts = {
        "fd": s32(uapi.HANDSHAKE_A_ACCEPT_SOCKFD, 5),
        "type": u32(uapi.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE, 1),
        "name": attr(uapi.HANDSHAKE_A_ACCEPT_PEERNAME, b"127.0.0.1\0"),
        "timeout": u32(uapi.HANDSHAKE_A_ACCEPT_TIMEOUT, 10000),
        "keyring": u32(uapi.HANDSHAKE_A_ACCEPT_KEYRING, 0x2a),
        "auth": u32(uapi.HANDSHAKE_A_ACCEPT_AUTH_MODE, 2),
        "peer": u32(uapi.HANDSHAKE_A_ACCEPT_PEER_IDENTITY, 0x1111),
    }
    parts.update(over)
    return b"".join(v for v in parts.values() if v is not None)


def test_decode_full_reply_in_kernel_order():
    req = netlink_codec.decode_accept_attrs(accept_attrs())
    assert req == netlink_codec.AcceptedRequest(
        sockfd=5, msg_type=1, auth_mode=2, timeout_ms=10000,
        peerids=(0x1111,), certs=(), peername="127.0.0.1", keyring=0x2a)


def test_certificate_nest():
    nest = (s32(uapi.HANDSHAKE_A_X509_CERT, 100)
            + s32(uapi.HANDSHAKE_A_X509_PRIVKEY, 200))
    cert = attr(uapi.HANDSHAKE_A_ACCEPT_CERTIFICATE | 0x8000, nest)
    req = netlink_codec.decode_accept_attrs(accept_attrs(peer=cert))
    assert req.certs == ((100, 200),)


def test_optional_attributes_absent():
    req = netlink_codec.decode_accept_attrs(
        accept_attrs(name=None, timeout=None, keyring=None, peer=None))
    assert req.peername is None and req.timeout_ms is None
    assert req.keyring is None and req.peerids == ()


def test_unknown_attribute_skipped():
    req = netlink_codec.decode_accept_attrs(accept_attrs(extra=u32(11, 9)))
    assert req.sockfd == 5


@pytest.mark.parametrize("over,match", [
    ({"fd": None}, "lacks"),
    ({"auth": None}, "lacks"),
    ({"fd": attr(uapi.HANDSHAKE_A_ACCEPT_SOCKFD, b"\1\0")}, "bytes"),
    ({"fd": s32(uapi.HANDSHAKE_A_ACCEPT_SOCKFD, -1)}, "negative"),
    ({"name": attr(uapi.HANDSHAKE_A_ACCEPT_PEERNAME, b"abc")}, "NUL"),
    ({"name": attr(uapi.HANDSHAKE_A_ACCEPT_PEERNAME, b"a\0b\0")}, "NUL"),
    ({"name": attr(uapi.HANDSHAKE_A_ACCEPT_PEERNAME, b"\xff\0")}, "UTF-8"),
    ({"name": attr(uapi.HANDSHAKE_A_ACCEPT_PEERNAME,
                   b"a" * 2000 + b"\0")}, "length"),
    ({"dup": u32(uapi.HANDSHAKE_A_ACCEPT_AUTH_MODE, 2)}, "repeated"),
    ({"peer": u32(uapi.HANDSHAKE_A_ACCEPT_PEER_IDENTITY, 1) * 6},
     "too many"),
    ({"trunc": b"\x08\x00"}, "truncated"),
    ({"long": struct.pack("=HH", 200, 3)}, "out of range"),
])
def test_strict_rejections(over, match):
    with pytest.raises(ProtocolError, match=match):
        netlink_codec.decode_accept_attrs(accept_attrs(**over))


def test_salvage_sockfd_from_broken_reply():
    bad = accept_attrs(name=attr(uapi.HANDSHAKE_A_ACCEPT_PEERNAME, b"x"))
    assert netlink_codec.salvage_sockfd(bad) == 5


@settings(max_examples=1000)
@given(st.binary(max_size=256))
def test_decoder_raises_only_protocol_error(data):
    try:
        netlink_codec.decode_accept_attrs(data)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=12)),
                max_size=12))
def test_decoder_on_well_framed_attrs(items):
    data = b"".join(attr(t, p) for t, p in items)
    try:
        req = netlink_codec.decode_accept_attrs(data)
    except ProtocolError:
        return
    assert req.sockfd >= 0
    assert len(req.peerids) <= uapi.HANDSHAKE_MAX_PEER_IDS


def test_done_encoding_has_only_attributes_1_to_3():
    data = netlink_codec.encode_done(0x21, 9, sockfd=7, status=13,
                              remote_auth=(1, 2, 3, 4, 5, 6))
    (msg,) = netlink_codec.split_messages(data)
    assert msg.type == 0x21 and msg.seq == 9
    assert msg.flags == netlink_codec.NLM_F_REQUEST | netlink_codec.NLM_F_ACK
    cmd, attrs = netlink_codec.genl_payload(msg)
    assert cmd == uapi.HANDSHAKE_CMD_DONE
    got = netlink_codec.iter_attrs(attrs)
    assert {t for t, _ in got} == {1, 2, 3}
    assert got[0] == (1, struct.pack("=I", 13))
    assert got[1] == (2, struct.pack("=i", 7))
    assert len([t for t, _ in got if t == 3]) == 5  # kernel keeps 5


def test_done_status_out_of_range_becomes_eio():
    data = netlink_codec.encode_done(0x21, 1, sockfd=7, status=-5,
                                     remote_auth=())
    (msg,) = netlink_codec.split_messages(data)
    _, attrs = netlink_codec.genl_payload(msg)
    assert netlink_codec.iter_attrs(attrs)[0] == (1, struct.pack("=I", 5))


def test_netlink_error():
    payload = struct.pack("=i", -11) + b"\0" * 16
    msg = netlink_codec.NlMsg(netlink_codec.NLMSG_ERROR, 0, 1, payload)
    assert netlink_codec.netlink_error(msg) == 11
