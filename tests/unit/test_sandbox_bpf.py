"""The seccomp compiler and the worker's policy, run through a BPF
interpreter (no kernel involved), and the syscall tables checked against
the kernel headers installed on this machine.
"""

from __future__ import annotations

import errno
import os
import re
import struct

import pytest

from tlshd.shared import keys, seccomp
from tlshd.shared.seccomp import (
    ARCHES,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_LOG,
    Eq,
    NoBits,
    Rule,
)
from tlshd.worker import sandbox

X86 = ARCHES["x86_64"]
ARM = ARCHES["aarch64"]
PID = 4242
KILL = SECCOMP_RET_KILL_PROCESS
ALLOW = SECCOMP_RET_ALLOW
DATA = struct.Struct("=iIQ6Q")  # struct seccomp_data


def run_bpf(program: bytes, arch: int, nr: int, *args: int) -> int:
    """Evaluate a seccomp program the way the kernel would."""
    data = DATA.pack(nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [seccomp.INSN.unpack_from(program, i)
             for i in range(0, len(program), seccomp.INSN.size)]
    pc, acc = 0, 0
    for _ in range(len(insns)):
        code, jt, jf, k = insns[pc]
        if code == seccomp.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == seccomp.BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == seccomp.BPF_JSET_K:
            pc += 1 + (jt if acc & k else jf)
        elif code == seccomp.BPF_RET_K:
            return int(k)
        else:
            raise AssertionError("unexpected BPF opcode %#x" % code)
    raise AssertionError("program ran off its end")


def worker(arch: seccomp.Arch = X86, default: int = KILL) -> bytes:
    return seccomp.compile_filter(sandbox.policy(PID), arch, default)


def call(name: str, *args: int, arch: seccomp.Arch = X86,
         prog: bytes | None = None) -> int:
    prog = worker(arch) if prog is None else prog
    return run_bpf(prog, arch.audit, arch.syscalls[name], *args)


def test_every_rule_allows_or_errors_and_names_a_reason() -> None:
    names = [r.syscall for r in sandbox.policy(PID)]
    assert len(names) == len(set(names))
    for rule in sandbox.policy(PID):
        assert rule.why
        assert rule.syscall in X86.syscalls or rule.syscall in ARM.syscalls


@pytest.mark.parametrize("arch", [X86, ARM], ids=["x86_64", "aarch64"])
def test_plain_allowed_syscalls(arch: seccomp.Arch) -> None:
    prog = worker(arch)
    for rule in sandbox.policy(PID):
        if not rule.when and rule.syscall in arch.syscalls:
            assert call(rule.syscall, arch=arch, prog=prog) == ALLOW, rule


@pytest.mark.parametrize("arch", [X86, ARM], ids=["x86_64", "aarch64"])
@pytest.mark.parametrize("name", [
    "open", "openat", "socket", "socketpair", "connect", "bind", "execve",
    "execveat", "fork", "vfork", "clone", "clone3", "ptrace", "setuid",
    "setgid", "setresuid", "setresgid", "setns", "unshare", "bpf",
    "seccomp", "add_key", "kill",
])
def test_forbidden_syscalls_kill(arch: seccomp.Arch, name: str) -> None:
    if name not in arch.syscalls:
        pytest.skip("%s has no %s" % (arch.name, name))
    assert call(name, arch=arch) == KILL


def test_unlisted_numbers_kill_or_log() -> None:
    prog = worker()
    logged = worker(default=SECCOMP_RET_LOG)
    allowed = {X86.syscalls[r.syscall] for r in sandbox.policy(PID)
               if r.syscall in X86.syscalls}
    for nr in range(0, 460):
        if nr not in allowed:
            assert run_bpf(prog, X86.audit, nr) == KILL, nr
            assert run_bpf(logged, X86.audit, nr) == SECCOMP_RET_LOG, nr


def test_wrong_arch_and_x32_are_killed_even_in_log_mode() -> None:
    logged = worker(default=SECCOMP_RET_LOG)
    read = X86.syscalls["read"]
    assert run_bpf(logged, 0x40000003, read) == KILL  # AUDIT_ARCH_I386
    assert run_bpf(logged, ARM.audit, read) == KILL
    assert run_bpf(logged, X86.audit, read | seccomp.X32_SYSCALL_BIT) == KILL
    assert run_bpf(logged, X86.audit, read) == ALLOW


def test_setsockopt_only_tcp_nodelay_cork_ulp_and_sol_tls() -> None:
    assert call("setsockopt", 3, 6, 1) == ALLOW  # TCP_NODELAY
    assert call("setsockopt", 3, 6, 3) == ALLOW  # TCP_CORK
    assert call("setsockopt", 3, 6, 31) == ALLOW  # TCP_ULP
    assert call("setsockopt", 3, 282, 1) == ALLOW  # TLS_TX
    assert call("setsockopt", 3, 282, 2) == ALLOW  # TLS_RX
    assert call("setsockopt", 3, 1, 2) == KILL  # SO_REUSEADDR
    assert call("setsockopt", 3, 6, 2) == KILL  # TCP_MAXSEG
    assert call("setsockopt", 3, 0, 1) == KILL  # IPPROTO_IP
    # The kernel takes level as an int: the high word does not matter.
    assert call("setsockopt", 3, (7 << 32) | 282, 1) == ALLOW


def test_getsockopt_levels() -> None:
    assert call("getsockopt", 3, 1, 38) == ALLOW  # SO_PROTOCOL
    assert call("getsockopt", 3, 6, 1) == ALLOW
    assert call("getsockopt", 3, 0, 1) == KILL


def test_no_executable_memory() -> None:
    rw, rx = 0x1 | 0x2, 0x1 | 0x4
    assert call("mmap", 0, 4096, rw, 0x22) == ALLOW
    assert call("mmap", 0, 4096, 0, 0x22) == ALLOW  # PROT_NONE
    assert call("mmap", 0, 4096, rx, 0x22) == KILL
    assert call("mprotect", 0x1000, 4096, rw) == ALLOW
    assert call("mprotect", 0x1000, 4096, rw | 0x4) == KILL
    assert call("mmap", 0, 4096, rx, 0x22, arch=ARM) == KILL


def test_ioctl_fcntl_keyctl_tgkill() -> None:
    enotty = seccomp.errno_action(errno.ENOTTY)
    assert call("ioctl", 3, 0x5421) == ALLOW  # FIONBIO
    assert call("ioctl", 3, 0x5401) == enotty  # TCGETS: isatty
    assert call("ioctl", 3, 0x541C) == enotty  # TIOCSTI
    assert call("fcntl", 3, 4) == ALLOW  # F_SETFL
    assert call("fcntl", 3, 0) == KILL  # F_DUPFD
    assert call("fcntl", 3, 7) == KILL  # F_SETLKW
    # No kernel keys at all: the supervisor passes the material.
    for op in (keys.KEYCTL_READ, keys.KEYCTL_SEARCH, keys.KEYCTL_DESCRIBE,
               keys.KEYCTL_JOIN_SESSION_KEYRING, 5):  # 5: SETPERM
        assert call("keyctl", op) == KILL
    assert call("add_key") == KILL
    assert call("request_key") == KILL
    assert call("tgkill", PID, PID, 6) == ALLOW
    assert call("tgkill", PID + 1, PID + 1, 9) == KILL


def test_aarch64_numbers_differ() -> None:
    assert call("ppoll", arch=ARM) == ALLOW
    assert call("read", arch=ARM) == ALLOW
    # x86_64's read (0) is io_setup on aarch64.
    assert run_bpf(worker(ARM), ARM.audit, 0) == KILL


def test_compiler_conjunctions_and_otherwise() -> None:
    rules = (Rule("ioctl", "t", when=((Eq(0, 1), Eq(1, 2)),
                                      (NoBits(2, 0x4),)),
                  otherwise=seccomp.errno_action(errno.EINVAL)),)
    prog = seccomp.compile_filter(rules, X86)
    nr = X86.syscalls["ioctl"]
    assert run_bpf(prog, X86.audit, nr, 1, 2, 4) == ALLOW
    assert run_bpf(prog, X86.audit, nr, 1, 3, 0) == ALLOW
    assert run_bpf(prog, X86.audit, nr, 1, 3, 4) == (
        seccomp.errno_action(errno.EINVAL))
    assert run_bpf(prog, X86.audit, X86.syscalls["read"]) == KILL


def test_compiler_rejects_unknown_and_duplicate_rules() -> None:
    with pytest.raises(ValueError, match="unknown syscall"):
        seccomp.compile_filter((seccomp.allow("nosuchcall", "x"),), X86)
    with pytest.raises(ValueError, match="two rules"):
        seccomp.compile_filter((seccomp.allow("read", "x"),
                                seccomp.allow("read", "y")), X86)


def test_unknown_machine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seccomp.platform, "machine", lambda: "riscv64")
    with pytest.raises(seccomp.UnsupportedArch, match="riscv64"):
        seccomp.native_arch()


def _header_numbers(path: str, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path) as f:
        for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)",
                             f.read()):
            if m.group(1).startswith(prefix):
                out[m.group(1)[len(prefix):]] = int(m.group(2))
            elif not prefix:
                out[m.group(1)] = int(m.group(2))
    return out


@pytest.mark.parametrize("arch,header", [
    (X86, "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    (ARM, "/usr/include/asm-generic/unistd.h"),
], ids=["x86_64", "aarch64"])
def test_tables_match_kernel_headers(arch: seccomp.Arch, header: str) -> None:
    if not os.path.exists(header):
        pytest.skip("%s not installed" % header)
    numbers = _header_numbers(header, "")
    for name, nr in arch.syscalls.items():
        assert numbers.get(name) == nr, name
