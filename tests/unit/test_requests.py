"""The request table (supervisor/requests.py) on its own, with fakes.

The table is the only place that keeps a request and the only sender of
DONE; these tests state its rules without processes: one DONE per
request on every exit path, a pending request that expires is never
dispatched later, ``fail_all`` answers exactly the requests it names.
"""

from __future__ import annotations

import errno
import os
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from tlshd.shared import uapi
from tlshd.supervisor import netlink_codec
from tlshd.supervisor.requests import Requests


class Recorder:
    """Stands in for requests.send_done: records, closes the fd."""

    def __init__(self) -> None:
        self.dones: list[tuple[Any, int, int]] = []

    def __call__(self, nlsock: Any, sockfd: int, status: int,
                 remote_auth: tuple[int, ...], session_id: int) -> None:
        self.dones.append((nlsock, sockfd, status))
        os.close(sockfd)


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, msg: Any, req_id: int, fds: tuple[int, ...] = (),
             wait: bool = True) -> None:
        self.sent.append(req_id)


def namespace(label: str) -> Any:
    return SimpleNamespace(label=label, nlsock=label + "-nl", initial=True,
                           cfg=SimpleNamespace(keyrings=()), succeeded=0,
                           failed=0, last_failure="", held=False,
                           worker=None)  # its worker is not started yet


def worker(pid: int) -> Any:
    return SimpleNamespace(pid=pid, channel=FakeChannel())


@pytest.fixture
def table() -> tuple[Requests, Recorder]:
    done = Recorder()
    return Requests(keep_secrets=False, done=done), done


def accepted() -> netlink_codec.AcceptedRequest:
    sock = socket.socket()
    return netlink_codec.AcceptedRequest(
        sockfd=sock.detach(), msg_type=uapi.MsgType.CLIENTHELLO,
        auth_mode=uapi.AuthMode.UNAUTH, timeout_ms=None, peerids=(),
        certs=(), peername="127.0.0.1", keyring=None)


def test_expired_while_pending_is_never_dispatched(table) -> None:
    """A request whose deadline passes while its namespace's worker is
    still starting gets one DONE (ETIMEDOUT), and is not handed to the
    worker once it is ready."""
    reqs, done = table
    ns = namespace("a")
    req = reqs.submit(ns, accepted(), timeout=0.0)
    assert reqs.pending(ns) == [req]
    assert reqs.expire(req.deadline + 0.01) == []  # no worker held it
    assert done.dones == [("a-nl", req.sockfd, errno.ETIMEDOUT)]
    assert reqs.pending(ns) == [] and len(reqs) == 0
    w = worker(1)
    for r in reqs.pending(ns):  # what WorkerPool.ready does
        reqs.dispatch(r, w)
    assert w.channel.sent == []
    assert reqs.fail_all(errno.EIO) == 0
    assert len(done.dones) == 1


def test_expired_while_dispatched_tolerates_a_late_answer(table) -> None:
    reqs, done = table
    ns = namespace("a")
    req = reqs.submit(ns, accepted(), timeout=0.0)
    w = worker(1)
    reqs.dispatch(req, w)
    assert w.channel.sent == [req.req_id] and reqs.held_by(w) == [req]
    assert reqs.expire(req.deadline) == []  # the worker gets a grace
    assert reqs.expire(req.wakeup()) == [w]
    assert done.dones == [("a-nl", req.sockfd, errno.ETIMEDOUT)]
    assert reqs.held(w, req.req_id) is None
    assert reqs.is_late(w, req.req_id) and not reqs.is_late(worker(2),
                                                             req.req_id)
    reqs.answered_late(req.req_id)
    assert not reqs.is_late(w, req.req_id)


def test_fail_all_namespace_sends_one_done_per_request(table) -> None:
    reqs, done = table
    a, b = namespace("a"), namespace("b")
    w = worker(1)
    in_a = [reqs.submit(a, accepted(), 30) for _ in range(3)]
    in_b = reqs.submit(b, accepted(), 30)
    reqs.dispatch(in_a[0], w)  # one dispatched, two pending
    assert reqs.fail_all(errno.EIO, "gone", namespace=a) == 3
    assert sorted(d[1] for d in done.dones) == sorted(r.sockfd
                                                      for r in in_a)
    assert all(d == ("a-nl", d[1], errno.EIO) for d in done.dones)
    assert list(reqs) == [in_b] and a.failed == 3
    assert a.last_failure == "EIO: gone"
    assert reqs.fail_all(errno.EIO, namespace=a) == 0  # none twice
    assert len(done.dones) == 3


def test_fail_all_worker_sends_one_done_per_request(table) -> None:
    reqs, done = table
    ns = namespace("a")
    w1, w2 = worker(1), worker(2)
    held = [reqs.submit(ns, accepted(), 30) for _ in range(2)]
    other = reqs.submit(ns, accepted(), 30)
    pending = reqs.submit(ns, accepted(), 30)
    for r in held:
        reqs.dispatch(r, w1)
    reqs.dispatch(other, w2)
    late = reqs.submit(ns, accepted(), 0.0)
    reqs.dispatch(late, w1)
    reqs.expire(late.wakeup())
    assert reqs.is_late(w1, late.req_id)
    done.dones.clear()
    assert reqs.fail_all(errno.EIO, "worker died", worker=w1) == 2
    assert sorted(d[1] for d in done.dones) == sorted(r.sockfd for r in held)
    assert not reqs.is_late(w1, late.req_id)  # it is gone: no answer due
    assert list(reqs) == [other, pending]
    assert reqs.fail_all(errno.ETIMEDOUT, namespace=ns,
                         pending_only=True) == 1
    assert done.dones[-1][1:] == (pending.sockfd, errno.ETIMEDOUT)
    assert list(reqs) == [other]


def test_complete_twice_is_a_bug_not_a_second_done(table) -> None:
    reqs, done = table
    req = reqs.submit(namespace("a"), accepted(), 30)
    reqs.complete(req, 0, ())
    with pytest.raises(AssertionError, match="completed twice"):
        reqs.complete(req, errno.EIO, ())
    assert len(done.dones) == 1


def test_refuse_never_answers_an_fd_a_request_owns(table) -> None:
    reqs, done = table
    ns = namespace("a")
    req = reqs.submit(ns, accepted(), 30)
    reqs.refuse(ns, req.sockfd, errno.EIO)
    assert done.dones == []
    os.fstat(req.sockfd)  # still open
    stray = socket.socket().detach()
    reqs.refuse(ns, stray, errno.EIO)
    assert done.dones == [("a-nl", stray, errno.EIO)]
    reqs.fail_all(errno.EIO)


def test_successes_are_counted_by_server_certificate_kind(table) -> None:
    reqs, done = table
    ns = namespace("a")
    ns.by_certificate = {}
    for kind, status in (("ml-dsa", 0), ("ml-dsa", 0), ("classical", 0),
                         ("", 0), ("", errno.EACCES)):
        req = reqs.submit(ns, accepted(), timeout=5.0)
        reqs.complete(req, status, (), "", 0, kind)
    assert ns.by_certificate == {"ml-dsa": 2, "classical": 1}
    assert (ns.succeeded, ns.failed) == (4, 1)
    assert len(done.dones) == 5
