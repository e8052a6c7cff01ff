"""The worker's handshake thread pool (tlshd.worker.serve.Server): which
thread runs a request, and that the pool's concurrency is unchanged."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest

from tlshd.worker import serve


class _Channel:
    """Collects the answers the pool sends."""

    def __init__(self) -> None:
        self.sent: queue.Queue[Any] = queue.Queue()

    def send(self, msg: Any, req_id: int = 0) -> None:
        self.sent.put((req_id, msg))


def _server(monkeypatch: pytest.MonkeyPatch, threads: int,
            run: Any) -> tuple[serve.Server, _Channel]:
    def handle(engine: Any, job: serve.Job, *args: Any) -> Any:
        return run(job)

    monkeypatch.setattr(serve, "handle", handle)
    channel = _Channel()
    server = serve.Server(channel, threading.Lock(), None,  # type: ignore
                          threads)
    return server, channel


def _job(i: int) -> serve.Job:
    return serve.Job(req_id=i, request=None, fd=-1)  # type: ignore


def test_requests_one_at_a_time_run_on_the_thread_idle_last(monkeypatch):
    """A worker serving one request at a time dirties one thread's
    stack and state, not each of its 16 threads' in turn."""
    server, channel = _server(monkeypatch, 16,
                              lambda job: threading.current_thread().name)
    names = []
    for i in range(20):
        server.submit(_job(i))
        req_id, name = channel.sent.get(timeout=10)
        assert req_id == i
        names.append(name)
    assert len(set(names)) == 1, names


def test_every_thread_runs_at_once_and_the_rest_wait(monkeypatch):
    """16 requests that only finish together all run at once; a 17th
    waits for a free thread and runs next."""
    barrier = threading.Barrier(16, timeout=10)
    released = threading.Event()

    def run(job: serve.Job) -> tuple[str, bool]:
        if job.req_id < 16:
            barrier.wait()
            released.set()
        return threading.current_thread().name, released.is_set()

    server, channel = _server(monkeypatch, 16, run)
    for i in range(17):
        server.submit(_job(i))
    answers = [channel.sent.get(timeout=10) for _ in range(17)]
    assert sorted(r for r, _ in answers) == list(range(17))
    assert len({name for r, (name, _) in answers if r < 16}) == 16
    # The 17th started only once a thread was free.
    assert dict(answers)[16][1]
