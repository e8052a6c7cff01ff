"""The Linux syscalls Python's standard library lacks, via ctypes, and the
process limits the supervisor needs."""

from __future__ import annotations

import ctypes
import os
import resource

# <linux/prctl.h>
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
CLONE_NEWNET = 0x40000000
# <malloc.h>
M_ARENA_MAX = -8

# seccomp(2) has no glibc wrapper; its number per architecture.
_NR_SECCOMP = {"x86_64": 317, "aarch64": 277}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ret


def _prctl(option: int, arg: int, what: str) -> int:
    return _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg),
                              ctypes.c_ulong(0), ctypes.c_ulong(0),
                              ctypes.c_ulong(0)), what)


PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to us instead of init."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, "prctl(PR_SET_CHILD_SUBREAPER)")


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def get_no_new_privs() -> bool:
    return _prctl(PR_GET_NO_NEW_PRIVS, 0, "prctl(PR_GET_NO_NEW_PRIVS)") == 1


def set_dumpable(dumpable: bool) -> None:
    """Allow or forbid core dumps and ptrace/proc access by our own uid."""
    _prctl(PR_SET_DUMPABLE, int(dumpable), "prctl(PR_SET_DUMPABLE)")


def get_dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE, 0, "prctl(PR_GET_DUMPABLE)") != 0


def set_malloc_arena_max(arenas: int) -> bool:
    """Fix glibc's malloc arena limit now (``mallopt(M_ARENA_MAX)``).

    Otherwise glibc works the limit out when it first needs a ninth
    arena, by reading /sys/devices/system/cpu/online: an open that a
    sandbox forbids.  Returns False where there is no glibc mallopt.
    """
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(arenas)))


class _SockFprog(ctypes.Structure):
    # struct sock_fprog: the program length and a pointer to its
    # instructions (struct sock_filter, 8 bytes each).
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def seccomp_set_mode_filter(program: bytes, flags: int) -> None:
    """Install a classic BPF seccomp filter (``seccomp(2)``).

    ``program`` is the packed ``struct sock_filter`` array.  With
    SECCOMP_FILTER_FLAG_TSYNC the kernel installs it on every thread of
    the process or on none; a positive return names the thread that could
    not be synchronised.
    """
    # os.uname() rather than platform.machine(): the same field, and the
    # supervisor does not pay for importing platform at start-up.
    machine = os.uname().machine
    nr = _NR_SECCOMP.get(machine)
    if nr is None:
        raise OSError(38, "seccomp: unsupported architecture %s" % machine)
    if len(program) % 8 or not 0 < len(program) // 8 <= 4096:
        raise ValueError("not a BPF program of 1 to 4096 instructions")
    insns = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(insns))
    ret = _check(int(_libc.syscall(
        ctypes.c_long(nr), ctypes.c_long(1),  # SECCOMP_SET_MODE_FILTER
        ctypes.c_long(flags), ctypes.byref(fprog))), "seccomp")
    if ret > 0:
        raise OSError(0, "seccomp: thread %d could not be synchronised"
                      % ret)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace ``fd`` refers to."""
    _check(_libc.setns(fd, nstype), "setns")


def proc_status() -> dict[str, str]:
    """The fields of /proc/self/status, for reporting the sandbox state."""
    with open("/proc/self/status") as f:
        return parse_status(f.read())


def parse_status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


class StatusFile:
    """A /proc status file held open, to read again once opening is banned.

    The kernel regenerates the text on every read from offset 0, so the
    fd reports the state at the time of reading.  The caller closes it.
    """

    def __init__(self, path: str = "/proc/self/status") -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> dict[str, str]:
        return parse_status(os.pread(self.fd, 1 << 16, 0).decode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def raise_fd_limit(need: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (or to ``need``
    if there is none): systemd starts services at 1024 of 524288, as
    select() users want, and we use epoll.  Returns the soft limit now.
    (Workers set their own, low, limit: see worker/sandbox.py.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (OSError, ValueError):
            pass
    return soft
