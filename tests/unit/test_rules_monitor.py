"""The monitor's rules (supervisor/monitor.py) row by row, with fakes for
the worker, its channel and the pool, and the real request table.

test_worker_hostile.py sends a real worker's messages; here each row of
MON_TABLE and each answer is stated on its own: when a message is
permitted, what a refusal does (the worker is killed, nothing answered),
and what a permitted message changes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from tlshd.shared import protocol, uapi
from tlshd.shared.errors import PeerGone, ProtocolError
from tlshd.supervisor import monitor, netlink_codec, requests
from tlshd.supervisor.monitor import MON_TABLE, Monitor
from tlshd.supervisor.requests import Requests

MT, AM = uapi.MsgType, uapi.AuthMode
X509_ID = uapi.TLS_X509_PEERID


class Channel:
    def __init__(self, inbox: list[Any] | None = None,
                 error: Exception | None = None) -> None:
        self.inbox = inbox or []
        self.sent: list[tuple[Any, int]] = []
        self.error = error
        self.reads = 0

    def recv_answer(self) -> tuple[Any, int]:
        self.reads += 1
        item = self.inbox.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def send(self, msg: Any, req_id: int, fds: tuple[int, ...] = (),
             wait: bool = True) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((msg, req_id))


class Worker:
    def __init__(self, pid: int = 100, ready: bool = True) -> None:
        self.pid = pid
        self.label = "a"
        self.ready = ready
        self.returncode: int | None = None
        self.last_busy = 0.0
        self.sessions = 0
        self.channel = Channel()
        self.killed = 0
        self.logged: list[tuple[int, str]] = []
        self.logs = SimpleNamespace(
            emit=lambda level, text: self.logged.append((level, text)))

    def kill(self) -> None:
        self.killed += 1


class Pool:
    worker_ids = (65534, 65534)

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def kill(self, worker: Worker) -> None:
        self.events.append(("kill", worker))

    def unwatch_channel(self, worker: Worker) -> None:
        self.events.append(("unwatch", worker))

    def ready(self, ns: Any, worker: Worker) -> None:
        self.events.append(("ready", worker))

    def close_if_idle(self, worker: Worker) -> None:
        self.events.append(("idle", worker))


class Recorder:
    def __init__(self) -> None:
        self.dones: list[tuple[int, int, tuple[int, ...], int]] = []

    def __call__(self, nlsock: Any, sockfd: int, status: int,
                 remote_auth: tuple[int, ...], session_id: int) -> None:
        self.dones.append((sockfd, status, remote_auth, session_id))
        os.close(sockfd)


def namespace() -> Any:
    cfg = SimpleNamespace(keyrings=("ring",), handshake_timeout=30.0,
                          client_handshake_timeout=30.0)
    return SimpleNamespace(label="a", nlsock="nl", initial=False, cfg=cfg,
                           succeeded=0, failed=0, last_failure="",
                           held=False, worker=None)


class Env:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(requests.keymaterial, "x509_from_keys",
                            lambda certs, scope: (b"", b""))
        monkeypatch.setattr(requests.keymaterial, "client_psks",
                            lambda peerids, scope: ([], []))
        self.done = Recorder()
        self.reqs = Requests(keep_secrets=False, done=self.done)
        self.pool = Pool()
        self.mon = Monitor(self.reqs, self.pool)  # type: ignore[arg-type]
        self.ns = namespace()
        self.worker = Worker()

    def request(self, msg_type: int = MT.SERVERHELLO, auth: int = AM.PSK,
                timeout: float = 30.0, keyring: int | None = None
                ) -> requests.Request:
        acc = netlink_codec.AcceptedRequest(
            sockfd=socket.socket().detach(), msg_type=msg_type,
            auth_mode=auth, timeout_ms=None, peerids=(), certs=(),
            peername="host", keyring=keyring)
        req = self.reqs.submit(self.ns, acc, timeout)
        self.reqs.dispatch(req, self.worker)  # type: ignore[arg-type]
        return req

    def deliver(self, msg: Any, req_id: int = 0) -> None:
        self.worker.channel.inbox.append((msg, req_id))
        self.mon.on_channel(self.ns, self.worker)  # type: ignore[arg-type]

    @property
    def found(self) -> list[tuple[Any, int]]:
        """The PskFound answers sent to the worker."""
        return [(m, i) for m, i in self.worker.channel.sent
                if isinstance(m, protocol.PskFound)]

    def close(self) -> None:
        self.reqs.fail_all(errno.EIO)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Any:
    e = Env(monkeypatch)
    yield e
    e.close()


def answer(status: int = 0, remote_auth: tuple[int, ...] = (),
           session_id: int = 0, reason: str = "") -> protocol.HandshakeAnswer:
    return protocol.HandshakeAnswer(status=status, remote_auth=remote_auth,
                                    reason=reason, session_id=session_id)


HELLO = protocol.Hello(pid=100, uid=65534, gid=65534, cap_eff=0,
                       no_new_privs=1, seccomp=2)


def test_the_table_is_fixed() -> None:
    """Its rows cannot be changed at run time."""
    import dataclasses
    rule = MON_TABLE[protocol.Hello]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(rule, "permitted", Monitor._always)


def test_the_table_rows() -> None:
    assert {t: (r.permitted, r.answer) for t, r in MON_TABLE.items()} == {
        protocol.LogRecord: (Monitor._always, Monitor.answer_log),
        protocol.Hello: (Monitor._before_ready, Monitor.answer_hello),
        protocol.HandshakeAnswer: (Monitor._holds_or_late,
                                   Monitor.answer_handshake),
        protocol.PskLookup: (Monitor._may_look_up, Monitor.answer_lookup),
    }


# ---- reading ----------------------------------------------------------

def test_a_reaped_worker_is_not_read(env: Env) -> None:
    env.worker.returncode = 0
    env.mon.on_channel(env.ns, env.worker)  # type: ignore[arg-type]
    assert env.worker.channel.reads == 0 and env.pool.events == []


def test_a_closed_channel_is_unwatched_not_killed(env: Env) -> None:
    env.worker.channel.inbox.append(PeerGone("eof"))
    env.mon.on_channel(env.ns, env.worker)  # type: ignore[arg-type]
    assert env.pool.events == [("unwatch", env.worker)]


@pytest.mark.parametrize("error", [ProtocolError("bad"),
                                   ConnectionResetError()])
def test_a_broken_message_kills(env: Env, error: Exception) -> None:
    env.worker.channel.inbox.append(error)
    env.mon.on_channel(env.ns, env.worker)  # type: ignore[arg-type]
    assert env.pool.events == [("kill", env.worker)]


def test_a_message_type_not_in_the_table_kills(env: Env) -> None:
    req = env.request()
    env.deliver(protocol.PskFound(psk=None), req.req_id)
    assert env.pool.events == [("kill", env.worker)]
    assert env.done.dones == []  # its exit (on_exit) fails the request


# ---- LogRecord, Hello ---------------------------------------------------

def test_log_records_at_any_time(env: Env) -> None:
    env.deliver(protocol.LogRecord(level=logging.WARNING, text="x"))
    env.worker.ready = False
    env.deliver(protocol.LogRecord(level=logging.INFO, text="y"))
    assert env.worker.logged == [(logging.WARNING, "x"), (logging.INFO, "y")]
    assert env.pool.events == []


def test_hello_once_before_ready(env: Env,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(monitor.workercheck, "verify_hello",
                        lambda pid, hello, ids: seen.append(
                            (pid, hello, ids)) or [])
    env.worker.ready = False
    env.deliver(HELLO)
    assert env.pool.events == [("ready", env.worker)]
    assert seen == [(100, HELLO, (65534, 65534))]
    env.worker.ready = True
    env.deliver(HELLO)
    assert env.pool.events[-1] == ("kill", env.worker) and len(seen) == 1


def test_a_hello_that_does_not_check_out_kills(
        env: Env, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(monitor.workercheck, "verify_hello",
                        lambda pid, hello, ids: ["uid 0", "no seccomp"])
    env.worker.ready = False
    with caplog.at_level(logging.ERROR):
        env.deliver(HELLO)
    assert env.pool.events == [("kill", env.worker)]
    assert "uid 0; no seccomp" in caplog.text


# ---- HandshakeAnswer ----------------------------------------------------

@pytest.fixture
def ktls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """ktls_attached, faked: the fds listed have kTLS."""
    attached: list[int] = []
    monkeypatch.setattr(monitor, "ktls_attached",
                        lambda fd: fd in attached)
    return attached


def test_the_completion_line_is_the_supervisors(
        env: Env, ktls: list[int], caplog: pytest.LogCaptureFixture) -> None:
    """ktls-utils' "Handshake with ..." line, from the answer and the
    socket (the worker sends no log record for it), tagged with the
    namespace; a peer name is sanitised like a worker's log text."""
    ok = env.request(auth=AM.X509)
    ktls.append(ok.sockfd)
    reused = env.request(auth=AM.X509)
    ktls.append(reused.sockfd)
    bad = env.request(auth=AM.X509)
    bad.request = bad.request.replace(peername="x\ny")
    for req in (ok, reused, bad):
        req.request = req.request.replace(peer_address="192.0.2.7")
    with caplog.at_level(logging.INFO, logger="tlshd.supervisor.monitor"):
        env.deliver(answer(0), ok.req_id)
        env.deliver(protocol.HandshakeAnswer(status=0, remote_auth=(),
                                             resumed=True), reused.req_id)
        env.deliver(answer(errno.EACCES, reason="bad cert"), bad.req_id)
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("Handshake with")]
    label = env.ns.label
    assert lines == [
        "Handshake with 'host' (192.0.2.7) succeeded [netns %s]" % label,
        "Handshake with 'host' (192.0.2.7) succeeded (session reuse)"
        " [netns %s]" % label,
        "Handshake with 'x\\x0ay' (192.0.2.7) failed: EACCES [netns %s]"
        % label,
    ]


def test_a_rekey_answer_gets_no_completion_line(
        env: Env, ktls: list[int], caplog: pytest.LogCaptureFixture) -> None:
    """A re-key has the worker's own line; the handshake completion line
    is for handshakes only, as before it moved to the supervisor."""
    req = env.request(msg_type=uapi.KEY_UPDATE_MSGS[0], auth=AM.X509)
    ktls.append(req.sockfd)
    with caplog.at_level(logging.INFO, logger="tlshd.supervisor.monitor"):
        env.deliver(answer(0), req.req_id)
    assert env.done.dones[-1][:2] == (req.sockfd, 0)
    assert "Handshake with" not in caplog.text


def test_a_success_without_ktls_is_logged_as_failed(
        env: Env, ktls: list[int], caplog: pytest.LogCaptureFixture) -> None:
    req = env.request(auth=AM.X509)  # no address read: "unknown"
    with caplog.at_level(logging.INFO, logger="tlshd.supervisor.monitor"):
        env.deliver(answer(0), req.req_id)
    assert env.done.dones == [(req.sockfd, errno.EIO, (), 0)]
    assert "Handshake with 'host' (unknown) failed: EIO" in caplog.text


def test_success_with_ktls_is_passed_on(env: Env, ktls: list[int]) -> None:
    req = env.request(auth=AM.X509)
    ktls.append(req.sockfd)
    env.deliver(answer(0, (X509_ID,), session_id=9), req.req_id)
    assert env.done.dones == [(req.sockfd, 0, (X509_ID,), 9)]
    assert env.pool.events == [("idle", env.worker)]
    assert env.worker.killed == 0 and env.ns.succeeded == 1
    # It keeps that session's re-key secrets: it must not idle out.
    assert env.worker.sessions == 1


def test_success_without_ktls_is_eio(env: Env, ktls: list[int]) -> None:
    req = env.request(auth=AM.X509)
    env.deliver(answer(0, (X509_ID,)), req.req_id)
    assert env.done.dones == [(req.sockfd, errno.EIO, (), 0)]
    assert env.ns.last_failure == "EIO: no kTLS on the socket"
    assert env.pool.events == [("idle", env.worker)]


def test_failure_carries_no_peer_ids(env: Env, ktls: list[int]) -> None:
    req = env.request(auth=AM.X509)
    ktls.append(req.sockfd)  # whatever the socket says
    env.deliver(answer(errno.EACCES, (X509_ID,), reason="bad cert"),
                req.req_id)
    assert env.done.dones == [(req.sockfd, errno.EACCES, (), 0)]
    assert env.ns.last_failure == "EACCES: bad cert"


def test_an_answer_naming_a_key_it_was_not_given(env: Env,
                                                 ktls: list[int]) -> None:
    req = env.request()
    req.handed.add(0x51)
    ktls.append(req.sockfd)
    env.deliver(answer(0, (0x52,)), req.req_id)
    assert env.worker.killed == 1
    assert env.done.dones == [(req.sockfd, errno.EIO, (), 0)]
    assert env.ns.last_failure == "EIO: worker's answer refused"
    assert ("idle", env.worker) not in env.pool.events


def test_an_answer_for_a_request_it_does_not_hold_kills(
        env: Env, ktls: list[int]) -> None:
    other = Worker(200)
    env.request()
    theirs = env.request()
    theirs.worker = other  # type: ignore[assignment]
    env.deliver(answer(errno.EIO), theirs.req_id)
    env.deliver(answer(errno.EIO), 999)
    assert env.pool.events == [("kill", env.worker)] * 2
    assert env.done.dones == []


def test_a_late_answer_is_ignored_once(env: Env, ktls: list[int]) -> None:
    req = env.request(timeout=0.0)
    env.reqs.expire(req.wakeup())
    assert env.reqs.is_late(env.worker, req.req_id)  # type: ignore
    env.deliver(answer(0, ()), req.req_id)
    assert env.pool.events == [] and len(env.done.dones) == 1
    assert not env.reqs.is_late(env.worker, req.req_id)  # type: ignore
    env.deliver(answer(0, ()), req.req_id)  # a second one: not permitted
    assert env.pool.events == [("kill", env.worker)]


@pytest.mark.parametrize("auth,ids,bad", [
    (AM.X509, (X509_ID,), False),
    (AM.X509, (uapi.TLS_NO_PEERID,), False),
    (AM.PSK, (X509_ID,), True),  # not asked to verify a certificate
    (AM.UNAUTH, (X509_ID,), True),
    (AM.PSK, (0x51,), False),
    (AM.PSK, (0x51, 0x53), True),
    (AM.PSK, (), False),
    (AM.UNSPEC, (X509_ID,), True),
    (4, (X509_ID,), True),  # a mode this agent does not know
])
def test_bad_answer(env: Env, auth: int, ids: tuple[int, ...],
                    bad: bool) -> None:
    req = env.request(auth=auth)
    req.handed.update({0x51, 0x52})
    why = monitor.bad_answer(req, answer(0, ids))
    assert (why is not None) == bad
    if bad:
        assert why == "peer identity %08x it was not given" % ids[-1]


# ---- PskLookup ----------------------------------------------------------

@pytest.fixture
def psks(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    table = {b"known": protocol.PskMaterial(serial=0x77, identity=b"known",
                                            secret=b"s" * 32)}

    def find_psk(identity: bytes, request_keyring: int, initial: bool,
                 named: tuple[str, ...]) -> Any:
        calls.append((identity, request_keyring, initial, named))
        return table.get(identity)
    monkeypatch.setattr(monitor.keymaterial, "find_psk", find_psk)
    return calls


def test_lookup_answers_in_the_namespace_s_scope(
        env: Env, psks: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    req = env.request(keyring=0x2A)
    with caplog.at_level(logging.DEBUG, logger="tlshd.supervisor.monitor"):
        env.deliver(protocol.PskLookup(identity=b"known"), req.req_id)
        env.deliver(protocol.PskLookup(identity=b"other"), req.req_id)
    assert [r.getMessage() for r in caplog.records
            if r.name == "tlshd.supervisor.monitor"] == [
        "PSK lookup for request %d in netns a: key 00000077" % req.req_id,
        "PSK lookup for request %d in netns a: not found" % req.req_id]
    assert psks == [(b"known", 0x2A, False, ("ring",)),
                    (b"other", 0x2A, False, ("ring",))]
    assert [(m.psk.serial if m.psk else None, i) for m, i in env.found] == [
        (0x77, req.req_id), (None, req.req_id)]
    assert req.handed == {0x77} and req.lookups == 2
    no_ring = env.request()
    env.deliver(protocol.PskLookup(identity=b"x"), no_ring.req_id)
    assert psks[-1][1] == 0
    assert env.pool.events == []


def test_lookups_are_bounded(env: Env, psks: list[Any]) -> None:
    req = env.request()
    for _ in range(protocol.MAX_LOOKUPS):
        env.deliver(protocol.PskLookup(identity=b"x"), req.req_id)
    assert env.pool.events == [] and protocol.MAX_LOOKUPS == 8
    env.deliver(protocol.PskLookup(identity=b"x"), req.req_id)
    assert env.pool.events == [("kill", env.worker)]
    assert len(psks) == protocol.MAX_LOOKUPS


@pytest.mark.parametrize("msg_type,auth", [
    (MT.CLIENTHELLO, AM.PSK),  # a client was handed its PSKs
    (MT.SERVERHELLO, AM.X509),
    (MT.SERVERHELLO, AM.UNAUTH),
    (MT.SERVERKEYUPDATE, AM.PSK),  # re-keying needs no PSK
    (MT.CLIENTKEYUPDATE, AM.PSK),
])
def test_only_a_psk_server_looks_up(env: Env, psks: list[Any],
                                    msg_type: int, auth: int) -> None:
    req = env.request(msg_type, auth)
    env.deliver(protocol.PskLookup(identity=b"known"), req.req_id)
    assert env.pool.events == [("kill", env.worker)] and psks == []
    assert req.lookups == 0


def test_lookup_for_a_request_not_held(env: Env, psks: list[Any]) -> None:
    late = env.request(timeout=0.0)
    env.reqs.expire(late.wakeup())
    env.deliver(protocol.PskLookup(identity=b"known"), late.req_id)
    assert env.pool.events == [] and psks == []  # late: ignored
    assert env.found == []
    env.deliver(protocol.PskLookup(identity=b"known"), 999)
    assert env.pool.events == [("kill", env.worker)] and psks == []


@pytest.mark.parametrize("error", [PeerGone("gone"), BrokenPipeError()])
def test_lookup_answer_to_a_gone_worker_is_logged(
        env: Env, psks: list[Any], caplog: pytest.LogCaptureFixture,
        error: Exception) -> None:
    req = env.request()
    env.worker.channel.error = error
    with caplog.at_level(logging.ERROR):
        env.deliver(protocol.PskLookup(identity=b"known"), req.req_id)
    assert "Cannot answer worker 100's PSK lookup" in caplog.text
    assert env.pool.events == [] and env.done.dones == []


def test_a_worker_that_does_not_read_its_answers_is_killed(
        env: Env, psks: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    """The answer is never waited for: a worker whose channel is full
    (it asks and does not read) is killed; its exit answers the request."""
    req = env.request()
    env.worker.channel.error = BlockingIOError()
    with caplog.at_level(logging.ERROR):
        env.deliver(protocol.PskLookup(identity=b"known"), req.req_id)
    assert "does not read the answers to its PSK lookups" in caplog.text
    assert env.pool.events == [("kill", env.worker)]
    assert env.done.dones == []


# ---- ktls_attached ------------------------------------------------------

def test_ktls_attached_reads_the_ulp(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = socket.socketpair()  # not TCP: the option is refused
    try:
        assert not monitor.ktls_attached(pair[0].fileno())
        os.fstat(pair[0].fileno())  # detached, not closed
    finally:
        for s in pair:
            s.close()
    tcp = socket.socket()
    try:
        assert not monitor.ktls_attached(tcp.fileno())  # no ULP
        os.fstat(tcp.fileno())
    finally:
        tcp.close()

    class FakeSocket:
        ulp = b""

        def __init__(self, fileno: int) -> None:
            pass

        def getsockopt(self, level: int, name: int, size: int) -> bytes:
            assert (level, name, size) == (socket.IPPROTO_TCP, 31, 16)
            return self.ulp

        def detach(self) -> int:
            return 0

    monkeypatch.setattr(monitor.socket, "socket", FakeSocket)
    for ulp, attached in ((b"tls\0", True), (b"tls", True),
                          (b"tls\0\0\0\0", True), (b"tl", False),
                          (b"tlsx", False), (b"mptcp\0", False)):
        FakeSocket.ulp = ulp
        assert monitor.ktls_attached(3) == attached, ulp
