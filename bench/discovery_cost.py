#!/usr/bin/env python3
"""How long namespace discovery holds the supervisor's loop.

Runs as root on the host (no handshake family needed: the sockets join a
made-up group, as the unit tests' do), in a private mount namespace so
the host's /run/netns is never touched:

    .venv/bin/python bench/discovery_cost.py [--named 1000] [--procs 10000]

It makes N named namespaces with ``ip netns add`` (on a private tmpfs at
/run/netns) and starts P sleeping processes, then times, as the median
and maximum of several calls: the full read of /run/netns
(``netns.named``), a ``NamedCache`` refresh after one entry changed, a
full walk over /proc (``netns.unnamed``) and each batch of one
(``ProcWalk``, CHECK_EVERY processes), a real Supervisor's first scan
(serving them all), the longest turn of the loop spent on discovery over
5 s, its scans when nothing changed, and ``on_watch`` + ``scan`` around
``ip netns add`` and ``ip netns del``.  ``--clock cpu`` times with the
thread's CPU time instead of the wall clock, for a host that others keep
busy.  Last, the loop's wake-up latency while /proc is walked back to
back: a child process writes its time.monotonic() to a pipe the loop
polls every few milliseconds, as a READY would come, and the loop's
callback makes ten system calls, as a READY's turn does, then takes the
difference (wall time whatever --clock says: what a request waits).
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tlshd.shared import config
from tlshd.supervisor import netlink_family, netns, procwalk
from tlshd.supervisor.arbiter import Supervisor

FAMILY = netlink_family.FamilyInfo(0x3F00, 5)
INNER = "TLSHD_DISCOVERY_COST_INNER"


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = [time.perf_counter]


def clock() -> float:
    """Seconds on the clock chosen with --clock: wall time, or this
    thread's CPU time (what a busy host's preemption does not inflate)."""
    return _clock[0]()


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, max) milliseconds of ``runs`` calls."""
    times = []
    for _ in range(runs):
        t = clock()
        fn()
        times.append((clock() - t) * 1000)
    return statistics.median(times), max(times)


def row(name: str, figures: tuple[float, float]) -> None:
    print("%-30s median %8.2f ms  max %8.2f ms" % (name, *figures))


def private_run_netns() -> None:
    """Re-run in a private mount namespace with a tmpfs on /run/netns."""
    if os.environ.get(INNER) is None:
        os.environ[INNER] = "1"
        sys.exit(subprocess.run(["unshare", "-m", "--propagation",
                                 "private", sys.executable, *sys.argv],
                                check=False).returncode)
    os.makedirs(netns.RUN_NETNS, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", netns.RUN_NETNS],
                   check=True)


def sleepers(count: int) -> subprocess.Popen[bytes]:
    """``count`` sleeping processes in one process group."""
    script = "for i in $(seq %d); do sleep 3600 & done; wait" % count
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 300
    while len([p for p in os.listdir("/proc") if p.isdigit()]) < count:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return proc


def loop_turns(sup: Supervisor, seconds: float) -> tuple[float, int]:
    """Longest discovery turn (ms) and turns, driving scan_due as the
    loop does."""
    longest, turns = 0.0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = clock()
        if sup.discovery.scan_due(time.monotonic()):
            sup.scan()
        longest = max(longest, (clock() - t) * 1000)
        turns += 1
        time.sleep(0.001)
    return longest, turns


PROBE = struct.Struct("d")
PROBE_CHILD = """
import os, random, struct, sys, time
fd, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    time.sleep(random.uniform(0.002, 0.012))
    os.write(fd, struct.pack("d", time.monotonic()))
"""


def wake_latency(sup: Supervisor, seconds: float) -> None:
    """The loop's delay (ms) in handling a readable fd while it runs
    with walks over /proc back to back (procwalk.INTERVAL 0)."""
    procwalk.INTERVAL = 0.0
    r, w = os.pipe()
    delays: list[float] = []

    def on_probe() -> None:
        data = os.read(r, PROBE.size * 64)
        for _ in range(10):  # a READY's turn makes about ten system calls
            os.fstat(r)
        now = time.monotonic()
        for (sent,) in PROBE.iter_unpack(data[:len(data) // 8 * 8]):
            delays.append((now - sent) * 1000)
    sup.step(0)  # the first turn ACCEPTs in every new namespace
    sup.sel.register(r, selectors.EVENT_READ, on_probe)
    child = subprocess.Popen([sys.executable, "-c", PROBE_CHILD, str(w),
                              str(seconds)], pass_fds=[w])
    os.close(w)
    walks = sup.discovery.unnamed.count
    while child.poll() is None:
        sup.step(0.1)
    sup.sel.unregister(r)
    os.close(r)
    delays.sort()
    print("%-30s p50 %.2f ms, p99 %.2f ms, max %.2f ms (%d wake-ups, %d "
          "walks)" % ("loop wake-up, walks running", delays[len(delays) // 2],
                      delays[int(len(delays) * 0.99)], delays[-1],
                      len(delays), sup.discovery.unnamed.count - walks))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--named", type=int, default=1000)
    p.add_argument("--procs", type=int, default=10000)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = p.parse_args()
    _clock[0] = CLOCKS[args.clock]
    if os.geteuid() != 0:
        raise SystemExit("run as root (see the docstring)")
    private_run_netns()
    t = time.monotonic()
    for i in range(args.named):
        subprocess.run(["ip", "netns", "add", "d%04d" % i], check=True)
    print("%d named namespaces made in %.1f s"
          % (args.named, time.monotonic() - t))
    sleep = sleepers(args.procs)
    nprocs = len([p for p in os.listdir("/proc") if p.isdigit()])
    print("%d processes" % nprocs)
    work = Path(tempfile.mkdtemp(prefix="tlshd-discovery-"))
    try:
        (work / "tenant.conf").write_text("[authenticate.client]\n")
        (work / "tlshd.conf").write_text(
            "[netns]\ndefault=%s\nunnamed=%s\nmax_namespaces=65536\n"
            % (work / "tenant.conf", work / "tenant.conf"))
        row("netns.named() (full read)", timed(netns.named, args.runs))
        cache = netns.NamedCache()
        cache.refresh()

        def one_change() -> None:
            cache.mark(["d0000"])
            cache.refresh()
        row("NamedCache, one entry marked", timed(one_change, args.runs))
        row("netns.unnamed() (full walk)",
            timed(lambda: netns.unnamed({os.getpid()}), 5))
        walk = netns.ProcWalk({os.getpid()})
        slices: list[float] = []
        done = False
        while not done:
            t = clock()
            done = walk.step(0.0)  # one batch
            slices.append((clock() - t) * 1000)
        print("%-30s %d batches of %d, longest %.2f ms" % (
            "ProcWalk batches", len(slices), netns.ProcWalk.CHECK_EVERY,
            max(slices)))
        sup = Supervisor(config.load(str(work / "tlshd.conf")), FAMILY)
        sup.discovery.watch()
        first = timed(sup.scan, 1)[0]
        print("%-30s %8.2f ms (%d served)"
              % ("first Discovery.scan()", first, len(sup.namespaces)))
        longest, turns = loop_turns(sup, 5.0)
        print("%-30s %8.2f ms over %d turns (%d served, %d walks)"
              % ("longest discovery turn", longest, turns,
                 len(sup.namespaces), sup.discovery.unnamed.count))
        row("Discovery.scan(), no change", timed(sup.scan, args.runs))

        def churn() -> None:
            subprocess.run(["ip", "netns", "add", "churn"], check=True)
            sup.on_watch()
            sup.scan()
            subprocess.run(["ip", "netns", "del", "churn"], check=True)
            sup.on_watch()
            sup.scan()
        churn()
        t = clock()
        longest = 0.0
        for _ in range(args.runs):
            subprocess.run(["ip", "netns", "add", "churn"], check=True)
            for _ in (0, 1):
                t = clock()
                sup.on_watch()
                sup.scan()
                longest = max(longest, (clock() - t) * 1000)
            subprocess.run(["ip", "netns", "del", "churn"], check=True)
            t = clock()
            sup.on_watch()
            sup.scan()
            longest = max(longest, (clock() - t) * 1000)
        print("%-30s %8.2f ms (longest on_watch+scan)"
              % ("add/del churn", longest))
        wake_latency(sup, 20.0)
        for ns in list(sup.namespaces):
            sup.remove_namespace(ns)
    finally:
        os.killpg(sleep.pid, signal.SIGKILL)
        sleep.wait()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
