"""Fuzz targets: the decoders that read untrusted bytes, their seeds and
their mutations.  Shared by the hypothesis tests (test_fuzz_decoders.py)
and the long run outside CI (tests/fuzz/run.py).

An input is a tuple of byte strings (a datagram and its fd count, a
certificate and its key, ...).  A target runs one decoder on it; the
contract is that the decoder returns a valid object (``check`` holds) or
raises the one error type it documents.  Any other exception, a failed
check or an input that takes longer than SLOW seconds is a crash.

Inputs come from valid seeds built with the project's own encoders, then
mutated (``mutate``): truncations, bit flips, interesting integers written
over length and type fields, chunks repeated (repeated attributes) or
deleted, splices with other seeds, and nested garbage.  Half of the
mutants get their length fields recomputed (``fixup``) so that they get
past the outer framing to the inner decoder.
"""

from __future__ import annotations

import array
import datetime
import os
import random
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from tlshd.shared import config, protocol, uapi
from tlshd.shared.channel import Channel, socketpair
from tlshd.shared.errors import ConfigError, ProtocolError
from tlshd.supervisor import netlink_codec
from tlshd.worker import pskhandshake, recordlimit, tlscreds, verify
from tlshd.worker.verify import CredentialError

Input = tuple[bytes, ...]
# An input taking more CPU time than this counts as a crash ("unbounded
# time"); valid ones take well under 20 ms.
SLOW = 1.0
FAMILY_ID = 0x21


@dataclass(frozen=True)
class Target:
    name: str
    seeds: Callable[[], list[Input]]
    run: Callable[[Input], object]
    error: type[BaseException]
    check: Callable[[Input, object], None]
    fixup: Callable[[Input], Input] = lambda inp: inp
    # Keep mutants below this size: bigger inputs only test the bound.
    max_len: int = 8192


class CheckFailed(AssertionError):
    """A decoder returned an object that breaks its documented bounds."""


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


# ---- mutations ---------------------------------------------------------

INTERESTING = (0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF,
               0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF)


def _put_int(b: bytearray, rng: random.Random) -> None:
    size = rng.choice((1, 2, 4, 8))
    if len(b) < size:
        return
    pos = rng.randrange(len(b) - size + 1)
    if rng.random() < 0.5:
        pos -= pos % min(size, 4)  # fields are mostly aligned
    value = rng.choice((*INTERESTING, len(b), len(b) + 1, len(b) - 1))
    if rng.random() < 0.3:
        value += rng.choice((-1, 1))
    value %= 1 << (8 * size)
    order = rng.choice(("little", "big"))
    b[pos : pos + size] = value.to_bytes(size, order)


def _chunk(b: bytearray, rng: random.Random) -> tuple[int, int]:
    i = rng.randrange(len(b) + 1)
    j = min(len(b), i + rng.choice((1, 2, 4, 8, 12, 16, 32, 64, 256)))
    return i, j


def mutate_bytes(data: bytes, rng: random.Random,
                 others: Sequence[bytes]) -> bytes:
    """Apply one to four random mutations to ``data``."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(10)
        if op == 0 and b:  # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op == 1 and b:  # bit flip
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 2:  # interesting integer over a field
            _put_int(b, rng)
        elif op == 3 and b:  # byte to an edge value
            b[rng.randrange(len(b))] = rng.choice((0, 0x0A, 0x2D, 0x3D,
                                                   0x5B, 0x7F, 0x80, 0xFF))
        elif op == 4:  # repeat a chunk (repeated attributes, sections)
            i, j = _chunk(b, rng)
            b[j:j] = b[i:j] * rng.choice((1, 1, 2, 5))
        elif op == 5:  # delete a chunk
            i, j = _chunk(b, rng)
            del b[i:j]
        elif op == 6:  # insert random bytes
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.randbytes(rng.choice((1, 2, 3, 4, 8, 16)))
        elif op == 7 and others:  # splice with another seed
            other = rng.choice(others)
            b = b[: rng.randrange(len(b) + 1)] + bytearray(
                other[rng.randrange(len(other) + 1):])
        elif op == 8 and others:  # nest another seed inside this one
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.choice(others)
        elif op == 9 and b:  # swap two bytes
            i, j = rng.randrange(len(b)), rng.randrange(len(b))
            b[i], b[j] = b[j], b[i]
    return bytes(b)


def mutate(target: Target, inp: Input, rng: random.Random,
           corpus: Sequence[Input]) -> Input:
    """A mutant of ``inp``: one of its fields mutated, maybe fixed up."""
    k = rng.randrange(len(inp))
    others = [c[k] for c in corpus if len(c) > k]
    fields = list(inp)
    fields[k] = mutate_bytes(fields[k], rng, others)[: target.max_len]
    out = tuple(fields)
    if rng.random() < 0.5:
        out = target.fixup(out)
    return out


def generate(target: Target, rng: random.Random,
             corpus: Sequence[Input]) -> Input:
    """One input for ``target``: a mutant of a seed, rarely a seed."""
    inp = rng.choice(corpus)
    if rng.random() < 0.05:
        return inp
    return mutate(target, inp, rng, corpus)


# ---- ACCEPT replies (supervisor/netlink_codec.py) ----------------------


def nla(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return (struct.pack("=HH", length, atype) + payload
            + b"\0" * ((-length) % 4))


def _u32(atype: int, v: int) -> bytes:
    return nla(atype, struct.pack("=I", v))


def _s32(atype: int, v: int) -> bytes:
    return nla(atype, struct.pack("=i", v))


def nlmsg(mtype: int, payload: bytes, seq: int = 1, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq,
                       0) + payload


def accept_reply(attrs: bytes) -> bytes:
    genlhdr = struct.pack("=BBH", uapi.HANDSHAKE_CMD_ACCEPT, 1, 0)
    return nlmsg(FAMILY_ID, genlhdr + attrs)


def random_accept_attrs(rng: random.Random) -> bytes:
    """An ACCEPT attribute run in the kernel's order, maybe re-key."""
    a = uapi
    parts = [_s32(a.HANDSHAKE_A_ACCEPT_SOCKFD, rng.randrange(3, 1024)),
             _u32(a.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE, rng.randrange(1, 5)),
             _u32(a.HANDSHAKE_A_ACCEPT_TIMEOUT, rng.randrange(0, 60000)),
             _u32(a.HANDSHAKE_A_ACCEPT_AUTH_MODE, rng.randrange(1, 4))]
    for _ in range(rng.randrange(0, 6)):
        parts.append(_u32(a.HANDSHAKE_A_ACCEPT_PEER_IDENTITY,
                          rng.getrandbits(32)))
    for _ in range(rng.randrange(0, 3)):
        nest = (_s32(a.HANDSHAKE_A_X509_CERT, rng.randrange(1, 1 << 30))
                + _s32(a.HANDSHAKE_A_X509_PRIVKEY, rng.randrange(1, 1 << 30)))
        parts.append(nla(a.HANDSHAKE_A_ACCEPT_CERTIFICATE | 0x8000, nest))
    name = rng.choice((b"127.0.0.1", b"server.example", b"::1",
                       "b\u00fccher.example".encode(), b"x" * 1024))
    parts.append(nla(a.HANDSHAKE_A_ACCEPT_PEERNAME, name + b"\0"))
    parts.append(_u32(a.HANDSHAKE_A_ACCEPT_KEYRING, rng.getrandbits(31)))
    if rng.random() < 0.3:
        parts.append(_u32(a.HANDSHAKE_A_ACCEPT_KEY_UPDATE_REQUEST,
                          rng.randrange(0, 4)))
        parts.append(_u32(a.HANDSHAKE_A_ACCEPT_SESSION_ID,
                          rng.getrandbits(32)))
    if rng.random() < 0.2:
        parts.append(nla(rng.randrange(12, 40), rng.randbytes(4)))
    if rng.random() < 0.2:
        rng.shuffle(parts)
    return b"".join(parts)


def _accept_seeds() -> list[Input]:
    rng = random.Random(8)
    seeds: list[Input] = []
    for i in range(24):
        data = accept_reply(random_accept_attrs(rng))
        if i % 6 == 0:  # two messages in one datagram
            data += accept_reply(random_accept_attrs(rng))
        seeds.append((data, bytes([i % 2])))
    err = struct.pack("=i", -11) + b"\0" * 16  # EAGAIN: nothing pending
    seeds.append((nlmsg(2, err), b"\0"))
    return seeds


def _fix_nla_lengths(attrs: bytearray, pos: int, end: int) -> None:
    """Make each attribute's length fit what follows it (best effort)."""
    while end - pos >= 4:
        length, atype = struct.unpack_from("=HH", attrs, pos)
        length = max(4, min(length, end - pos))
        struct.pack_into("=HH", attrs, pos, length, atype)
        if atype & 0x8000:
            _fix_nla_lengths(attrs, pos + 4, pos + length)
        pos += (length + 3) & ~3


def _accept_fixup(inp: Input) -> Input:
    data = bytearray(inp[0])
    if len(data) >= 20:
        # Treat the datagram as one message: its length, then attributes.
        struct.pack_into("=I", data, 0, len(data))
        _fix_nla_lengths(data, 20, len(data))
    return (bytes(data), *inp[1:])


def run_accept(inp: Input) -> list[object]:
    """What netlink_socket.HandshakeSocket.accept does with the kernel's
    answer."""
    rekey = bool(inp[1][:1] and inp[1][0] & 1)
    out: list[object] = []
    for msg in netlink_codec.split_messages(inp[0]):
        if msg.type == netlink_codec.NLMSG_ERROR:
            out.append(netlink_codec.netlink_error(msg))
            continue
        _cmd, attrs = netlink_codec.genl_payload(msg)
        try:
            out.append(netlink_codec.decode_accept_attrs(attrs, rekey=rekey))
        except ProtocolError:
            fd = netlink_codec.salvage_sockfd(attrs)  # must never raise
            _require(fd is None or fd >= 0, "salvaged a negative fd")
            raise
    return out


def check_accept(inp: Input, out: object) -> None:
    assert isinstance(out, list)
    for req in out:
        if isinstance(req, int):
            continue
        assert isinstance(req, netlink_codec.AcceptedRequest)
        _require(req.sockfd >= 0, "negative sockfd")
        _require(len(req.peerids) <= uapi.HANDSHAKE_MAX_PEER_IDS,
                 "too many peer ids")
        _require(len(req.certs) <= netlink_codec.MAX_CERTS, "too many certs")
        _require(all(c >= 0 and k >= 0 for c, k in req.certs),
                 "negative key serial")
        name = req.peername
        _require(name is None or (
            0 < len(name.encode()) <= netlink_codec.MAX_PEERNAME
            and "\0" not in name), "bad peer name")
        _require(req.key_update in set(uapi.KeyUpdateType),
                 "unknown key update type")


ACCEPT = Target("accept", _accept_seeds, run_accept, ProtocolError,
                check_accept, _accept_fixup)


# ---- supervisor-worker messages (shared/protocol.py + channel) ---------


def protocol_seed_messages(rng: random.Random) -> list[protocol.Message]:
    """Valid messages of every type, with varied field values."""
    msgs: list[protocol.Message] = []
    for i in range(4):
        psks = tuple(protocol.PskMaterial(
            serial=rng.randrange(1, 1 << 32), identity=b"NVMe0R01 host %d" % k,
            secret=rng.randbytes((32, 48)[k % 2])) for k in range(i))
        x509 = (rng.randbytes(300), rng.randbytes(120)) if i % 2 else (
            b"", b"")
        msgs.append(protocol.HandshakeRequest(
            msg_type=rng.randrange(1, 5), auth_mode=rng.randrange(1, 4),
            timeout_ms=rng.getrandbits(32),
            peername=None if i == 0 else "peer%d.example" % i, psks=psks,
            x509_cert=x509[0], x509_key=x509[1],
            keep_secrets=bool(i % 2), key_update=i % 4,
            session_id=i * 7))
        msgs.append(protocol.HandshakeAnswer(
            status=(0, 13, 110, 4095)[i],
            remote_auth=tuple(range(i)),
            reason="" if i == 0 else "failure %d" % i,
            session_id=5 if i == 0 else 0))
        msgs.append(protocol.LogRecord(level=(10, 20, 30, 40)[i],
                                       text="log line \u00e9 %d" % i))
    msgs.append(protocol.Hello(pid=1234, uid=998, gid=998, cap_eff=0,
                               no_new_privs=1, seccomp=2))
    msgs.append(protocol.SpawnRequest(label="init", config_path="/etc/x",
                                      uid=998, gid=998, debug=1))
    msgs.append(protocol.SpawnAnswer(pid=4321))
    msgs.append(protocol.PskLookup(identity=b"NVMe0R01 host subsys"))
    msgs.append(protocol.PskFound(psk=None))
    msgs.append(protocol.PskFound(psk=protocol.PskMaterial(
        serial=0x1234, identity=b"NVMe1R02 host subsys", secret=bytes(48))))
    return msgs


def _protocol_seeds() -> list[Input]:
    rng = random.Random(3)
    return [(protocol.encode(m, rng.getrandbits(64)), bytes([m.NFDS]))
            for m in protocol_seed_messages(rng)]


def _protocol_fixup(inp: Input) -> Input:
    data = bytearray(inp[0])
    if len(data) >= protocol.HEADER.size:
        struct.pack_into("!I", data, 4, len(data) - protocol.HEADER.size)
    return (bytes(data), *inp[1:])


class _ChannelPair:
    """A SEQPACKET pair: the fuzz input goes in one end, with fds."""

    def __init__(self) -> None:
        self.tx, rx = socketpair()
        self.rx = Channel(rx)
        self.fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    for _ in range(4)]


@cache
def _pair() -> _ChannelPair:
    return _ChannelPair()


def run_channel(inp: Input) -> object:
    """Send the datagram with 0-3 fds; Channel.recv decodes it."""
    pair = _pair()
    nfds = inp[1][0] % 4 if inp[1] else 0
    anc = []
    if nfds:
        anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS,
                    array.array("i", pair.fds[:nfds]).tobytes()))
    pair.tx.sendmsg([inp[0]], anc)
    msg, req_id, fds = pair.rx.recv()
    for fd in fds:
        os.close(fd)
    return msg, req_id, len(fds)


def check_channel(inp: Input, out: object) -> None:
    assert isinstance(out, tuple)
    msg, req_id, nfds = out
    _require(nfds == msg.NFDS, "fd count does not match the type")
    # A decoded message is exactly what its encoder writes.
    _require(protocol.encode(msg, req_id) == inp[0], "does not re-encode")


PROTOCOL = Target("protocol", _protocol_seeds, run_channel, ProtocolError,
                  check_channel, _protocol_fixup,
                  max_len=protocol.MAX_MSG + 16)


# ---- the configuration file (shared/config.py) -------------------------

CONFIG_SECTIONS = ("debug", "authenticate", "authenticate.client",
                   "authenticate.server", "netns", "sandbox", "DEFAULT",
                   "other")
CONFIG_KEYS = ("loglevel", "tls", "nl", "keyrings", "handshake_timeout",
               "x509.truststore", "x509.crl", "x509.certificate",
               "x509.private_key", "x509.ciphersuites", "x509.client_auth",
               "default", "unnamed", "user", "unknown")
CONFIG_VALUES = ("0", "1", "0x10", "-1", "15", "0.05", "nan", "inf", "1e400",
                 "9" * 5000, "/etc/tlshd/cert.pem", ".nfs;.nvme;;", "",
                 "a=b", "%(x)s", "TLS_AES_128_GCM_SHA256", "\u00e9",
                 " spaced ")


# Pairs that parse: most lines, so that most seeds are valid files.
CONFIG_GOOD = (("loglevel", "1"), ("tls", "0"), ("keyrings", ".nfs;.nvme;;"),
               ("handshake_timeout", "15"), ("x509.crl", "/etc/crl.pem"),
               ("x509.certificate", "/etc/tlshd/cert.pem"),
               ("x509.ciphersuites", "TLS_AES_128_GCM_SHA256"),
               ("unknown", "\u00e9"), ("user", " spaced "))


def random_config(rng: random.Random) -> bytes:
    """Config text from the grammar: sections, keys, comments, oddities."""
    lines = []
    used_in: dict[str, set[str]] = {}
    for _ in range(rng.randrange(1, 6)):
        section = rng.choice(CONFIG_SECTIONS)
        lines.append("[%s]" % section)
        # A repeated header continues its section (GLib).
        used = used_in.setdefault(section, set())
        for _ in range(rng.randrange(0, 6)):
            r = rng.random()
            sep = rng.choice(("=", " = ", "= ", "="))
            if r < 0.75:
                key, value = rng.choice(CONFIG_GOOD)
                if key in used:  # a key set twice is refused
                    continue
                used.add(key)
                lines.append(key + sep + value)
            elif r < 0.83:
                lines.append(rng.choice(CONFIG_KEYS) + sep
                             + rng.choice(CONFIG_VALUES))
            elif r < 0.93:
                lines.append("# " + rng.choice(CONFIG_VALUES))
            elif r < 0.96:  # not a key=value line: refused
                lines.append("  continued " + rng.choice(CONFIG_VALUES))
            else:
                lines.append("")
    return "\n".join(lines).encode()


def _config_seeds() -> list[Input]:
    rng = random.Random(5)
    seeds = [(random_config(rng),) for _ in range(30)]
    sample = os.path.join(os.path.dirname(__file__), "..", "..",
                          "packaging", "config")
    with open(sample, "rb") as f:
        seeds.append((f.read(),))
    return seeds


def run_config(inp: Input) -> config.Config:
    return config.parse_bytes(inp[0], "<fuzz>")


def check_config(inp: Input, out: object) -> None:
    assert isinstance(out, config.Config)
    _require(0.1 <= out.handshake_timeout <= 600, "timeout out of range")
    _require(all(k and ";" not in k for k in out.keyrings), "bad keyring")


CONFIG = Target("config", _config_seeds, run_config, ConfigError,
                check_config, max_len=64 * 1024)


# ---- credentials (worker/tlscreds.py, worker/verify.py) ----------------

_DAY = datetime.timedelta(days=1)


def _cert(subject: str, key: object, issuer: str, signer: object,
          ca: bool) -> x509.Certificate:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                     subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    issuer)]))
         .public_key(key.public_key())  # type: ignore[attr-defined]
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - _DAY).not_valid_after(now + 400 * _DAY)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                        critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("server.example")]), critical=False)
    algo = None if isinstance(signer, ed25519.Ed25519PrivateKey) else (
        hashes.SHA256())
    return b.sign(signer, algo)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Credentials:
    """DER and PEM credentials of several key types, and a CRL."""

    # P-256, P-384, Ed25519, RSA-1024, in that order
    pairs: list[tuple[bytes, bytes]]  # (cert DER, PKCS#8 key DER)
    pem_pairs: list[tuple[bytes, bytes]]  # (chain PEM, key PEM)
    ca_pem: bytes
    crl_pem: bytes


@cache
def credentials() -> Credentials:
    """Throwaway credentials (made once per process)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Fuzz CA", ca_key, "Fuzz CA", ca_key, True)
    pem = serialization.Encoding.PEM
    keys: list[object] = [ec.generate_private_key(ec.SECP256R1()),
                          ec.generate_private_key(ec.SECP384R1()),
                          ed25519.Ed25519PrivateKey.generate(),
                          rsa.generate_private_key(65537, 1024)]
    pairs, pem_pairs = [], []
    for i, key in enumerate(keys):
        leaf = _cert("leaf%d" % i, key, "Fuzz CA", ca_key, False)
        pkcs8 = key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        pairs.append((leaf.public_bytes(serialization.Encoding.DER), pkcs8))
        # PEM keys in the format each type is usually stored in.
        fmt = (serialization.PrivateFormat.TraditionalOpenSSL
               if isinstance(key, (ec.EllipticCurvePrivateKey,
                                   rsa.RSAPrivateKey))
               else serialization.PrivateFormat.PKCS8)
        key_pem = key.private_bytes(  # type: ignore[attr-defined]
            pem, fmt, serialization.NoEncryption())
        pem_pairs.append((leaf.public_bytes(pem) + ca.public_bytes(pem),
                          key_pem))
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    revoked = (x509.RevokedCertificateBuilder().serial_number(7)
               .revocation_date(now).build())
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(ca.subject).last_update(now)
           .next_update(now + _DAY).add_revoked_certificate(revoked)
           .sign(ca_key, hashes.SHA256()))
    return Credentials(pairs, pem_pairs, ca.public_bytes(pem),
                       crl.public_bytes(pem))


def _weighted(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # Loading an RSA key checks it (primality of p and q: ~5 ms against
    # 0.03 ms for P-256), so RSA gets a smaller share of the inputs, or
    # it would take most of a long run's time.
    return pairs[:3] * 3 + pairs[3:]


def _der_seeds() -> list[Input]:
    creds = credentials()
    seeds: list[Input] = list(_weighted(creds.pairs))
    # Mismatched certificate and key: a valid encoding, refused.
    seeds.append((creds.pairs[0][0], creds.pairs[1][1]))
    return seeds


def run_der(inp: Input) -> tlscreds.Identity:
    return tlscreds.load_der_identity(inp[0], inp[1])


def check_identity(inp: Input, out: object) -> None:
    """A loaded identity installs on a connection, or OpenSSL refuses it
    with SSL.Error (a key too weak for the security level), which the
    engine reports as a credential error."""
    assert isinstance(out, tlscreds.Identity)
    _require(len(out.chain) >= 1, "empty chain")
    try:
        out.use_in_connection(SSL.Connection(_connection_context(), None))
    except SSL.Error:
        pass


DER = Target("der", _der_seeds, run_der, ValueError, check_identity,
             max_len=16 * 1024)

# PEM inputs: (loader, file 1, file 2).  Loaders read files, so the
# fields are written to a private directory first.
PEM_IDENTITY, PEM_TRUST, PEM_CRL = b"i", b"t", b"c"


def _pem_seeds() -> list[Input]:
    creds = credentials()
    seeds: list[Input] = [(PEM_IDENTITY, c, k)
                          for c, k in _weighted(creds.pem_pairs)]
    seeds += [(PEM_TRUST, creds.ca_pem + creds.pem_pairs[0][0], b"")] * 2
    seeds += [(PEM_CRL, creds.crl_pem * 2, b"")] * 2
    return seeds


@cache
def _pem_dir() -> str:
    return tempfile.mkdtemp(prefix="tlshd-fuzz-",
                            dir="/dev/shm" if os.path.isdir("/dev/shm")
                            else None)


@cache
def _connection_context() -> SSL.Context:
    return SSL.Context(SSL.TLS_METHOD)


_ctx: list[tuple[SSL.Context, int]] = []


def _context() -> SSL.Context:
    # A fresh store every 500 inputs, so that loaded anchors do not pile
    # up and slow every later input down.
    if not _ctx or _ctx[0][1] >= 500:
        _ctx[:] = [(SSL.Context(SSL.TLS_METHOD), 0)]
    ctx, uses = _ctx[0]
    _ctx[0] = (ctx, uses + 1)
    return ctx


_written: dict[str, bytes] = {}


def run_pem(inp: Input) -> object:
    first = os.path.join(_pem_dir(), "1.pem")
    second = os.path.join(_pem_dir(), "2.pem")
    for path, data in ((first, inp[1]), (second, inp[2])):
        if _written.get(path) != data:  # most mutants change one file
            with open(path, "wb") as f:
                f.write(data)
            _written[path] = data
    kind = inp[0][:1]
    if kind == PEM_TRUST:
        return verify.load_trust(_context(), first)
    if kind == PEM_CRL:
        return verify.load_crl(_context(), first)
    return tlscreds.load_pem_identity(first, second)


def check_pem(inp: Input, out: object) -> None:
    if isinstance(out, int):
        _require(out >= 1, "loaded nothing without an error")
    else:
        check_identity(inp, out)


PEM = Target("pem", _pem_seeds, run_pem, CredentialError, check_pem,
             max_len=16 * 1024)

# ---- the ClientHello a PSK server peeks at (worker/pskhandshake.py) ---
#
# Peer data, read before OpenSSL sees it: the worker takes the offered
# PSK identities from the raw ClientHello records to ask the supervisor
# for the keys.  Contract: a list of identities, HelloIncomplete (wait
# for more bytes: only if more can still come within one peek) or
# ValueError.

INCOMPLETE = "incomplete"


def _vec(width: int, body: bytes) -> bytes:
    return len(body).to_bytes(width, "big") + body


def _ext(etype: int, body: bytes) -> bytes:
    return etype.to_bytes(2, "big") + _vec(2, body)


def hello_records(identities: Sequence[bytes], rng: random.Random,
                  fragment: int = pskhandshake.MAX_RECORD,
                  extra: Sequence[bytes] = ()) -> bytes:
    """A TLS 1.3 ClientHello offering ``identities`` as PSKs (the
    pre_shared_key extension last, as RFC 8446 requires), in handshake
    records of at most ``fragment`` bytes."""
    exts = b"".join(extra) + _ext(43, _vec(1, b"\x03\x04"))
    exts += _ext(51, _vec(2, b"\x00\x1d" + _vec(2, rng.randbytes(32))))
    if identities:
        exts += _ext(45, _vec(1, b"\x01"))
        ids = b"".join(_vec(2, i) + rng.randbytes(4) for i in identities)
        binders = b"".join(_vec(1, rng.randbytes(32)) for _ in identities)
        exts += _ext(pskhandshake.EXT_PRE_SHARED_KEY,
                     _vec(2, ids) + _vec(2, binders))
    body = (b"\x03\x03" + rng.randbytes(32) + _vec(1, rng.randbytes(32))
            + _vec(2, b"\x13\x01\x13\x02") + _vec(1, b"\x00")
            + _vec(2, exts))
    msg = bytes([pskhandshake.HS_CLIENT_HELLO]) + _vec(3, body)
    out = b""
    for i in range(0, len(msg), fragment):
        out += b"\x16\x03\x01" + _vec(2, msg[i : i + fragment])
    return out


def _openssl_hello() -> bytes:
    """A real ClientHello from the wheel's OpenSSL (default groups, so a
    post-quantum key share), taken from a memory BIO."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(1 << 16)


def _hello_seeds() -> list[Input]:
    rng = random.Random(9)
    nvme = b"NVMe1R01 hostnqn.2014-08.org.nvmexpress:uuid:%d subnqn %s"
    seeds: list[Input] = [(_openssl_hello(),)]
    for n in (1, 1, 2, 3, 8):
        ids = [nvme % (i, rng.randbytes(8).hex().encode()) for i in range(n)]
        seeds.append((hello_records(ids, rng),))
    seeds.append((hello_records([b"x" * 300], rng, fragment=100),))
    seeds.append((hello_records([b"a"], rng, fragment=7),))
    seeds.append((hello_records([nvme % (0, b"s")], rng,
                                extra=[_ext(0, rng.randbytes(40))]),))
    seeds.append((hello_records([], rng),))
    return seeds


def _hello_fixup(inp: Input) -> Input:
    """Make the first record's length cover the rest of the input."""
    data = bytearray(inp[0])
    if 5 <= len(data) <= 5 + pskhandshake.MAX_RECORD:
        struct.pack_into("!H", data, 3, len(data) - 5)
    if len(data) >= 9:
        data[6:9] = (len(data) - 9).to_bytes(3, "big")
    return (bytes(data),)


def run_hello(inp: Input) -> object:
    try:
        return pskhandshake.offered_identities(inp[0])
    except pskhandshake.HelloIncomplete as e:
        return (INCOMPLETE, e.needed)


def check_hello(inp: Input, out: object) -> None:
    if isinstance(out, tuple):
        needed = out[1]
        # More must be possible, and must fit in one peek, or the
        # server would wait for bytes it can never see.
        _require(len(inp[0]) < needed <= pskhandshake.MAX_PEEK,
                 "incomplete needs %d of %d" % (needed, len(inp[0])))
        return
    assert isinstance(out, list)
    _require(sum(len(i) + 6 for i in out) <= len(inp[0]),
             "identities larger than the hello")
    _require(all(isinstance(i, bytes) and len(i) <= 0xFFFF for i in out),
             "bad identity")


HELLO = Target("hello", _hello_seeds, run_hello, ValueError, check_hello,
               _hello_fixup, max_len=pskhandshake.MAX_PEEK + 16)



# ---- record_size_limit in a ClientHello or EncryptedExtensions ----------


def _handshake_message(records: bytes) -> bytes:
    """The handshake message of a single handshake record."""
    assert int.from_bytes(records[3:5], "big") == len(records) - 5
    return records[5:]


def _record_limit_seeds() -> list[Input]:
    rng = random.Random(28)
    rsl = recordlimit.EXT_RECORD_SIZE_LIMIT
    seeds: list[Input] = [(_handshake_message(_openssl_hello()),)]
    for value in (64, 512, 16385):
        seeds.append((_handshake_message(hello_records(
            [b"id"], rng, extra=[_ext(rsl, value.to_bytes(2, "big"))])),))
        exts = _ext(0, b"") + _ext(rsl, value.to_bytes(2, "big"))
        seeds.append((b"\x08" + _vec(3, _vec(2, exts)),))
    seeds.append((b"\x08" + _vec(3, _vec(2, b"")),))
    seeds.append((b"\x08" + _vec(3, _vec(2, _ext(rsl, b"\x00\x3f"))),))
    return seeds


def _record_limit_fixup(inp: Input) -> Input:
    """Make the handshake header's length cover the rest."""
    data = bytearray(inp[0])
    if len(data) >= 4:
        data[1:4] = (len(data) - 4).to_bytes(3, "big")
    return (bytes(data),)


NO_LIMIT = "no limit"  # classify() takes None for a rejection


def run_record_limit(inp: Input) -> object:
    limit = recordlimit.peer_limit(inp[0])
    return NO_LIMIT if limit is None else limit


def check_record_limit(inp: Input, out: object) -> None:
    if out == NO_LIMIT:
        return
    _require(isinstance(out, int)
             and recordlimit.MIN_LIMIT <= out <= 0xFFFF,
             "limit out of range: %r" % (out,))
    _require(inp[0][:1] in (b"\x01", b"\x08"),
             "a limit from another message type")


RECORD_LIMIT = Target("record_limit", _record_limit_seeds, run_record_limit,
                      recordlimit.RecordLimitError, check_record_limit,
                      _record_limit_fixup)

TARGETS = {t.name: t for t in (ACCEPT, PROTOCOL, CONFIG, DER, PEM, HELLO,
                               RECORD_LIMIT)}


def classify(target: Target, inp: Input) -> tuple[str, str]:
    """Run ``target`` on ``inp``: ("ok", ""), ("rejected", the documented
    error) or ("crash", "ExceptionType: message")."""
    start = time.monotonic()
    try:
        out = target.run(inp)
    except target.error as e:
        out, rejected = None, "%s: %s" % (type(e).__name__, e)
    except Exception as e:
        return "crash", "%s: %s" % (type(e).__name__, e)
    if time.monotonic() - start > SLOW:
        took = cpu_time(target, inp)
        if took > SLOW:
            return "crash", "Slow: %.1f s" % took
    if out is None:
        return "rejected", rejected
    try:
        target.check(inp, out)
    except AssertionError as e:
        return "crash", "CheckFailed: %s" % e
    return "ok", ""


def cpu_time(target: Target, inp: Input) -> float:
    """The CPU time ``target`` takes on ``inp``: slow in wall time may
    just be a busy machine (reading the CPU clock on every input would
    cost more than most decoders)."""
    start = time.process_time()
    try:
        target.run(inp)
    except Exception:
        pass
    return time.process_time() - start


def verdict(target: Target, inp: Input) -> str | None:
    """None if ``target`` kept its contract on ``inp``, else the crash."""
    kind, detail = classify(target, inp)
    return detail if kind == "crash" else None
