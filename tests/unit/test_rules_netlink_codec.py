"""The netlink codec's rules as tables: every ACCEPT reply it refuses
(and the boundary it still takes), the framing checks, the fd it
salvages from a broken reply, and the exact bytes of ACCEPT and DONE.

The ACCEPT reply comes from the kernel, but a decoder that trusts it
would turn a kernel change (or a bug) into an fd or key serial handed to
a worker; so it is strict, and these tests say how strict.
"""

from __future__ import annotations

import errno
import struct

import pytest
from supervisorfakes import attr, s32, u32

from tlshd.shared import uapi
from tlshd.shared.errors import ProtocolError
from tlshd.supervisor import netlink_codec
from tlshd.supervisor.netlink_codec import (
    decode_accept_attrs,
    salvage_sockfd,
    split_messages,
)

A = uapi
NESTED = 0x8000  # NLA_F_NESTED
BYTEORDER = 0x4000  # NLA_F_NET_BYTEORDER


def cert(c: int | None, k: int | None, size: int = 4) -> bytes:
    nest = b""
    if c is not None:
        nest += attr(A.HANDSHAKE_A_X509_CERT, struct.pack("=i", c)[:size])
    if k is not None:
        nest += attr(A.HANDSHAKE_A_X509_PRIVKEY, struct.pack("=i", k))
    return attr(A.HANDSHAKE_A_ACCEPT_CERTIFICATE | NESTED, nest)


BASE = (s32(A.HANDSHAKE_A_ACCEPT_SOCKFD, 5)
        + u32(A.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE, 1)
        + u32(A.HANDSHAKE_A_ACCEPT_AUTH_MODE, 2))
NAME = A.HANDSHAKE_A_ACCEPT_PEERNAME


def without(atype: int) -> bytes:
    """BASE without its attribute ``atype`` (each is 8 bytes)."""
    return b"".join(BASE[i : i + 8] for i in range(0, len(BASE), 8)
                    if struct.unpack_from("=H", BASE, i + 2)[0] != atype)

PEER = A.HANDSHAKE_A_ACCEPT_PEER_IDENTITY


REFUSED = [
    # required attributes
    ("no SOCKFD", BASE[8:], "lacks attribute 1"),
    ("no MESSAGE_TYPE", BASE[:8] + BASE[16:], "lacks attribute 3"),
    ("no AUTH_MODE", BASE[:16], "lacks attribute 5"),
    ("negative SOCKFD", s32(A.HANDSHAKE_A_ACCEPT_SOCKFD, -1) + BASE[8:],
     "negative SOCKFD"),
    # every single-valued attribute: its exact size, and once
    *[("%d of %d bytes" % (t, n), without(t) + attr(t, b"\1" * n),
       "want 4")
      for t in (A.HANDSHAKE_A_ACCEPT_SOCKFD,
                A.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE,
                A.HANDSHAKE_A_ACCEPT_AUTH_MODE, A.HANDSHAKE_A_ACCEPT_TIMEOUT,
                A.HANDSHAKE_A_ACCEPT_KEYRING, PEER,
                A.HANDSHAKE_A_ACCEPT_HANDLER_CLASS)
      for n in (0, 3, 8)],
    *[("%d repeated" % t, BASE + u32(t, 1) + u32(t, 1), "repeated")
      for t in (A.HANDSHAKE_A_ACCEPT_SOCKFD,
                A.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE,
                A.HANDSHAKE_A_ACCEPT_TIMEOUT,
                A.HANDSHAKE_A_ACCEPT_AUTH_MODE,
                A.HANDSHAKE_A_ACCEPT_KEYRING,
                A.HANDSHAKE_A_ACCEPT_HANDLER_CLASS)],
    ("PEERNAME repeated", BASE + attr(NAME, b"a\0") + attr(NAME, b"a\0"),
     "repeated"),
    # the peer name
    ("PEERNAME empty payload", BASE + attr(NAME, b""), "NUL-terminated"),
    ("PEERNAME without NUL", BASE + attr(NAME, b"abc"), "NUL-terminated"),
    ("PEERNAME only NUL", BASE + attr(NAME, b"\0"), "bad length"),
    ("PEERNAME embedded NUL", BASE + attr(NAME, b"a\0b\0"), "embedded NUL"),
    ("PEERNAME over 1024", BASE + attr(NAME, b"a" * 1025 + b"\0"),
     "bad length"),
    ("PEERNAME not UTF-8", BASE + attr(NAME, b"\xc3\0"), "UTF-8"),
    # bounded lists
    ("6 PEER_IDENTITY", BASE + u32(PEER, 1) * 6, "too many PEER_IDENTITY"),
    ("9 CERTIFICATE", BASE + cert(1, 2) * 9, "too many CERTIFICATE"),
    ("negative X509_CERT", BASE + cert(-1, 2), "negative key serial"),
    ("negative X509_PRIVKEY", BASE + cert(1, -2), "negative key serial"),
    ("short X509_CERT", BASE + cert(1, 2, size=2), "want 4"),
    # framing
    *[("attribute length %d" % n, BASE + struct.pack("=HH", n, 3),
       "attribute length %d out of range" % n) for n in (0, 1, 3, 9)],
    ("truncated attribute header", BASE + b"\x08\x00", "header truncated"),
]


@pytest.mark.parametrize("attrs,match", [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_accept_reply_refused(attrs: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_accept_attrs(attrs)


def test_accept_reply_at_every_bound() -> None:
    attrs = (s32(A.HANDSHAKE_A_ACCEPT_SOCKFD, 0) + BASE[8:]
             + attr(NAME, "\u00e9".encode() * 512 + b"\0")
             + b"".join(u32(PEER, i) for i in range(1, 6))
             + b"".join(cert(i, i + 100) for i in range(8))
             + u32(A.HANDSHAKE_A_ACCEPT_KEYRING, 0xFFFFFFFF)
             + u32(A.HANDSHAKE_A_ACCEPT_HANDLER_CLASS, 1)
             + u32(20, 1) + u32(20, 2))  # unknown: skipped, even twice
    req = decode_accept_attrs(attrs)
    assert req.sockfd == 0
    assert req.peername == "\u00e9" * 512
    assert req.peerids == (1, 2, 3, 4, 5)
    assert req.certs == tuple((i, i + 100) for i in range(8))
    assert req.keyring == 0xFFFFFFFF
    assert (req.key_update, req.session_id) == (0, 0)


def test_certificate_nest_parts_default_to_zero() -> None:
    req = decode_accept_attrs(BASE + cert(7, None) + cert(None, 8)
                              + cert(None, None))
    assert req.certs == ((7, 0), (0, 8), (0, 0))


def test_attribute_flags_are_stripped_from_the_type() -> None:
    req = decode_accept_attrs(
        BASE + u32(A.HANDSHAKE_A_ACCEPT_TIMEOUT | BYTEORDER, 9))
    assert req.timeout_ms == 9


def test_rekey_singles_repeated_only_with_the_upcall() -> None:
    for t in (A.HANDSHAKE_A_ACCEPT_KEY_UPDATE_REQUEST,
              A.HANDSHAKE_A_ACCEPT_SESSION_ID):
        twice = BASE + u32(t, 0) + u32(t, 0)
        assert decode_accept_attrs(twice).sockfd == 5
        with pytest.raises(ProtocolError, match="repeated"):
            decode_accept_attrs(twice, rekey=True)


@pytest.mark.parametrize("attrs,fd", [
    (BASE + attr(NAME, b"x"), 5),
    (s32(A.HANDSHAKE_A_ACCEPT_SOCKFD, 0) + attr(NAME, b"x"), 0),
    (s32(A.HANDSHAKE_A_ACCEPT_SOCKFD, -4), None),
    (s32(A.HANDSHAKE_A_ACCEPT_SOCKFD, -1), None),  # no fd: nothing to close
    (attr(A.HANDSHAKE_A_ACCEPT_SOCKFD, b"\5\0") + BASE, 5),  # first is bad
    (BASE[8:], None),
    (BASE[8:] + b"\x08\x00", None),  # framing broken before any SOCKFD
    (b"", None),
])
def test_salvage_sockfd(attrs: bytes, fd: int | None) -> None:
    assert salvage_sockfd(attrs) == fd


# ---- netlink framing --------------------------------------------------

def nlmsg(mtype: int, payload: bytes, seq: int = 1) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), mtype, 0, seq,
                       0) + payload


@pytest.mark.parametrize("data,match", [
    (b"\0" * 15, "partial header"),
    (struct.pack("=IHHII", 15, 2, 0, 1, 0), "length 15 out of range"),
    (struct.pack("=IHHII", 21, 2, 0, 1, 0) + b"\0" * 4,
     "length 21 out of range"),
    (nlmsg(2, b"\0" * 4) + b"\0" * 8, "partial header"),
])
def test_split_messages_refused(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        split_messages(data)


def test_split_messages_aligned() -> None:
    one = nlmsg(0x21, b"abcde", seq=7)
    data = one + b"\0" * 3 + nlmsg(3, b"", seq=8)
    msgs = split_messages(data)
    assert [(m.type, m.seq, m.payload) for m in msgs] == [
        (0x21, 7, b"abcde"), (3, 8, b"")]
    assert split_messages(b"") == []


def test_genl_and_error_payloads() -> None:
    with pytest.raises(ProtocolError, match="header truncated"):
        netlink_codec.genl_payload(netlink_codec.NlMsg(0x21, 0, 1, b"\2\1"))
    assert netlink_codec.genl_payload(
        netlink_codec.NlMsg(0x21, 0, 1, b"\2\1\0\0xyz")) == (2, b"xyz")
    with pytest.raises(ProtocolError, match="NLMSG_ERROR truncated"):
        netlink_codec.netlink_error(netlink_codec.NlMsg(2, 0, 1, b"\0" * 3))
    ack = netlink_codec.NlMsg(2, 0, 1, b"\0" * 20)
    assert netlink_codec.netlink_error(ack) == 0


def test_abi_constants() -> None:
    """<linux/netlink.h>; the two bounds the decoder applies."""
    c = netlink_codec
    assert (c.NLMSG_ERROR, c.NLMSG_DONE) == (2, 3)
    assert (c.NLM_F_REQUEST, c.NLM_F_ACK) == (1, 4)
    assert c.NLA_TYPE_MASK == 0x3FFF
    assert (c.MAX_PEERNAME, c.MAX_CERTS) == (1024, 8)


# ---- what is sent -----------------------------------------------------

def test_accept_bytes() -> None:
    assert netlink_codec.encode_accept(0x21, 9) == (
        struct.pack("=IHHII", 28, 0x21, 1, 9, 0)  # NLM_F_REQUEST
        + bytes([A.HANDSHAKE_CMD_ACCEPT, 1, 0, 0])
        + struct.pack("=HHI", 8, A.HANDSHAKE_A_ACCEPT_HANDLER_CLASS,
                      A.HandlerClass.TLSHD))


def test_done_bytes() -> None:
    """Status, sockfd, at most five peer ids; REQUEST | ACK; no session
    id unless asked for with the attribute number."""
    done = netlink_codec.encode_done(0x21, 4, sockfd=7, status=4095,
                                     remote_auth=tuple(range(1, 8)))
    assert done == (
        struct.pack("=IHHII", 76, 0x21, 1 | 4, 4, 0)
        + bytes([A.HANDSHAKE_CMD_DONE, 1, 0, 0])
        + struct.pack("=HHI", 8, 1, 4095) + struct.pack("=HHi", 8, 2, 7)
        + b"".join(struct.pack("=HHI", 8, 3, i) for i in range(1, 6)))
    plain = netlink_codec.encode_done(0x21, 4, sockfd=7, status=0,
                                      remote_auth=(), session_id=5)
    assert len(plain) == 16 + 4 + 16
    assert netlink_codec.encode_done(0x21, 4, 7, 0, ()) == plain


@pytest.mark.parametrize("status,sent", [
    (0, 0), (4095, 4095), (4096, errno.EIO), (-1, errno.EIO)])
def test_done_status_range(status: int, sent: int) -> None:
    (msg,) = split_messages(netlink_codec.encode_done(0x21, 1, 7, status,
                                                      ()))
    _, attrs = netlink_codec.genl_payload(msg)
    assert netlink_codec.iter_attrs(attrs)[0] == (
        A.HANDSHAKE_A_DONE_STATUS, struct.pack("=I", sent))


def test_a_repeated_attribute_is_named_in_one_line() -> None:
    """The refusal names the attribute number once (it is logged)."""
    t = A.HANDSHAKE_A_ACCEPT_TIMEOUT
    with pytest.raises(ProtocolError) as err:
        decode_accept_attrs(BASE + u32(t, 1) + u32(t, 2))
    assert str(err.value) == "attribute %d repeated" % t


def test_the_last_attribute_may_lack_its_padding() -> None:
    """As in the kernel's nla_for_each_attr: the padding after the last
    attribute may be left out."""
    assert netlink_codec.iter_attrs(struct.pack("=HH", 5, 9) + b"x") == [
        (9, b"x")]


def test_a_generic_netlink_message_without_attributes() -> None:
    msg = netlink_codec.NlMsg(type=0x21, flags=0, seq=1,
                              payload=struct.pack("=BBH", 3, 1, 0))
    assert netlink_codec.genl_payload(msg) == (3, b"")


def test_an_unknown_attribute_in_a_certificate_nest_is_skipped() -> None:
    """A newer kernel may add attributes to the CERTIFICATE nest: they
    are not taken for the private key."""
    nest = (s32(A.HANDSHAKE_A_X509_CERT, 7)
            + s32(A.HANDSHAKE_A_X509_PRIVKEY, 8) + s32(3, 9) + s32(4, 9))
    req = decode_accept_attrs(
        BASE + attr(A.HANDSHAKE_A_ACCEPT_CERTIFICATE | NESTED, nest))
    assert req.certs == ((7, 8),)


def test_decoded_messages_are_immutable() -> None:
    """What the kernel sent is not changed after it is checked."""
    req = decode_accept_attrs(BASE)
    with pytest.raises(AttributeError):
        req.sockfd = 6  # type: ignore[misc]
    msg = netlink_codec.NlMsg(type=1, flags=0, seq=1, payload=b"")
    with pytest.raises(AttributeError):
        msg.seq = 2  # type: ignore[misc]


def test_the_last_message_may_lack_its_padding() -> None:
    msg = struct.pack("=IHHII", 17, 3, 0, 4, 0) + b"x"
    assert netlink_codec.split_messages(msg) == [
        netlink_codec.NlMsg(type=3, flags=0, seq=4, payload=b"x")]


def test_salvage_takes_sockfd_only() -> None:
    """Another 4-byte attribute before SOCKFD (type 0 included) is not
    taken for the socket."""
    assert salvage_sockfd(s32(0, 9) + s32(A.HANDSHAKE_A_ACCEPT_SOCKFD, 5)) \
        == 5
