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

Syslog is written by SyslogHandler below rather than
logging.handlers.SysLogHandler, whose module (with pickle, queue and the
network handlers) the service paid for on every start, before it could
listen (docs/benchmarks.md, Start-up).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

FORMAT_STDERR = "tlshd[%(process)d]: %(message)s"
FORMAT_SYSLOG = "tlshd[%(process)d]: %(message)s"

# Python level -> syslog priority (sd-daemon(3) prefixes and syslog).
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3),
              (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7
# syslog(3)'s socket and tlshd's facility, as ktls-utils logs.
SYSLOG_PATH = "/dev/log"
LOG_AUTH = 4


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


class SyslogHandler(logging.Handler):
    """Records to the local syslog socket, as syslog(3) sends them:
    ``<PRI>message``, one datagram each (or NUL-terminated on a stream
    socket), PRI being the facility and the record's priority.

    Like logging.handlers.SysLogHandler: connected at construction (an
    error there is the caller's), connected again once if a send fails
    (syslog restarted), and a record that still cannot be sent goes to
    handleError.
    """

    def __init__(self, path: str, facility: int) -> None:
        super().__init__()
        self.path = path
        self.facility = facility
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        # A datagram socket, as journald's and rsyslog's /dev/log are;
        # a stream one where the first fails (a daemon offering that).
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
            return sock
        except OSError:
            sock.close()
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = ("<%d>%s\0" % (self.facility << 3 | priority(
                record.levelno), self.format(record))).encode()
            try:
                self.sock.sendall(data)
            except OSError:
                self.sock.close()
                self.sock = self._connect()
                self.sock.sendall(data)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


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
    if to_stderr or not os.path.exists(SYSLOG_PATH):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter(stderr_is_journal()))
    else:
        handler = SyslogHandler(SYSLOG_PATH, LOG_AUTH)
        handler.setFormatter(logging.Formatter(FORMAT_SYSLOG))
    root.addHandler(handler)
    # Debugging applies to tlshd's own loggers only: pyroute2 narrates
    # every netlink message at DEBUG, partly through the root logger.
    root.setLevel(logging.INFO)
    logging.getLogger("tlshd").setLevel(logging.DEBUG if debug
                                        else logging.INFO)
