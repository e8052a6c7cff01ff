"""Run one command as root inside a qemu guest on a Debian kernel.

The guest sees the host's / read-only over 9p with a tmpfs overlay on top
(writes vanish), runs the command in the caller's cwd and environment,
and its stdout/stderr come back through two virtio-serial ports that qemu
writes into FIFOs here.  The exit code is the command's own; 124 means
the run timed out, 125 that the harness or the boot failed.

Design, measurements and the numbered pitfalls this file avoids:
docs/vm-harness.md in this repository.
Stdlib only: runs with /usr/bin/python3 before any venv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vmimage

EXIT_TIMEOUT = 124
EXIT_HARNESS = 125

STAGE2 = vmimage.TOOLS / "vm" / "stage2"
KERNEL_ARGS = (
    "console=ttyS0 loglevel=4 panic=-1 rdinit=/init mitigations=off "
    "tsc=reliable 8250.nr_uarts=1 random.trust_cpu=on"
)

# Login-, terminal- and shell-specific variables are not the caller's
# environment in any useful sense; bash refuses to set some of them.
ENV_DROP = frozenset(
    "PWD OLDPWD SHLVL _ HOSTNAME TERM TERMCAP DISPLAY STY WINDOW PPID UID "
    "EUID GROUPS BASHOPTS SHELLOPTS INVOCATION_ID JOURNAL_STREAM".split()
)
ENV_DROP_PREFIXES = ("SSH_", "TMUX", "BASH_", "XDG_", "DBUS_", "PYENV")
ENV_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\Z")


def log(msg: str) -> None:
    print(f"vm-run: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------- options


@dataclasses.dataclass
class Options:
    kernel: str
    smp: int
    mem: int
    timeout: float
    boot_timeout: float
    boot_retries: int
    rw: list[Path]
    console: Path | None
    accel: str
    append: str
    keep: bool
    verbose: bool
    command: list[str]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="vm-run",
        usage="vm-run [OPTIONS] -- CMD [ARGS...]  |  vm-run [OPTIONS] "
        "'SHELL COMMAND'",
        description="Boot a Debian kernel under qemu and run CMD as root "
        "in the guest, in this cwd and environment.  Exit status: CMD's, "
        "124 on timeout, 125 on a boot or harness failure.",
    )
    ap.add_argument(
        "--kernel",
        default="6.12",
        help="kernel series or version (6.12, 7, or a kver)",
    )
    ap.add_argument("--smp", type=int, default=1, help="vCPUs (default 1)")
    ap.add_argument("--mem", type=int, default=2048, help="MiB (2048)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds CMD may run, 0 = no limit (3600)",
    )
    ap.add_argument(
        "--boot-timeout",
        type=float,
        default=90,
        help="seconds until CMD must have started (90)",
    )
    ap.add_argument(
        "--boot-retries",
        type=int,
        default=2,
        help="boots to retry if CMD never started (2)",
    )
    ap.add_argument(
        "--rw",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="mount DIR read-write in the guest",
    )
    ap.add_argument(
        "--console",
        type=Path,
        metavar="FILE",
        help="save the guest console log to FILE",
    )
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    ap.add_argument("--append", default="", help="extra kernel arguments")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the run directory (control share, logs)",
    )
    ap.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="report boot progress and timings on stderr",
    )
    ap.add_argument(
        "--list",
        action="store_true",
        help="list the prepared kernels and exit",
    )
    ap.add_argument(
        "--which",
        action="store_true",
        help="print the kver --kernel selects and exit",
    )
    ap.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    # Everything after "--" is the command, even if it looks like options.
    if "--" in argv:
        cut = argv.index("--")
        args = ap.parse_args(argv[:cut])
        args.command = argv[cut + 1 :]
    else:
        args = ap.parse_args(argv)
    return args


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        kernel=args.kernel,
        smp=args.smp,
        mem=args.mem,
        timeout=args.timeout,
        boot_timeout=args.boot_timeout,
        boot_retries=args.boot_retries,
        rw=args.rw,
        console=args.console,
        accel=args.accel,
        append=args.append,
        keep=args.keep,
        verbose=args.verbose,
        command=args.command,
    )


# ------------------------------------------------------- control share


def command_script(command: list[str]) -> str:
    """One argument is a shell command line; several are an argv."""
    if len(command) == 1:
        return command[0] + "\n"
    return "exec " + shlex.join(command) + "\n"


def guest_path(path: str) -> str:
    """PATH without pyenv shims: bash scripts cost ~4 s each under TCG
    (pitfall 16); modprobe and friends need the sbin directories."""
    dirs = [d for d in path.split(":") if d and not d.endswith("/shims")]
    for d in ("/usr/sbin", "/sbin"):
        if d not in dirs:
            dirs.append(d)
    return ":".join(dirs)


def shell_quote(value: bytes) -> bytes:
    return b"'" + value.replace(b"'", b"'\\''") + b"'"


def keep_env(name: bytes) -> bool:
    text = name.decode("ascii", "replace")
    return (
        bool(ENV_NAME.match(name))
        and text not in ENV_DROP
        and not text.startswith(ENV_DROP_PREFIXES)
    )


def env_script(kver: str) -> bytes:
    """`export NAME='value'` lines for the guest, binary-safe."""
    env = {k: v for k, v in os.environb.items() if keep_env(k)}
    env[b"PATH"] = guest_path(os.environ.get("PATH", "")).encode()
    env[b"TERM"] = b"dumb"
    env[b"TLSHD_IN_VM"] = b"1"
    env[b"TLSHD_VM_KERNEL"] = kver.encode()
    return b"".join(
        b"export " + name + b"=" + shell_quote(value) + b"\n"
        for name, value in sorted(env.items())
    )


def rw_shares(dirs: list[Path]) -> list[tuple[str, Path]]:
    shares = []
    for i, d in enumerate(dirs):
        real = d.resolve()
        if not real.is_dir():
            raise ValueError(f"--rw {d}: not a directory")
        if "\n" in str(real):
            raise ValueError(f"--rw {d}: a newline in the path")
        shares.append((f"rw{i}", real))
    return shares


def write_control(
    run: Path,
    opts: Options,
    kernel: vmimage.Kernel,
    shares: list[tuple[str, Path]],
) -> None:
    """The files stage 1 and stage 2 read from the control share."""
    cwd = os.getcwd()
    (run / "cmd").write_text(command_script(opts.command))
    (run / "env").write_bytes(env_script(kernel.kver))
    (run / "cwd").write_text(("/" if "\n" in cwd else cwd) + "\n")
    (run / "kmoddir").write_text(f"{kernel.moddir}\n")
    (run / "shares").write_text(
        "".join(f"{tag} {path}\n" for tag, path in shares)
    )
    shutil.copy(STAGE2, run / "stage2")


# ----------------------------------------------------------------- qemu


def use_kvm(accel: str) -> bool:
    """KVM only with real VT-x/SVM: /dev/kvm on the dev machines is
    kvm_pvm, which cannot run a stock kernel (pitfall 1)."""
    if accel != "auto":
        return accel == "kvm"
    hw = any(
        Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd")
    )
    return hw and os.access("/dev/kvm", os.R_OK | os.W_OK)


def qarg(path: Path) -> str:
    """A path inside a qemu -fsdev/-chardev option: commas are doubled."""
    return str(path).replace(",", ",,")


def qemu_command(
    opts: Options,
    kernel: vmimage.Kernel,
    initrd: Path,
    run: Path,
    shares: list[tuple[str, Path]],
) -> list[str]:
    if use_kvm(opts.accel):
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]
    cmd = [
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-machine",
        "q35",
        "-m",
        str(opts.mem),
        "-smp",
        str(opts.smp),
        *accel,
        "-kernel",
        str(kernel.image),
        "-initrd",
        str(initrd),
        "-append",
        f"{KERNEL_ARGS} {opts.append}".strip(),
        "-fsdev",
        "local,id=fsroot,path=/,security_model=none,"
        "readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot",
        "-fsdev",
        f"local,id=fsctl,path={qarg(run)},security_model=none",
        "-device",
        "virtio-9p-pci,fsdev=fsctl,mount_tag=vmctl",
    ]
    for tag, path in shares:
        cmd += [
            "-fsdev",
            f"local,id=fs{tag},path={qarg(path)},security_model=none,"
            "multidevs=remap",
            "-device",
            f"virtio-9p-pci,fsdev=fs{tag},mount_tag={tag}",
        ]
    cmd += [
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"file,id=cout,path={qarg(run / 'out.fifo')}",
        "-device",
        "virtserialport,chardev=cout,name=vm.stdout",
        "-chardev",
        f"file,id=cerr,path={qarg(run / 'err.fifo')}",
        "-device",
        "virtserialport,chardev=cerr,name=vm.stderr",
        "-device",
        "virtio-rng-pci",
    ]
    return cmd


def die_with_parent() -> None:
    """In the qemu child: get SIGKILL if vm-run itself dies, so that no
    qemu outlives its harness."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def stop_qemu(proc: subprocess.Popen[bytes]) -> None:
    """Stop our own qemu, by its pid only."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------- output


class Relay:
    """Copies what qemu writes into a FIFO to one of our output fds.

    The FIFO is opened O_RDWR: our own writer reference means qemu's open
    never blocks and reads never hit EOF or POLLHUP, even when qemu dies
    early or between boot attempts (pitfall 4).  Binary-safe.
    """

    def __init__(self, path: Path, dest: int) -> None:
        os.mkfifo(path, 0o600)
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.dest = dest
        self.broken = False

    def pump(self) -> None:
        """Copy whatever is buffered in the FIFO now."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                return
            self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self.dest, view) :]
            except BlockingIOError:
                select.select([], [self.dest], [])
            except BrokenPipeError:
                self.broken = True  # reader went away: keep draining

    def close(self) -> None:
        os.close(self.fd)


# ----------------------------------------------------------------- boot


@dataclasses.dataclass
class Attempt:
    number: int
    console: Path
    qemu_log: Path
    result: str = ""  # "exited", "boot-timeout" or "timeout"
    boot_seconds: float | None = None


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def watch(
    proc: subprocess.Popen[bytes],
    attempt: Attempt,
    run: Path,
    relays: list[Relay],
    opts: Options,
) -> None:
    """Relay output until qemu exits, the boot watchdog fires (command
    not started in time) or the command's timeout expires."""
    poller = select.poll()
    by_fd = {r.fd: r for r in relays}
    for r in relays:
        poller.register(r.fd, select.POLLIN)
    t0 = time.monotonic()
    started_at: float | None = None
    while True:
        for fd, _ in poller.poll(50):
            by_fd[fd].pump()
        now = time.monotonic()
        if started_at is None and (run / "started").exists():
            started_at = now
            attempt.boot_seconds = now - t0
            if opts.verbose:
                log(
                    f"attempt {attempt.number}: command started after "
                    f"{now - t0:.2f} s"
                )
        if proc.poll() is not None:
            attempt.result = "exited"
            break
        if started_at is None and now - t0 > opts.boot_timeout:
            attempt.result = "boot-timeout"
            break
        if (
            started_at is not None
            and opts.timeout > 0
            and now - started_at > opts.timeout
        ):
            attempt.result = "timeout"
            break
    stop_qemu(proc)
    for r in relays:
        r.pump()


def boot(
    cmd: list[str],
    attempt: Attempt,
    run: Path,
    relays: list[Relay],
    opts: Options,
) -> None:
    with open(attempt.qemu_log, "wb") as qlog:
        # Own session: a terminal's ^C reaches only vm-run, which then
        # stops qemu itself.
        proc = subprocess.Popen(
            [*cmd, "-serial", f"file:{attempt.console}"],
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Safe in preexec_fn: vm-run runs no threads.
            preexec_fn=die_with_parent,
        )
    try:
        watch(proc, attempt, run, relays, opts)
    finally:
        stop_qemu(proc)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(none)"
    return "\n".join(text.splitlines()[-lines:])


def report_failure(what: str, attempt: Attempt) -> None:
    log(what)
    log(f"qemu log:\n{tail(attempt.qemu_log, 20)}")
    log(f"console tail:\n{tail(attempt.console)}")


def run_attempts(
    opts: Options, cmd: list[str], run: Path, relays: list[Relay]
) -> tuple[int, list[Attempt]]:
    """Boot until the command has run; retry only boots in which it never
    started (TCG boot flakes, pitfalls 20 and 21), never a started one."""
    attempts: list[Attempt] = []
    for n in range(1, opts.boot_retries + 2):
        attempt = Attempt(n, run / f"console-{n}.log", run / f"qemu-{n}.log")
        attempts.append(attempt)
        t0 = time.monotonic()
        boot(cmd, attempt, run, relays, opts)
        if opts.verbose:
            log(
                f"attempt {n}: {attempt.result} after "
                f"{time.monotonic() - t0:.2f} s"
            )
        if (run / "rc").exists():
            return int((run / "rc").read_text().strip() or 255), attempts
        if attempt.result == "timeout":
            log(f"timeout: the command ran longer than {opts.timeout:g} s")
            log(f"console tail:\n{tail(attempt.console)}")
            return EXIT_TIMEOUT, attempts
        if (run / "started").exists():
            report_failure("the guest died while the command ran", attempt)
            return EXIT_HARNESS, attempts
        why = (
            "boot watchdog fired"
            if attempt.result == "boot-timeout"
            else "qemu exited"
        )
        if n <= opts.boot_retries:
            log(f"boot attempt {n} failed ({why}); retrying")
            continue
        report_failure(f"boot failed {n} times ({why})", attempt)
    return EXIT_HARNESS, attempts


def save_console(dest: Path, attempts: list[Attempt]) -> None:
    with open(dest, "w") as out:
        for a in attempts:
            if len(attempts) > 1:
                out.write(f"=== vm-run boot attempt {a.number} ===\n")
            with contextlib.suppress(FileNotFoundError):
                out.write(a.console.read_text(errors="replace"))


# ----------------------------------------------------------------- main


def run_vm(opts: Options) -> int:
    kernel = vmimage.select_kernel(opts.kernel)
    initrd, rebuilt = vmimage.ensure_initramfs(kernel)
    if rebuilt and opts.verbose:
        log(f"rebuilt {initrd}")
    shares = rw_shares(opts.rw)
    run = Path(tempfile.mkdtemp(prefix="tlshd-vm-"))
    relays: list[Relay] = []
    attempts: list[Attempt] = []
    try:
        write_control(run, opts, kernel, shares)
        relays = [Relay(run / "out.fifo", 1), Relay(run / "err.fifo", 2)]
        cmd = qemu_command(opts, kernel, initrd, run, shares)
        if opts.verbose:
            log(
                f"kernel {kernel.kver} ({kernel.boot}), "
                f"{'kvm' if use_kvm(opts.accel) else 'tcg'}, "
                f"{opts.smp} vCPU, {opts.mem} MiB, run dir {run}"
            )
        rc, attempts = run_attempts(opts, cmd, run, relays)
        return rc
    finally:
        for r in relays:
            r.close()
        if opts.console and attempts:
            save_console(opts.console, attempts)
        if opts.keep:
            log(f"run directory kept: {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.list:
            for k in vmimage.kernels():
                print(k.kver, k.boot, k.tree)
            return 0
        if args.which:
            print(vmimage.select_kernel(args.kernel).kver)
            return 0
        if not args.command:
            log("no command given (vm-run -- CMD [ARGS...])")
            return EXIT_HARNESS
        if shutil.which("qemu-system-x86_64") is None:
            log("qemu-system-x86_64 not found: run tools/setup")
            return EXIT_HARNESS
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, on_signal)
        return run_vm(options_from(args))
    except (LookupError, ValueError) as e:
        log(str(e))
        return EXIT_HARNESS
    except Interrupted as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
