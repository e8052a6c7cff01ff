#!/usr/bin/env python3
"""tlshd with many network namespaces: memory, add latency, churn.

Runs as root inside the VM (it creates namespaces, starts nfsd and tlshd):

    tools/vm-run --kernel 6.12 --smp 2 --timeout 3000 -- \\
        .venv/bin/python bench/scale.py --count 1000 --cycles 1000 \\
        --mounts 40 --procs 3000

Every namespace is served through ``[netns] default=`` with one set of
throwaway credentials, and ``[netns] unnamed=`` is set, so the supervisor
walks /proc all along (``--procs`` sleeping processes give it something
to walk).  In order, it prints:

1. ``ip netns add`` -> served, for COUNT-1 namespaces added one at a time
   to a running tlshd: served = a socket in the namespace has joined the
   tlshd group (from then on the kernel hands its requests to tlshd),
   timed from the return of ``ip netns add`` and from its start;
2. total PSS of the tlshd tree (supervisor, template, workers) with
   COUNT namespaces served and idle (once no worker is starting);
3. the same with ACTIVE of them active: each has a handshake in flight
   (an NFS mount from a peer on its own loopback that never finishes
   the handshake), so each has a worker; and the PSS per worker;
4. submit -> accept of NFS mounts in the initial namespace (the
   handshake tracepoints) while a loop adds and deletes a namespace and
   the /proc walk runs (the three slowest requests are listed);
5. the supervisor's fds and VmRSS before and after CYCLES add/delete
   cycles (every 50 cycles too; at most --cycle-seconds of them).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The lab package (tests/lab), shared with the kernel tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lab import nfs, trace
from lab.netns import NETNS_RUN, in_netns, tlshd_group_joined
from lab.peers import RpcTlsPeer
from lab.pki import Pki
from lab.procs import fd_count, rss_kib
from lab.shell import REPO, VENV_BIN, ensure_worker_user, sh

from tlshd.supervisor.ctl import query

CONTROL = "/run/tlshd/control.sock"
PREFIX = "scale"


def wait(what: str, cond: Callable[[], bool], timeout: float,
         every: float = 0.005) -> float:
    """Poll ``cond`` until true; time.monotonic() when it was."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit("timed out waiting for %s" % what)
        time.sleep(every)
    return time.monotonic()


def served(name: str) -> bool:
    """Is ``name`` in status (the supervisor knows it)?"""
    try:
        return not query(CONTROL, "status-netns " + name).startswith(
            "error:")
    except OSError:
        return False


def descendants(root: int) -> dict[int, str]:
    """pid -> title of every process below ``root``, and ``root``."""
    parent: dict[int, int] = {}
    title: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        title[pid] = cmd.decode(errors="replace")
    out = {root: title.get(root, "?")}
    grew = True
    while grew:
        new = {p: title[p] for p, pp in parent.items()
               if pp in out and p not in out}
        out.update(new)
        grew = bool(new)
    return out


def pss_kib(pid: int) -> int:
    for line in Path("/proc/%d/smaps_rollup" % pid).read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Daemon:
    """tlshd started as ``tlshd -s -c FILE``, its log in a file."""

    def __init__(self, work: Path, config: str) -> None:
        (work / "tlshd.conf").write_text(config)
        self.logfile = work / "tlshd.log"
        with open(self.logfile, "wb") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "tlshd"), "-s", "-c",
                 str(work / "tlshd.conf")],
                stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        wait("tlshd serving init", lambda: self.alive() and served("init"),
             300, 0.2)
        m = re.search(r"group tlshd id (\d+)", self.logfile.read_text())
        if not m:
            raise SystemExit("no group id in tlshd's log")
        self.group = int(m.group(1))

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit("tlshd exited with %s:\n%s" % (
                self.proc.returncode, self.logfile.read_text()[-3000:]))
        return True

    def joined(self, name: str) -> bool:
        return tlshd_group_joined(name, self.group)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def add_namespaces(d: Daemon, count: int) -> None:
    after, total = [], []
    for i in range(1, count):
        name = "%s%04d" % (PREFIX, i)
        start = time.monotonic()
        subprocess.run(["ip", "netns", "add", name], check=True)
        added = time.monotonic()
        try:
            joined = wait("group joined in " + name,
                          lambda name=name: d.alive() and d.joined(name), 30)
        except SystemExit as e:
            raise SystemExit("%s; tlshd's log ends:\n%s" % (
                e, d.logfile.read_text()[-4000:])) from None
        after.append(joined - added)
        total.append(joined - start)
    if after:
        print("ip netns add -> served (%d namespaces): p50 %.3f s, max "
              "%.3f s after it returned; p50 %.3f s, max %.3f s after it "
              "started" % (len(after), statistics.median(after), max(after),
                           statistics.median(total), max(total)))


def idle_pss(d: Daemon, count: int, settle: float) -> int:
    """Print the tree's PSS once every namespace is served and no worker
    starts; return the total (KiB)."""
    def settled() -> bool:
        out = query(CONTROL, "status")
        m = re.match(r"(\d+) namespace\(s\) served.*?(\d+) starting", out)
        return bool(m) and int(m.group(1)) >= count and m.group(2) == "0"
    wait("every namespace served, no worker starting", settled, 3600, 1.0)
    time.sleep(settle)
    kib, workers = tree_pss(d)
    pid = d.proc.pid
    print("idle, %d namespaces: total PSS %.1f MiB (supervisor %.1f, %d "
          "workers %.1f, other %.1f); %s"
          % (count, sum(kib.values()) / 1024, kib[pid] / 1024,
             len(workers), sum(kib[p] for p in workers) / 1024,
             (sum(kib.values()) - kib[pid]
              - sum(kib[p] for p in workers)) / 1024,
             query(CONTROL, "status").splitlines()[0]))
    return sum(kib.values())


@contextmanager
def churning() -> Iterator[None]:
    """A namespace added and deleted over and over, meanwhile."""
    loop = subprocess.Popen(
        ["bash", "-c", "while :; do ip netns add %schurn; sleep 0.1; "
         "ip netns del %schurn; sleep 0.1; done" % (PREFIX, PREFIX)],
        start_new_session=True)
    try:
        yield
    finally:
        os.killpg(loop.pid, signal.SIGKILL)
        loop.wait()
        subprocess.run(["ip", "netns", "del", PREFIX + "churn"],
                       check=False, capture_output=True)


@contextmanager
def spying(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy samples ``pid`` meanwhile (collapsed stacks to ``out``),
    when asked for: where the supervisor's own time goes in this phase."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(
        [str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--rate",
         "250", "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output
        spy.wait(120)
        print("py-spy samples of the supervisor in %s" % out)


def mounts_under_churn(d: Daemon, mounts: int,
                       spy: Path | None = None) -> None:
    """NFS mounts in the initial namespace under churn; submit -> accept
    of the requests submitted meanwhile (the trace's clock is
    time.monotonic()'s, so a request of an earlier phase that the kernel
    still had is left out)."""
    client = nfs.Nfs(nfs.start_server())
    trace.enable()
    tids = sched_trace_on(d.proc.pid)
    failed = 0
    start = time.monotonic()
    with churning(), spying(d.proc.pid, spy):
        for _ in range(mounts):
            r = client.mount("", "tls")
            failed += not r.ok
            client.umount()
            d.alive()
    reqs = [r for r in trace.read_requests()
            if r.accept is not None and r.submit is not None
            and r.submit >= start]
    waits = [(r.accept - r.submit) * 1000 for r in reqs
             if r.accept is not None and r.submit is not None]
    if not waits:
        raise SystemExit("no handshake was accepted")
    print("submit -> accept under churn and /proc walks: %d requests, p50 "
          "%.1f ms, p99 %.1f ms, max %.1f ms; %d of %d mounts failed"
          % (len(waits), statistics.median(waits), pct(waits, 0.99),
             max(waits), failed, mounts))
    # The slowest three, whatever their wait: where in the phase a tail
    # falls (the first mount, with the initial namespace's worker still
    # to start, or any) says more than its size.
    slow = sorted((r for r in reqs
                   if r.accept is not None and r.submit is not None),
                  key=lambda r: (r.accept or 0.0) - (r.submit or 0.0))
    runs = sched_runs(tids)
    sched_trace_off()
    for r in reversed(slow[-3:]):
        assert r.accept is not None and r.submit is not None
        print("  slow: req %s (%s) submitted %.1f s into the phase, "
              "accepted %.1f ms later; %s"
              % (r.req, r.comm, r.submit - start,
                 (r.accept - r.submit) * 1000,
                 runs.explain(d.proc.pid, r.submit, r.accept)))


SCHED = trace.TRACING / "events/sched"
SWITCH = re.compile(r"\s(\d+\.\d+): sched_switch: .*prev_pid=(\d+) .*"
                    r"next_pid=(\d+) ")
WAKEUP = re.compile(r"\s(\d+\.\d+): sched_waking: .*pid=(\d+) ")


def sched_trace_on(pid: int) -> list[int]:
    """Trace when the supervisor's threads (as they are now) run and are
    woken: with the slow requests' windows, it tells the supervisor busy
    (its own work: a rescan, a garbage collection) from the supervisor
    waiting for a CPU (the guest)."""
    tids = [int(t) for t in os.listdir("/proc/%d/task" % pid)]
    either = " || ".join("prev_pid == %d || next_pid == %d" % (t, t)
                         for t in tids)
    (SCHED / "sched_switch/filter").write_text(either)
    (SCHED / "sched_waking/filter").write_text(
        " || ".join("pid == %d" % t for t in tids))
    for ev in ("sched_switch", "sched_waking"):
        (SCHED / ev / "enable").write_text("1")
    return tids


def sched_trace_off() -> None:
    for ev in ("sched_switch", "sched_waking"):
        (SCHED / ev / "enable").write_text("0")
        (SCHED / ev / "filter").write_text("0")


class Runs:
    """When each traced thread was on a CPU, and when it was woken."""

    def __init__(self) -> None:
        self.on: dict[int, list[tuple[float, float]]] = {}
        self.woken: dict[int, list[float]] = {}

    def cpu_ms(self, tid: int, a: float, b: float) -> float:
        return 1000 * sum(max(0.0, min(e, b) - max(s, a))
                          for s, e in self.on.get(tid, []))

    def explain(self, pid: int, a: float, b: float) -> str:
        """The supervisor's main thread and its other threads over [a, b]:
        time on a CPU, and the longest wait from a wake-up to running."""
        waits = []
        starts = sorted(s for s, _ in self.on.get(pid, []))
        for w in self.woken.get(pid, []):
            if a <= w <= b:
                later = [s for s in starts if s >= w]
                if later:
                    waits.append(later[0] - w)
        others = sum(self.cpu_ms(t, a, b) for t in self.on if t != pid)
        return ("main thread on CPU %.1f ms, its other threads (those of the "
                "phase's start: not the /proc walks', each on a new one) "
                "%.1f ms, longest wake-up -> run %.1f ms"
                % (self.cpu_ms(pid, a, b), others,
                   1000 * max(waits, default=0.0)))


def sched_runs(tids: list[int]) -> Runs:
    runs = Runs()
    began: dict[int, float] = {}
    for line in (trace.TRACING / "trace").read_text().splitlines():
        m = SWITCH.search(line)
        if m:
            t, prev, nxt = float(m.group(1)), int(m.group(2)), int(m.group(3))
            if prev in tids and prev in began:
                runs.on.setdefault(prev, []).append((began.pop(prev), t))
            if nxt in tids:
                began[nxt] = t
            continue
        m = WAKEUP.search(line)
        if m and int(m.group(2)) in tids:
            runs.woken.setdefault(int(m.group(2)), []).append(
                float(m.group(1)))
    return runs


def tree_pss(d: Daemon) -> tuple[dict[int, int], list[int]]:
    """PSS (KiB) of each process of the tlshd tree; the workers' pids."""
    tree = descendants(d.proc.pid)
    kib = {pid: pss_kib(pid) for pid in tree}
    return kib, [p for p, t in tree.items()
                 if t.startswith("tlshd: worker [")]


def active_pss(d: Daemon, count: int, names: list[str],
               idle_kib: int) -> None:
    """A handshake in flight in each of ``names``, so each has a worker:
    the tree's PSS then.  Each namespace's NFS client mounts from an
    RPC-with-TLS peer on its own loopback that reads the ClientHello and
    never answers (tests/lab/peers.py), so the handshake holds; a mount
    that gave up (its request timed out while the worker started) is
    made again."""
    peers: list[RpcTlsPeer] = []
    mounts: dict[str, subprocess.Popen[bytes]] = {}

    def mount(i: int, name: str) -> None:
        target = "/mnt/%s-active%d" % (PREFIX, i)
        os.makedirs(target, exist_ok=True)
        mounts[name] = subprocess.Popen(
            ["nsenter", "--net=%s/%s" % (NETNS_RUN, name), "timeout",
             "120", "mount", "-t", "nfs", "-o", "vers=4.2,xprtsec=tls,"
             "retry=0,soft,timeo=50,retrans=1", "127.0.0.1:/", target],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def working() -> list[str]:
        titles = descendants(d.proc.pid).values()
        return [n for n in names if "tlshd: worker [netns %s]" % n
                in titles]

    try:
        for i, name in enumerate(names):
            sh("ip -n %s link set lo up" % name)
            with in_netns(name):
                peers.append(RpcTlsPeer(2049, "hold"))
            mount(i, name)
        end = time.monotonic() + 600
        while len(working()) < len(names) and time.monotonic() < end:
            d.alive()
            for i, name in enumerate(names):
                if mounts[name].poll() is not None:
                    mount(i, name)
            time.sleep(1.0)
        time.sleep(1.0)
        kib, workers = tree_pss(d)
        total = sum(kib.values())
        print("%d namespaces, %d active (%d with a worker): total PSS %.1f "
              "MiB (idle: %.1f); %d workers, PSS per worker %.1f MiB "
              "(mean; %.1f to %.1f), %.1f MiB more than idle per worker"
              % (count, len(names), len(working()), total / 1024,
                 idle_kib / 1024, len(workers),
                 statistics.mean(kib[p] for p in workers or [d.proc.pid])
                 / 1024, min(kib[p] for p in workers or [d.proc.pid]) / 1024,
                 max(kib[p] for p in workers or [d.proc.pid]) / 1024,
                 (total - idle_kib) / max(1, len(workers)) / 1024),
              flush=True)
    finally:
        for p in peers:
            p.close()
        for m in mounts.values():
            m.kill()
            m.wait()


def cycles(d: Daemon, count: int, budget: float) -> None:
    """``count`` add/delete cycles, or as many as ``budget`` seconds
    allow; fds and VmRSS printed every 50 cycles, so a stopped run
    still reports."""
    pid = d.proc.pid
    fd0, rss0 = fd_count(pid), rss_kib(pid)
    start = time.monotonic()
    done = 0
    for i in range(count):
        if time.monotonic() - start > budget:
            print("  budget of %.0f s spent" % budget)
            break
        name = "%sc%d" % (PREFIX, i)
        subprocess.run(["ip", "netns", "add", name], check=True)
        wait("served " + name, lambda name=name: d.alive() and served(name),
             30, 0.05)
        subprocess.run(["ip", "netns", "del", name], check=True)
        wait("dropped " + name,
             lambda name=name: d.alive() and not served(name), 30, 0.05)
        done = i + 1
        if done % 50 == 0:
            print("  %d cycles, %.0f s: supervisor fds %d, VmRSS %d KiB"
                  % (done, time.monotonic() - start, fd_count(pid),
                     rss_kib(pid)), flush=True)
    fd1, rss1 = fd_count(pid), rss_kib(pid)
    print("%d add/delete cycles in %.0f s: supervisor fds %d -> %d, VmRSS "
          "%d -> %d KiB (%+d KiB)" % (done, time.monotonic() - start, fd0,
                                      fd1, rss0, rss1, rss1 - rss0))


def sleepers(count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["bash", "-c", "for i in $(seq %d); do sleep 100000 & done; wait"
         % count], start_new_session=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000,
                   help="namespaces served, the initial one included")
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--mounts", type=int, default=20)
    p.add_argument("--procs", type=int, default=1000,
                   help="extra processes for the /proc walk")
    p.add_argument("--active", type=int, default=10,
                   help="namespaces given a worker for the active PSS")
    p.add_argument("--cycle-seconds", type=float, default=1200,
                   help="stop the add/delete cycles after this long")
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--spy", type=Path, default=None,
                   help="py-spy the supervisor during the mounts under "
                   "churn, collapsed stacks to this file (py-spy is not a "
                   "dependency: .venv/bin/pip install py-spy)")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root in the VM (see the docstring)")
    ensure_worker_user()
    sh("modprobe tls")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    print("scale: kernel %s, %d CPU, python %s, commit %s; --count %d "
          "--cycles %d --mounts %d --procs %d"
          % (platform.release(), os.cpu_count() or 0,
             platform.python_version(), commit or "?", args.count,
             args.cycles, args.mounts, args.procs), flush=True)
    work = Path(tempfile.mkdtemp(prefix="tlshd-scale-"))
    work.chmod(0o755)
    pki = Pki(work / "pki")
    text = pki.config(idle_timeout=None)  # tlshd's default: on demand
    tenant = work / "tenant.conf"
    # The namespaces' file: the credentials, without the main file's
    # [debug] section.
    tenant.write_text("[authenticate]" + text.split("[authenticate]", 1)[1])
    procs = sleepers(args.procs)
    d = Daemon(work, text + "[netns]\ndefault=%s\nunnamed=%s\n"
               "max_namespaces=65536\n" % (tenant, tenant))
    try:
        add_namespaces(d, args.count)
        sys.stdout.flush()
        idle = idle_pss(d, args.count, args.settle)
        sys.stdout.flush()
        active = ["%s%04d" % (PREFIX, i)
                  for i in range(1, min(args.active + 1, args.count))]
        if active:
            active_pss(d, args.count, active, idle)
        mounts_under_churn(d, args.mounts, args.spy)
        sys.stdout.flush()
        cycles(d, args.cycles, args.cycle_seconds)
    finally:
        d.stop()
        os.killpg(procs.pid, signal.SIGKILL)
        procs.wait()
        for name in os.listdir("/run/netns"):
            if name.startswith(PREFIX):
                subprocess.run(["ip", "netns", "del", name], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
