"""The proposed re-key upcall on encoded messages: ACCEPT attributes 10
and 11, DONE's SESSION_ID, detection from the kernel's DONE policy, and
the supervisor-worker fields that carry them (protocol version 3)."""

import struct

import pytest
from supervisorfakes import attr, u32

from tlshd.shared import protocol, uapi
from tlshd.shared.errors import ProtocolError
from tlshd.supervisor import netlink_codec, netlink_family

KU = uapi.KeyUpdateType


def accept_attrs(msg_type=uapi.MsgType.CLIENTKEYUPDATE, key_update=KU.SEND,
                 session_id=0x1234ABCD, extra=b""):
    out = (attr(uapi.HANDSHAKE_A_ACCEPT_SOCKFD, struct.pack("=i", 6))
           + u32(uapi.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE, msg_type)
           + u32(uapi.HANDSHAKE_A_ACCEPT_AUTH_MODE, uapi.AuthMode.PSK))
    if key_update is not None:
        out += u32(uapi.HANDSHAKE_A_ACCEPT_KEY_UPDATE_REQUEST, key_update)
    if session_id is not None:
        out += u32(uapi.HANDSHAKE_A_ACCEPT_SESSION_ID, session_id)
    return out + extra


# ------------------------------------------------------------ ACCEPT


@pytest.mark.parametrize("kind", [KU.SEND, KU.RECEIVED,
                                  KU.RECEIVED_REQUEST_UPDATE])
@pytest.mark.parametrize("msg_type", [uapi.MsgType.CLIENTKEYUPDATE,
                                      uapi.MsgType.SERVERKEYUPDATE])
def test_key_update_request_decoded(kind, msg_type):
    req = netlink_codec.decode_accept_attrs(accept_attrs(msg_type, kind),
                                     rekey=True)
    assert (req.msg_type, req.key_update, req.session_id) == (
        msg_type, kind, 0x1234ABCD)
    assert req.sockfd == 6


def test_rekey_attributes_ignored_without_kernel_support():
    # Before the series is merged, 10 and 11 may mean anything: skipped.
    req = netlink_codec.decode_accept_attrs(
        accept_attrs(key_update=7, session_id=0))
    assert (req.key_update, req.session_id) == (0, 0)


def test_hello_may_carry_a_session_id_but_no_key_update():
    req = netlink_codec.decode_accept_attrs(
        accept_attrs(uapi.MsgType.CLIENTHELLO, key_update=None),
        rekey=True)
    assert (req.key_update, req.session_id) == (0, 0x1234ABCD)
    req = netlink_codec.decode_accept_attrs(
        accept_attrs(uapi.MsgType.SERVERHELLO, key_update=KU.UNSPEC,
                     session_id=None), rekey=True)
    assert (req.key_update, req.session_id) == (0, 0)


@pytest.mark.parametrize(("attrs", "match"), [
    (accept_attrs(key_update=4), "KEY_UPDATE_REQUEST 4 unknown"),
    (accept_attrs(key_update=None), "without KEY_UPDATE_REQUEST"),
    (accept_attrs(key_update=KU.UNSPEC), "without KEY_UPDATE_REQUEST"),
    (accept_attrs(session_id=None), "without SESSION_ID"),
    (accept_attrs(session_id=0), "without SESSION_ID"),
    (accept_attrs(uapi.MsgType.CLIENTHELLO, KU.SEND),
     "KEY_UPDATE_REQUEST in a handshake"),
    (accept_attrs(extra=u32(uapi.HANDSHAKE_A_ACCEPT_SESSION_ID, 1)),
     "repeated"),
    (accept_attrs(extra=u32(uapi.HANDSHAKE_A_ACCEPT_KEY_UPDATE_REQUEST, 1)),
     "repeated"),
    (accept_attrs(session_id=None)
     + attr(uapi.HANDSHAKE_A_ACCEPT_SESSION_ID, b"\1\0"), "want 4"),
])
def test_key_update_request_strict(attrs, match):
    with pytest.raises(ProtocolError, match=match):
        netlink_codec.decode_accept_attrs(attrs, rekey=True)


# -------------------------------------------------------------- DONE


def done_attrs(data):
    msg = netlink_codec.split_messages(data)[0]
    cmd, attrs = netlink_codec.genl_payload(msg)
    assert cmd == uapi.HANDSHAKE_CMD_DONE
    return netlink_codec.iter_attrs(attrs)


def test_done_with_session_id_when_policy_has_it():
    data = netlink_codec.encode_done(0x21, 9, 6, 0, (7,), 0xCAFE, 4)
    assert done_attrs(data) == [
        (1, struct.pack("=I", 0)), (2, struct.pack("=i", 6)),
        (3, struct.pack("=I", 7)), (4, struct.pack("=I", 0xCAFE))]


@pytest.mark.parametrize(("status", "sid", "attr_no"), [
    (0, 0xCAFE, None),  # the kernel's DONE has no SESSION_ID
    (0, 0, 4),  # no session kept
    (13, 0xCAFE, 4),  # failures carry no session
])
def test_done_without_session_id(status, sid, attr_no):
    data = netlink_codec.encode_done(0x21, 9, 6, status, (), sid, attr_no)
    assert [a for a, _ in done_attrs(data)] == [1, 2]


# ------------------------------------------------ policy and detection


def nest(atype, payload):
    return attr(atype | 0x8000, payload)


def policy_dump(done_types):
    """Two CTRL_CMD_GETPOLICY replies, as the kernel sends them: the op
    table (DONE's do policy is index 1) and the policy's attributes;
    returned as netlink_family.ask_ctrl does, each reply's attributes."""
    def msg(attrs):
        body = struct.pack("=BBH", 10, 1, 0) + attrs
        return struct.pack("=IHHII", 16 + len(body), 0x10, 2, 1, 0) + body

    ops = msg(attr(1, struct.pack("=H", 0x21)) + nest(
        9, nest(uapi.HANDSHAKE_CMD_DONE, u32(1, 1))))
    attrs = b"".join(nest(n, u32(1, t)) for n, t in done_types.items())
    pol = msg(attr(1, struct.pack("=H", 0x21)) + nest(8, nest(1, attrs)))
    # What netlink_family.ask_ctrl returns: each reply's attributes.
    return [netlink_codec.genl_payload(m)[1] for raw in (ops, pol)
            for m in netlink_codec.split_messages(raw)]


MAINLINE = {1: 4, 2: 8, 3: 4}  # STATUS u32, SOCKFD s32, REMOTE_AUTH u32


def family(done_types):
    types = netlink_family._done_policy(policy_dump(done_types))
    return netlink_family.FamilyInfo(0x21, 5, {}, frozenset(types), types)


def test_mainline_policy_has_no_rekey_upcall():
    fam = family(MAINLINE)
    assert fam.done_attr_types == MAINLINE
    assert not fam.rekey_upcall and fam.done_session_id_attr is None
    assert fam.rekey_status(True) == (
        "Kernel re-key upcall: not supported (DONE policy has no "
        "SESSION_ID; kTLS can re-key)")
    assert fam.capabilities() == (
        "session_tags=unsupported remote_peerids=supported")


def test_keyupdate_series_policy_enables_the_upcall():
    fam = family({**MAINLINE, 4: netlink_family.NL_ATTR_TYPE_U32})
    assert fam.rekey_upcall and fam.done_session_id_attr == 4
    assert fam.rekey_status(True).startswith(
        "Kernel re-key upcall: supported (DONE has a u32 SESSION_ID")
    assert fam.rekey_status(False).startswith(
        "Kernel re-key upcall: not supported (DONE has a u32 SESSION_ID")
    assert "session_tags=unsupported" in fam.capabilities()


def test_nfsd_tag_at_4_is_not_a_session_id():
    fam = family({**MAINLINE, 4: netlink_family.NL_ATTR_TYPE_NUL_STRING})
    assert not fam.rekey_upcall
    assert "session_tags=supported" in fam.capabilities()


def test_getfamily_reply_gives_id_group_and_op_flags():
    """A CTRL_CMD_GETFAMILY reply as 6.12 sends it: the id (u16), the
    ops (ACCEPT and DONE admin-only) and the multicast groups, the
    ``tlshd`` one second."""
    ops = nest(6, nest(1, u32(1, uapi.HANDSHAKE_CMD_ACCEPT) + u32(2, 0xB))
               + nest(2, u32(1, uapi.HANDSHAKE_CMD_DONE) + u32(2, 0xB)))
    groups = nest(7, nest(1, attr(1, b"none\0") + u32(2, 4))
                  + nest(2, attr(1, b"tlshd\0") + u32(2, 5)))
    reply = (attr(1, struct.pack("=H", 0x21)) + attr(2, b"handshake\0")
             + ops + groups)
    assert netlink_family._family(reply) == (
        0x21, 5, {uapi.HANDSHAKE_CMD_ACCEPT: 0xB,
                  uapi.HANDSHAKE_CMD_DONE: 0xB})
    assert netlink_family._family(attr(1, struct.pack("=H", 0x21)))[1] is None
    with pytest.raises(ProtocolError):
        netlink_family._family(attr(1, struct.pack("=I", 0x21)))


def test_ctrl_request_names_the_family():
    data = netlink_family._ctrl_request(
        netlink_family.CTRL_CMD_GETPOLICY, "handshake",
        netlink_family.NLM_F_DUMP, 7)
    (msg,) = netlink_codec.split_messages(data)
    assert (msg.type, msg.flags, msg.seq) == (0x10, 0x301, 7)
    cmd, attrs = netlink_codec.genl_payload(msg)
    assert cmd == netlink_family.CTRL_CMD_GETPOLICY
    assert netlink_codec.iter_attrs(attrs) == [(2, b"handshake\0")]


def test_mainline_done_never_carries_a_session_id():
    # Without the upcall DONE stays attributes 1-3 even for a session id.
    fam = family(MAINLINE)
    data = netlink_codec.encode_done(fam.family_id, 1, 6, 0, (), 5,
                              fam.done_session_id_attr)
    assert [a for a, _ in done_attrs(data)] == [1, 2]


# ---------------------------------------------- supervisor <-> worker


def test_protocol_version_bumped_for_the_new_layouts():
    assert protocol.PROTOCOL_VERSION >= 4


def roundtrip(msg):
    data = protocol.encode(msg, 4)
    return protocol.decode(data, msg.NFDS)[0]


def request(**over):
    fields = dict(msg_type=3, auth_mode=2, timeout_ms=5,
                  peername=None, keep_secrets=False,
                  key_update=KU.RECEIVED, session_id=0x80000001)
    fields.update(over)
    return protocol.HandshakeRequest(**fields)


def test_request_and_answer_carry_rekey_fields():
    for msg in (request(), request(keep_secrets=True, key_update=0,
                                   session_id=0, msg_type=1),
                protocol.HandshakeAnswer(status=0, remote_auth=(),
                                         session_id=0xFFFFFFFF)):
        assert roundtrip(msg) == msg


def test_request_defaults_keep_nothing():
    req = protocol.HandshakeRequest(msg_type=1, auth_mode=1, timeout_ms=1,
                                    peername=None)
    assert (req.keep_secrets, req.key_update, req.session_id) == (
        False, 0, 0)


def tamper(msg, offset_from_end, value):
    data = bytearray(protocol.encode(msg, 4))
    data[len(data) - offset_from_end] = value
    return bytes(data)


@pytest.mark.parametrize(("data", "match"), [
    (tamper(request(), 9, 2), "unknown request flags"),  # flags byte
    (tamper(request(), 5, 4), "key update type 4"),  # key_update low byte
    (protocol.encode(request(session_id=0), 4), "without a session id"),
])
def test_request_decoder_strict(data, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(data, 1)


def test_failed_answer_with_session_id_rejected():
    data = protocol.encode(protocol.HandshakeAnswer(
        status=5, remote_auth=(), reason="x", session_id=3))
    with pytest.raises(ProtocolError, match="session id in a failed"):
        protocol.decode(data, 0)
