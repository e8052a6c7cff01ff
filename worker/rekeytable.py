"""The worker's table of live sessions' traffic secrets, for re-keying.

A kTLS socket can only be re-keyed by whoever holds the current
``*_application_traffic_secret_N`` (the kernel keeps keys, not secrets).
When the kernel has the re-key upcall, the worker keeps each successful
handshake's secrets here under a random non-zero 32-bit session id, which
the supervisor returns to the kernel in DONE; a later key update request
names that id.  The secrets never leave this process: not to the
supervisor, not to a keyring.

The worker cannot see a session end (holding a dup of the socket would
keep the connection alive), so entries go away by bounds instead: the
least recently used beyond ``max_sessions``, and any not used for
``max_idle`` seconds; :meth:`RekeyTable.forget` drops one explicitly.
A dropped session fails its next re-key with ENOKEY, which the kernel
consumer handles like any failed re-key (by reconnecting).
"""

from __future__ import annotations

import logging
import secrets as _random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tlshd.worker.rekey import Secrets

log = logging.getLogger(__name__)

MAX_SESSIONS = 4096
# NVMe and NFS connections live for days; a re-key after a week of silence
# is not worth keeping secrets around for.
MAX_IDLE = 7 * 24 * 3600.0


@dataclass
class Slot:
    """One session's entry; ``secrets`` is replaced after each re-key."""

    secrets: Secrets
    used: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class RekeyTable:
    """Session id -> current secrets, bounded in size and age."""

    def __init__(self, max_sessions: int = MAX_SESSIONS,
                 max_idle: float = MAX_IDLE,
                 clock: Callable[[], float] = time.monotonic,
                 new_id: Callable[[], int] | None = None) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self.max_idle = max_idle
        self._clock = clock
        self._new_id = new_id or (lambda: _random.randbits(32))
        self._slots: OrderedDict[int, Slot] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._slots

    def _expire(self, now: float) -> None:
        # Oldest first: stop at the first entry still fresh.
        while self._slots:
            sid, slot = next(iter(self._slots.items()))
            if now - slot.used < self.max_idle:
                break
            del self._slots[sid]

    def add(self, secrets: Secrets) -> int:
        """Keep ``secrets``; return their new session id (never 0)."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            while len(self._slots) >= self.max_sessions:
                self._slots.popitem(last=False)
                log.warning("Session table full (%d): forgot the least "
                            "recently used session", self.max_sessions)
            for _ in range(64):
                sid = self._new_id() & 0xFFFFFFFF
                if sid and sid not in self._slots:
                    break
            else:
                raise RuntimeError("no free session id")
            self._slots[sid] = Slot(secrets, now)
            return sid

    def forget(self, session_id: int) -> bool:
        """Drop a session (it ended); True if it was known."""
        with self._lock:
            return self._slots.pop(session_id, None) is not None

    @contextmanager
    def use(self, session_id: int) -> Iterator[Slot]:
        """Hold one session for a re-key; KeyError if unknown or expired.

        Re-keys of one session are serialised by the slot's lock; the
        caller stores the advanced secrets in ``slot.secrets`` (also when
        it fails halfway, so the table follows what the kernel has).
        """
        now = self._clock()
        with self._lock:
            self._expire(now)
            slot = self._slots[session_id]
            slot.used = now
            self._slots.move_to_end(session_id)
        with slot.lock:
            yield slot
