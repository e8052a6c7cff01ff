"""Emit a worker's log records in the supervisor, defensively.

A worker parses peer data, so it may be compromised; its log records
then become an attacker's pen in root's syslog.  What reaches the log is
therefore bounded here (OpenSSH's monitor does the same with the
unprivileged child's log pipe):

- one record is one line: control characters (newlines, ANSI escapes,
  and any other character Python does not call printable, such as bidi
  overrides and line separators) are written as backslash escapes;
- a line holds at most MAX_CHARS characters of the worker's text;
- the level is clamped to DEBUG..ERROR: a worker cannot raise CRITICAL;
- a token bucket per worker (BURST lines, then RATE per second) drops
  floods; the number dropped is logged later, as one WARNING line, when
  the worker is allowed to log again or when it exits.

The supervisor's own "[netns X]" tag comes last, after the worker's text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_CHARS = 1000
TRUNCATED = "...[truncated]"
MIN_LEVEL = logging.DEBUG
MAX_LEVEL = logging.ERROR
# Generous for a real worker (a few lines per handshake, so hundreds of
# handshakes at once fit in the burst); small against a flood.
BURST = 1000
RATE = 100.0  # lines per second, sustained


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return "\\x%02x" % code
    if code < 0x10000:
        return "\\u%04x" % code
    return "\\U%08x" % code


def sanitize(text: str) -> str:
    """``text`` as one printable line of at most MAX_CHARS characters of
    the original (plus the marker when cut)."""
    cut = len(text) > MAX_CHARS
    text = text[:MAX_CHARS]
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else _escape(ch)
                       for ch in text)
    return text + TRUNCATED if cut else text


def clamp_level(level: int) -> int:
    return min(max(level, MIN_LEVEL), MAX_LEVEL)


class WorkerLog:
    """The log of one worker: ``emit`` each record it sends, ``close``
    once it is gone (to report what was dropped at the end)."""

    def __init__(self, pid: int, label: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pid = pid
        self.label = label
        self.clock = clock
        self.tokens = float(BURST)
        self.last = clock()
        self.suppressed = 0

    def emit(self, level: int, text: str) -> None:
        now = self.clock()
        self.tokens = min(float(BURST),
                          self.tokens + (now - self.last) * RATE)
        self.last = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return
        self.tokens -= 1.0
        self._report_suppressed()
        log.log(clamp_level(level), "%s [netns %s]", sanitize(text),
                self.label)

    def close(self) -> None:
        self._report_suppressed()

    def _report_suppressed(self) -> None:
        if self.suppressed:
            log.warning("Worker %d (netns %s): suppressed %d log lines",
                        self.pid, self.label, self.suppressed)
            self.suppressed = 0
