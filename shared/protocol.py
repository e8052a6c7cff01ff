"""Typed, versioned messages between the supervisor and its workers.

Every message is one SOCK_SEQPACKET datagram: a fixed header followed by a
body whose layout depends on the message type.  Fds travel with the message
that needs them; each type declares exactly how many it carries, and which
side sends it (``SENT_BY``).  Decoding is strict: a short or oversized body,
trailing bytes, a string that is not UTF-8 or a field out of range raise
ProtocolError.  Nothing is ever unpickled.

Header (network byte order): magic u16, version u8, type u8, body length u32,
request id u64.  This module frames; the bodies are in
tlshd.shared.messages and their fields in tlshd.shared.msgcodec.  Every name
callers need is reachable here (``protocol.HandshakeRequest``), so that
they import one module.
"""

from __future__ import annotations

import struct

from tlshd.shared.errors import ProtocolError
from tlshd.shared.messages import (
    KEY_UPDATE_MAX,
    LOG_LEVELS,
    MAX_LOOKUPS,
    MAX_REASON,
    MAX_SECRET,
    NO_ID,
    REQ_KEEP_SECRETS,
    HandshakeAnswer,
    HandshakeRequest,
    Hello,
    LogRecord,
    Msg,
    PskFound,
    PskLookup,
    PskMaterial,
    Side,
    SpawnAnswer,
    SpawnRequest,
)
from tlshd.shared.msgcodec import MAX_LIST, MAX_MSG, MAX_STR

__all__ = [
    "HEADER", "KEY_UPDATE_MAX", "LOG_LEVELS", "MAGIC", "MAX_LIST",
    "MAX_LOOKUPS", "MAX_MSG", "MAX_REASON", "MAX_SECRET",
    "MAX_STR", "NO_ID", "PROTOCOL_VERSION", "REQ_KEEP_SECRETS",
    "HandshakeAnswer", "HandshakeRequest", "Hello", "LogRecord", "Message",
    "Msg", "PskFound", "PskLookup", "PskMaterial", "Side", "SpawnAnswer",
    "SpawnRequest", "decode", "encode",
]

MAGIC = 0x544C  # "TL"
PROTOCOL_VERSION = 6  # bump on any change to Msg or a body layout
HEADER = struct.Struct("!HBBIQ")

Message = (HandshakeRequest | HandshakeAnswer | Hello | LogRecord
           | SpawnRequest | SpawnAnswer | PskLookup | PskFound)

_BY_TYPE: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (HandshakeRequest, HandshakeAnswer, Hello, LogRecord,
                SpawnRequest, SpawnAnswer, PskLookup, PskFound)
}


def encode(msg: Message, req_id: int = 0) -> bytes:
    """Frame ``msg`` with its header."""
    body = msg.encode()
    frame = HEADER.pack(MAGIC, PROTOCOL_VERSION, msg.TYPE, len(body), req_id)
    if len(frame) + len(body) > MAX_MSG:
        raise ValueError("message larger than MAX_MSG")
    return frame + body


def decode(data: bytes, nfds: int,
           sender: Side | None = None) -> tuple[Message, int]:
    """Parse one datagram carrying ``nfds`` fds; return (message, req id).

    Raises ProtocolError for anything but a well-formed message of a known
    type with exactly the fd count that type declares, and, if ``sender``
    is given, of a type that side sends (checked before the body is
    parsed).
    """
    if len(data) < HEADER.size:
        raise ProtocolError("message shorter than its header")
    if len(data) > MAX_MSG:
        raise ProtocolError("message longer than MAX_MSG")
    magic, version, mtype, length, req_id = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("bad magic 0x%04x" % magic)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("protocol version %d, want %d"
                            % (version, PROTOCOL_VERSION))
    if length != len(data) - HEADER.size:
        raise ProtocolError("length field %d does not match body %d"
                            % (length, len(data) - HEADER.size))
    cls = _BY_TYPE.get(mtype)
    if cls is None:
        raise ProtocolError("unknown message type %d" % mtype)
    if sender is not None and cls.SENT_BY is not sender:
        raise ProtocolError("%s is sent by the %s, not the %s"
                            % (cls.__name__, cls.SENT_BY.value,
                               sender.value))
    if nfds != cls.NFDS:
        raise ProtocolError("%s carries %d fds, want %d"
                            % (cls.__name__, nfds, cls.NFDS))
    return cls.decode(data[HEADER.size :]), req_id
