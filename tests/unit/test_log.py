"""What ``tlshd -s`` prints, and the start-up error of a kernel without
the handshake service."""

from __future__ import annotations

import errno
import logging
import os
import sys

import pytest

from tlshd.shared import log as tlshd_log
from tlshd.shared.errors import ConfigError
from tlshd.supervisor import netlink_family


def record(level: int, msg: str) -> logging.LogRecord:
    r = logging.LogRecord("tlshd.x", level, __file__, 1, msg, None, None)
    r.process = 42
    return r


@pytest.mark.parametrize("level,line", [
    (logging.DEBUG, "tlshd[42]: debug: m"),
    (logging.INFO, "tlshd[42]: m"),
    (logging.WARNING, "tlshd[42]: warning: m"),
    (logging.ERROR, "tlshd[42]: error: m"),
    (logging.CRITICAL, "tlshd[42]: critical: m"),
])
def test_terminal_lines_name_their_severity(level, line):
    assert tlshd_log.StderrFormatter(journal=False).format(
        record(level, "m")) == line


@pytest.mark.parametrize("level,prio", [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
    (logging.ERROR, 3), (logging.CRITICAL, 2)])
def test_journal_lines_carry_the_sd_daemon_prefix(level, prio):
    fmt = tlshd_log.StderrFormatter(journal=True)
    assert fmt.format(record(level, "m")) == "<%d>tlshd[42]: m" % prio
    # Every line of a multi-line record: journald reads each on its own.
    assert fmt.format(record(level, "a\nb")) == "<%d>tlshd[42]: a\n<%d>b" % (
        prio, prio)


def test_journal_stream_must_be_stderr_itself(monkeypatch, tmp_path):
    f = open(tmp_path / "err", "w")
    monkeypatch.setattr(sys, "stderr", f)
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev, st.st_ino))
    assert tlshd_log.stderr_is_journal()
    # Inherited by a child whose stderr went elsewhere: not the journal.
    monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev,
                                                    st.st_ino + 1))
    assert not tlshd_log.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not tlshd_log.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not tlshd_log.stderr_is_journal()
    f.close()


def test_missing_handshake_family_names_what_is_needed():
    """Not an errno tuple: the kernel version and option it takes.  Asks
    the host's real nlctrl for a family no kernel has."""
    with pytest.raises(ConfigError) as e:
        netlink_family.probe_family("tlshd-test-none")
    text = str(e.value)
    assert text.startswith("Kernel handshake service is not available: "
                           'this kernel has no "handshake" netlink family')
    assert "Linux 6.4 or later built with CONFIG_NET_HANDSHAKE=y" in text
    assert "(2," not in text
    if not os.path.isdir("/sys/module/tls"):
        assert "the tls module (CONFIG_TLS) is not loaded" in text


def test_other_netlink_errors_are_named():
    text = netlink_family.unavailable_message(
        OSError(errno.EPERM, os.strerror(errno.EPERM)))
    assert "cannot ask the kernel for it: Operation not permitted" in text


def test_syslog_records_carry_facility_auth_and_reconnect(tmp_path):
    """What syslog(3) would send: <PRI>line, NUL-terminated; a restarted
    syslog (a new socket at the same path) still gets the next record."""
    import socket

    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(10)
    handler = tlshd_log.SyslogHandler(path, tlshd_log.LOG_AUTH)
    handler.setFormatter(logging.Formatter(tlshd_log.FORMAT_SYSLOG))
    record = logging.LogRecord("tlshd", logging.WARNING, "f", 1, "x %d",
                               (1,), None)
    handler.emit(record)
    assert server.recv(100) == b"<36>tlshd[%d]: x 1\0" % os.getpid()
    server.close()
    os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(10)
    record.levelno = logging.DEBUG
    handler.emit(record)
    assert server.recv(100) == b"<39>tlshd[%d]: x 1\0" % os.getpid()
    handler.close()
    server.close()
