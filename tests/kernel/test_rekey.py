"""TLS 1.3 re-keying (KeyUpdate) through kTLS, with the worker's own code.

Two loopback endpoints get their keys the way the worker installs them:
our Engine runs the handshake (client on one socket, server on the other,
in two threads), ``ktls.install`` programs both directions, and
``ktlspeer.KtlsPeer`` (tests/unit/ktlspeer.py) drives KeyUpdates on both.
The test owns the sockets.  Then:

- 1000 re-keys of client-to-server with data before and after each, then
  1000 of server-to-client, then 1000 mixed steps (either side, both at
  once, update_requested answered), every byte compared, and the kernel's
  ``TlsTxRekeyOk`` / ``TlsRxRekeyOk`` / ``TlsRxRekeyReceived`` counters
  checked against the counts;
- interop: our kTLS endpoint (client and server role) against OpenSSL in
  user space, which re-keys with ``SSL_key_update``, in both directions.

Re-keying needs Linux 6.14 or later.  On older kernels (6.12) the tests
report "not applicable" (skip, marked ``not_applicable``) and one test
checks that the support probe says so.  ``SSL_key_update`` is not bound by
cryptography; it is found in the wheel's ELF symbol table (test-only hack:
OpenSSL is linked into cryptography's extension with hidden symbols, but
the wheel is not stripped; see ``_elf_symbol`` below).
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL

from tlshd.shared import protocol, tlsstat, uapi
from tlshd.shared.config import RoleConfig
from tlshd.supervisor import netlink_family
from tlshd.worker import ktls, rekey, serve
from tlshd.worker.rekey import Secrets
from tlshd.worker.rekeytable import RekeyTable
from tlshd.worker.tlsengine import Engine, Outcome

# The test-side kTLS peer (reads records, answers KeyUpdates) lives with
# the unit tests' helpers.
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
import ktlspeer
from ktlspeer import KtlsPeer

pytestmark = pytest.mark.kernel

REKEY_SINCE = (6, 14)
N_REKEYS = int(os.environ.get("TLSHD_REKEY_COUNT", "1000"))
N_INTEROP = int(os.environ.get("TLSHD_REKEY_INTEROP", "100"))
# No loop may hang the VM: every blocking read gives up after this long.
IO_TIMEOUT = 60
SUITES = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
]
COUNTERS = ("TlsTxRekeyOk", "TlsRxRekeyOk", "TlsRxRekeyReceived",
            "TlsTxRekeyError", "TlsRxRekeyError", "TlsDecryptError")


@pytest.fixture(scope="module", autouse=True)
def tls_module() -> None:
    subprocess.run(["modprobe", "tls"], check=True)


def require_rekey(kernel_version: tuple[int, ...]) -> None:
    """Skip as not applicable on kernels without kTLS re-keying.

    A kernel new enough that lacks the counters fails instead: that is a
    broken probe or kernel, not an old one.
    """
    supported = rekey.rekey_supported()
    if kernel_version[:2] >= REKEY_SINCE:
        assert supported, "kernel %s has no Tls*Rekey* counters" % (
            ".".join(map(str, kernel_version)))
        return
    if not supported:
        pytest.skip("not applicable: kernel %s is too old for kTLS "
                    "re-keying (needs %d.%d)"
                    % (".".join(map(str, kernel_version)), *REKEY_SINCE))


def tls_stat() -> dict[str, int]:
    return tlsstat.read()


def deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}


@pytest.fixture(scope="module")
def engine_settings(pki: Any) -> tuple[RoleConfig, RoleConfig]:
    ca = pki.path("ca.pem")
    client = RoleConfig(truststore=ca)
    server = RoleConfig(truststore=ca, certificate=pki.path("server.pem"),
                          private_key=pki.path("server.key"))
    return client, server


def make_engine(settings: tuple[RoleConfig, RoleConfig],
                suite: str | None = None) -> Engine:
    client, server = settings
    if suite is not None:
        client = RoleConfig(truststore=client.truststore,
                              ciphersuites=suite)
    return Engine(client, server)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server) of a connected loopback TCP pair."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=30)
        server, _ = listener.accept()
    client.settimeout(30)
    server.settimeout(30)
    with client, server:
        yield client, server


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``fn`` in a thread; the returned call joins and returns."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the joining thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join() -> Any:
        t.join(120)
        assert not t.is_alive(), "handshake thread hung"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def bound_reads(sock: socket.socket) -> None:
    """Blocking mode with a kernel receive timeout.

    Not ``settimeout``: Python then polls before each read, and poll
    reports no input while a decrypted KeyUpdate waits to be read.
    """
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("=qq", IO_TIMEOUT, 0))


def install(sock: socket.socket, out: Outcome) -> KtlsPeer:
    """What the worker does after a handshake, then a session on top."""
    assert out.status == 0, out.reason
    assert out.tx is not None and out.rx is not None
    ktls.install(sock, out.tx, out.rx)
    bound_reads(sock)
    return KtlsPeer(sock, Secrets(out.cipher, out.tx.secret,
                                     out.rx.secret))


def engine_pair(engine: Engine, csock: socket.socket, ssock: socket.socket
                ) -> tuple[KtlsPeer, KtlsPeer]:
    deadline = time.monotonic() + 60
    server = in_thread(lambda: engine.server_handshake(
        ssock, deadline=deadline))
    cout = engine.client_handshake(csock, peername="127.0.0.1",
                                   deadline=deadline)
    sout = server()
    assert cout.cipher == sout.cipher
    return install(csock, cout), install(ssock, sout)


# ------------------------------------------------------------ the loops


@dataclass
class Tally:
    """What one run did, to compare with the kernel's counters."""

    rekeys: int = 0  # KeyUpdates sent (= TX and RX re-keys each)
    requested: int = 0
    data_bytes: int = 0


def payload(rng: random.Random, limit: int = 4096) -> bytes:
    return rng.randbytes(rng.randrange(1, limit))


def exchange(sender: KtlsPeer, receiver: KtlsPeer, rng: random.Random,
             tally: Tally, request: bool = False) -> None:
    """Data, KeyUpdate, data from ``sender``; ``receiver`` reads it all."""
    before, after = payload(rng), payload(rng)
    sender.sendall(before)
    sender.send_key_update(request)
    sender.sendall(after)
    assert receiver.recv_exact(len(before) + len(after)) == before + after
    tally.rekeys += 1
    tally.data_bytes += len(before) + len(after)
    if request:
        # The receiver answered with its own KeyUpdate before replying.
        tally.requested += 1
        tally.rekeys += 1
        reply = payload(rng)
        receiver.sendall(reply)
        assert sender.recv_exact(len(reply)) == reply
        tally.data_bytes += len(reply)


def both_at_once(c: KtlsPeer, s: KtlsPeer, rng: random.Random,
                 tally: Tally) -> None:
    """Both sides re-key before either reads: the KeyUpdates cross."""
    cdata, sdata = payload(rng), payload(rng)
    c.send_key_update(False)
    s.send_key_update(False)
    c.sendall(cdata)
    s.sendall(sdata)
    assert s.recv_exact(len(cdata)) == cdata
    assert c.recv_exact(len(sdata)) == sdata
    tally.rekeys += 2
    tally.data_bytes += len(cdata) + len(sdata)


def check_generations(c: KtlsPeer, s: KtlsPeer) -> None:
    assert c.tx_generation == s.rx_generation
    assert s.tx_generation == c.rx_generation


def check_counters(d: dict[str, int], rekeys: int) -> None:
    assert d["TlsTxRekeyOk"] == rekeys, d
    assert d["TlsRxRekeyOk"] == rekeys, d
    assert d["TlsRxRekeyReceived"] == rekeys, d
    assert d["TlsTxRekeyError"] == d["TlsRxRekeyError"] == 0, d
    assert d["TlsDecryptError"] == 0, d


def timed_phase(name: str, c: KtlsPeer, s: KtlsPeer,
                step: Callable[[int, Tally], None], n: int) -> Tally:
    tally = Tally()
    before = tls_stat()
    start = time.monotonic()
    for i in range(n):
        step(i, tally)
    elapsed = time.monotonic() - start
    d = deltas(before, tls_stat())
    print("%-22s %5d steps, %5d re-keys (%d requested), %8d bytes, "
          "%.2f s (%.2f ms/re-key); tls_stat %s"
          % (name, n, tally.rekeys, tally.requested, tally.data_bytes,
             elapsed, 1000 * elapsed / max(tally.rekeys, 1), d))
    check_generations(c, s)
    check_counters(d, tally.rekeys)
    return tally


# ---------------------------------------------------------------- tests


def test_rekey_support_probe_matches_kernel(
    kernel_version: tuple[int, ...],
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """The counter probe agrees with the kernel version, and on old
    kernels a second TLS_TX really is refused (EBUSY)."""
    supported = rekey.rekey_supported()
    assert supported == (kernel_version[:2] >= REKEY_SINCE)
    print("kernel %s: kTLS re-key %s"
          % (".".join(map(str, kernel_version)),
             "supported" if supported else "not supported"))
    if supported:
        return
    sock, _ = tcp_pair
    keys = ktls.TrafficKeys("TLS_AES_128_GCM_SHA256", os.urandom(32), 0)
    ktls.install(sock, keys, keys)
    with pytest.raises(OSError) as exc:
        sock.setsockopt(ktls.SOL_TLS, ktls.TLS_TX, keys.crypto_info())
    assert exc.value.errno == errno.EBUSY


def test_rekey_upcall_detection(tlshd: Any, pki: Any) -> None:
    """No kernel we test has the proposed re-key upcall: the policy probe
    must say so (DONE is STATUS, SOCKFD, REMOTE_AUTH), and tlshd must log
    it at start-up together with what kTLS can do."""
    fam = netlink_family.probe_family()
    types = fam.done_attr_types
    print("DONE policy attribute types: %s" % types)
    assert {uapi.HANDSHAKE_A_DONE_STATUS, uapi.HANDSHAKE_A_DONE_SOCKFD,
            uapi.HANDSHAKE_A_DONE_REMOTE_AUTH} <= set(types)
    assert (types[uapi.HANDSHAKE_A_DONE_STATUS]
            == netlink_family.NL_ATTR_TYPE_U32)
    assert not fam.rekey_upcall
    tlshd.start(pki.config())
    line = tlshd.wait_for(r"Kernel re-key upcall: [^\n]*", 30)
    print(line)
    ktls_part = ("kTLS can re-key" if rekey.rekey_supported()
                 else "kTLS cannot re-key")
    assert line.startswith("Kernel re-key upcall: not supported (DONE "
                           "policy has no SESSION_ID; %s" % ktls_part)


@pytest.mark.not_applicable
def test_rekey_1000_each_way_then_mixed(
    kernel_version: tuple[int, ...],
    engine_settings: tuple[RoleConfig, RoleConfig],
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    require_rekey(kernel_version)
    c, s = engine_pair(make_engine(engine_settings), *tcp_pair)
    print("cipher %s, %d re-keys per phase" % (c.cipher, N_REKEYS))
    rng = random.Random(7)

    timed_phase("client->server", c, s,
                lambda i, t: exchange(c, s, rng, t), N_REKEYS)
    assert (c.tx_generation, s.tx_generation) == (N_REKEYS, 0)
    timed_phase("server->client", c, s,
                lambda i, t: exchange(s, c, rng, t), N_REKEYS)
    assert (c.tx_generation, s.tx_generation) == (N_REKEYS, N_REKEYS)

    def mixed(i: int, t: Tally) -> None:
        kind = rng.randrange(5)
        if kind == 0:
            exchange(c, s, rng, t)
        elif kind == 1:
            exchange(s, c, rng, t)
        elif kind == 2:
            exchange(c, s, rng, t, request=True)
        elif kind == 3:
            exchange(s, c, rng, t, request=True)
        else:
            both_at_once(c, s, rng, t)

    tally = timed_phase("interleaved", c, s, mixed, N_REKEYS)
    assert tally.requested > 0
    assert c.tx_generation + s.tx_generation == 2 * N_REKEYS + tally.rekeys


@pytest.mark.not_applicable
@pytest.mark.parametrize("suite", SUITES)
def test_rekey_every_suite(
    suite: str,
    kernel_version: tuple[int, ...],
    engine_settings: tuple[RoleConfig, RoleConfig],
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Fewer rounds, but each suite (SHA-256 and SHA-384 secrets)."""
    require_rekey(kernel_version)
    c, s = engine_pair(make_engine(engine_settings, suite), *tcp_pair)
    assert c.cipher == suite
    rng = random.Random(suite)
    timed_phase(suite, c, s,
                lambda i, t: exchange(*((c, s) if i % 2 else (s, c)), rng,
                                      t, request=i % 3 == 0), 50)


# ------------------------------------- the worker's re-key upcall service


def kernel_request(msg_type: int, **kw: Any) -> protocol.HandshakeRequest:
    return protocol.HandshakeRequest(
        msg_type=msg_type, auth_mode=uapi.AuthMode.UNAUTH,
        timeout_ms=60000, peername="127.0.0.1", **kw)


def consumer_read(sock: socket.socket, n: int) -> tuple[int, bytes]:
    """Read like a kernel consumer: (record type, data) of one read."""
    data, anc, _, _ = sock.recvmsg(n, socket.CMSG_SPACE(1))
    return ktlspeer.record_type(anc), data


@pytest.mark.not_applicable
def test_worker_services_key_update_requests(
    kernel_version: tuple[int, ...],
    engine_settings: tuple[RoleConfig, RoleConfig],
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """What the worker does for the proposed re-key upcall, on real kTLS.

    No kernel has the upcall yet, so the test plays the kernel consumer:
    it owns the client socket and hands the worker's ``serve.handle`` a
    dup of it, as the supervisor passes ACCEPT's fd: first a ClientHello
    with keep_secrets (the answer names a session id), then key update
    requests for that session.  The server end is our KtlsPeer.
    """
    require_rekey(kernel_version)
    engine = make_engine(engine_settings)
    csock, ssock = tcp_pair
    deadline = time.monotonic() + 60
    server = in_thread(lambda: engine.server_handshake(
        ssock, deadline=deadline))
    table = RekeyTable()
    answer = serve.handle(engine, serve.Job(
        1, kernel_request(uapi.MsgType.CLIENTHELLO, keep_secrets=True),
        os.dup(csock.fileno())), table)
    peer = install(ssock, server())
    assert answer.status == 0, answer.reason
    sid = answer.session_id
    assert sid != 0 and sid in table and len(table) == 1
    bound_reads(csock)

    def upcall(kind: int) -> None:
        ans = serve.handle(engine, serve.Job(
            2, kernel_request(uapi.MsgType.CLIENTKEYUPDATE,
                              key_update=kind, session_id=sid),
            os.dup(csock.fileno())), table)
        assert (ans.status, ans.session_id) == (0, sid), ans.reason

    rng = random.Random(11)
    before = tls_stat()
    start = time.monotonic()
    rounds = 50
    for i in range(rounds):
        # The consumer initiates: SEND.
        upcall(uapi.KeyUpdateType.SEND)
        data = payload(rng)
        csock.sendall(data)
        assert peer.recv_exact(len(data)) == data
        # The peer re-keys, asking for an update every other round.
        request = i % 2 == 0
        peer.send_key_update(request)
        data = payload(rng)
        peer.sendall(data)
        kind, body = consumer_read(csock, 64)
        assert (kind, body) == (rekey.CT_HANDSHAKE,
                                rekey.key_update_message(request))
        with pytest.raises(OSError) as exc:
            csock.recv(64)
        assert exc.value.errno == errno.EKEYEXPIRED
        upcall(uapi.KeyUpdateType.RECEIVED_REQUEST_UPDATE if request
               else uapi.KeyUpdateType.RECEIVED)
        got = b""
        while len(got) < len(data):
            kind, chunk = consumer_read(csock, len(data) - len(got))
            assert kind == ktlspeer.CT_APPLICATION_DATA
            got += chunk
        assert got == data
        # Our answer (if asked) reaches the peer before this data.
        data = payload(rng)
        csock.sendall(data)
        assert peer.recv_exact(len(data)) == data
    d = deltas(before, tls_stat())
    answered = (rounds + 1) // 2
    print("worker upcall service: %d rounds, %.2f s; tls_stat %s"
          % (rounds, time.monotonic() - start, d))
    with table.use(sid) as slot:
        assert slot.secrets.tx_generation == rounds + answered
        assert slot.secrets.rx_generation == rounds
    assert peer.rx_generation == rounds + answered
    assert peer.tx_generation == rounds
    check_counters(d, 2 * rounds + answered)
    # A session the worker does not know: ENOKEY, nothing sent.
    ans = serve.handle(engine, serve.Job(
        3, kernel_request(uapi.MsgType.CLIENTKEYUPDATE,
                          key_update=uapi.KeyUpdateType.SEND,
                          session_id=sid ^ 1), os.dup(csock.fileno())), table)
    assert ans.status == errno.ENOKEY


# ------------------------------------------------- OpenSSL in user space


def _elf_symbol(path: str, name: str) -> tuple[int, int]:
    """(st_value, vaddr of the PT_LOAD at file offset 0) from .symtab."""
    with open(path, "rb") as f:
        elf = f.read()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2, "not ELF64"
    e_phoff, e_shoff = struct.unpack_from("<QQ", elf, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from(
        "<HHHH", elf, 0x36)
    load0 = None
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr = struct.unpack_from(
            "<IIQQ", elf, e_phoff + i * e_phentsize)
        if p_type == 1 and p_offset == 0:  # PT_LOAD
            load0 = p_vaddr
    assert load0 is not None
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", elf, e_shoff + i * e_shentsize)
        for i in range(e_shnum)
    ]
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        offset, size, link, entsize = sh[4], sh[5], sh[6], sh[9]
        strtab = sections[link][4]
        want = name.encode() + b"\0"
        for pos in range(offset, offset + size, entsize):
            st_name, st_info, _, st_shndx, st_value = struct.unpack_from(
                "<IBBHQ", elf, pos)
            if (st_info & 0xF) == 2 and st_shndx and elf[
                    strtab + st_name : strtab + st_name + len(want)] == want:
                return st_value, load0
    raise LookupError("%s not in the symbol table of %s" % (name, path))


def _load_base(path: str) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(
                    fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise LookupError("%s is not mapped" % real)


def openssl_key_update() -> Callable[[SSL.Connection, bool], None]:
    """SSL_key_update(ssl, updatetype) from the cryptography wheel.

    OpenSSL is linked statically with hidden symbols, but the wheel keeps
    its .symtab: symbol value + load base is the function.
    """
    from cryptography.hazmat.bindings import _rust
    from OpenSSL._util import ffi

    path = _rust.__file__
    value, load0 = _elf_symbol(path, "SSL_key_update")
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    fn = proto(_load_base(path) + value - load0)

    def key_update(conn: SSL.Connection, request: bool) -> None:
        ssl = int(ffi.cast("uintptr_t", conn._ssl))
        assert fn(ssl, 1 if request else 0) == 1, "SSL_key_update failed"

    return key_update


def peer_recv_exact(conn: SSL.Connection, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        buf += conn.recv(n - len(buf))
    return buf


def openssl_context(pki: Any, server: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server
                      else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if server:
        ctx.use_certificate_file(pki.path("server.pem"))
        ctx.use_privatekey_file(pki.path("server.key"))
    else:
        ctx.load_verify_locations(pki.path("ca.pem"))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    return ctx


@pytest.mark.not_applicable
@pytest.mark.parametrize("role", ["client", "server"])
def test_rekey_interop_with_openssl(
    role: str,
    kernel_version: tuple[int, ...],
    pki: Any,
    engine_settings: tuple[RoleConfig, RoleConfig],
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Our kTLS endpoint (``role``) against OpenSSL in user space."""
    require_rekey(kernel_version)
    key_update = openssl_key_update()
    engine = make_engine(engine_settings)
    csock, ssock = tcp_pair
    ours_sock, peer_sock = (csock, ssock) if role == "client" else (
        ssock, csock)
    bound_reads(peer_sock)  # pyOpenSSL wants a blocking socket too
    peer = SSL.Connection(openssl_context(pki, server=role == "client"),
                          peer_sock)
    if role == "client":
        peer.set_accept_state()
    else:
        peer.set_connect_state()
        peer.set_tlsext_host_name(b"localhost")
    peer_done = in_thread(peer.do_handshake)
    deadline = time.monotonic() + 60
    if role == "client":
        out = engine.client_handshake(ours_sock, peername="127.0.0.1",
                                      deadline=deadline)
    else:
        out = engine.server_handshake(ours_sock, deadline=deadline)
    peer_done()
    ours = install(ours_sock, out)
    print("our %s vs OpenSSL %s, cipher %s"
          % (role, SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
             ours.cipher))
    rng = random.Random(role)

    # ours -> OpenSSL: our KeyUpdate, then data OpenSSL must decrypt.
    before = tls_stat()
    start = time.monotonic()
    answers = 0
    for i in range(N_INTEROP):
        request = i % 2 == 1
        data = payload(rng)
        ours.send_key_update(request)
        ours.sendall(data)
        assert peer_recv_exact(peer, len(data)) == data
        reply = payload(rng)
        # OpenSSL answers update_requested with its next write.
        peer.sendall(reply)
        assert ours.recv_exact(len(reply)) == reply
        answers += request
    d = deltas(before, tls_stat())
    print("ours->OpenSSL: %d KeyUpdates (%d requested), %.2f s; tls_stat %s"
          % (N_INTEROP, answers, time.monotonic() - start, d))
    assert ours.tx_generation == N_INTEROP
    assert ours.rx_generation == answers
    assert d["TlsTxRekeyOk"] == N_INTEROP, d
    assert d["TlsRxRekeyOk"] == d["TlsRxRekeyReceived"] == answers, d

    # OpenSSL -> ours: SSL_key_update, then data through kTLS.
    before = tls_stat()
    start = time.monotonic()
    gen_tx, gen_rx = ours.tx_generation, ours.rx_generation
    requested = 0
    for i in range(N_INTEROP):
        request = i % 2 == 0
        key_update(peer, request)
        data = payload(rng)
        peer.sendall(data)  # the KeyUpdate goes out first
        assert ours.recv_exact(len(data)) == data
        reply = payload(rng)
        ours.sendall(reply)  # after our answering KeyUpdate, if asked
        assert peer_recv_exact(peer, len(reply)) == reply
        requested += request
    d = deltas(before, tls_stat())
    print("OpenSSL->ours: %d SSL_key_update (%d requested), %.2f s; "
          "tls_stat %s" % (N_INTEROP, requested, time.monotonic() - start, d))
    assert ours.rx_generation - gen_rx == N_INTEROP
    assert ours.tx_generation - gen_tx == requested
    assert d["TlsRxRekeyOk"] == d["TlsRxRekeyReceived"] == N_INTEROP, d
    assert d["TlsTxRekeyOk"] == requested, d
    assert d["TlsDecryptError"] == 0, d


def test_symtab_hack_finds_ssl_key_update() -> None:
    """The test-only OpenSSL hook resolves (runs on every kernel)."""
    value, _ = _elf_symbol(
        __import__("cryptography.hazmat.bindings._rust",
                   fromlist=["_rust"]).__file__, "SSL_key_update")
    assert value > 0
    assert re.match(r"OpenSSL \d", SSL.OpenSSL_version(
        SSL.OPENSSL_VERSION).decode())
