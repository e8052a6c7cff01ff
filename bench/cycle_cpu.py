#!/usr/bin/env python3
"""Why the benchmark's CPU per handshake is higher than the profile's.

    tools/vm-run --kernel 6.12 --smp 2 --timeout 2400 -- \\
        .venv/bin/python bench/cycle_cpu.py [--impls ours,reference]

bench/guest.py reads an agent's CPU over whole timed loops: NFS mount
cycles with a plain (no TLS) NFS cycle between them and pauses around
them.  bench/profile_guest.py reads it over mount cycles back to back.
For the same daemon the first gives about twice the second.  This runs
one daemon per implementation (started once each, interleaved by round)
through the same NFS tls mount cycles in four ways and prints the
cgroup's CPU per handshake for each:

- ``back-to-back``: as the profile;
- ``plain-between``: a plain NFS mount cycle after each, as the
  benchmark's NFS scenarios;
- ``idle-between``: 2 s of sleep after each;
- ``idle``: no mounts at all, 10 s (CPU per second, not per handshake).

If ``idle`` is about zero and ``plain-between`` is well above
``back-to-back``, the agent pays for other work run between its
handshakes (under TCG, code the emulator must translate again), not for
its own idle loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from tlshd.worker import sslconf

sslconf.use_worker_config()

import guest  # noqa: E402
from guest import say  # noqa: E402


def cg_usec(d: guest.Daemon) -> int:
    return guest.cpu_usec(d.cg)["usage_usec"]


def loop(d: guest.Daemon, cycles: int, between: Callable[[], None]
         ) -> tuple[float, int]:
    """CPU ms per handshake over ``cycles`` tls mount cycles."""
    time.sleep(0.5)
    guest.clear_trace()
    c0 = cg_usec(d)
    for _ in range(cycles):
        guest.nfs_cycle("tls")
        between()
    time.sleep(0.5)
    c1 = cg_usec(d)
    hs = len(guest.read_trace())
    return (c1 - c0) / 1000 / max(hs, 1), hs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--impls", default="ours,reference")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cycles", type=int, default=6)
    a = p.parse_args()
    conf = guest.prepare()
    guest.ktls_throwaway()
    group = guest.handshake_group_id()
    modes: dict[str, Callable[[], None]] = {
        "back-to-back": lambda: None,
        "plain-between": lambda: guest.nfs_cycle(None),
        "idle-between": lambda: time.sleep(2.0),
    }
    results: dict[tuple[str, str], list[float]] = {}
    impls = a.impls.split(",")
    for rnd in range(a.rounds):
        order = impls if rnd % 2 == 0 else impls[::-1]
        for impl in order:
            d = guest.Daemon(impl, conf, group)
            d.start("cycles%d" % rnd)
            try:
                guest.nfs_cycle("tls")  # warm-up: the worker starts
                guest.nfs_cycle("tls")
                names = list(modes)
                if rnd % 2:
                    names.reverse()
                for name in names:
                    ms, hs = loop(d, a.cycles, modes[name])
                    results.setdefault((impl, name), []).append(ms)
                    say("round %d %s %s: %.1f ms/hs (%d handshakes)"
                        % (rnd, impl, name, ms, hs))
                c0 = cg_usec(d)
                time.sleep(10)
                per_s = (cg_usec(d) - c0) / 1000 / 10
                results.setdefault((impl, "idle"), []).append(per_s)
                say("round %d %s idle: %.2f ms CPU per second"
                    % (rnd, impl, per_s))
            finally:
                d.stop()
    print("\nCPU per handshake (ms; idle: ms per second), median of %d "
          "rounds of %d tls mount cycles" % (a.rounds, a.cycles))
    for impl in impls:
        row = ["%s: %.1f" % (name, statistics.median(results[(impl, name)]))
               for name in (*modes, "idle")]
        print("  %-10s %s" % (impl, "; ".join(row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
