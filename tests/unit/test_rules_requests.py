"""The request table's rules one by one (supervisor/requests.py), with
fakes for the namespace, the worker, the kernel keys and DONE.

test_requests.py follows requests through their life; here each rule is
stated on its own: how long a request may take, what a worker is handed
(and what happens when it cannot be), what each exit path sends, who
holds what, and that DONE closes the fd whatever the kernel says.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest

from tlshd.shared import protocol, uapi
from tlshd.shared.errors import PeerGone, ProtocolError
from tlshd.supervisor import netlink_codec, requests
from tlshd.supervisor.requests import Requests

MT, AM = uapi.MsgType, uapi.AuthMode


class Recorder:
    """Stands in for requests.send_done: records every DONE, closes."""

    def __init__(self) -> None:
        self.dones: list[tuple[Any, int, int, tuple[int, ...], int]] = []

    def __call__(self, nlsock: Any, sockfd: int, status: int,
                 remote_auth: tuple[int, ...], session_id: int) -> None:
        self.dones.append((nlsock, sockfd, status, remote_auth, session_id))
        os.close(sockfd)


class Channel:
    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[tuple[Any, int, tuple[int, ...]]] = []
        self.error = error

    def send(self, msg: Any, req_id: int, fds: tuple[int, ...] = (),
             wait: bool = True) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((msg, req_id, fds))

    def writable(self) -> bool:
        return not isinstance(self.error, BlockingIOError)


def namespace(label: str = "a", *, held: bool = False, worker: Any = None,
              initial: bool = True) -> Any:
    cfg = SimpleNamespace(keyrings=("ring",), handshake_timeout=30.0,
                          client_handshake_timeout=7.0)
    return SimpleNamespace(label=label, nlsock=label + "-nl",
                           initial=initial, cfg=cfg, succeeded=0, failed=0,
                           last_failure="", held=held, worker=worker)


def worker(pid: int = 1, *, ready: bool = True,
           error: Exception | None = None) -> Any:
    return SimpleNamespace(pid=pid, ready=ready, channel=Channel(error))


def accepted(msg_type: int = MT.CLIENTHELLO, auth: int = AM.X509,
             timeout_ms: int | None = None, **kw: Any
             ) -> netlink_codec.AcceptedRequest:
    fields: dict[str, Any] = dict(
        sockfd=socket.socket().detach(), msg_type=msg_type, auth_mode=auth,
        timeout_ms=timeout_ms, peerids=(), certs=(), peername="host",
        keyring=None)
    fields.update(kw)
    return netlink_codec.AcceptedRequest(**fields)


class Keys:
    """Fake keymaterial: what the supervisor reads for a request."""

    def __init__(self) -> None:
        self.x509: tuple[bytes, bytes] | OSError = (b"", b"")
        self.psks: list[protocol.PskMaterial] = []
        self.skipped: list[str] = []
        self.scopes: list[Any] = []
        self.client_calls = 0

    def x509_from_keys(self, certs: Any, scope: Any) -> tuple[bytes, bytes]:
        self.scopes.append(scope)
        if isinstance(self.x509, OSError):
            raise self.x509
        return self.x509

    def client_psks(self, peerids: Any, scope: Any) -> Any:
        self.client_calls += 1
        return list(self.psks), list(self.skipped)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> tuple[Requests, Recorder,
                                                    Keys]:
    fake = Keys()
    monkeypatch.setattr(requests.keymaterial, "x509_from_keys",
                        fake.x509_from_keys)
    monkeypatch.setattr(requests.keymaterial, "client_psks",
                        fake.client_psks)
    done = Recorder()
    return Requests(keep_secrets=False, done=done), done, fake


# ---- how long a request may take --------------------------------------

@pytest.mark.parametrize("msg_type,timeout_ms,seconds", [
    (MT.CLIENTHELLO, None, 7.0),  # the client role's default
    (MT.SERVERHELLO, None, 30.0),
    (MT.CLIENTHELLO, 0, 7.0),  # 0: no TIMEOUT of its own
    (MT.UNSPEC, None, 30.0),  # only a client hello is the client's
    (MT.CLIENTKEYUPDATE, None, 30.0),
    (MT.SERVERKEYUPDATE, None, 30.0),
    (MT.SERVERHELLO, 10000, 9.5),  # its own, less the margin
    (MT.SERVERHELLO, 2000, 1.8),  # a tenth at most
    (MT.SERVERHELLO, 5000, 4.5),  # both the same
    (MT.SERVERHELLO, 1, 0.0009),
])
def test_request_timeout(msg_type: int, timeout_ms: int | None,
                         seconds: float) -> None:
    req = accepted(msg_type, timeout_ms=timeout_ms)
    assert requests.request_timeout(namespace(), req) == pytest.approx(
        seconds)
    os.close(req.sockfd)


def test_submit_sets_the_deadline_and_ids(table: Any) -> None:
    reqs, done, _ = table
    ns = namespace()
    t0 = time.monotonic()
    first = reqs.submit(ns, accepted(MT.SERVERHELLO, timeout_ms=10000))
    second = reqs.submit(ns, accepted(), timeout=3.0)
    assert t0 + 9.5 <= first.deadline <= time.monotonic() + 9.5
    assert t0 + 3.0 <= second.deadline <= time.monotonic() + 3.0
    assert (first.req_id, second.req_id) == (1, 2)
    assert reqs.get(1) is first and reqs.get(3) is None
    assert len(reqs) == 2 and list(reqs) == [first, second]
    assert reqs.next_wakeup() == second.deadline  # the earlier one
    assert done.dones == []
    reqs.fail_all(errno.EIO)
    assert reqs.next_wakeup() is None


def test_wakeup_gives_a_dispatched_request_the_grace(table: Any) -> None:
    reqs, _, _ = table
    req = reqs.submit(namespace(), accepted(), 5.0)
    assert req.wakeup() == req.deadline
    reqs.dispatch(req, worker())
    assert req.wakeup() == req.deadline + requests.DEADLINE_GRACE
    assert requests.DEADLINE_GRACE == 1.0
    assert requests.TIMEOUT_MARGIN == 0.5
    reqs.fail_all(errno.EIO)


# ---- submit: held, ready, or pending ----------------------------------

def test_submit_in_a_held_namespace_fails_at_once(table: Any) -> None:
    reqs, done, _ = table
    w = worker()
    ns = namespace(held=True, worker=w)
    req = reqs.submit(ns, accepted(), 5.0)
    assert done.dones == [("a-nl", req.sockfd, errno.EIO, (), 0)]
    assert len(reqs) == 0 and w.channel.sent == []
    assert ns.failed == 1 and ns.last_failure == "EIO: ?"


def test_submit_dispatches_only_to_a_ready_worker(table: Any) -> None:
    reqs, done, _ = table
    starting = worker(ready=False)
    ns = namespace(worker=starting)
    pending = reqs.submit(ns, accepted(), 5.0)
    assert starting.channel.sent == [] and reqs.pending(ns) == [pending]
    ready = worker(2)
    ns.worker = ready
    req = reqs.submit(ns, accepted(), 5.0)
    assert [s[1:] for s in ready.channel.sent] == [(req.req_id,
                                                    (req.sockfd,))]
    assert req.worker is ready and reqs.pending(ns) == [pending]
    assert reqs.held_by(ready) == [req] and reqs.held_by(starting) == []
    assert done.dones == []
    reqs.fail_all(errno.EIO)


# ---- dispatch: what the worker is handed ------------------------------

def test_dispatch_message(table: Any) -> None:
    reqs, _, keys = table
    reqs.keep_secrets = True
    keys.x509 = (b"cert", b"key")
    acc = accepted(MT.SERVERHELLO, AM.X509, peername="peer",
                   key_update=0, session_id=0)
    req = reqs.submit(namespace(), acc, 100.0)
    w = worker()
    reqs.dispatch(req, w)
    (msg, req_id, fds), = w.channel.sent
    assert (req_id, fds) == (req.req_id, (acc.sockfd,))
    assert isinstance(msg, protocol.HandshakeRequest)
    assert (msg.msg_type, msg.auth_mode, msg.peername) == (
        MT.SERVERHELLO, AM.X509, "peer")
    assert (msg.x509_cert, msg.x509_key, msg.psks) == (b"cert", b"key", ())
    assert msg.keep_secrets is True
    assert 99_900 < msg.timeout_ms <= 100_000  # what is left, in ms
    assert keys.client_calls == 0  # a server reads no client PSKs
    reqs.fail_all(errno.EIO)


def test_dispatch_after_the_deadline_still_gives_a_millisecond(
        table: Any) -> None:
    reqs, _, _ = table
    req = reqs.submit(namespace(), accepted(), 0.0)
    w = worker()
    reqs.dispatch(req, w)
    assert w.channel.sent[0][0].timeout_ms == 1
    reqs.fail_all(errno.EIO)


def test_dispatch_reads_keys_in_the_namespace_s_scope(table: Any) -> None:
    reqs, _, keys = table
    ns = namespace(initial=False)
    req = reqs.submit(ns, accepted(keyring=0x2A), 5.0)
    reqs.dispatch(req, worker())
    other = reqs.submit(ns, accepted(), 5.0)  # no keyring: 0
    reqs.dispatch(other, worker(2))
    assert [(s.request_keyring, s.initial, s.named) for s in keys.scopes
            ] == [(0x2A, False, ("ring",)), (0, False, ("ring",))]
    reqs.fail_all(errno.EIO)


@pytest.mark.parametrize("msg_type,auth,read", [
    (MT.CLIENTHELLO, AM.PSK, True),
    (MT.SERVERHELLO, AM.PSK, False),  # the server looks keys up later
    (MT.CLIENTHELLO, AM.X509, False),
    (MT.CLIENTHELLO, AM.UNAUTH, False),
    (MT.UNSPEC, AM.PSK, False),
])
def test_client_psks_are_read_for_a_psk_client_only(
        table: Any, msg_type: int, auth: int, read: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    reqs, _, keys = table
    psk = protocol.PskMaterial(serial=0x51, identity=b"id", secret=b"s" * 32)
    keys.psks, keys.skipped = [psk], ["key 00000052: gone"]
    req = reqs.submit(namespace(), accepted(msg_type, auth,
                                            peerids=(0x51, 0x52)), 5.0)
    w = worker()
    with caplog.at_level(logging.ERROR):
        reqs.dispatch(req, w)
    sent = w.channel.sent[0][0]
    assert sent.psks == ((psk,) if read else ())
    assert req.handed == ({0x51} if read else set())
    assert ("Cannot use PSK key 00000052: gone [netns a]" in caplog.text
            ) == read
    reqs.fail_all(errno.EIO)


def test_unreadable_certificate_keys_fail_the_request(table: Any) -> None:
    reqs, done, keys = table
    keys.x509 = OSError(errno.EACCES, "denied")
    ns = namespace()
    req = reqs.submit(ns, accepted(), 5.0)
    w = worker()
    reqs.dispatch(req, w)
    assert w.channel.sent == [] and req.worker is None
    assert done.dones == [("a-nl", req.sockfd, errno.ENOKEY, (), 0)]
    assert ns.last_failure == "ENOKEY: certificate keys unreadable"


@pytest.mark.parametrize("error,status,reason", [
    (ValueError("message too large"), errno.EINVAL,
     "EINVAL: message too large"),
    (PeerGone("gone"), errno.EIO, "EIO: ?"),
    (BrokenPipeError(), errno.EIO, "EIO: ?"),
])
def test_a_failed_hand_over_completes_the_request(
        table: Any, error: Exception, status: int, reason: str) -> None:
    reqs, done, keys = table
    keys.psks = [protocol.PskMaterial(serial=9, identity=b"i",
                                      secret=b"s")]
    ns = namespace()
    req = reqs.submit(ns, accepted(MT.CLIENTHELLO, AM.PSK, peerids=(9,)),
                      5.0)
    w = worker(error=error)
    reqs.dispatch(req, w)
    assert done.dones == [("a-nl", req.sockfd, status, (), 0)]
    assert ns.last_failure == reason and len(reqs) == 0
    assert req.worker is None and req.handed == set()
    assert reqs.held_by(w) == []


def test_dispatch_only_a_pending_request(table: Any) -> None:
    reqs, _, _ = table
    req = reqs.submit(namespace(), accepted(), 5.0)
    reqs.dispatch(req, worker())
    with pytest.raises(AssertionError):
        reqs.dispatch(req, worker(2))
    reqs.fail_all(errno.EIO)
    with pytest.raises(AssertionError):
        reqs.dispatch(req, worker(3))


# ---- who holds what ---------------------------------------------------

def test_pending_held_and_owned(table: Any) -> None:
    reqs, _, _ = table
    a, b = namespace("a"), namespace("b")
    w1, w2 = worker(1), worker(2)
    ra, rb, rc = (reqs.submit(a, accepted(), 5.0),
                  reqs.submit(b, accepted(), 5.0),
                  reqs.submit(a, accepted(), 5.0))
    reqs.dispatch(ra, w1)
    assert reqs.pending(a) == [rc] and reqs.pending(b) == [rb]
    assert reqs.held(w1, ra.req_id) is ra
    assert reqs.held(w2, ra.req_id) is None
    assert reqs.held(w1, rc.req_id) is None  # pending: nobody's
    assert reqs.held(w1, 99) is None
    assert reqs.owns_fd(rb.sockfd) and not reqs.owns_fd(10**6)
    assert not reqs.is_late(w1, ra.req_id)
    reqs.fail_all(errno.EIO)
    assert not reqs.owns_fd(rb.sockfd)


# ---- expire -----------------------------------------------------------

def test_expire_exactly_at_the_wakeup(table: Any) -> None:
    reqs, done, _ = table
    ns = namespace()
    early = reqs.submit(ns, accepted(), 1.0)
    late = reqs.submit(ns, accepted(), 100.0)
    assert reqs.expire(early.deadline - 0.001) == []
    assert done.dones == []
    assert reqs.expire(early.deadline) == []
    assert [d[1:3] for d in done.dones] == [(early.sockfd, errno.ETIMEDOUT)]
    assert list(reqs) == [late]
    assert ns.last_failure == "ETIMEDOUT: deadline passed"
    reqs.fail_all(errno.EIO)


def test_expire_releases_each_worker_and_marks_late(table: Any) -> None:
    reqs, done, _ = table
    ns = namespace()
    w1, w2 = worker(1), worker(2)
    r1 = reqs.submit(ns, accepted(), 0.0)
    r2 = reqs.submit(ns, accepted(), 0.0)
    r3 = reqs.submit(ns, accepted(), 50.0)
    reqs.dispatch(r1, w1)
    reqs.dispatch(r2, w2)
    reqs.dispatch(r3, w1)
    assert reqs.expire(r2.wakeup()) == [w1, w2]
    assert reqs.is_late(w1, r1.req_id) and reqs.is_late(w2, r2.req_id)
    assert not reqs.is_late(w1, r2.req_id)
    assert not reqs.is_late(w1, r3.req_id)
    assert list(reqs) == [r3] and len(done.dones) == 2


# ---- complete and fail_all --------------------------------------------

def test_complete_counts_and_passes_everything_on(table: Any) -> None:
    reqs, done, _ = table
    ns = namespace()
    ok = reqs.submit(ns, accepted(), 5.0)
    bad = reqs.submit(ns, accepted(), 5.0)
    odd = reqs.submit(ns, accepted(), 5.0)
    reqs.complete(ok, 0, (7, 8), "fine", session_id=42)
    assert done.dones[-1] == ("a-nl", ok.sockfd, 0, (7, 8), 42)
    assert (ns.succeeded, ns.failed, ns.last_failure) == (1, 0, "")
    reqs.complete(bad, errno.EACCES, (), "bad certificate")
    assert (ns.succeeded, ns.failed) == (1, 1)
    assert ns.last_failure == "EACCES: bad certificate"
    reqs.complete(odd, 4000, ())
    assert ns.last_failure == "4000: ?"
    assert ns.failed == 2 and len(reqs) == 0


def test_fail_all_pending_only_leaves_the_dispatched(table: Any) -> None:
    reqs, done, _ = table
    a, b = namespace("a"), namespace("b")
    w = worker()
    sent = reqs.submit(a, accepted(), 5.0)
    reqs.dispatch(sent, w)
    waiting = reqs.submit(a, accepted(), 5.0)
    other = reqs.submit(b, accepted(), 5.0)
    assert reqs.fail_all(errno.EIO, pending_only=True, namespace=a) == 1
    assert done.dones[-1][1] == waiting.sockfd
    assert reqs.fail_all(errno.ESHUTDOWN, "stop") == 2
    assert {d[1]: d[2] for d in done.dones[1:]} == {
        sent.sockfd: errno.ESHUTDOWN, other.sockfd: errno.ESHUTDOWN}
    assert b.last_failure == "ESHUTDOWN: stop"


def test_fail_all_for_a_worker_keeps_other_late_answers(table: Any) -> None:
    reqs, _, _ = table
    ns = namespace()
    w1, w2 = worker(1), worker(2)
    r1 = reqs.submit(ns, accepted(), 0.0)
    r2 = reqs.submit(ns, accepted(), 0.0)
    reqs.dispatch(r1, w1)
    reqs.dispatch(r2, w2)
    assert reqs.expire(max(r1.wakeup(), r2.wakeup())) == [w1, w2]
    assert reqs.fail_all(errno.EIO, worker=w1) == 0
    assert not reqs.is_late(w1, r1.req_id)
    assert reqs.is_late(w2, r2.req_id)
    reqs.answered_late(r1.req_id)  # not expected: no error either
    reqs.answered_late(r2.req_id)
    assert not reqs.is_late(w2, r2.req_id)


# ---- send_done: the one DONE, and the fd closed whatever happens -------

class NlSock:
    def __init__(self, result: int | Exception = 0) -> None:
        self.result = result
        self.calls: list[tuple[Any, ...]] = []

    def done(self, sockfd: int, status: int, remote_auth: tuple[int, ...],
             **kw: Any) -> int:
        self.calls.append((sockfd, status, remote_auth, kw))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.mark.parametrize("result,logged", [
    (0, None),
    (errno.EBADF, "refused by the kernel: " + os.strerror(errno.EBADF)),
    (OSError(errno.ENOBUFS, "no buffer space"), "failed"),
    (TimeoutError("no answer"), "failed: no answer"),
    (ProtocolError("garbled"), "failed: garbled"),
])
def test_send_done_always_closes(result: int | Exception,
                                 logged: str | None,
                                 caplog: pytest.LogCaptureFixture) -> None:
    nl = NlSock(result)
    fd = socket.socket().detach()
    with caplog.at_level(logging.ERROR):
        requests.send_done(nl, fd, 0, (5,), 0)  # type: ignore[arg-type]
    assert nl.calls == [(fd, 0, (5,), {})]
    assert closed(fd)
    if logged is None:
        assert caplog.text == ""
    else:
        assert "DONE for fd %d" % fd in caplog.text and logged in caplog.text


def test_send_done_passes_a_session_id_only_if_there_is_one() -> None:
    nl = NlSock()
    fd = socket.socket().detach()
    requests.send_done(nl, fd, 0, (), 77)  # type: ignore[arg-type]
    assert nl.calls == [(fd, 0, (), {"session_id": 77})]


def test_complete_twice_names_the_request(table: Any) -> None:
    reqs, done, _ = table
    ns = namespace()
    reqs.submit(ns, accepted(), 5.0)
    second = reqs.submit(ns, accepted(), 5.0)
    reqs.fail_all(errno.EIO)
    with pytest.raises(AssertionError, match=r"^request 2 completed twice$"):
        reqs.complete(second, 0, ())
    assert len(done.dones) == 2 and ns.succeeded == 0


def test_refuse_answers_a_stray_fd_once(table: Any) -> None:
    """An fd no request owns (numbered below and above a request's):
    one DONE, no session id."""
    reqs, done, _ = table
    ns = namespace()
    below = socket.socket().detach()
    req = reqs.submit(ns, accepted(), 5.0)
    above = socket.socket().detach()
    assert below < req.sockfd < above
    reqs.refuse(ns, below, errno.EINVAL)
    reqs.refuse(ns, above, errno.EIO)
    reqs.refuse(ns, req.sockfd, errno.EIO)
    assert done.dones == [("a-nl", below, errno.EINVAL, (), 0),
                          ("a-nl", above, errno.EIO, (), 0)]
    assert (ns.failed, len(reqs)) == (0, 1)  # not a request's failure
    reqs.fail_all(errno.EIO)


# ---- a worker that does not read: the supervisor never waits on it ------

def test_a_full_channel_leaves_requests_pending_in_order(table: Any) -> None:
    """The hand-over never waits: a worker whose channel is full (busy,
    stuck or compromised) gets its requests later, in the order they
    came, and each still ends with one DONE."""
    reqs, done, _ = table
    w = worker()
    ns = namespace(worker=w)
    w.channel.error = BlockingIOError()
    first = reqs.submit(ns, accepted())
    assert first.worker is None and done.dones == []
    # Waiting for a turn of the loop soon, to try again.
    next_wakeup = reqs.next_wakeup()
    assert next_wakeup is not None
    assert next_wakeup <= time.monotonic() + requests.STALL_RETRY
    w.channel.error = None
    # A request that comes meanwhile does not overtake the first.
    second = reqs.submit(ns, accepted())
    assert second.worker is None and w.channel.sent == []
    reqs.retry_stalled()
    assert [r for _, r, _ in w.channel.sent] == [first.req_id, second.req_id]
    assert first.worker is w and second.worker is w
    assert reqs.next_wakeup() == min(first.wakeup(), second.wakeup())
    for req in (first, second):
        reqs.complete(req, 0, ())
    assert [d[2] for d in done.dones] == [0, 0]


def test_a_stalled_worker_costs_one_log_line_and_no_key_reads(
        table: Any, caplog: pytest.LogCaptureFixture) -> None:
    """While its channel shows no room, the turns of the loop read no
    kernel keys for its requests and log nothing more."""
    reqs, _, keys = table
    w = worker()
    ns = namespace(worker=w)
    w.channel.error = BlockingIOError()
    with caplog.at_level(logging.WARNING):
        req = reqs.submit(ns, accepted())
        reads = len(keys.scopes)
        for _ in range(50):
            reqs.retry_stalled()
    assert len(keys.scopes) == reads
    assert len([r for r in caplog.records
                if "is not reading its requests" in r.getMessage()]) == 1
    w.channel.error = None
    reqs.retry_stalled()
    assert req.worker is w
    reqs.complete(req, 0, ())


def test_a_worker_that_never_reads_again_times_its_requests_out(
        table: Any) -> None:
    reqs, done, _ = table
    w = worker()
    ns = namespace(worker=w)
    w.channel.error = BlockingIOError()
    req = reqs.submit(ns, accepted(), timeout=0.5)
    reqs.retry_stalled()
    assert req.worker is None and done.dones == []
    assert reqs.expire(time.monotonic() + 5) == []
    assert [d[2] for d in done.dones] == [errno.ETIMEDOUT]
    assert len(reqs) == 0


def test_a_replaced_worker_leaves_its_waiting_requests_to_the_next(
        table: Any) -> None:
    reqs, done, _ = table
    old = worker(1)
    ns = namespace(worker=old)
    old.channel.error = BlockingIOError()
    req = reqs.submit(ns, accepted())
    ns.worker = worker(2)  # the old one died or was retired
    reqs.retry_stalled()
    assert old.channel.sent == [] and req.worker is None
    assert reqs.pending(ns) == [req]  # WorkerPool.ready hands it over
    reqs.dispatch(req, ns.worker)
    assert req.worker is ns.worker and done.dones == []
    reqs.complete(req, 0, ())


def test_a_real_channel_that_is_not_read_never_blocks(table: Any) -> None:
    """With a real socketpair whose worker end nobody reads: the
    supervisor hands over what fits and keeps the rest, without waiting
    (an alarm fails the test if a send blocks)."""
    from tlshd.shared.channel import Channel, socketpair
    reqs, done, keys = table
    keys.x509 = (b"c" * 4000, b"k" * 300)  # a certificate and key's size
    ours, theirs = socketpair()
    w = worker()
    w.channel = Channel(ours, protocol.Side.SUPERVISOR)
    ns = namespace(worker=w)
    class Blocked(Exception):
        """Not an OSError: nothing on the way catches it."""

    def blocked(*_: Any) -> None:
        raise Blocked("the supervisor waited on its worker")

    old = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)
    try:
        made = [reqs.submit(ns, accepted()) for _ in range(200)]
        reqs.retry_stalled()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    handed = [r for r in made if r.worker is w]
    assert 0 < len(handed) < len(made)
    assert reqs.pending(ns) == [r for r in made if r.worker is None]
    for r in made:
        reqs.complete(r, errno.EIO, ())
    assert len(done.dones) == len(made)
    ours.close()
    theirs.close()
