"""Restart delays for a namespace whose worker keeps dying."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Exponential delay with jitter; forgiven after a stable period.

    Pure: the clock and the random source are passed in, so tests drive it
    with fakes.
    """

    def __init__(self, base: float = 0.5, cap: float = 60.0,
                 stable: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.base = base
        self.cap = cap
        self.stable = stable
        self.rand = rand
        self.failures = 0
        self.started_at: float | None = None

    def started(self, now: float) -> None:
        self.started_at = now

    def failed(self, now: float) -> float:
        """Record a death at ``now``; return when to start the next one."""
        if (self.started_at is not None
                and now - self.started_at >= self.stable):
            self.failures = 0  # it ran long enough: a fresh failure
        delay = min(self.cap, self.base * 2.0 ** self.failures)
        self.failures += 1
        # Jitter in [0.5, 1.0] so that many namespaces do not restart in
        # lock step after a common cause.
        return float(now + delay * (0.5 + self.rand() / 2))
