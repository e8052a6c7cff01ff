"""The message bodies of the supervisor-worker protocol.

One frozen dataclass per message type (tlshd.shared.protocol frames
them): its type number, which side sends it, how many fds travel with it,
and a strict ``decode`` for every ``encode``.  A decoder checks ranges and
relations between fields, not only sizes (tlshd.shared.msgcodec does
those).  Bump protocol.PROTOCOL_VERSION on any change to Msg or a body
layout.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from tlshd.shared.errors import ProtocolError
from tlshd.shared.msgcodec import MAX_LIST, MAX_MSG, MAX_STR, Reader, Writer

MAX_REASON = 512
MAX_SECRET = 64  # a PSK: 32 (SHA-256) or 48 (SHA-384) bytes
# Offered identities a worker may look up per request: a hostile
# ClientHello may list hundreds; NVMe hosts offer one or two.
MAX_LOOKUPS = 8
# HandshakeRequest.flags
REQ_KEEP_SECRETS = 0x1  # the kernel may ask to re-key: keep the secrets
KEY_UPDATE_MAX = 3  # uapi.KeyUpdateType.RECEIVED_REQUEST_UPDATE
CERT_KINDS = ("", "classical", "ml-dsa")  # HandshakeAnswer.cert_kind


class Side(enum.Enum):
    """The end of a channel a message comes from.

    The worker template counts as a worker: the supervisor receives from
    it under the same rule as from any worker.
    """

    SUPERVISOR = "supervisor"
    WORKER = "worker"


class Msg(enum.IntEnum):
    """Message type numbers.  Who may send a type is its class's SENT_BY;
    the numbers need not follow any rule."""

    HANDSHAKE_REQ = 2  # 1 fd: the ACCEPTed socket
    HELLO = 3  # once, after the worker's sandbox is up
    HANDSHAKE_ANS = 5
    LOG = 7  # one formatted log record
    SPAWN_REQ = 8  # to the worker template, 2 fds: netns, channel
    SPAWN_ANS = 9  # from the worker template: the new worker's pid
    PSK_FOUND = 10  # the answer to a PSK_LOOKUP
    PSK_LOOKUP = 11  # a server PSK identity to find


@dataclass(frozen=True, slots=True, kw_only=True)
class PskMaterial:
    """A PSK read from a kernel key by the supervisor: its serial (for
    REMOTE_AUTH), its identity (the key's description) and its secret."""

    serial: int
    identity: bytes
    secret: bytes = field(repr=False)  # never in a log line or traceback

    def write(self, w: Writer) -> None:
        w.u32(self.serial)
        w.blob(self.identity, MAX_STR)
        w.blob(self.secret, MAX_SECRET)

    @classmethod
    def read(cls, r: Reader) -> PskMaterial:
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
    SENT_BY: ClassVar[Side] = Side.SUPERVISOR
    NFDS: ClassVar[int] = 1

    msg_type: int
    auth_mode: int
    timeout_ms: int
    peername: str | None
    psks: tuple[PskMaterial, ...] = ()
    x509_cert: bytes = b""
    x509_key: bytes = field(default=b"", repr=False)  # a private key
    keep_secrets: bool = False
    key_update: int = 0
    session_id: int = 0

    def encode(self) -> bytes:
        w = Writer()
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
        r = Reader(body)
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
    SENT_BY: ClassVar[Side] = Side.WORKER
    NFDS: ClassVar[int] = 0

    identity: bytes

    def encode(self) -> bytes:
        w = Writer()
        w.blob(self.identity, MAX_STR)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> PskLookup:
        r = Reader(body)
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
    SENT_BY: ClassVar[Side] = Side.SUPERVISOR
    NFDS: ClassVar[int] = 0

    psk: PskMaterial | None

    def encode(self) -> bytes:
        w = Writer()
        w.u8(0 if self.psk is None else 1)
        if self.psk is not None:
            self.psk.write(w)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> PskFound:
        r = Reader(body)
        found = r.u8()
        if found > 1:
            raise ProtocolError("bad PSK_FOUND flag %d" % found)
        psk = PskMaterial.read(r) if found else None
        r.end()
        return cls(psk=psk)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeAnswer:
    """The outcome of one request: DONE's status and REMOTE_AUTH ids,
    a failure's one-line reason, the session id under which the worker
    keeps the secrets (0: none), a success's server certificate kind,
    and whether a success reused a session (the supervisor writes the
    completion line from these: no log message per handshake)."""

    TYPE: ClassVar[Msg] = Msg.HANDSHAKE_ANS
    SENT_BY: ClassVar[Side] = Side.WORKER
    NFDS: ClassVar[int] = 0

    status: int
    remote_auth: tuple[int, ...]
    reason: str = ""
    session_id: int = 0
    cert_kind: str = ""
    resumed: bool = False

    def encode(self) -> bytes:
        w = Writer()
        w.u32(self.status)
        w.u32_list(self.remote_auth)
        w.text(self.reason[:MAX_REASON])
        w.u32(self.session_id)
        w.u8(CERT_KINDS.index(self.cert_kind))
        w.u8(1 if self.resumed else 0)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> HandshakeAnswer:
        r = Reader(body)
        status = r.u32()
        remote_auth = r.u32_list()
        reason = r.text()
        session_id = r.u32()
        kind = r.u8()
        resumed = r.u8()
        r.end()
        # The kernel caps STATUS at MAX_ERRNO; anything larger is a lie.
        if status > 4095:
            raise ProtocolError("status %d is not an errno" % status)
        if reason is None or len(reason) > MAX_REASON:
            raise ProtocolError("bad failure reason")
        if session_id and status:
            raise ProtocolError("session id in a failed answer")
        if kind >= len(CERT_KINDS) or (kind and status):  # for the counts
            raise ProtocolError("bad certificate kind %d" % kind)
        if resumed > 1 or (resumed and status):
            raise ProtocolError("bad session reuse flag %d" % resumed)
        return cls(status=status, remote_auth=remote_auth, reason=reason,
                   session_id=session_id, cert_kind=CERT_KINDS[kind],
                   resumed=bool(resumed))


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """The worker's report once it is sandboxed: who it runs as."""

    TYPE: ClassVar[Msg] = Msg.HELLO
    SENT_BY: ClassVar[Side] = Side.WORKER
    NFDS: ClassVar[int] = 0

    pid: int
    uid: int
    gid: int
    cap_eff: int
    no_new_privs: int
    seccomp: int

    def encode(self) -> bytes:
        w = Writer()
        for v in (self.pid, self.uid, self.gid):
            w.u32(v)
        w.u64(self.cap_eff)
        w.u8(self.no_new_privs)
        w.u8(self.seccomp)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        r = Reader(body)
        pid, uid, gid = r.u32(), r.u32(), r.u32()
        cap_eff = r.u64()
        no_new_privs, seccomp = r.u8(), r.u8()
        r.end()
        return cls(pid=pid, uid=uid, gid=gid, cap_eff=cap_eff,
                   no_new_privs=no_new_privs, seccomp=seccomp)


# Python logging levels a worker may use; anything else is a protocol error.
LOG_LEVELS = frozenset((10, 20, 30, 40, 50))


@dataclass(frozen=True, slots=True, kw_only=True)
class LogRecord:
    """A log line formatted in the worker, emitted by the supervisor."""

    TYPE: ClassVar[Msg] = Msg.LOG
    SENT_BY: ClassVar[Side] = Side.WORKER
    NFDS: ClassVar[int] = 0

    level: int
    text: str

    def encode(self) -> bytes:
        w = Writer()
        w.u8(self.level)
        w.text(self.text[:MAX_STR])
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> LogRecord:
        r = Reader(body)
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
    SENT_BY: ClassVar[Side] = Side.SUPERVISOR
    NFDS: ClassVar[int] = 2

    label: str
    config_path: str
    uid: int
    gid: int
    debug: int

    def encode(self) -> bytes:
        w = Writer()
        w.text(self.label)
        w.text(self.config_path)
        w.u32(self.uid)
        w.u32(self.gid)
        w.u8(self.debug)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> SpawnRequest:
        r = Reader(body)
        label, config_path = r.text(), r.text()
        uid, gid, debug = r.u32(), r.u32(), r.u8()
        r.end()
        if label is None or config_path is None or debug > 1:
            raise ProtocolError("bad spawn request")
        return cls(label=label, config_path=config_path, uid=uid, gid=gid,
                   debug=debug)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpawnAnswer:
    """The worker template's answer: the pid of the worker it forked."""

    TYPE: ClassVar[Msg] = Msg.SPAWN_ANS
    SENT_BY: ClassVar[Side] = Side.WORKER
    NFDS: ClassVar[int] = 0

    pid: int

    def encode(self) -> bytes:
        w = Writer()
        w.u32(self.pid)
        return w.data()

    @classmethod
    def decode(cls, body: bytes) -> SpawnAnswer:
        r = Reader(body)
        pid = r.u32()
        r.end()
        if pid == 0:
            raise ProtocolError("spawn answer without a pid")
        return cls(pid=pid)

