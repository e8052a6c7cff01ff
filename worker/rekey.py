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

Receiving: the kernel consumer reads the peer's KeyUpdate itself and asks
for the next RX key (:meth:`KtlsSocket.update_rx`).  The tests' peers also
read records on their own sockets; that code lives with the tests
(tests/unit/ktlspeer.py).

On kernels without re-key support (6.12: ``EBUSY`` on the second
``TLS_TX``) nothing here can work; :func:`rekey_supported` tells, from the
``Tls*Rekey*`` counters in ``/proc/net/tls_stat``.  It never probes by
setting a key twice: on a kernel that supports re-keying, that is a real
re-key.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

from tlshd.shared.tlsstat import rekey_supported
from tlshd.worker import ktls

__all__ = ["KtlsSocket", "RekeyError", "Secrets", "rekey_supported"]

CT_HANDSHAKE = 22

HS_KEY_UPDATE = 24
UPDATE_NOT_REQUESTED = 0
UPDATE_REQUESTED = 1


class RekeyError(Exception):
    """The peer or the kernel broke the KeyUpdate protocol; the session
    cannot continue (the caller closes the connection)."""


def key_update_message(request_update: bool) -> bytes:
    """The KeyUpdate handshake message (RFC 8446 section 4.6.3)."""
    flag = UPDATE_REQUESTED if request_update else UPDATE_NOT_REQUESTED
    return bytes([HS_KEY_UPDATE, 0, 0, 1, flag])


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
