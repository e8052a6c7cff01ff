"""Logging set-up shared by the supervisor and the workers.

The supervisor logs to syslog with facility auth and ident "tlshd", as
ktls-utils does, or to stderr with -s.  A sandboxed worker cannot reach
syslog: its records travel to the supervisor over the channel (see
tlshd.worker.serve) and are emitted there with the namespace's tag.

With -s, unlike ktls-utils (which then logs to syslog as well), lines go
to stderr only: under systemd both would reach the journal, every line
twice.  Each stderr line carries its severity: when stderr is the journal
(systemd's JOURNAL_STREAM names it), as the sd-daemon "<N>" prefix that
journald turns into the entry's priority; otherwise as a word after
"tlshd[pid]: " for warnings and worse ("error: ...").  Informational
lines keep the plain "tlshd[pid]: message" form.  See tlshd(8), LOGGING.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

FORMAT_STDERR = "tlshd[%(process)d]: %(message)s"
FORMAT_SYSLOG = "tlshd[%(process)d]: %(message)s"

# Python level -> syslog priority (sd-daemon(3) prefixes and syslog).
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3),
              (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7


def priority(level: int) -> int:
    """The syslog priority of a Python logging level."""
    for at_least, prio in PRIORITIES:
        if level >= at_least:
            return prio
    return DEBUG_PRIORITY


# The word a terminal sees; informational lines get none.
WORDS = {2: "critical: ", 3: "error: ", 4: "warning: ", 7: "debug: "}


class StderrFormatter(logging.Formatter):
    """``tlshd[pid]: message`` with the record's severity: the "<N>"
    prefix for journald, or a word after the pid for a terminal."""

    def __init__(self, journal: bool) -> None:
        super().__init__(FORMAT_STDERR)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        prio = priority(record.levelno)
        if self.journal:
            # journald reads the prefix on each line of the stream.
            return "\n".join("<%d>%s" % (prio, part)
                             for part in line.split("\n"))
        word = WORDS.get(prio, "")
        if not word:
            return line
        head, sep, rest = line.partition(": ")
        return head + sep + word + rest


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal stream (sd_journal_stream_fd):
    JOURNAL_STREAM holds its device and inode, "DEV:INO"."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError, AttributeError):
        return False


def lean_records(*, process: bool) -> None:
    """Skip the LogRecord fields tlshd's formats never use.

    By default every record walks the stack for the caller's file and
    line and looks up the thread and multiprocessing names; the formats
    here use only the message and (supervisor) the pid.  Several records
    per handshake cross the channel and are logged again by the
    supervisor, and interpreted Python is slow under emulation
    (docs/benchmarks.md).  These switches are the logging module's
    documented optimisations.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = process


def setup(to_stderr: bool, debug: bool) -> None:
    """Configure the root logger for the supervisor process."""
    lean_records(process=True)  # the formats print %(process)d
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if to_stderr or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter(stderr_is_journal()))
    else:
        handler = logging.handlers.SysLogHandler(
            address="/dev/log",
            facility=logging.handlers.SysLogHandler.LOG_AUTH)
        handler.setFormatter(logging.Formatter(FORMAT_SYSLOG))
    root.addHandler(handler)
    # Debugging applies to tlshd's own loggers only: pyroute2 narrates
    # every netlink message at DEBUG, partly through the root logger.
    root.setLevel(logging.INFO)
    logging.getLogger("tlshd").setLevel(logging.DEBUG if debug
                                        else logging.INFO)
