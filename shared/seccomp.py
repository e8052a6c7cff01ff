"""Seccomp allow-lists as hand-built classic BPF (no libseccomp).

A policy is a tuple of :class:`Rule`: a syscall by name, the action taken
when the rule's argument tests hold (allow, or fail with an errno), and
the action when they do not.  :func:`compile_filter` turns a policy into
the ``struct sock_filter`` array the kernel takes; installing it is
``tlshd.shared.linux.seccomp_set_mode_filter``.

Shape of the program, in order:

1. The architecture in ``seccomp_data.arch`` must be the one the policy
   was compiled for, or the process is killed: the same number means a
   different syscall under another ABI (i386 through ``int 0x80`` on
   x86_64).  On x86_64, x32 syscalls (bit 30 set) are killed too.
2. One ``JEQ`` per rule on the syscall number.  A rule without tests
   returns its action at once; a rule with tests checks arguments, each
   a disjunction of conjunctions, and returns either action.
3. Anything else gets the default action (kill the process; or, for
   finding missing syscalls during development, SECCOMP_RET_LOG).

Argument tests look at the low 32 bits of an argument only.  That is
exact for the ``int`` arguments tested here (socket levels, option names,
keyctl and fcntl commands, ioctl requests), which the kernel truncates
itself, and enough for flag bits below bit 32 (PROT_EXEC).

Syscall numbers come from a table per architecture (x86_64 and aarch64,
checked against the kernel headers by the tests); a machine with neither
raises :class:`UnsupportedArch` before anything is changed.
"""

from __future__ import annotations

import platform
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass

# <linux/seccomp.h>
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF

# <linux/audit.h>
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
# <asm/unistd.h> (x86_64): x32 ABI syscalls have this bit set.
X32_SYSCALL_BIT = 0x40000000

# <linux/filter.h>: the only instructions used.
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
BPF_MAXINSNS = 4096
INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer;
# u64 args[6].
DATA_NR = 0
DATA_ARCH = 4
DATA_ARGS = 16

# Syscall numbers: arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h (aarch64).  Only the names policies
# use; aarch64 has no open, poll, select or time (libc uses the *at,
# ppoll, pselect6 and clock_gettime forms there).
SYSCALLS_X86_64: Mapping[str, int] = {
    "read": 0, "write": 1, "open": 2, "close": 3, "poll": 7, "mmap": 9,
    "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13,
    "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16, "pread64": 17,
    "select": 23, "sched_yield": 24, "mremap": 25, "madvise": 28,
    "nanosleep": 35, "getpid": 39, "socket": 41, "connect": 42,
    "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47,
    "bind": 49, "getsockname": 51, "getpeername": 52, "socketpair": 53,
    "setsockopt": 54, "getsockopt": 55, "clone": 56, "fork": 57,
    "vfork": 58, "execve": 59, "exit": 60, "kill": 62, "uname": 63,
    "fcntl": 72, "gettimeofday": 96, "ptrace": 101, "getuid": 102,
    "getgid": 104, "setuid": 105, "setgid": 106, "geteuid": 107,
    "getegid": 108, "setresuid": 117, "setresgid": 119, "gettid": 186,
    "time": 201, "futex": 202, "restart_syscall": 219,
    "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230,
    "exit_group": 231, "tgkill": 234, "add_key": 248, "request_key": 249,
    "keyctl": 250,
    "openat": 257, "unshare": 272, "pselect6": 270, "ppoll": 271,
    "setns": 308, "seccomp": 317, "getrandom": 318, "bpf": 321,
    "execveat": 322, "clone3": 435,
}
SYSCALLS_AARCH64: Mapping[str, int] = {
    "fcntl": 25, "ioctl": 29, "openat": 56, "close": 57, "read": 63,
    "write": 64, "pread64": 67, "pselect6": 72, "ppoll": 73,
    "exit": 93, "exit_group": 94, "unshare": 97, "futex": 98,
    "nanosleep": 101, "clock_gettime": 113, "clock_getres": 114,
    "clock_nanosleep": 115, "ptrace": 117, "sched_yield": 124,
    "kill": 129, "tgkill": 131, "restart_syscall": 128,
    "rt_sigaction": 134, "rt_sigprocmask": 135, "rt_sigreturn": 139,
    "setresuid": 147, "setresgid": 149, "setgid": 144, "setuid": 146,
    "uname": 160, "gettimeofday": 169, "getpid": 172, "getuid": 174,
    "geteuid": 175, "getgid": 176, "getegid": 177, "gettid": 178,
    "socket": 198, "socketpair": 199, "bind": 200, "connect": 203,
    "getsockname": 204, "getpeername": 205, "sendto": 206,
    "recvfrom": 207, "setsockopt": 208, "getsockopt": 209,
    "sendmsg": 211, "recvmsg": 212, "brk": 214, "munmap": 215,
    "mremap": 216, "add_key": 217, "request_key": 218, "keyctl": 219,
    "clone": 220,
    "execve": 221, "mmap": 222, "mprotect": 226, "madvise": 233,
    "setns": 268, "seccomp": 277, "getrandom": 278, "bpf": 280,
    "execveat": 281, "clone3": 435,
}


class UnsupportedArch(RuntimeError):
    """No syscall table for this machine: refuse rather than guess."""


@dataclass(frozen=True)
class Arch:
    name: str
    audit: int
    syscalls: Mapping[str, int]
    reject_x32: bool = False


ARCHES: Mapping[str, Arch] = {
    "x86_64": Arch("x86_64", AUDIT_ARCH_X86_64, SYSCALLS_X86_64, True),
    "aarch64": Arch("aarch64", AUDIT_ARCH_AARCH64, SYSCALLS_AARCH64),
}


def native_arch() -> Arch:
    """The table for the running machine, or UnsupportedArch."""
    machine = platform.machine()
    arch = ARCHES.get(machine)
    if arch is None or sys.byteorder != "little":
        raise UnsupportedArch(
            "no seccomp syscall table for %s (%s endian); supported: %s"
            % (machine, sys.byteorder, ", ".join(ARCHES)))
    return arch


def errno_action(err: int) -> int:
    """The action that fails a syscall with ``err`` instead of running it."""
    return SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)


@dataclass(frozen=True)
class Eq:
    """Argument ``index`` (low 32 bits) equals ``value``."""

    index: int
    value: int


@dataclass(frozen=True)
class NoBits:
    """Argument ``index`` has none of the bits in ``mask`` set."""

    index: int
    mask: int


Test = Eq | NoBits


@dataclass(frozen=True)
class Rule:
    """What the filter does with one syscall.

    ``when`` is a disjunction of conjunctions of argument tests; empty
    means "always".  If it holds the filter returns ``action``, otherwise
    ``otherwise`` (None: the policy's default action).  ``why`` is the
    reason the rule exists, for people reading the policy.
    """

    syscall: str
    why: str
    action: int = SECCOMP_RET_ALLOW
    when: tuple[tuple[Test, ...], ...] = ()
    otherwise: int | None = None


def allow(syscall: str, why: str) -> Rule:
    return Rule(syscall, why)


def allow_if(syscall: str, why: str, *when: tuple[Test, ...],
             otherwise: int | None = None) -> Rule:
    return Rule(syscall, why, SECCOMP_RET_ALLOW, tuple(when), otherwise)


def allow_args(syscall: str, why: str, index: int, values: tuple[int, ...],
               otherwise: int | None = None) -> Rule:
    """Allow ``syscall`` when argument ``index`` is one of ``values``."""
    return allow_if(syscall, why, *((Eq(index, v),) for v in values),
                    otherwise=otherwise)


def fail(syscall: str, err: int, why: str) -> Rule:
    """Fail ``syscall`` with ``err`` without running it."""
    return Rule(syscall, why, errno_action(err))


def _stmt(code: int, k: int) -> bytes:
    return INSN.pack(code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    if not (0 <= jt <= 255 and 0 <= jf <= 255):
        raise ValueError("BPF jump out of range")
    return INSN.pack(code, jt, jf, k)


def _arg_low(index: int) -> int:
    if not 0 <= index < 6:
        raise ValueError("syscall argument index %d" % index)
    return DATA_ARGS + 8 * index  # little endian: the low word first


def _conjunction(tests: tuple[Test, ...], action: int) -> list[bytes]:
    """Return ``action`` if every test holds; else fall off the end."""
    size = 2 * len(tests) + 1
    out: list[bytes] = []
    for i, test in enumerate(tests):
        out.append(_stmt(BPF_LD_W_ABS, _arg_low(test.index)))
        rest = size - 2 * (i + 1)  # instructions after this jump
        if isinstance(test, Eq):
            out.append(_jump(BPF_JEQ_K, test.value, 0, rest))
        else:
            out.append(_jump(BPF_JSET_K, test.mask, rest, 0))
    out.append(_stmt(BPF_RET_K, action))
    return out


def _rule_body(rule: Rule, default: int) -> list[bytes]:
    if not rule.when:
        return [_stmt(BPF_RET_K, rule.action)]
    body: list[bytes] = []
    for tests in rule.when:
        body += _conjunction(tests, rule.action)
    otherwise = default if rule.otherwise is None else rule.otherwise
    body.append(_stmt(BPF_RET_K, otherwise))
    return body


def compile_filter(rules: tuple[Rule, ...], arch: Arch,
                   default: int = SECCOMP_RET_KILL_PROCESS) -> bytes:
    """Build the BPF program for ``rules`` on ``arch``.

    Rules naming a syscall ``arch`` does not have are skipped (aarch64
    has no ``poll``); a name no architecture knows is a ValueError, as
    is a syscall with two rules.
    """
    prog = [
        _stmt(BPF_LD_W_ABS, DATA_ARCH),
        _jump(BPF_JEQ_K, arch.audit, 1, 0),
        _stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        _stmt(BPF_LD_W_ABS, DATA_NR),
    ]
    if arch.reject_x32:
        prog += [_jump(BPF_JSET_K, X32_SYSCALL_BIT, 0, 1),
                 _stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS)]
    seen: set[str] = set()
    for rule in rules:
        if not any(rule.syscall in a.syscalls for a in ARCHES.values()):
            raise ValueError("unknown syscall %r" % rule.syscall)
        if rule.syscall in seen:
            raise ValueError("two rules for %r" % rule.syscall)
        seen.add(rule.syscall)
        nr = arch.syscalls.get(rule.syscall)
        if nr is None:
            continue
        body = _rule_body(rule, default)
        # The body clobbers the accumulator but always ends in a return.
        prog.append(_jump(BPF_JEQ_K, nr, 0, len(body)))
        prog += body
    prog.append(_stmt(BPF_RET_K, default))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError("BPF program too long")
    return b"".join(prog)
