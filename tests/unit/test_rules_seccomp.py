"""The seccomp compiler's rules, stated against the kernel's ABI.

test_sandbox_bpf.py runs the policy through an interpreter that takes
its opcodes from the module, so a wrong opcode or action constant would
be read back the same way it was written.  Here the numbers are the
kernel's (<linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>), written
out, and the interpreter knows only those.
"""

from __future__ import annotations

import dataclasses
import errno
import struct

import pytest

from tlshd.shared import seccomp
from tlshd.shared.seccomp import ARCHES, Eq, NoBits, Rule

X86 = ARCHES["x86_64"]
ARM = ARCHES["aarch64"]

# The kernel's values, not the module's.
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
SOCK_FILTER = struct.Struct("=HBBI")
SECCOMP_DATA = struct.Struct("=iIQ6Q")


def run(program: bytes, arch: int, nr: int, *args: int) -> int:
    """Evaluate ``program`` on a syscall, knowing the ABI's opcodes only."""
    data = SECCOMP_DATA.pack(nr, arch, 0, *args, *[0] * (6 - len(args)))
    insns = list(SOCK_FILTER.iter_unpack(program))
    pc, acc = 0, 0
    for _ in insns:
        code, jt, jf, k = insns[pc]
        if code == LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == JSET_K:
            pc += 1 + (jt if acc & k else jf)
        elif code == RET_K:
            return int(k)
        else:
            raise AssertionError("not a classic BPF opcode: %#x" % code)
    raise AssertionError("program ran off its end")


def test_action_constants_are_the_kernels() -> None:
    assert seccomp.SECCOMP_RET_KILL_PROCESS == RET_KILL_PROCESS
    assert seccomp.SECCOMP_RET_ALLOW == RET_ALLOW
    assert seccomp.SECCOMP_RET_LOG == RET_LOG
    assert seccomp.errno_action(errno.EPERM) == RET_ERRNO | errno.EPERM
    # Only the low 16 bits are data: a large value cannot change the action.
    assert seccomp.errno_action(0x7FFF0001) == RET_ERRNO | 1


def test_empty_policy_program_word_for_word() -> None:
    """x86_64: wrong arch killed, x32 killed, everything else default."""
    prog = seccomp.compile_filter((), X86)
    assert list(SOCK_FILTER.iter_unpack(prog)) == [
        (LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (RET_K, 0, 0, RET_KILL_PROCESS),
        (LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (JSET_K, 0, 1, 0x40000000),  # __X32_SYSCALL_BIT
        (RET_K, 0, 0, RET_KILL_PROCESS),
        (RET_K, 0, 0, RET_KILL_PROCESS),
    ]
    arm = seccomp.compile_filter((), ARM, default=RET_LOG)
    assert list(SOCK_FILTER.iter_unpack(arm)) == [
        (LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, AUDIT_ARCH_AARCH64),
        (RET_K, 0, 0, RET_KILL_PROCESS), (LD_W_ABS, 0, 0, 0),
        (RET_K, 0, 0, RET_LOG),
    ]


@pytest.mark.parametrize("arch,audit", [(X86, AUDIT_ARCH_X86_64),
                                        (ARM, AUDIT_ARCH_AARCH64)])
def test_rules_through_an_abi_interpreter(arch: seccomp.Arch,
                                          audit: int) -> None:
    einval = RET_ERRNO | errno.EINVAL
    rules = (
        seccomp.allow("read", "r"),
        seccomp.fail("write", errno.EPERM, "w"),
        Rule("ioctl", "i", when=((Eq(0, 1), Eq(5, 7)), (NoBits(2, 0x4),)),
             otherwise=einval),
        seccomp.allow_args("fcntl", "f", 1, (3, 4)),
    )
    prog = seccomp.compile_filter(rules, arch, default=RET_LOG)
    nr = arch.syscalls
    assert run(prog, audit, nr["read"]) == RET_ALLOW
    assert run(prog, audit, nr["write"]) == RET_ERRNO | errno.EPERM
    # The last argument (index 5) is read from its own slot.
    assert run(prog, audit, nr["ioctl"], 1, 0, 4, 0, 0, 7) == RET_ALLOW
    assert run(prog, audit, nr["ioctl"], 1, 0, 4, 0, 7, 0) == einval
    assert run(prog, audit, nr["ioctl"], 1, 0, 3, 0, 0, 0) == RET_ALLOW
    assert run(prog, audit, nr["fcntl"], 9, 4) == RET_ALLOW
    assert run(prog, audit, nr["fcntl"], 9, 5) == RET_LOG  # the default
    assert run(prog, audit, nr["getpid"]) == RET_LOG
    assert run(prog, audit ^ 1, nr["read"]) == RET_KILL_PROCESS


def test_argument_index_bounds() -> None:
    for index in (-1, 6):
        with pytest.raises(ValueError, match="argument index"):
            seccomp.compile_filter(
                (seccomp.allow_if("ioctl", "i", (Eq(index, 0),)),), X86)


def test_program_length_and_jump_limits() -> None:
    # 256 tests in one conjunction: the first jump would skip 511.
    wide = (seccomp.allow_if("ioctl", "i",
                             tuple(Eq(1, v) for v in range(256))),)
    with pytest.raises(ValueError, match="jump out of range"):
        seccomp.compile_filter(wide, X86)
    # Bodies up to 255 long, in as many rules as it takes: 4096
    # instructions are accepted, 4097 are not.
    names = sorted(X86.syscalls)
    for extra, fits in ((7, True), (8, False)):
        rules = [seccomp.allow_args(names[i], "n", 1, tuple(range(84)))
                 for i in range(16)]  # 16 * (1 + 3 * 84 + 1)
        rules.append(seccomp.allow_args(names[16], "n", 1,
                                        tuple(range(extra))))
        if fits:
            rules.append(seccomp.allow(names[17], "n"))
        if fits:
            prog = seccomp.compile_filter(tuple(rules), X86)
            assert len(prog) == 4096 * SOCK_FILTER.size
        else:
            with pytest.raises(ValueError, match="too long"):
                seccomp.compile_filter(tuple(rules), X86)

def test_native_arch_needs_a_table_and_little_endian(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seccomp.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(seccomp.sys, "byteorder", "little")
    assert seccomp.native_arch() is X86
    monkeypatch.setattr(seccomp.platform, "machine", lambda: "aarch64")
    assert seccomp.native_arch() is ARM
    monkeypatch.setattr(seccomp.sys, "byteorder", "big")
    with pytest.raises(seccomp.UnsupportedArch, match="big endian"):
        seccomp.native_arch()


def test_policy_parts_are_immutable() -> None:
    """A policy is module-level data shared by every worker start."""
    for part in (Eq(0, 1), NoBits(0, 1), seccomp.allow("read", "r")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, "index", 2)
