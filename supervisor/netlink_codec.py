"""Encode and decode the handshake family's netlink messages.

Pure functions over bytes, so that they can be fuzzed without a kernel.
The decoder is strict about what it knows: every known attribute must have
exactly its wire size, single-valued attributes may appear once, lists are
bounded, the peer name must be NUL-terminated UTF-8 of sane length.
Attributes this kernel interface does not know yet are skipped, because a
newer kernel may add some (netlink's usual forward compatibility).

The proposed re-key upcall (ACCEPT attributes KEY_UPDATE_REQUEST and
SESSION_ID, DONE's SESSION_ID) is decoded and encoded only when the caller
says the kernel has it: before that, the numbers may mean something else.
"""

from __future__ import annotations

import errno
import struct

from tlshd.shared import uapi
from tlshd.shared.errors import ProtocolError
from tlshd.shared.frozen import Frozen

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
GENL_HDR = struct.Struct("=BBH")  # cmd, version, reserved
NLA_HDR = struct.Struct("=HH")  # len, type
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

MAX_PEERNAME = 1024
MAX_CERTS = 8


class NlMsg(Frozen):
    """One netlink message: header fields and payload after nlmsghdr."""

    __slots__ = ("flags", "payload", "seq", "type")
    type: int
    flags: int
    seq: int
    payload: bytes

    def __init__(self, type: int, flags: int, seq: int,
                 payload: bytes) -> None:
        self.type = type
        self.flags = flags
        self.seq = seq
        self.payload = payload


class AcceptedRequest(Frozen):
    """The kernel's ACCEPT reply: one handshake to run.

    ``sockfd`` is an fd number in the process that sent ACCEPT; that
    process owns it and must close it after DONE.
    """

    __slots__ = ("auth_mode", "certs", "key_update", "keyring", "msg_type",
                 "peer_address", "peerids", "peername", "session_id",
                 "sockfd", "timeout_ms")
    sockfd: int
    msg_type: int
    auth_mode: int
    timeout_ms: int | None
    peerids: tuple[int, ...]
    certs: tuple[tuple[int, int], ...]
    peername: str | None
    keyring: int | None
    # Re-key upcall (proposed): uapi.KeyUpdateType and the session id the
    # agent returned in the first handshake's DONE; 0 when absent.
    key_update: int
    session_id: int
    # Not an attribute: the socket's peer address, read from the socket
    # itself when the ACCEPT reply is checked (for the log lines).
    peer_address: str

    def __init__(self, *, sockfd: int, msg_type: int, auth_mode: int,
                 timeout_ms: int | None, peerids: tuple[int, ...],
                 certs: tuple[tuple[int, int], ...], peername: str | None,
                 keyring: int | None, key_update: int = 0,
                 session_id: int = 0, peer_address: str = "") -> None:
        self.sockfd = sockfd
        self.msg_type = msg_type
        self.auth_mode = auth_mode
        self.timeout_ms = timeout_ms
        self.peerids = peerids
        self.certs = certs
        self.peername = peername
        self.keyring = keyring
        self.key_update = key_update
        self.session_id = session_id
        self.peer_address = peer_address


def _align(n: int) -> int:
    return (n + 3) & ~3


def split_messages(data: bytes) -> list[NlMsg]:
    """Split one netlink datagram into its messages."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < NLMSG_HDR.size:
            raise ProtocolError("netlink datagram has a partial header")
        length, mtype, flags, seq, _pid = NLMSG_HDR.unpack_from(data, pos)
        if length < NLMSG_HDR.size or pos + length > len(data):
            raise ProtocolError("netlink message length %d out of range"
                                % length)
        out.append(NlMsg(mtype, flags, seq,
                         data[pos + NLMSG_HDR.size : pos + length]))
        pos += _align(length)
    return out


def iter_attrs(data: bytes) -> list[tuple[int, bytes]]:
    """Split a run of netlink attributes into (type, payload) pairs."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < NLA_HDR.size:
            raise ProtocolError("attribute header truncated")
        length, atype = NLA_HDR.unpack_from(data, pos)
        if length < NLA_HDR.size or pos + length > len(data):
            raise ProtocolError("attribute length %d out of range" % length)
        out.append((atype & NLA_TYPE_MASK,
                    data[pos + NLA_HDR.size : pos + length]))
        pos += _align(length)
    return out


def _u32(payload: bytes, name: str) -> int:
    if len(payload) != 4:
        raise ProtocolError("%s: %d bytes, want 4" % (name, len(payload)))
    return int(struct.unpack("=I", payload)[0])


def _s32(payload: bytes, name: str) -> int:
    if len(payload) != 4:
        raise ProtocolError("%s: %d bytes, want 4" % (name, len(payload)))
    return int(struct.unpack("=i", payload)[0])


def _peername(payload: bytes) -> str:
    if not payload or payload[-1] != 0:
        raise ProtocolError("PEERNAME is not NUL-terminated")
    raw = payload[:-1]
    if not raw or len(raw) > MAX_PEERNAME or b"\0" in raw:
        raise ProtocolError("PEERNAME has a bad length or embedded NUL")
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ProtocolError("PEERNAME is not UTF-8") from e


def _certificate(payload: bytes) -> tuple[int, int]:
    cert = key = 0
    for atype, value in iter_attrs(payload):
        if atype == uapi.HANDSHAKE_A_X509_CERT:
            cert = _s32(value, "X509_CERT")
        elif atype == uapi.HANDSHAKE_A_X509_PRIVKEY:
            key = _s32(value, "X509_PRIVKEY")
    if cert < 0 or key < 0:
        raise ProtocolError("negative key serial in CERTIFICATE")
    return cert, key


_SINGLE = {
    uapi.HANDSHAKE_A_ACCEPT_SOCKFD,
    uapi.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE,
    uapi.HANDSHAKE_A_ACCEPT_TIMEOUT,
    uapi.HANDSHAKE_A_ACCEPT_AUTH_MODE,
    uapi.HANDSHAKE_A_ACCEPT_PEERNAME,
    uapi.HANDSHAKE_A_ACCEPT_KEYRING,
    uapi.HANDSHAKE_A_ACCEPT_HANDLER_CLASS,
}
_REKEY_SINGLE = {
    uapi.HANDSHAKE_A_ACCEPT_KEY_UPDATE_REQUEST,
    uapi.HANDSHAKE_A_ACCEPT_SESSION_ID,
}


def decode_accept_attrs(attrs: bytes, *,
                        rekey: bool = False) -> AcceptedRequest:
    """Decode the attributes of an ACCEPT reply (after the genl header).

    ``rekey``: the kernel has the re-key upcall, so attributes 10 and 11
    are KEY_UPDATE_REQUEST and SESSION_ID; otherwise they are skipped
    like any attribute unknown here.
    """
    single = _SINGLE | _REKEY_SINGLE if rekey else _SINGLE
    seen: set[int] = set()
    fields: dict[int, int] = {}
    peerids: list[int] = []
    certs: list[tuple[int, int]] = []
    peername = None
    for atype, value in iter_attrs(attrs):
        if atype in single:
            if atype in seen:
                raise ProtocolError("attribute %d repeated" % atype)
            seen.add(atype)
        if atype == uapi.HANDSHAKE_A_ACCEPT_SOCKFD:
            fields[atype] = _s32(value, "SOCKFD")
        elif atype == uapi.HANDSHAKE_A_ACCEPT_PEERNAME:
            peername = _peername(value)
        elif atype == uapi.HANDSHAKE_A_ACCEPT_PEER_IDENTITY:
            if len(peerids) >= uapi.HANDSHAKE_MAX_PEER_IDS:
                raise ProtocolError("too many PEER_IDENTITY attributes")
            peerids.append(_u32(value, "PEER_IDENTITY"))
        elif atype == uapi.HANDSHAKE_A_ACCEPT_CERTIFICATE:
            if len(certs) >= MAX_CERTS:
                raise ProtocolError("too many CERTIFICATE attributes")
            certs.append(_certificate(value))
        elif atype in single:
            fields[atype] = _u32(value, "attribute %d" % atype)
    for required in (uapi.HANDSHAKE_A_ACCEPT_SOCKFD,
                     uapi.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE,
                     uapi.HANDSHAKE_A_ACCEPT_AUTH_MODE):
        if required not in fields:
            raise ProtocolError("ACCEPT reply lacks attribute %d" % required)
    sockfd = fields[uapi.HANDSHAKE_A_ACCEPT_SOCKFD]
    if sockfd < 0:
        raise ProtocolError("negative SOCKFD")
    key_update, session_id = _check_rekey(fields) if rekey else (0, 0)
    return AcceptedRequest(
        sockfd=sockfd,
        msg_type=fields[uapi.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE],
        auth_mode=fields[uapi.HANDSHAKE_A_ACCEPT_AUTH_MODE],
        timeout_ms=fields.get(uapi.HANDSHAKE_A_ACCEPT_TIMEOUT),
        peerids=tuple(peerids),
        certs=tuple(certs),
        peername=peername,
        keyring=fields.get(uapi.HANDSHAKE_A_ACCEPT_KEYRING),
        key_update=key_update,
        session_id=session_id,
    )


def _check_rekey(fields: dict[int, int]) -> tuple[int, int]:
    """(key update type, session id), consistent with the message type.

    A KeyUpdate request must say what to do and for which session; a
    hello must not ask for a key update.
    """
    key_update = fields.get(uapi.HANDSHAKE_A_ACCEPT_KEY_UPDATE_REQUEST, 0)
    session_id = fields.get(uapi.HANDSHAKE_A_ACCEPT_SESSION_ID, 0)
    if key_update not in set(uapi.KeyUpdateType):
        raise ProtocolError("KEY_UPDATE_REQUEST %d unknown" % key_update)
    if fields[uapi.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE] in uapi.KEY_UPDATE_MSGS:
        if key_update == uapi.KeyUpdateType.UNSPEC:
            raise ProtocolError("key update request without "
                                "KEY_UPDATE_REQUEST")
        if session_id == 0:
            raise ProtocolError("key update request without SESSION_ID")
    elif key_update != uapi.KeyUpdateType.UNSPEC:
        raise ProtocolError("KEY_UPDATE_REQUEST in a handshake request")
    return key_update, session_id


def salvage_sockfd(attrs: bytes) -> int | None:
    """Find SOCKFD in an ACCEPT reply that failed to decode.

    The kernel has installed that fd in us even if the rest of the reply is
    unusable; we still owe it a DONE.
    """
    try:
        for atype, value in iter_attrs(attrs):
            if atype == uapi.HANDSHAKE_A_ACCEPT_SOCKFD and len(value) == 4:
                fd = int(struct.unpack("=i", value)[0])
                return fd if fd >= 0 else None
    except ProtocolError:
        return None
    return None


def genl_payload(msg: NlMsg) -> tuple[int, bytes]:
    """Return (command, attributes) of a generic netlink message."""
    if len(msg.payload) < GENL_HDR.size:
        raise ProtocolError("generic netlink header truncated")
    cmd, _version, _reserved = GENL_HDR.unpack_from(msg.payload)
    return cmd, msg.payload[GENL_HDR.size :]


def netlink_error(msg: NlMsg) -> int:
    """Return the positive errno of an NLMSG_ERROR (0 for an ACK)."""
    if len(msg.payload) < 4:
        raise ProtocolError("NLMSG_ERROR truncated")
    (err,) = struct.unpack_from("=i", msg.payload)
    return -int(err)


def encode_attr(atype: int, payload: bytes) -> bytes:
    length = NLA_HDR.size + len(payload)
    pad = b"\0" * (_align(length) - length)
    return NLA_HDR.pack(length, atype) + payload + pad


def encode_request(family_id: int, cmd: int, attrs: bytes, seq: int,
                   flags: int = NLM_F_REQUEST,
                   version: int = uapi.HANDSHAKE_FAMILY_VERSION) -> bytes:
    body = GENL_HDR.pack(cmd, version, 0) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), family_id, flags,
                          seq, 0) + body


def encode_accept(family_id: int, seq: int) -> bytes:
    attrs = encode_attr(uapi.HANDSHAKE_A_ACCEPT_HANDLER_CLASS,
                  struct.pack("=I", uapi.HandlerClass.TLSHD))
    return encode_request(family_id, uapi.HANDSHAKE_CMD_ACCEPT, attrs, seq)


def encode_done(family_id: int, seq: int, sockfd: int, status: int,
                remote_auth: tuple[int, ...], session_id: int = 0,
                session_id_attr: int | None = None) -> bytes:
    """DONE with attributes 1-3: what both Debian kernels accept.

    SESSION_ID is added only on success, for a non-zero id, and only when
    the caller found its attribute number in the kernel's DONE policy
    (``session_id_attr``).
    """
    if not 0 <= status <= 4095:
        status = errno.EIO
    attrs = encode_attr(uapi.HANDSHAKE_A_DONE_STATUS,
                        struct.pack("=I", status))
    attrs += encode_attr(uapi.HANDSHAKE_A_DONE_SOCKFD,
                         struct.pack("=i", sockfd))
    for peerid in remote_auth[: uapi.HANDSHAKE_MAX_PEER_IDS]:
        attrs += encode_attr(uapi.HANDSHAKE_A_DONE_REMOTE_AUTH,
                             struct.pack("=I", peerid))
    if status == 0 and session_id and session_id_attr is not None:
        attrs += encode_attr(session_id_attr, struct.pack("=I", session_id))
    return encode_request(family_id, uapi.HANDSHAKE_CMD_DONE, attrs, seq,
                          NLM_F_REQUEST | NLM_F_ACK)
