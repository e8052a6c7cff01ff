"""A kTLS socket that also reads records and answers KeyUpdates itself:
the tests' end of a re-keyed connection.

The worker only re-keys (tlshd.worker.rekey.KtlsSocket); a test peer must
also read application data past the peer's KeyUpdate.  Receiving
(:meth:`KtlsPeer.recv`): application data is returned; handshake records
are parsed (KeyUpdate and NewSessionTicket only); a KeyUpdate installs the
next RX key at once and, if the peer asked for it, answers with our own
KeyUpdate (update_not_requested) before any further data is sent.
"""

from __future__ import annotations

import errno
import socket

from tlshd.worker import ktls
from tlshd.worker.rekey import (
    CT_HANDSHAKE,
    HS_KEY_UPDATE,
    UPDATE_NOT_REQUESTED,
    UPDATE_REQUESTED,
    KtlsSocket,
    RekeyError,
    Secrets,
)

CT_ALERT = 21
CT_APPLICATION_DATA = 23
HS_NEW_SESSION_TICKET = 4
ALERT_CLOSE_NOTIFY = 0

# A handshake message header: msg_type u8, length u24.
_HS_HEADER = 4
# NewSessionTicket carries at most a u16 ticket plus extensions; anything
# that claims more than a record's worth is a broken or hostile peer.
MAX_HS_MESSAGE = 1 << 14
_CMSG_SPACE = socket.CMSG_SPACE(1)


def parse_key_update(body: bytes) -> bool:
    """Return request_update of one KeyUpdate message; strict.

    ``body`` is the whole message, header included: ``18 00 00 01 0X``
    with X 0 or 1.  Anything else raises RekeyError (RFC 8446 requires an
    illegal_parameter alert for other values).
    """
    if len(body) != 5 or body[:4] != bytes([HS_KEY_UPDATE, 0, 0, 1]):
        raise RekeyError("malformed KeyUpdate message %s" % body.hex())
    if body[4] not in (UPDATE_NOT_REQUESTED, UPDATE_REQUESTED):
        raise RekeyError("KeyUpdate request_update %d is illegal" % body[4])
    return body[4] == UPDATE_REQUESTED


def split_handshake(buf: bytes) -> tuple[list[bytes], bytes]:
    """Split handshake bytes into complete messages and a partial tail."""
    messages = []
    pos = 0
    while len(buf) - pos >= _HS_HEADER:
        length = int.from_bytes(buf[pos + 1 : pos + 4], "big")
        if length > MAX_HS_MESSAGE:
            raise RekeyError("handshake message of %d bytes" % length)
        end = pos + _HS_HEADER + length
        if end > len(buf):
            break
        messages.append(buf[pos:end])
        pos = end
    return messages, buf[pos:]


def record_type(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The record type from recvmsg's control data; none means data."""
    for level, kind, data in ancdata:
        if level == ktls.SOL_TLS and kind == ktls.TLS_GET_RECORD_TYPE:
            if len(data) < 1:
                raise RekeyError("empty TLS_GET_RECORD_TYPE")
            return data[0]
    return CT_APPLICATION_DATA


class KtlsPeer(KtlsSocket):
    """:class:`KtlsSocket` plus reading: one reader (``recv``) and any
    number of writers (``sendall``)."""

    def __init__(self, sock: socket.socket, secrets: Secrets) -> None:
        super().__init__(sock, secrets)
        self._hs_buf = b""

    def sendall(self, data: bytes) -> None:
        """Send application data under the current TX key."""
        with self._tx_lock:
            self.sock.sendall(data)

    def handle_rx_key_update(self, message: bytes) -> bool:
        """Process one received KeyUpdate message (header included).

        Installs the next RX key and, when the peer asked for it, sends
        our own KeyUpdate (update_not_requested) and moves TX on.
        Returns the peer's request_update flag.
        """
        requested = parse_key_update(message)
        self.update_rx()
        if requested:
            self.send_key_update(False)
        return requested

    def handle_handshake_record(self, body: bytes) -> int:
        """Process a decrypted handshake record; return KeyUpdates seen.

        Messages may be split over records; complete ones are handled in
        order.  NewSessionTicket is ignored (kTLS has no use for it);
        a KeyUpdate must end its record (RFC 8446 section 5.1: handshake
        messages must not span a key change); anything else is an error.
        """
        messages, self._hs_buf = split_handshake(self._hs_buf + body)
        updates = 0
        for i, msg in enumerate(messages):
            if msg[0] == HS_NEW_SESSION_TICKET:
                continue
            if msg[0] != HS_KEY_UPDATE:
                raise RekeyError("unexpected post-handshake message type %d"
                                 % msg[0])
            if i != len(messages) - 1 or self._hs_buf:
                raise RekeyError("KeyUpdate does not end its record")
            self.handle_rx_key_update(msg)
            updates += 1
        return updates

    def recv(self, bufsize: int) -> bytes:
        """Return application data (b"" at EOF or close_notify).

        Handshake records in between are consumed: KeyUpdates re-key RX
        (and TX when requested).  An EKEYEXPIRED here means the kernel saw
        a KeyUpdate this session did not: the session is out of step.
        """
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(bufsize, _CMSG_SPACE)
            except OSError as e:
                if e.errno == errno.EKEYEXPIRED:
                    raise RekeyError("kernel waits for a new RX key, but no"
                                     " KeyUpdate was read here") from e
                raise
            if flags & socket.MSG_CTRUNC:
                raise RekeyError("record type control message truncated")
            kind = record_type(anc)
            if kind == CT_APPLICATION_DATA:
                return data
            if kind == CT_HANDSHAKE:
                self.handle_handshake_record(data)
                continue
            if kind == CT_ALERT:
                if len(data) == 2 and data[1] == ALERT_CLOSE_NOTIFY:
                    return b""
                raise RekeyError("peer sent alert %s" % data.hex())
            raise RekeyError("unexpected record type %d" % kind)

    def recv_exact(self, n: int) -> bytes:
        """Read exactly ``n`` bytes of application data."""
        parts = []
        left = n
        while left:
            chunk = self.recv(min(left, 1 << 16))
            if not chunk:
                raise EOFError("EOF after %d of %d bytes" % (n - left, n))
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)
