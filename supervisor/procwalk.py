"""The walk over /proc for unnamed namespaces, off the loop's thread.

Why a thread, not slices of the loop's turns: a slice is bounded by the
clock, but the clock is looked at between processes, and in a loaded
TCG guest one stat of /proc/<pid>/ns/net takes a millisecond or more; and
while a walk is under way the loop ran its slices back to back, so a
READY nearly always found one under way (the loop's slowest turns under
churn were the walk's: docs/benchmarks.md).  On a thread, the loop
sleeps in select() while the walk goes on, instead of spinning.

But the GIL is not fair: a thread that gives it back for a system call
and wants it again after finds the walk's thread holding it, and waits
up to sys.getswitchinterval() (5 ms), at every system call of a turn (a
READY's turn makes about ten).  So the walk only runs while the loop
waits in select() (``gate``, set by the loop around it): the walk looks
at the gate before each process, and while the loop works it waits on
the gate without the GIL.  A READY then waits for the end of one
process's look at most (a stat(2), which itself runs without the GIL),
and the turn that follows has the GIL to itself.  A loop that never
waits still lets the walk look at one process every CHUNK, so a busy
host delays discovery but cannot stop it.

The thread only reads /proc: it is given a ProcWalk opened by the loop
(an error opening /proc is the loop's to log) and the pids to leave out,
and hands back the list of namespaces found, or the error that ended it.
It touches no state of the loop, forks nothing and opens no fd that
outlives it; the loop is woken through an eventfd (close-on-exec) and
takes the result with ``take``.  A cancelled walk stops at its next
batch and its result is dropped.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable

from tlshd.supervisor import netns

log = logging.getLogger(__name__)

# The pause between the end of one walk over /proc and the start of the
# next, while unnamed namespaces are served.
INTERVAL = 2.0
# How long the thread waits on the gate before it looks at one process
# anyway (and at the cancel flag).
CHUNK = 0.05


class WalkThread:
    """At most one walk over /proc at a time, each on a thread of its own.

    ``fileno`` is readable when a walk has ended (poll it with the loop's
    selector); ``take`` then gives its result.
    """

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # Set while the loop waits in select(): the walk runs only then.
        self.gate = threading.Event() if gate is None else gate
        if gate is None:
            self.gate.set()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        # Written by the thread before it ends; read after join().
        self._found: list[netns.Found] = []
        self._error: OSError | None = None

    def fileno(self) -> int:
        return self.fd

    @property
    def running(self) -> bool:
        """A walk was started and its result not taken yet."""
        return self._thread is not None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def start(self, walk: netns.ProcWalk) -> None:
        """Walk ``walk`` to its end on a new thread (owned from now on)."""
        assert self._thread is None
        self._cancel.clear()
        self._found, self._error = [], None
        self._thread = threading.Thread(target=self._run, args=(walk,),
                                        name="tlshd-proc-walk", daemon=True)
        self._thread.start()

    def _run(self, walk: netns.ProcWalk) -> None:
        # Signals are the loop's (its wake-up fd): none interrupts us.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        walk.CHECK_EVERY = 1  # one process per step: the gate between
        try:
            while not walk.step(0.0):
                if self._cancel.is_set():
                    return
                # With a timeout: a loop that never waits (a flood) still
                # lets the walk go on, by one process every CHUNK.
                self.gate.wait(CHUNK)
            self._found = walk.result()
        except OSError as e:
            self._error = e
        finally:
            walk.close()
            os.eventfd_write(self.fd, 1)

    def take(self) -> list[netns.Found] | None:
        """The namespaces the walk found, once it has ended (None: under
        way, cancelled, or none started).  Raises the OSError that ended
        it."""
        thread = self._thread
        if thread is None:
            return None
        try:
            os.eventfd_read(self.fd)  # written as the thread ends
        except BlockingIOError:
            return None
        thread.join()
        self._thread = None
        if self._cancel.is_set():
            return None
        if self._error is not None:
            raise self._error
        return self._found

    def cancel(self) -> None:
        """Drop the walk under way (its thread ends at its next batch)."""
        self._cancel.set()
        self.take()

    def close(self) -> None:
        """Stop the walk under way and close the eventfd."""
        thread = self._thread
        self._cancel.set()
        if thread is not None:
            thread.join()
            self._thread = None
        os.close(self.fd)


class Walks:
    """A walk over /proc every INTERVAL seconds (from the end of one to
    the start of the next), each on a WalkThread; what the last complete
    one found.  ``watch_fd`` polls the thread's eventfd in the loop (the
    thread is made at the first walk, so a supervisor that serves no
    unnamed namespace holds no eventfd)."""

    def __init__(self, watch_fd: Callable[[WalkThread, Callable[[], None]],
                                          None] | None = None) -> None:
        self._watch_fd = watch_fd
        # Set by the loop while it waits in select() (see the top).
        self.gate = threading.Event()
        self.gate.set()
        self._walker: WalkThread | None = None
        self._at = 0.0  # when the next walk starts
        self.found: dict[netns.Key, netns.Found] = {}
        self.count = 0  # walks completed

    def select(self, sel: selectors.BaseSelector, timeout: float | None
               ) -> list[tuple[selectors.SelectorKey, int]]:
        """The loop's ``sel.select(timeout)``: the walk runs meanwhile
        (and only then, see the top)."""
        self.gate.set()
        try:
            return sel.select(timeout)
        finally:
            self.gate.clear()

    @property
    def wake_at(self) -> float | None:
        """When the next walk is to start (None: one is under way; its
        thread wakes the loop when it ends)."""
        return None if self.running else self._at

    @property
    def running(self) -> bool:
        return self._walker is not None and self._walker.running

    def due(self, now: float, ours: Callable[[], set[int]]) -> bool:
        """Start a walk if it is time (leaving out the pids ``ours``
        gives), or take the result of the one under way: True when one
        has just completed.  An error is logged; the next walk is then
        INTERVAL later."""
        try:
            if not self.running:
                if now >= self._at:
                    self._start(ours())
                return False
            assert self._walker is not None
            found = self._walker.take()
        except OSError as e:  # EMFILE, say: the next walk may do
            log.error("Cannot look for unnamed namespaces in /proc: %s", e)
            self._at = time.monotonic() + INTERVAL
            return False
        if found is None:
            return False
        self.found = {f.key: f for f in found}
        self._at = time.monotonic() + INTERVAL
        self.count += 1
        return True

    def _start(self, ours: set[int]) -> None:
        walk = netns.ProcWalk(frozenset(ours))
        if self._walker is None:
            try:
                self._walker = WalkThread(self.gate)
            except OSError:
                walk.close()
                raise
            if self._watch_fd is not None:
                self._watch_fd(self._walker, self._ended)
        self._walker.start(walk)

    def _ended(self) -> None:
        """The thread has ended.  A walk still wanted is taken by the
        loop's next call of ``due``; a cancelled one is dropped here (its
        eventfd would keep the loop awake)."""
        if self._walker is not None and self._walker.cancelled:
            self._walker.take()

    def stop(self) -> None:
        """No more walks for now: drop the one under way and what the
        last one found; the next ``due`` starts one at once."""
        if self._walker is not None:
            self._walker.cancel()
        self.found = {}
        self._at = 0.0

    def close(self) -> None:
        if self._walker is not None:
            self._walker.close()
            self._walker = None
