#!/usr/bin/env python3
"""How long tlshd takes to start: exec -> READY=1, and a worker's start.

Runs as root inside the VM (it starts tlshd, which joins the handshake
family's group):

    tools/vm-run --kernel 6.12 --smp 2 --timeout 900 -- \\
        .venv/bin/python bench/startup.py [--starts 5]

Each start execs tlshd fresh (``python -m tlshd.supervisor -s``,
loglevel 1, one set of throwaway credentials, only the initial namespace
served) with
$NOTIFY_SOCKET pointing at a datagram socket of ours, as systemd would,
and times (CLOCK_BOOTTIME, seconds):

- ``ready``: exec to the READY=1 datagram (tlshd.service's Type=notify
  readiness: listening in the initial namespace);
- ``ready_cpu``: the supervisor's CPU time (user + system, 10 ms ticks)
  when READY=1 arrived: less sensitive than ``ready`` to other work
  on the host and in the guest, though TCG inflates both;
- ``listening``: exec to the "Listening ... netns init" log line;
- ``worker``: exec to the initial namespace's worker saying HELLO (the
  supervisor's "Worker N for netns init ready" line);
- ``fork_hello``: that worker's process start (the template's fork,
  /proc/PID/stat starttime, 10 ms resolution) to its HELLO: what a
  worker's cold start costs once the template is up;
- ``namespace``, ``credentials``, ``pool``, ``lock-down``: the steps of
  that worker's boot, as it reports them (its "Boot" debug line).

Log lines are timestamped as they arrive on the pipe, so each figure is an
upper bound by the pipe's latency (well under a millisecond).
``--base-python PYTHON`` starts another checkout's tlshd (that venv's
interpreter) before each of ours, for before/after figures from one run;
``--packaged NAME=ROOT`` (repeatable) also starts the tlshd of a .deb
unpacked at ROOT (``dpkg-deb -x``), as its /usr/sbin/tlshd would run:
the package's own environment with its first line's options
(``python3 -IS``), none of the development venv's .pth files.
``floor`` lines: a bare interpreter start (with ``-I``, ``-S``, both)
and importing the supervisor, per interpreter, for reference.
``--trace`` prints the first start's log lines with their arrival
times.  ``--importtime`` runs one more start with
PYTHONPROFILEIMPORTTIME=1 and prints the supervisor's 25 costliest imports
(cumulative).
"""

from __future__ import annotations

import argparse
import os
import platform
import pwd
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The lab package (tests/lab), shared with the kernel tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lab import pki
from lab.shell import REPO

PYTHON = REPO / ".venv" / "bin" / "python"
LISTENING = re.compile(rb"Listening for handshake requests in netns init")
FORKED = re.compile(rb"(?:Forked|Started) worker (\d+) for netns init")
HELLO = re.compile(rb"Worker (\d+) for netns init ready")
# The worker's own account of its boot (tlshd.worker.main.boot, debug).
BOOT = re.compile(rb"Boot [\d.]+ s: namespace ([\d.]+), credentials "
                  rb"([\d.]+), pool ([\d.]+), lock-down ([\d.]+)")
BOOT_STEPS = ("namespace", "credentials", "pool", "lock-down")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (fields 14 and 15)."""
    stat = Path("/proc/%d/stat" % pid).read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def started_at(pid: int) -> float:
    """A process's start, on CLOCK_BOOTTIME (field 22 of stat)."""
    stat = Path("/proc/%d/stat" % pid).read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]) / CLK_TCK


def packaged(root: str) -> list[str]:
    """The command of a .deb unpacked at ``root`` (``dpkg-deb -x``):
    /usr/sbin/tlshd run by the package's own environment with the
    options of its first line (``#!/usr/lib/tlshd/venv/bin/python3
    -IS``), as the kernel would.  The environment's interpreter is a
    relative link to /usr/bin/python3.11: link that below ``root``."""
    link = Path(root, "usr/bin/python3.11")
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/usr/bin/python3.11")
    script = root + "/usr/sbin/tlshd"
    with open(script) as f:
        interpreter, *options = f.readline()[2:].split(maxsplit=1)
    return [root + interpreter, *(o.strip() for o in options), script]


def one_start(command: list[str], conf: Path, timeout: float,
              importtime: bool = False
              ) -> tuple[dict[str, float], bytes, list[str]]:
    """Start tlshd once; return its timings, its log, and its log lines
    each prefixed with when it arrived (seconds after exec)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = "\0tlshd-bench-startup-%d" % os.getpid()
    notify.bind(address)
    env = dict(os.environ, NOTIFY_SOCKET="@" + address[1:])
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    out = bytearray()
    trace: list[str] = []
    times: dict[str, float] = {}
    worker_pid = 0
    start = now()
    proc = subprocess.Popen([*command, "-s", "-c", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    pipe = proc.stdout.fileno()
    try:
        while "worker" not in times or "ready" not in times:
            if now() - start > timeout:
                raise SystemExit("tlshd not ready after %d s:\n%s"
                                 % (timeout, out.decode(errors="replace")))
            readable, _, _ = select.select([pipe, notify], [], [], 1.0)
            t = now() - start
            if notify in readable:
                if notify.recv(4096).split(b"\n")[0] == b"READY=1":
                    times.setdefault("ready", t)
                    times.setdefault("ready_cpu", cpu_seconds(proc.pid))
                    trace.append("%7.2f (READY=1)" % t)
            if pipe in readable:
                data = os.read(pipe, 65536)
                if not data:
                    raise SystemExit("tlshd exited with %s:\n%s" % (
                        proc.wait(), out.decode(errors="replace")))
                out += data
                trace += ["%7.2f %s" % (t, line.decode(errors="replace"))
                          for line in data.splitlines()]
                if LISTENING.search(out):
                    times.setdefault("listening", t)
                m = FORKED.search(out)
                if m and not worker_pid:
                    worker_pid = int(m.group(1))
                    times["fork"] = started_at(worker_pid) - start
                if HELLO.search(out):
                    times.setdefault("worker", t)
        if "fork" in times:
            times["fork_hello"] = times["worker"] - times["fork"]
        boot = BOOT.search(out)
        if boot:
            times.update(zip(BOOT_STEPS, map(float, boot.groups()),
                             strict=True))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out += proc.stdout.read()
        proc.stdout.close()
        notify.close()
    return times, bytes(out), trace


def import_table(log: bytes, limit: int = 25) -> list[str]:
    """The costliest imports (cumulative us) in one PYTHONPROFILEIMPORTTIME
    log; the supervisor's only (its pid's lines come first)."""
    rows = []
    for line in log.decode(errors="replace").splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|", 2)
        if cumulative.strip().isdigit():
            rows.append((int(cumulative), name.rstrip()))
    rows.sort(reverse=True)
    return ["%9.1f ms %s" % (us / 1000, name) for us, name in rows[:limit]]


def floors(python: str, runs: int = 3) -> dict[str, float]:
    """Median wall time of a bare interpreter start and of importing the
    supervisor (what tlshd pays before its first line of main)."""
    out = {}
    for flags, code in (([], "pass"), (["-I"], "pass"), (["-S"], "pass"),
                        (["-I", "-S"], "pass"),
                        ([], "import tlshd.supervisor.main"),
                        (["-I"], "import tlshd.supervisor.main")):
        samples = []
        for _ in range(runs):
            start = now()
            subprocess.run([python, *flags, "-c", code], check=True)
            samples.append(now() - start)
        out[" ".join([python, *flags, "-c", repr(code)])] = (
            statistics.median(samples))
    return out


def setup(workdir: Path) -> Path:
    creds = workdir / "creds"
    creds.mkdir(mode=0o755)
    pki.write_credentials(creds, "bench", [])
    conf = workdir / "tlshd.conf"
    # worker_idle_timeout=0: the initial namespace's worker starts with
    # the daemon (with on-demand workers it would wait for a request).
    conf.write_text("\n".join(["[debug]", "loglevel=1", "[authenticate]",
                               *pki.authenticate_lines(creds), "[netns]",
                               "worker_idle_timeout=0"]) + "\n")
    return conf


def impl_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each tlshd to start (base first), by the name it is reported as."""
    commands = {"ours": [str(PYTHON), "-m", "tlshd.supervisor"]}
    if args.base_python:
        commands = {"base": [args.base_python, "-m", "tlshd.supervisor"],
                    **commands}
    for spec in args.packaged:
        name, _, root = spec.partition("=")
        commands[name] = packaged(root)
    return commands


def print_summary(runs: dict[str, list[dict[str, float]]],
                  keys: tuple[str, ...]) -> None:
    """The p50 and min of each figure, per impl."""
    for impl, rows in runs.items():
        for name, pick in (("p50", statistics.median), ("min", min)):
            print("%5s %5s " % (impl, name) + " ".join(
                "%11.2f" % pick(r.get(k, float("nan")) for r in rows)
                for k in keys))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--importtime", action="store_true")
    p.add_argument("--base-python", metavar="PYTHON",
                   help="also start the tlshd this interpreter imports "
                        "(another checkout's venv), alternating with ours")
    p.add_argument("--packaged", metavar="NAME=ROOT", action="append",
                   default=[],
                   help="also start the tlshd of a .deb unpacked at ROOT "
                        "(dpkg-deb -x), reported as NAME; repeatable")
    p.add_argument("--trace", action="store_true",
                   help="print the first start's log, each line with "
                        "when it arrived")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root in the VM (see the docstring)")
    try:
        pwd.getpwnam("tlshd")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "tlshd"], check=True)
    subprocess.run(["modprobe", "tls"], check=True)
    workdir = Path(tempfile.mkdtemp(prefix="tlshd-startup-"))
    workdir.chmod(0o755)
    try:
        conf = setup(workdir)
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False).stdout.strip()
        print("startup: kernel %s, %d CPU, python %s, commit %s, load %s"
              % (platform.release(), os.cpu_count() or 0,
                 platform.python_version(), commit or "?",
                 Path("/proc/loadavg").read_text().split()[0]))
        keys = ("ready", "ready_cpu", "listening", "worker", "fork_hello",
                *BOOT_STEPS)
        commands = impl_commands(args)
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in commands}
        print("%5s %5s " % ("impl", "start")
              + " ".join("%11s" % k for k in keys))
        for i in range(args.starts):
            for impl, command in commands.items():
                times, _, trace = one_start(command, conf, args.timeout)
                runs[impl].append(times)
                if i == 0 and args.trace:
                    print("\n".join(trace))
                print("%5s %5d " % (impl, i + 1) + " ".join(
                    "%11.2f" % times.get(k, float("nan")) for k in keys))
                sys.stdout.flush()
        print_summary(runs, keys)
        for impl, command in commands.items():
            for name, seconds in floors(command[0]).items():
                print("floor: %s: %s %.2f s (median of 3)"
                      % (impl, name, seconds))
        if args.importtime:
            _, log, _ = one_start(commands["ours"], conf, args.timeout,
                                  importtime=True)
            print("supervisor imports, cumulative (one start):")
            print("\n".join(import_table(log)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
