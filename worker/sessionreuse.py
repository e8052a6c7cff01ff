"""TLS 1.3 session reuse between tlshd workers (``session_reuse``, off by
default).  docs/session-reuse.md has the analysis; in short:

* Traffic keys are never shared between sockets: two sockets with the
  same key start at the same record sequence number, so their AEAD nonces
  collide.
* What is shared is a resumption PSK, used with psk_dhe_ke (a fresh
  (EC)DHE on every connection, so each session has keys of its own and
  forward secrecy) and never for 0-RTT.  The second to Nth connection to a
  peer then skip the certificate signature and its verification.

How the PSK comes about.  RFC 8446 resumption sends it in a
NewSessionTicket after the handshake; under kTLS that record is a
problem (the client has returned from its handshake before the ticket
arrives, so it must wait for it, for a peer that may never send one),
and the OpenSSL in the cryptography wheel does not resume from its own
tickets as a client (measured: docs/session-reuse.md).  Instead both ends
derive the PSK from the finished session itself, with the TLS exporter
(RFC 8446 7.5), so nothing at all is sent after the handshake:

    identity = "tlshd-reuse " + hex(Exporter(LABEL, "identity", 16))
    psk      = Exporter(LABEL, "psk", Hash.length of the session's suite)

Both ends must agree that they keep it: the client offers the ALPN
protocol :data:`REUSE_ALPN` and a server with ``session_reuse`` on
selects it (in EncryptedExtensions, encrypted).  Peers that do not know
it (ktls-utils: GnuTLS ignores unknown ALPN protocols) select nothing,
nothing is kept, and nothing is waited for.  The next ClientHello to the
same peer offers the PSK (as an external PSK: psk_use_session_callback);
a server that still knows the identity accepts it (psk_find_session
callback), one that does not (restarted, expired, a different server)
ignores it and the handshake falls back to certificates.

Where it lives.  :class:`SessionReuse` is the engine's one handle on all
of this: it adds the ALPN protocol and the PSK callbacks to the engine's
contexts, and gives each handshake a :class:`ClientReuse` or
:class:`ServerReuse` whose ``setup`` runs before it and ``after`` once it
succeeded.  Client entries (:class:`ClientCache`) are keyed by
:class:`PeerKey` (peer address and port, the name the server was verified
against, and the client credentials presented), so a PSK is offered only
to the peer that earned it and only for the same client identity.  Server
entries (:class:`ServerTable`) are keyed by identity and remember what the
full handshake authenticated (REMOTE_AUTH, peer subject).  Both are in
the worker's memory only: one worker per network namespace, never the
supervisor, never a file or keyring; bounded in entries and in age.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from OpenSSL import SSL

from tlshd.shared.config import (
    DEFAULT_SESSION_CACHE_SIZE,
    DEFAULT_SESSION_LIFETIME,
)
from tlshd.worker import sslbind
from tlshd.worker.tlsoutcome import Outcome

log = logging.getLogger(__name__)

REUSE_ALPN = b"tlshd-reuse/1"
EXPORTER_LABEL = b"EXPORTER-tlshd-session-reuse"
IDENTITY_PREFIX = b"tlshd-reuse "

# TLS 1.3 suite -> (two-byte id, hash length): the PSK's hash is the
# session's, and OpenSSL drops a PSK whose hash differs from the suite
# it picks: it chooses the suite first, then ignores a PSK of another hash.
SUITE_IDS = {
    "TLS_AES_128_GCM_SHA256": (b"\x13\x01", 32),
    "TLS_AES_256_GCM_SHA384": (b"\x13\x02", 48),
    "TLS_CHACHA20_POLY1305_SHA256": (b"\x13\x03", 32),
    "TLS_AES_128_CCM_SHA256": (b"\x13\x04", 32),
}


@dataclass(frozen=True)
class ReuseSettings:
    """``[authenticate] session_reuse`` is on: how long a PSK may be used
    (seconds, both ends) and how many entries each end keeps."""

    lifetime: float = DEFAULT_SESSION_LIFETIME
    cache_size: int = DEFAULT_SESSION_CACHE_SIZE


@dataclass(frozen=True)
class PeerKey:
    """Whom a client PSK may be offered to, and as whom.

    ``credential`` names the client credentials presented:
    ``"anonymous"``, ``"configured"`` (the configuration's certificate) or
    ``"kernel:<sha256 of the DER certificate>"`` (one the consumer passed),
    so that a PSK from an anonymous connection never stands in for an
    mTLS one, nor the reverse.
    """

    address: str
    port: int
    peername: str
    credential: str


def peer_key(address: object, peername: str, credential: str
             ) -> PeerKey | None:
    """The cache key for a socket's ``getpeername()``; None if not IP."""
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    return PeerKey(str(address[0]), int(address[1]), peername, credential)


@dataclass(frozen=True)
class ReusePsk:
    """A PSK derived from a finished session.  ``suite`` is the two-byte
    id of the suite whose hash it uses."""

    identity: bytes
    secret: bytes = field(repr=False)
    suite: bytes


def derive(conn: SSL.Connection, cipher: str) -> ReusePsk | None:
    """Both ends' PSK for reusing ``conn``'s session (None: suite
    unknown).  Call after the handshake, before the connection goes."""
    if cipher not in SUITE_IDS:
        return None
    suite, hash_len = SUITE_IDS[cipher]
    ident = conn.export_keying_material(EXPORTER_LABEL, 16, b"identity")
    secret = conn.export_keying_material(EXPORTER_LABEL, hash_len, b"psk")
    return ReusePsk(IDENTITY_PREFIX + ident.hex().encode(), secret, suite)


@dataclass(frozen=True)
class ClientEntry:
    psk: ReusePsk
    # The verified server certificate's subject, for the logs.
    peer_subject: str | None


@dataclass(frozen=True)
class ServerEntry:
    psk: ReusePsk
    # What the full handshake authenticated: REMOTE_AUTH and subject of
    # the client certificate (empty/None: the client presented none).
    remote_auth: tuple[int, ...]
    peer_subject: str | None


K = TypeVar("K")
V = TypeVar("V")


class BoundedTable(Generic[K, V]):
    """A thread-safe map bounded in entries (least recently stored goes
    first) and in age (an entry older than ``lifetime`` is never
    returned).  Ages count from when the entry was stored, never from
    its last use."""

    def __init__(self, size: int = DEFAULT_SESSION_CACHE_SIZE,
                 lifetime: float = DEFAULT_SESSION_LIFETIME,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError("table size must be at least 1")
        self.size = size
        self.lifetime = lifetime
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: K) -> V | None:
        now = self._clock()
        with self._lock:
            item = self._entries.get(key)
            if item is not None and now - item[1] >= self.lifetime:
                del self._entries[key]
                item = None
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            return item[0]

    def put(self, key: K, value: V) -> None:
        now = self._clock()
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (value, now)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)


class ClientCache(BoundedTable[PeerKey, ClientEntry]):
    """Client: peer -> the newest PSK it agreed to keep for us.  Each
    connection (full or reused) brings a new one, which replaces the old;
    connections opened at the same time offer the same one."""


class ServerTable(BoundedTable[bytes, ServerEntry]):
    """Server: PSK identity -> PSK and what it authenticated."""


class SessionReuse:
    """Session reuse for one engine: both tables, the OpenSSL PSK
    callbacks, and the per-handshake hooks.  Built with the engine's
    contexts (before the sandbox); the hooks run in handshake threads."""

    def __init__(self, settings: ReuseSettings) -> None:
        self.client = ClientCache(settings.cache_size, settings.lifetime)
        self.server = ServerTable(settings.cache_size, settings.lifetime)
        # Per connection (SSL pointer): the PSK a client offers, the entry
        # a server accepted.
        self._offers: dict[int, ReusePsk] = {}
        self._found: dict[int, ServerEntry] = {}
        self._callbacks = sslbind.PskCallbacks(self._offer, self._lookup)
        log.info("TLS session reuse is on: PSKs live %d s, %d kept"
                 " per role", settings.lifetime, settings.cache_size)

    def install(self, ctx: SSL.Context, *, server: bool,
                keep: bool) -> None:
        """Add reuse to one of the engine's contexts.  ``keep``: a server
        context with the configured certificate (the per-request ones
        must never let a PSK stand in for a different certificate)."""
        if not server:
            ctx.set_alpn_protos([REUSE_ALPN])
            self._callbacks.install_client(ctx)
        elif keep:
            ctx.set_alpn_select_callback(_select_reuse_alpn)
            self._callbacks.install_server(ctx)
            # A verifying server refuses a PSK session without a session
            # id context ("session id context uninitialized").
            ctx.set_session_id(b"tlshd-reuse")

    def for_client(self, address: object, peername: str,
                   credential: str) -> ClientReuse | None:
        """The hooks of one client handshake (None: not an IP peer)."""
        key = peer_key(address, peername, credential)
        if key is None:
            return None
        return ClientReuse(self, key, self.client.get(key))

    def for_server(self) -> ServerReuse:
        """The hooks of one server handshake."""
        return ServerReuse(self)

    def forget(self, ssl: int) -> None:
        """Drop a finished connection's per-connection state."""
        self._offers.pop(ssl, None)
        self._found.pop(ssl, None)
        self._callbacks.forget(ssl)

    def _offer(self, ssl: int) -> tuple[bytes, bytes, bytes] | None:
        """Client (psk_use_session): the cached PSK for this peer."""
        psk = self._offers.get(ssl)
        if psk is None:
            return None
        return psk.identity, psk.secret, psk.suite

    def _lookup(self, ssl: int, identity: bytes
                ) -> tuple[bytes, bytes] | None:
        """Server (psk_find_session): a PSK this worker agreed to keep;
        None lets the handshake go on with certificates."""
        entry = self.server.get(identity)
        if entry is None:
            return None
        self._found[ssl] = entry
        return entry.psk.secret, entry.psk.suite


class ClientReuse:
    """One client handshake: offer the cached PSK, keep the next one."""

    def __init__(self, reuse: SessionReuse, key: PeerKey,
                 cached: ClientEntry | None) -> None:
        self._reuse, self._key, self._cached = reuse, key, cached

    def setup(self, conn: SSL.Connection) -> None:
        if self._cached is not None:
            self._reuse._offers[sslbind.ssl_pointer(conn)] = (
                self._cached.psk)

    def after(self, conn: SSL.Connection, out: Outcome) -> Outcome:
        cached, cache = self._cached, self._reuse.client
        if cached is not None and sslbind.session_reused(conn):
            out = _reused(out, cached.peer_subject, out.remote_auth)
        if conn.get_alpn_proto_negotiated() == REUSE_ALPN:
            psk = derive(conn, out.cipher)
            if psk is not None:
                cache.put(self._key, ClientEntry(psk, out.peer_subject))
        elif cached is not None:
            # The peer no longer keeps PSKs for us.
            cache.forget(self._key)
        return out


class ServerReuse:
    """One server handshake: report a reused session as the full one
    did, and keep the PSK a client asked for."""

    def __init__(self, reuse: SessionReuse) -> None:
        self._reuse = reuse

    def setup(self, conn: SSL.Connection) -> None:
        del conn  # the PSK callback finds the entry by identity

    def after(self, conn: SSL.Connection, out: Outcome) -> Outcome:
        entry = self._reuse._found.get(sslbind.ssl_pointer(conn))
        if entry is not None and sslbind.session_reused(conn):
            out = _reused(out, entry.peer_subject, entry.remote_auth)
        if conn.get_alpn_proto_negotiated() == REUSE_ALPN:
            psk = derive(conn, out.cipher)
            if psk is not None:
                self._reuse.server.put(psk.identity, ServerEntry(
                    psk, out.remote_auth, out.peer_subject))
        return out


def _select_reuse_alpn(
    conn: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    """Server: agree to keep a reuse PSK with a client that asks."""
    del conn
    if REUSE_ALPN in offered:
        return REUSE_ALPN
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _reused(out: Outcome, peer_subject: str | None,
            remote_auth: tuple[int, ...]) -> Outcome:
    """A handshake authenticated by a reuse PSK: no certificates were
    exchanged, so the subject and REMOTE_AUTH are the full handshake's."""
    suite = out.description.rsplit("-(", 1)[-1]
    return dataclasses.replace(
        out, resumed=True, peer_subject=peer_subject,
        remote_auth=remote_auth,
        description=f"(TLS1.3)-({out.group})-(session reuse PSK)-({suite}")
