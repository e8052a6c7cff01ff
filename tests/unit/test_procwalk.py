"""The walk over /proc on a thread of its own (supervisor.procwalk).

The loop hands the thread a ProcWalk and polls its eventfd; the thread
only reads /proc.  These tests drive ``Walks`` and ``WalkThread`` with a
real /proc, and with a fake walk where the test must hold it under way.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import threading
import time

from tlshd.supervisor import netns, procwalk


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class HeldWalk:
    """A ProcWalk look-alike that walks until the test lets it finish,
    on whichever thread; or fails with ``error``."""

    def __init__(self, exclude: object = None,
                 error: OSError | None = None) -> None:
        self.release = threading.Event()
        self.error = error
        self.threads: set[int] = set()
        self.closed = False

    def step(self, deadline: float) -> bool:
        self.threads.add(threading.get_ident())
        if self.error is not None:
            raise self.error
        return self.release.wait(0.01)

    def result(self) -> list[netns.Found]:
        return [netns.initial()]

    def close(self) -> None:
        self.closed = True


def test_a_walk_runs_on_its_own_thread_and_finds_our_namespace():
    before = fds()
    polled: list[object] = []
    walks = procwalk.Walks(lambda f, cb: polled.append(f))
    assert walks.due(time.monotonic(), lambda: set()) is False
    assert walks.running and walks.wake_at is None
    assert len(polled) == 1  # the eventfd, handed to the loop to poll
    thread = polled[0]
    assert isinstance(thread, procwalk.WalkThread)
    assert readable(thread.fileno(), 30)
    assert walks.due(time.monotonic(), lambda: set()) is True
    assert netns.initial().key in walks.found
    assert walks.count == 1 and not walks.running
    assert not readable(thread.fileno(), 0)  # drained
    # The next walk only INTERVAL later.
    assert walks.wake_at is not None
    assert walks.wake_at > time.monotonic() + procwalk.INTERVAL / 2
    assert walks.due(time.monotonic(), lambda: set()) is False
    assert not walks.running
    walks.close()
    assert fds() == before  # the /proc fd and the eventfd are closed


def test_the_walk_is_not_on_the_callers_thread(monkeypatch):
    held = HeldWalk()
    monkeypatch.setattr(netns, "ProcWalk", lambda exclude: held)
    walks = procwalk.Walks()
    walks.due(0.0, lambda: {1})
    held.release.set()
    deadline = time.monotonic() + 30
    while not walks.due(time.monotonic(), lambda: {1}):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert held.threads and threading.get_ident() not in held.threads
    assert held.closed
    walks.close()


def test_a_stopped_walk_is_dropped_and_does_not_keep_the_loop_awake(
        monkeypatch):
    held = HeldWalk()
    monkeypatch.setattr(netns, "ProcWalk", lambda exclude: held)
    callbacks: list[tuple[procwalk.WalkThread, object]] = []
    walks = procwalk.Walks(lambda f, cb: callbacks.append((f, cb)))
    walks.due(0.0, lambda: set())
    walks.found = {netns.initial().key: netns.initial()}
    walks.stop()
    assert walks.found == {}
    [(thread, ended)] = callbacks
    assert readable(thread.fileno(), 30)  # the thread saw the flag
    assert held.closed
    ended()  # the loop's callback drains it
    assert not readable(thread.fileno(), 0)
    assert not walks.running and walks.count == 0
    walks.close()


def test_a_walk_that_fails_is_logged_and_tried_later(monkeypatch, caplog):
    held = HeldWalk(error=OSError(5, "Input/output error"))
    monkeypatch.setattr(netns, "ProcWalk", lambda exclude: held)
    caplog.set_level(logging.ERROR)
    walks = procwalk.Walks()
    walks.due(0.0, lambda: set())
    deadline = time.monotonic() + 30
    while walks.running:
        assert walks.due(time.monotonic(), lambda: set()) is False
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert any("Cannot look for unnamed namespaces in /proc" in r.message
               for r in caplog.records)
    assert held.closed and walks.count == 0
    assert walks.wake_at is not None
    assert walks.wake_at > time.monotonic() + procwalk.INTERVAL / 2
    walks.close()


def test_close_stops_a_walk_under_way(monkeypatch):
    held = HeldWalk()
    monkeypatch.setattr(netns, "ProcWalk", lambda exclude: held)
    walks = procwalk.Walks()
    walks.due(0.0, lambda: set())
    walks.close()  # joins the thread: the walk sees the cancel flag
    assert held.closed
    assert not any(t.name == "tlshd-proc-walk" for t in threading.enumerate())


def test_a_thread_gives_its_result_once_the_walk_has_ended():
    thread = procwalk.WalkThread()
    held = HeldWalk()
    thread.start(held)  # type: ignore[arg-type]
    assert thread.running and thread.take() is None  # under way
    held.release.set()
    assert readable(thread.fileno(), 30)
    assert thread.take() == [netns.initial()]
    assert not thread.running and thread.take() is None
    thread.close()


class CountingWalk(HeldWalk):
    """Never ends; counts its steps (one process each)."""

    def __init__(self, exclude: object = None) -> None:
        super().__init__(exclude)
        self.steps = 0

    def step(self, deadline: float) -> bool:
        self.steps += 1
        return False


def test_the_walk_waits_while_the_loop_works(monkeypatch):
    """The loop sets the gate only while it waits in select(): when it
    is clear (a turn under way), the walk looks at one process per
    CHUNK only, so that a loop that never waits cannot stop it."""
    held = CountingWalk()
    monkeypatch.setattr(netns, "ProcWalk", lambda exclude: held)
    walks = procwalk.Walks()
    walks.gate.clear()  # the loop is working
    walks.due(0.0, lambda: set())
    time.sleep(0.5)
    stalled = held.steps
    assert 1 <= stalled <= 0.5 / procwalk.CHUNK + 2
    sel = selectors.DefaultSelector()
    assert walks.select(sel, 0.2) == []  # the loop waits in select()
    sel.close()
    assert not walks.gate.is_set()
    went_on = held.steps - stalled
    assert went_on > 100
    walks.close()  # a cancel is seen while the gate is clear
    assert held.closed
