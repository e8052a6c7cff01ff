"""The supervisor's handling of one worker's log records (workerlog.py),
with a fake clock; the same against a real supervisor loop and a flooding
worker: test_worker_hostile.py."""

from __future__ import annotations

import logging

from tlshd.supervisor import workerlog
from tlshd.supervisor.workerlog import WorkerLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_one_printable_line():
    text = "a\nb\r\x1b[31mc\td\x00e\u202ef\u2028g\U000e0001h é"
    out = workerlog.sanitize(text)
    assert out == ("a\\x0ab\\x0d\\x1b[31mc\\x09d\\x00e\\u202ef\\u2028g"
                   "\\U000e0001h é")
    assert out.isprintable()


def test_100k_text_is_capped():
    out = workerlog.sanitize("\n" * 100_000)
    assert out.isprintable()
    assert out == "\\x0a" * workerlog.MAX_CHARS + workerlog.TRUNCATED


def test_level_is_clamped(caplog):
    caplog.set_level(logging.DEBUG)
    wl = WorkerLog(7, "a")
    for level in (0, 5, 10, 20, 30, 40, 50, 99):
        wl.emit(level, "x")
    assert [r.levelno for r in caplog.records] == [
        10, 10, 10, 20, 30, 40, 40, 40]


def test_flood_dropped_then_summarised(caplog):
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    wl = WorkerLog(7, "a", clock=clock)
    for i in range(workerlog.BURST + 500):
        wl.emit(20, "line %d" % i)
    assert len(caplog.records) == workerlog.BURST
    clock.now += 1.0 / workerlog.RATE  # one more token
    wl.emit(20, "later")
    assert messages(caplog)[-2:] == [
        "Worker 7 (netns a): suppressed 500 log lines", "later [netns a]"]
    assert caplog.records[-2].levelno == logging.WARNING


def test_summary_at_exit(caplog):
    caplog.set_level(logging.DEBUG)
    wl = WorkerLog(7, "a", clock=Clock())
    for _ in range(workerlog.BURST + 3):
        wl.emit(20, "x")
    wl.close()
    assert messages(caplog)[-1] == "Worker 7 (netns a): suppressed 3 log lines"
    wl.close()  # nothing more to say
    assert len(caplog.records) == workerlog.BURST + 1
