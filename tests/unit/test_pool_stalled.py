"""A worker dies holding requests it had not taken yet (its channel was
full): the next worker is started for them and takes them, in order; each
still ends with one DONE."""

from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest

from tlshd.shared import uapi
from tlshd.supervisor import netlink_codec, requests
from tlshd.supervisor.backoff import Backoff
from tlshd.supervisor.requests import Requests
from tlshd.supervisor.workerpool import WorkerPool


class Channel:
    def __init__(self, full: bool) -> None:
        self.full = full
        self.sent: list[int] = []

    def send(self, msg: Any, req_id: int, fds: tuple[int, ...] = (),
             wait: bool = True) -> None:
        if self.full:
            raise BlockingIOError()
        self.sent.append(req_id)


class Worker:
    def __init__(self, pid: int, full: bool = False) -> None:
        self.pid = pid
        self.ready = True
        self.retiring = False
        self.sessions = 0
        self.last_busy = 0.0
        self.channel = Channel(full)
        self.pidfd = object()

    def reap(self) -> int:
        return -9  # SIGKILL


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> tuple[Requests, list[int]]:
    monkeypatch.setattr(requests.keymaterial, "x509_from_keys",
                        lambda certs, scope: (b"", b""))
    monkeypatch.setattr(requests.keymaterial, "client_psks",
                        lambda peerids, scope: ([], []))
    statuses: list[int] = []

    def done(nlsock: Any, sockfd: int, status: int,
             remote_auth: tuple[int, ...], session_id: int) -> None:
        statuses.append(status)
        os.close(sockfd)
    return Requests(keep_secrets=False, done=done), statuses


def accepted() -> netlink_codec.AcceptedRequest:
    return netlink_codec.AcceptedRequest(
        sockfd=socket.socket().detach(), msg_type=uapi.MsgType.CLIENTHELLO,
        auth_mode=uapi.AuthMode.X509, timeout_ms=None, peerids=(),
        certs=(), peername="host", keyring=None)


def test_requests_a_dead_worker_had_not_taken_start_the_next(
        table: Any) -> None:
    reqs, statuses = table
    pool = WorkerPool(reqs, lambda *a: None, lambda *a: None,
                      lambda ns, w: None, debug=False, worker_ids=None,
                      idle_timeout=60.0)
    stuck = Worker(10, full=True)
    cfg = SimpleNamespace(keyrings=(), handshake_timeout=30.0,
                          client_handshake_timeout=30.0)
    ns = SimpleNamespace(
        label="a", nlsock="nl", initial=True, cfg=cfg, succeeded=0,
        failed=0, last_failure="", held=False, removed=False, retiring=[],
        successor=None, worker=stuck, restarts=0, not_before=0.0,
        restart_at=None, backoff=Backoff())
    waiting = [reqs.submit(ns, accepted()) for _ in range(2)]
    assert all(r.worker is None for r in waiting)
    pool.on_exit(ns, stuck)  # type: ignore[arg-type]
    assert ns.worker is None and statuses == []
    # On demand (idle_timeout > 0), no READY comes for these again: the
    # exit itself asks for the next worker.
    assert ns.restart_at is not None
    assert ns.restart_at <= time.monotonic() + 60
    fresh = Worker(11)
    ns.worker = fresh
    pool.ready(ns, fresh)  # type: ignore[arg-type]
    assert fresh.channel.sent == [r.req_id for r in waiting]
    for r in waiting:
        reqs.complete(r, 0, ())
    assert statuses == [0, 0]
