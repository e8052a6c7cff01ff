"""Logging set-up shared by the supervisor and the workers.

The supervisor logs to syslog with facility auth and ident "tlshd", as
ktls-utils does, or to stderr with -s.  A sandboxed worker cannot reach
syslog: its records travel to the supervisor over the channel (see
tlshd.worker.serve) and are emitted there with the namespace's tag.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

FORMAT_STDERR = "tlshd[%(process)d]: %(message)s"
FORMAT_SYSLOG = "tlshd[%(process)d]: %(message)s"


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
        handler.setFormatter(logging.Formatter(FORMAT_STDERR))
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
