"""The Linux syscalls Python's standard library lacks, via ctypes."""

from __future__ import annotations

import ctypes
import os

PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ret


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
           "prctl(PR_SET_NO_NEW_PRIVS)")


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace ``fd`` refers to."""
    _check(_libc.setns(fd, nstype), "setns")


def proc_status() -> dict[str, str]:
    """The fields of /proc/self/status, for reporting the sandbox state."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out
