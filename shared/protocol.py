"""Typed, versioned messages between the supervisor and its workers.

Every message is one SOCK_SEQPACKET datagram: a fixed header followed by a
body whose layout depends on the message type.  Fds travel with the message
that needs them; each type declares exactly how many it carries.  Decoding is
strict: a short or oversized body, trailing bytes, a string that is not UTF-8
or a field out of range raise ProtocolError.  Nothing is ever unpickled.

Header (network byte order): magic u16, version u8, type u8, body length u32,
request id u64.  Requests from the supervisor have even types, answers and
notifications from the worker odd ones.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

from tlshd.shared.errors import ProtocolError

MAGIC = 0x544C  # "TL"
PROTOCOL_VERSION = 4  # bump on any change to MsgType or a body layout
HEADER = struct.Struct("!HBBIQ")
MAX_MSG = 64 * 1024
MAX_FDS = 2
MAX_STR = 4096
MAX_LIST = 16
MAX_REASON = 512
MAX_SECRET = 64  # a PSK: 32 (SHA-256) or 48 (SHA-384) bytes
# Offered identities a worker may look up per request: a hostile
# ClientHello may list hundreds; NVMe hosts offer one or two.
MAX_LOOKUPS = 8
# HandshakeRequest.flags
REQ_KEEP_SECRETS = 0x1  # the kernel may ask to re-key: keep the secrets
KEY_UPDATE_MAX = 3  # uapi.KeyUpdateType.RECEIVED_REQUEST_UPDATE


class Msg(enum.IntEnum):
    HANDSHAKE_REQ = 2  # supervisor -> worker, 1 fd: the ACCEPTed socket
    HELLO = 3  # worker -> supervisor, once, after the sandbox is up
    HANDSHAKE_ANS = 5  # worker -> supervisor, 0 fds
    LOG = 7  # worker -> supervisor, one formatted log record
    SPAWN_REQ = 8  # supervisor -> worker template, 2 fds: netns, channel
    SPAWN_ANS = 9  # worker template -> supervisor: the new worker's pid
    PSK_FOUND = 10  # supervisor -> worker: the answer to a PSK_LOOKUP
    PSK_LOOKUP = 11  # worker -> supervisor: a server PSK identity to find


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack("!B", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack("!I", v))

    def s32(self, v: int) -> None:
        self.parts.append(struct.pack("!i", v))

    def u64(self, v: int) -> None:
        self.parts.append(struct.pack("!Q", v))

    def text(self, v: str | None) -> None:
        """Write a length-prefixed UTF-8 string; None is length 0xFFFF."""
        if v is None:
            self.parts.append(struct.pack("!H", 0xFFFF))
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


class _Reader:
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

    def s32(self) -> int:
        return int(struct.unpack("!i", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("!Q", self._take(8))[0])

    def text(self) -> str | None:
        (n,) = struct.unpack("!H", self._take(2))
        if n == 0xFFFF:
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


@dataclass(frozen=True, slots=True, kw_only=True)
class PskMaterial:
    """A PSK read from a kernel key by the supervisor: its serial (for
    REMOTE_AUTH), its identity (the key's description) and its secret."""

    serial: int
    identity: bytes
    secret: bytes

    def write(self, w: _Writer) -> None:
        w.u32(self.serial)
        w.blob(self.identity, MAX_STR)
        w.blob(self.secret, MAX_SECRET)

    @classmethod
    def read(cls, r: _Reader) -> PskMaterial:
        serial = r.u32()
        identity, secret = r.blob(MAX_STR), r.blob(MAX_SECRET)
        if not serial or not identity or not secret:
            raise ProtocolError("empty PSK serial, identity or secret")
        return cls(serial=serial, identity=identity, secret=secret)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeRequest:
    """One ACCEPTed kernel request, handed to the namespace's worker.

    Workers possess no kernel keys: the supervisor reads what the request
    names and passes the material itself.  ``x509_cert``/``x509_key``: the
    DER certificate and private key the consumer passed by key serial
    (empty: none); ``psks``: the PSKs a client offers (PEER_IDENTITY).  A
    server looks up the identities its client offers with PSK_LOOKUP.
    ``timeout_ms`` is what is left of the request's deadline when the
    supervisor sent it.

    Re-keying: ``keep_secrets`` asks the worker to keep a handshake's
    traffic secrets under a new session id (only when the kernel has the
    re-key upcall); for a key update request, ``key_update`` is the
    kernel's ``key-update-type`` and ``session_id`` names the session.
    """

    TYPE: ClassVar[Msg] = Msg.HANDSHAKE_REQ
    NFDS: ClassVar[int] = 1

    msg_type: int
    auth_mode: int
    timeout_ms: int
    peername: str | None
    psks: tuple[PskMaterial, ...] = ()
    x509_cert: bytes = b""
    x509_key: bytes = b""
    keep_secrets: bool = False
    key_update: int = 0
    session_id: int = 0

    def encode(self) -> bytes:
        w = _Writer()
        w.u32(self.msg_type)
        w.u32(self.auth_mode)
        w.u32(self.timeout_ms)
        w.text(self.peername)
        if len(self.psks) > MAX_LIST:
            raise ValueError("too many PSKs for the channel")
        w.u8(len(self.psks))
        for psk in self.psks:
            psk.write(w)
        w.blob(self.x509_cert, MAX_MSG)
        w.blob(self.x509_key, MAX_MSG)
        w.u8(REQ_KEEP_SECRETS if self.keep_secrets else 0)
        w.u32(self.key_update)
        w.u32(self.session_id)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> HandshakeRequest:
        r = _Reader(body)
        msg_type, auth_mode, timeout_ms = r.u32(), r.u32(), r.u32()
        peername = r.text()
        npsks = r.u8()
        if npsks > MAX_LIST:
            raise ProtocolError("too many PSKs")
        psks = tuple(PskMaterial.read(r) for _ in range(npsks))
        x509_cert, x509_key = r.blob(MAX_MSG), r.blob(MAX_MSG)
        flags, key_update, session_id = r.u8(), r.u32(), r.u32()
        r.end()
        if bool(x509_cert) != bool(x509_key):
            raise ProtocolError("a certificate without its key or the "
                                "other way round")
        if flags & ~REQ_KEEP_SECRETS:
            raise ProtocolError("unknown request flags 0x%x" % flags)
        if key_update > KEY_UPDATE_MAX:
            raise ProtocolError("key update type %d unknown" % key_update)
        if key_update and not session_id:
            raise ProtocolError("key update without a session id")
        return cls(
            msg_type=msg_type,
            auth_mode=auth_mode,
            timeout_ms=timeout_ms,
            peername=peername,
            psks=psks,
            x509_cert=x509_cert,
            x509_key=x509_key,
            keep_secrets=bool(flags & REQ_KEEP_SECRETS),
            key_update=key_update,
            session_id=session_id,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PskLookup:
    """A server worker asks for the PSK of an identity its client offered
    (request id: the handshake's).  The supervisor searches the keyrings
    the request's namespace may use (tlshd.supervisor.keymaterial: the
    kernel's search does not tell namespaces apart in a global keyring
    such as ``.nvme``, so the supervisor scopes it), so a worker sees only
    the one key it needs, and only its namespace's.
    """

    TYPE: ClassVar[Msg] = Msg.PSK_LOOKUP
    NFDS: ClassVar[int] = 0

    identity: bytes

    def encode(self) -> bytes:
        w = _Writer()
        w.blob(self.identity, MAX_STR)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> PskLookup:
        r = _Reader(body)
        identity = r.blob(MAX_STR)
        r.end()
        # keyctl descriptions are C strings.
        if not identity or b"\0" in identity:
            raise ProtocolError("PSK identity empty or with a NUL byte")
        return cls(identity=identity)


@dataclass(frozen=True, slots=True, kw_only=True)
class PskFound:
    """The answer to a PskLookup: the key, or ``psk`` None (not found)."""

    TYPE: ClassVar[Msg] = Msg.PSK_FOUND
    NFDS: ClassVar[int] = 0

    psk: PskMaterial | None

    def encode(self) -> bytes:
        w = _Writer()
        w.u8(0 if self.psk is None else 1)
        if self.psk is not None:
            self.psk.write(w)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> PskFound:
        r = _Reader(body)
        found = r.u8()
        if found > 1:
            raise ProtocolError("bad PSK_FOUND flag %d" % found)
        psk = PskMaterial.read(r) if found else None
        r.end()
        return cls(psk=psk)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeAnswer:
    """The outcome of one request: DONE's status and REMOTE_AUTH ids,
    plus a one-line reason for a failure (for status reports), and the
    session id under which the worker keeps the secrets (0: none)."""

    TYPE: ClassVar[Msg] = Msg.HANDSHAKE_ANS
    NFDS: ClassVar[int] = 0

    status: int
    remote_auth: tuple[int, ...]
    reason: str = ""
    session_id: int = 0

    def encode(self) -> bytes:
        w = _Writer()
        w.u32(self.status)
        w.u32_list(self.remote_auth)
        w.text(self.reason[:MAX_REASON])
        w.u32(self.session_id)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> HandshakeAnswer:
        r = _Reader(body)
        status = r.u32()
        remote_auth = r.u32_list()
        reason = r.text()
        session_id = r.u32()
        r.end()
        # The kernel caps STATUS at MAX_ERRNO; anything larger is a lie.
        if status > 4095:
            raise ProtocolError("status %d is not an errno" % status)
        if reason is None or len(reason) > MAX_REASON:
            raise ProtocolError("bad failure reason")
        if session_id and status:
            raise ProtocolError("session id in a failed answer")
        return cls(status=status, remote_auth=remote_auth, reason=reason,
                   session_id=session_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """The worker's report once it is sandboxed: who it runs as."""

    TYPE: ClassVar[Msg] = Msg.HELLO
    NFDS: ClassVar[int] = 0

    pid: int
    uid: int
    gid: int
    cap_eff: int
    no_new_privs: int
    seccomp: int

    def encode(self) -> bytes:
        w = _Writer()
        for v in (self.pid, self.uid, self.gid):
            w.u32(v)
        w.u64(self.cap_eff)
        w.u8(self.no_new_privs)
        w.u8(self.seccomp)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        r = _Reader(body)
        pid, uid, gid = r.u32(), r.u32(), r.u32()
        cap_eff = r.u64()
        no_new_privs, seccomp = r.u8(), r.u8()
        r.end()
        return cls(
            pid=pid,
            uid=uid,
            gid=gid,
            cap_eff=cap_eff,
            no_new_privs=no_new_privs,
            seccomp=seccomp,
        )


# Python logging levels a worker may use; anything else is a protocol error.
LOG_LEVELS = frozenset((10, 20, 30, 40, 50))


@dataclass(frozen=True, slots=True, kw_only=True)
class LogRecord:
    """A log line formatted in the worker, emitted by the supervisor."""

    TYPE: ClassVar[Msg] = Msg.LOG
    NFDS: ClassVar[int] = 0

    level: int
    text: str

    def encode(self) -> bytes:
        w = _Writer()
        w.u8(self.level)
        w.text(self.text[:MAX_STR])
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> LogRecord:
        r = _Reader(body)
        level = r.u8()
        text = r.text()
        r.end()
        if level not in LOG_LEVELS or text is None:
            raise ProtocolError("bad log record")
        return cls(level=level, text=text)


NO_ID = 0xFFFFFFFF  # SpawnRequest: keep the template's uid/gid


@dataclass(frozen=True, slots=True, kw_only=True)
class SpawnRequest:
    """Fork a worker for one namespace (fds: namespace, its channel)."""

    TYPE: ClassVar[Msg] = Msg.SPAWN_REQ
    NFDS: ClassVar[int] = 2

    label: str
    config_path: str
    uid: int
    gid: int
    debug: int

    def encode(self) -> bytes:
        w = _Writer()
        w.text(self.label)
        w.text(self.config_path)
        w.u32(self.uid)
        w.u32(self.gid)
        w.u8(self.debug)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> SpawnRequest:
        r = _Reader(body)
        label, config_path = r.text(), r.text()
        uid, gid, debug = r.u32(), r.u32(), r.u8()
        r.end()
        if label is None or config_path is None or debug > 1:
            raise ProtocolError("bad spawn request")
        return cls(label=label, config_path=config_path, uid=uid, gid=gid,
                   debug=debug)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpawnAnswer:
    TYPE: ClassVar[Msg] = Msg.SPAWN_ANS
    NFDS: ClassVar[int] = 0

    pid: int

    def encode(self) -> bytes:
        w = _Writer()
        w.u32(self.pid)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> SpawnAnswer:
        r = _Reader(body)
        pid = r.u32()
        r.end()
        if pid == 0:
            raise ProtocolError("spawn answer without a pid")
        return cls(pid=pid)


Message = (HandshakeRequest | HandshakeAnswer | Hello | LogRecord
           | SpawnRequest | SpawnAnswer | PskLookup | PskFound)

_CLASSES: dict[int, type[Message]] = {
    Msg.HANDSHAKE_REQ: HandshakeRequest,
    Msg.HANDSHAKE_ANS: HandshakeAnswer,
    Msg.HELLO: Hello,
    Msg.LOG: LogRecord,
    Msg.SPAWN_REQ: SpawnRequest,
    Msg.SPAWN_ANS: SpawnAnswer,
    Msg.PSK_LOOKUP: PskLookup,
    Msg.PSK_FOUND: PskFound,
}


def encode(msg: Message, req_id: int = 0) -> bytes:
    """Frame ``msg`` with its header."""
    body = msg.encode()
    frame = HEADER.pack(MAGIC, PROTOCOL_VERSION, msg.TYPE, len(body), req_id)
    if len(frame) + len(body) > MAX_MSG:
        raise ValueError("message larger than MAX_MSG")
    return frame + body


def decode(data: bytes, nfds: int) -> tuple[Message, int]:
    """Parse one datagram carrying ``nfds`` fds; return (message, req id).

    Raises ProtocolError for anything but a well-formed message of a known
    type with exactly the fd count that type declares.
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
    cls = _CLASSES.get(mtype)
    if cls is None:
        raise ProtocolError("unknown message type %d" % mtype)
    if nfds != cls.NFDS:
        raise ProtocolError("%s carries %d fds, want %d"
                            % (cls.__name__, nfds, cls.NFDS))
    return cls.decode(data[HEADER.size :]), req_id
