"""TLS 1.3 KeyUpdate (re-keying) on a socket that already runs kTLS.

Linux 6.14 and later accept a second ``setsockopt(SOL_TLS, TLS_TX/TLS_RX)``
with the same version and cipher: that is a re-key.  When a KeyUpdate
arrives, the kernel hands the record to whoever reads the socket (record
type 22 in a ``TLS_GET_RECORD_TYPE`` control message) and then refuses to
decrypt (``EKEYEXPIRED``) until the next RX key is installed.  The kernel
never sees the traffic secrets, only keys and IVs, so the next generation
(RFC 8446 section 7.2) can only come from whoever kept the secrets: a
:class:`KtlsSocket`, which lives in the namespace's worker and nowhere
else.

Sending: a KeyUpdate handshake message goes out through kTLS as a record of
type 22 (``sendmsg`` with a ``TLS_SET_RECORD_TYPE`` control message) under
the current key; then the next TX key is installed.  Both happen under the
TX lock, so no data record of another thread can slip in between.

Receiving (:meth:`KtlsSocket.recv`): application data is returned;
handshake records are parsed (KeyUpdate and NewSessionTicket only); a
KeyUpdate installs the next RX key at once and, if the peer asked for it,
answers with our own KeyUpdate (update_not_requested) before any further
data is sent.

On kernels without re-key support (6.12: ``EBUSY`` on the second
``TLS_TX``) nothing here can work; :func:`rekey_supported` tells, from the
``Tls*Rekey*`` counters in ``/proc/net/tls_stat``.  It never probes by
setting a key twice: on a kernel that supports re-keying, that is a real
re-key.
"""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass

from tlshd.shared.tlsstat import rekey_supported
from tlshd.worker import ktls

__all__ = ["KtlsSocket", "RekeyError", "Secrets", "rekey_supported"]

CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23

HS_NEW_SESSION_TICKET = 4
HS_KEY_UPDATE = 24
UPDATE_NOT_REQUESTED = 0
UPDATE_REQUESTED = 1

ALERT_CLOSE_NOTIFY = 0

# A handshake message header: msg_type u8, length u24.
_HS_HEADER = 4
# NewSessionTicket carries at most a u16 ticket plus extensions; anything
# that claims more than a record's worth is a broken or hostile peer.
MAX_HS_MESSAGE = 1 << 14
_CMSG_SPACE = socket.CMSG_SPACE(1)


class RekeyError(Exception):
    """The peer or the kernel broke the KeyUpdate protocol; the session
    cannot continue (the caller closes the connection)."""


def key_update_message(request_update: bool) -> bytes:
    """The KeyUpdate handshake message (RFC 8446 section 4.6.3)."""
    flag = UPDATE_REQUESTED if request_update else UPDATE_NOT_REQUESTED
    return bytes([HS_KEY_UPDATE, 0, 0, 1, flag])


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


@dataclass(frozen=True)
class Secrets:
    """One session's current traffic secrets and their generations."""

    cipher: str
    tx: bytes
    rx: bytes
    tx_generation: int = 0
    rx_generation: int = 0

    def __repr__(self) -> str:
        return ("Secrets(cipher=%r, tx_generation=%d, rx_generation=%d)"
                % (self.cipher, self.tx_generation, self.rx_generation))


class KtlsSocket:
    """A kTLS socket plus the traffic secrets that can re-key it.

    The socket must already carry kTLS keys built from ``secrets`` (at
    any sequence number).  The caller owns the socket; this object never
    closes it.  Thread use: one reader (``recv``) and any number of
    writers; TX and RX state each have their own lock.

    The socket must be in blocking mode (bound waits with SO_RCVTIMEO if
    needed): once the kernel has decrypted a KeyUpdate record that has not
    been read yet, ``poll()`` reports no input (the re-key is pending), so
    a Python socket timeout, which polls before each read, would wait
    out its timeout although the record is there (seen on 7.3).
    """

    def __init__(self, sock: socket.socket, secrets: Secrets) -> None:
        ktls.hash_name(secrets.cipher)  # ValueError for unknown suites
        if sock.gettimeout() is not None:
            raise ValueError("KtlsSocket needs a blocking socket (poll "
                             "hides a received KeyUpdate)")
        self.sock = sock
        self.cipher = secrets.cipher
        self._tx = secrets.tx
        self._rx = secrets.rx
        self.tx_generation = secrets.tx_generation
        self.rx_generation = secrets.rx_generation
        self._tx_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._hs_buf = b""

    def __repr__(self) -> str:
        return ("KtlsSocket(fd=%d, cipher=%r, tx_generation=%d,"
                " rx_generation=%d)" % (self.sock.fileno(), self.cipher,
                                        self.tx_generation,
                                        self.rx_generation))

    def secrets(self) -> Secrets:
        """The current secrets, to keep for a later re-key."""
        with self._tx_lock, self._rx_lock:
            return Secrets(self.cipher, self._tx, self._rx,
                           self.tx_generation, self.rx_generation)

    # -- TX ---------------------------------------------------------------

    def update_tx(self) -> None:
        """Install the next-generation TX key (sequence number 0).

        Only after a KeyUpdate has been sent under the current key; the
        caller holds the TX lock (see :meth:`send_key_update`).
        """
        nxt = ktls.next_secret(self.cipher, self._tx)
        info = ktls.derive_crypto_info(self.cipher, nxt, 0)
        self.sock.setsockopt(ktls.SOL_TLS, ktls.TLS_TX, info)
        self._tx = nxt
        self.tx_generation += 1

    def send_key_update(self, request_update: bool) -> None:
        """Send a KeyUpdate, then switch TX to the next generation.

        With ``request_update`` the peer must answer with a KeyUpdate of
        its own, which :meth:`recv` processes when it arrives.
        """
        with self._tx_lock:
            self._send_key_update_locked(request_update)

    def _send_key_update_locked(self, request_update: bool) -> None:
        msg = key_update_message(request_update)
        cmsg = [(ktls.SOL_TLS, ktls.TLS_SET_RECORD_TYPE,
                 bytes([CT_HANDSHAKE]))]
        sent = self.sock.sendmsg([msg], cmsg)
        if sent != len(msg):
            # A handshake record goes out whole or not at all.
            raise RekeyError("KeyUpdate record cut short (%d bytes)" % sent)
        self.update_tx()

    def sendall(self, data: bytes) -> None:
        """Send application data under the current TX key."""
        with self._tx_lock:
            self.sock.sendall(data)

    # -- RX ---------------------------------------------------------------

    def update_rx(self) -> None:
        """Install the next-generation RX key (sequence number 0).

        Call it once per KeyUpdate received, after the record carrying it
        was read: the kernel has then paused decryption (EKEYEXPIRED).
        """
        with self._rx_lock:
            nxt = ktls.next_secret(self.cipher, self._rx)
            info = ktls.derive_crypto_info(self.cipher, nxt, 0)
            self.sock.setsockopt(ktls.SOL_TLS, ktls.TLS_RX, info)
            self._rx = nxt
            self.rx_generation += 1

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

