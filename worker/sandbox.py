"""Lock the worker down once its credentials are loaded.

The worker parses hostile peer data, so after boot it keeps only what the
request path needs.  :func:`lock_down` runs once, after the configuration,
credentials and every module are loaded and the thread pool is started,
and applies, in this order (OpenSSH's ``privsep_child_demote``), checking
each step and aborting (SystemExit) if one did not take:

1. Become the dedicated user: ``setgroups([])``, ``setresgid``,
   ``setresuid``; then prove root cannot come back (``setuid(0)`` and
   ``setresgid(0, 0, 0)`` must fail) and that every capability set in
   /proc/self/status is empty.  glibc applies these to every thread.
2. rlimits: no new processes or threads (NPROC 0), no file growth
   (FSIZE 0), no core dumps of key material (CORE 0), a small fd table,
   a generous address-space cap; and not dumpable, so other processes of
   the same uid (every namespace's worker shares it) cannot ptrace us or
   read our memory through /proc.
3. no_new_privs.
4. A seccomp allow-list (:func:`policy`), installed on every thread at
   once (SECCOMP_FILTER_FLAG_TSYNC): the pool threads already exist.
5. Read the result back from the kernel for every thread and report it
   (HELLO).

Anything the filter does not allow kills the whole process with SIGSYS:
no files, no new sockets, no exec, no fork or threads, no setuid, ptrace,
namespaces or bpf.  Python must therefore not touch the filesystem
lazily after this point (an import on first use would need openat); the
one lazy reader in the standard library that error paths reach,
linecache (source lines in tracebacks), is switched off here.

Development only: TLSHD_SECCOMP_LOG=1 in the environment makes the
default action SECCOMP_RET_LOG instead of a kill, so a missing syscall
shows up in the kernel log ("audit: type=1326 ... syscall=N") and the
worker carries on.  Never in production.
"""

from __future__ import annotations

import errno
import linecache
import logging
import os
import resource
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from tlshd.shared import linux, protocol, seccomp
from tlshd.shared.seccomp import Eq, NoBits, allow, allow_args, allow_if
from tlshd.shared.uapi import SOL_TLS, TCP_ULP

# glibc malloc arenas for the whole worker.  glibc gives each thread that
# allocates its own (up to 8 per CPU): after a few concurrent handshakes a
# worker kept ~120 KiB of mostly free memory in each of 8 or more arenas
# (docs/benchmarks.md, PSS per active worker).  The threads mostly wait
# for the GIL or the network, so two arenas cost them no measurable time.
MALLOC_ARENAS = 2

log = logging.getLogger(__name__)

SECCOMP_LOG_ENV = "TLSHD_SECCOMP_LOG"

# <linux/tls.h>, <netinet/tcp.h>, <asm-generic/ioctls.h>, <fcntl.h>,
# <sys/mman.h>: kernel names, so one grep covers C and Python.
SOL_SOCKET = socket.SOL_SOCKET
IPPROTO_TCP = socket.IPPROTO_TCP
TCP_NODELAY = 1
TCP_CORK = 3
FIONBIO = 0x5421
F_GETFD, F_SETFD, F_GETFL, F_SETFL = 1, 2, 3, 4
PROT_EXEC = 0x4

# Address space allowed on top of what the worker maps at lock-down:
# headroom, plus one malloc arena (64 MiB of reserve) per thread.
AS_HEADROOM = 1 << 30
AS_PER_THREAD = 64 << 20

_CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapAmb")


def policy(pid: int) -> tuple[seccomp.Rule, ...]:
    """The worker's allow-list; ``pid`` is the process it is built for.

    Found with ``strace -f`` on a worker serving every kind of request
    (see tests/unit/test_sandbox_worker.py); everything else is killed.
    """
    return (
        # The kernel sockets, the channel, and stderr.
        allow("read", "OpenSSL reads handshake records from the socket"),
        allow("write", "OpenSSL writes handshake records; stderr"),
        allow("recvmsg", "channel: requests and their SCM_RIGHTS fds"),
        allow("sendmsg", "channel: answers, HELLO and log records"),
        allow("recvfrom", "socket.recv (recv(2) is recvfrom in the ABI)"),
        allow("sendto", "socket.send (send(2) is sendto in the ABI)"),
        allow("getpeername", "the peer address for log lines"),
        allow("getsockname", "socket.socket(fileno=) asks the family"),
        allow_args("getsockopt", "SO_TYPE, SO_PROTOCOL, SO_ERROR, "
                   "TCP_NODELAY: reading our sockets' options", 1,
                   (SOL_SOCKET, IPPROTO_TCP, SOL_TLS)),
        allow_if("setsockopt", "TCP_NODELAY around the handshake, "
                 "TCP_CORK around each flight, TCP_ULP \"tls\", then "
                 "SOL_TLS TLS_TX/TLS_RX keys",
                 (Eq(1, IPPROTO_TCP), Eq(2, TCP_NODELAY)),
                 (Eq(1, IPPROTO_TCP), Eq(2, TCP_CORK)),
                 (Eq(1, IPPROTO_TCP), Eq(2, TCP_ULP)),
                 (Eq(1, SOL_TLS),)),
        allow_args("ioctl", "FIONBIO: sock.setblocking(); other requests "
                   "(isatty probes) fail with ENOTTY, harmlessly", 1,
                   (FIONBIO,), otherwise=seccomp.errno_action(errno.ENOTTY)),
        allow_args("fcntl", "fd and status flags (os.set_blocking, "
                   "set_inheritable); no F_DUPFD, no locks", 1,
                   (F_GETFD, F_SETFD, F_GETFL, F_SETFL)),
        allow("poll", "a handshake waits for its socket (select.poll)"),
        allow("ppoll", "poll() on aarch64, and glibc's poll fallback"),
        allow("close", "each handshake socket is closed when done"),
        allow("pread64", "re-reading /proc status fds opened before the "
              "sandbox (HELLO)"),
        # Memory: the allocators, never executable.
        allow("brk", "the main heap"),
        allow_if("mmap", "arenas and large blocks, never executable",
                 (NoBits(2, PROT_EXEC),)),
        allow_if("mprotect", "growing a thread's arena, never to "
                 "executable", (NoBits(2, PROT_EXEC),)),
        allow("munmap", "freeing large blocks and arenas"),
        allow("mremap", "realloc of large blocks"),
        allow("madvise", "glibc returning freed memory"),
        # Threads, time, randomness.
        allow("futex", "locks, the job queue, condition variables"),
        allow("sched_yield", "lock back-off in glibc and OpenSSL"),
        allow("clock_gettime", "deadlines and log times, when the vDSO "
              "falls back to the syscall"),
        allow("gettimeofday", "the same, older interface"),
        allow("time", "the same, oldest interface (x86_64)"),
        allow("clock_nanosleep", "time.sleep"),
        allow("nanosleep", "sleeps in C libraries"),
        allow("restart_syscall", "resuming a sleep after a signal"),
        allow("getrandom", "OpenSSL reseeding its DRBGs; os.urandom"),
        # Signals: handlers may run, abort() may signal itself.
        allow("rt_sigreturn", "returning from any signal handler"),
        allow("rt_sigprocmask", "glibc masks signals around some calls"),
        allow("rt_sigaction", "interpreter exit restores SIGINT"),
        allow_args("tgkill", "abort() signals itself, so a crash shows "
                   "as SIGABRT, not SIGSYS; no other process", 0, (pid,)),
        # Identity (cheap, read-only).
        allow("getpid", "every log record carries the pid"),
        allow("gettid", "thread ids (glibc, logging)"),
        allow("getuid", "HELLO"),
        allow("geteuid", "HELLO, and libraries checking for setuid"),
        allow("getgid", "HELLO"),
        allow("getegid", "libraries checking for setgid"),
        allow("uname", "platform.machine(), asked by libraries"),
        # No keyctl, add_key or request_key: a worker reads no kernel keys
        # (the supervisor passes the material), so a namespace's worker
        # cannot reach another's keys whatever their permissions say.
        allow("exit", "a pool thread ends when the channel closes"),
        allow("exit_group", "the worker exits"),
    )


@dataclass
class _Before:
    """What can only be looked at before the lock-down."""

    statuses: dict[int, linux.StatusFile]  # tid -> its status file
    highest_fd: int
    vm_bytes: int

    def close(self) -> None:
        for status in self.statuses.values():
            status.close()


def lock_down(uid: int | None, gid: int | None,
              max_fds: int) -> protocol.Hello:
    """Apply the sandbox to the whole process; return what took effect.

    ``uid``/``gid``: the dedicated user to become (root only); None for
    both keeps the current identity (tests as a normal user).
    ``max_fds``: the fd table size from now on.
    """
    if (uid is None) != (gid is None):
        _abort("a uid needs a gid and the other way round")
    try:
        arch = seccomp.native_arch()
    except seccomp.UnsupportedArch as e:
        _abort(str(e))
    debug = os.environ.get(SECCOMP_LOG_ENV) == "1"
    pid = os.getpid()
    program = seccomp.compile_filter(
        policy(pid), arch,
        seccomp.SECCOMP_RET_LOG if debug else
        seccomp.SECCOMP_RET_KILL_PROCESS)
    _forget_source_files()
    before = _look_before()
    try:
        _apply(uid, gid, max_fds, program, before)
        if debug:
            log.warning("seccomp in LOG mode (%s=1): violations are only "
                        "logged; never use this in production",
                        SECCOMP_LOG_ENV)
        for tid, status in before.statuses.items():
            _check_thread(tid, status.read(), uid, gid)
        return _hello(before.statuses[pid].read())
    finally:
        before.close()


def _apply(uid: int | None, gid: int | None, max_fds: int, program: bytes,
           before: _Before) -> None:
    """Steps 1 to 4, in order; any failure aborts."""
    try:
        if uid is not None and gid is not None:
            drop_privileges(uid, gid, before.statuses[os.getpid()])
        elif os.geteuid() == 0:
            log.warning("No user to drop to: the worker keeps root")
        set_limits(max_fds, before)
        linux.set_no_new_privs()
        if not linux.get_no_new_privs():
            _abort("no_new_privs did not take")
        linux.seccomp_set_mode_filter(
            program, seccomp.SECCOMP_FILTER_FLAG_TSYNC)
    except (OSError, ValueError) as e:
        _abort(str(e))


def drop_privileges(uid: int, gid: int, status: linux.StatusFile) -> None:
    """Become ``uid``/``gid`` for good, with no capabilities left."""
    if uid == 0 or gid == 0:
        _abort("refusing to 'drop' to uid %d gid %d" % (uid, gid))
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        _abort("cannot become uid %d gid %d: %s" % (uid, gid, e))
    if (os.getresuid() != (uid, uid, uid)
            or os.getresgid() != (gid, gid, gid) or os.getgroups()):
        _abort("uid/gid change did not take")
    # As OpenSSH's permanently_set_uid: getting root back must fail.
    for name, regain in (("setuid(0)", _regain_uid),
                         ("setresgid(0, 0, 0)", _regain_gid)):
        try:
            regain()
        except PermissionError:
            continue
        _abort("%s succeeded after dropping privileges" % name)
    fields = status.read()
    held = [f for f in _CAP_FIELDS if int(fields.get(f, "1"), 16)]
    if held:
        _abort("capabilities left after the uid change: %s"
               % ", ".join("%s=%s" % (f, fields[f]) for f in held))


def _regain_uid() -> None:
    os.setuid(0)


def _regain_gid() -> None:
    os.setresgid(0, 0, 0)


def set_limits(max_fds: int, before: _Before) -> None:
    """rlimits and non-dumpable; see the module docstring, step 2."""
    if before.highest_fd >= max_fds:
        _abort("fd %d is open but the fd limit would be %d"
               % (before.highest_fd, max_fds))
    address_space = (before.vm_bytes + AS_HEADROOM
                     + AS_PER_THREAD * len(before.statuses))
    limits = (
        (resource.RLIMIT_NPROC, 0),  # no process or thread, per uid
        (resource.RLIMIT_FSIZE, 0),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, max_fds),
        (resource.RLIMIT_AS, address_space),
    )
    for which, value in limits:
        resource.setrlimit(which, (value, value))
        if resource.getrlimit(which) != (value, value):
            _abort("rlimit %d did not take" % which)
    # Decided now (again: boot set it before the pool started): glibc
    # would otherwise read /sys/devices/system/cpu/online the first time
    # it wants a ninth arena (or retries after a failed allocation),
    # which is a kill.
    linux.set_malloc_arena_max(MALLOC_ARENAS)
    linux.set_dumpable(False)
    if linux.get_dumpable():
        _abort("still dumpable")


def _look_before() -> _Before:
    """Open every thread's status file and note the fd table and size."""
    fds = [int(name) for name in os.listdir("/proc/self/fd")]
    statuses: dict[int, linux.StatusFile] = {}
    try:
        for name in os.listdir("/proc/self/task"):
            statuses[int(name)] = linux.StatusFile(
                "/proc/self/task/%s/status" % name)
        vm_kb = statuses[os.getpid()].read().get("VmSize", "0 kB")
    except BaseException:
        for status in statuses.values():
            status.close()
        raise
    return _Before(statuses, max(fds), int(vm_kb.split()[0]) * 1024)


def _check_thread(tid: int, fields: Mapping[str, str], uid: int | None,
                  gid: int | None) -> None:
    """Abort unless thread ``tid`` is as sandboxed as the process."""
    want = {"NoNewPrivs": "1", "Seccomp": "2"}
    if uid is not None and gid is not None:
        want.update(Uid="\t".join([str(uid)] * 4),
                    Gid="\t".join([str(gid)] * 4), Groups="")
        want.update((f, "0" * 16) for f in _CAP_FIELDS)
    wrong = {k: fields.get(k) for k, v in want.items()
             if fields.get(k) != v}
    if wrong:
        _abort("thread %d is not sandboxed: %r" % (tid, wrong))


def _hello(fields: Mapping[str, str]) -> protocol.Hello:
    return protocol.Hello(
        pid=os.getpid(),
        uid=os.getuid(),
        gid=os.getgid(),
        cap_eff=int(fields.get("CapEff", "0"), 16),
        no_new_privs=int(fields.get("NoNewPrivs", "0")),
        seccomp=int(fields.get("Seccomp", "0")),
    )


def _no_lines(filename: str, module_globals: Any = None) -> list[str]:
    return []


def _no_check(filename: str | None = None) -> None:
    return None


def _no_lazy(filename: str, module_globals: Any) -> bool:
    return False


def _forget_source_files() -> None:
    """Make tracebacks skip source lines instead of opening .py files.

    traceback and warnings read source lines through linecache, which
    stats and opens files on demand: under the filter that would turn
    a logged exception into a dead worker.  Tracebacks keep file, line
    and function names.
    """
    linecache.clearcache()
    linecache.getlines = _no_lines
    linecache.updatecache = _no_lines
    linecache.checkcache = _no_check
    linecache.lazycache = _no_lazy


def _abort(message: str) -> NoReturn:
    log.critical("Sandbox: %s", message)
    raise SystemExit("tlshd worker sandbox: %s" % message)
