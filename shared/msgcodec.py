"""Bounded reads and writes of the fields of one message body.

The field layer of tlshd.shared.protocol, in the manner of OpenSMTPD's
``m_add_*``/``m_get_*``: big-endian integers, length-prefixed strings and
byte strings, short lists of u32.  Every read is bounds-checked and every
length has a ceiling, so a hostile peer can make a decoder raise
ProtocolError but never read past its datagram or allocate much;
``Reader.end`` refuses trailing bytes.  Writers raise ValueError for what
the reader would refuse: that is our bug, not the peer's.
"""

from __future__ import annotations

import struct

from tlshd.shared.errors import ProtocolError

MAX_MSG = 64 * 1024  # one datagram, header included
MAX_STR = 4096
MAX_LIST = 16
_NO_TEXT = 0xFFFF  # the length of a text field that is None


class Writer:
    """Collects the fields of one message body."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack("!B", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack("!I", v))

    def u64(self, v: int) -> None:
        self.parts.append(struct.pack("!Q", v))

    def text(self, v: str | None) -> None:
        """Write a length-prefixed UTF-8 string; None is length 0xFFFF."""
        if v is None:
            self.parts.append(struct.pack("!H", _NO_TEXT))
            return
        raw = v.encode()
        if len(raw) > MAX_STR:
            raise ValueError("string too long for the channel")
        self.parts.append(struct.pack("!H", len(raw)) + raw)

    def blob(self, v: bytes, limit: int) -> None:
        """Write length-prefixed bytes (u32 length), at most ``limit``."""
        if len(v) > limit:
            raise ValueError("%d bytes, at most %d fit" % (len(v), limit))
        self.parts.append(struct.pack("!I", len(v)) + v)

    def u32_list(self, values: tuple[int, ...]) -> None:
        if len(values) > MAX_LIST:
            raise ValueError("list too long for the channel")
        self.u8(len(values))
        for v in values:
            self.u32(v)

    def data(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    """Bounds-checked reads from one message body."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.body):
            raise ProtocolError("message body truncated")
        chunk = self.body[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack("!I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("!Q", self._take(8))[0])

    def text(self) -> str | None:
        (n,) = struct.unpack("!H", self._take(2))
        if n == _NO_TEXT:
            return None
        if n > MAX_STR:
            raise ProtocolError("string longer than %d bytes" % MAX_STR)
        try:
            return self._take(n).decode()
        except UnicodeDecodeError as e:
            raise ProtocolError("string is not UTF-8") from e

    def blob(self, limit: int) -> bytes:
        (n,) = struct.unpack("!I", self._take(4))
        if n > limit:
            raise ProtocolError("%d bytes, at most %d allowed" % (n, limit))
        return self._take(n)

    def u32_list(self) -> tuple[int, ...]:
        n = self.u8()
        if n > MAX_LIST:
            raise ProtocolError("list longer than %d items" % MAX_LIST)
        return tuple(self.u32() for _ in range(n))

    def end(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolError("trailing bytes after message body")
