#!/usr/bin/env python3
"""Session-reuse table from a benchmark's results.json: every
implementation side by side (ours, ours-reuse, reference).

    BENCH_IMPLS=ours,ours-reuse,reference bench/run -- ...
    bench/reuse_report.py results/bench-<kernel>-<stamp>/results.json

Per scenario and implementation, pooled over the rounds (bench/report.py
``pooled``): handshakes, how many of our handshake ends were reused
(client and server end each count), per-handshake latency p50/p99 (kernel
submit -> complete), the agent's share p50 (ACCEPT -> DONE), the time
from a cycle's first submit to its last DONE (median over cycles), and
the agent's CPU per handshake (the daemon's cgroup).  Stdlib only.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import report

ORDER = ("ours", "ours-reuse", "reference")
COLUMNS = (
    ("handshakes", "hs", 0),
    ("reused", "reused ends", 0),
    ("p50", "p50 ms", 1),
    ("p99", "p99 ms", 1),
    ("agent_p50", "agent p50 ms", 1),
    ("last_done_ms", "last DONE ms", 0),
    ("cpu_ms_per_hs", "CPU ms/hs", 2),
    ("cycle_ms", "cycle ms", 0),
    ("errors", "errors", 0),
)


def impls_of(results: dict[str, Any]) -> list[str]:
    seen = {s["impl"] for sc in results["scenarios"].values()
            for s in sc["samples"]}
    return [i for i in ORDER if i in seen] + sorted(
        seen - set(ORDER) - {"none"})


def rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for name, sc in results["scenarios"].items():
        for impl in impls_of(results):
            p = report.pooled(sc["samples"], impl)
            if not p:
                continue
            ss = [s for s in sc["samples"] if s["impl"] == impl]
            p["reused"] = sum(s.get("reused", 0) for s in ss)
            p["described"] = sum(s.get("described", 0) for s in ss)
            out.append((name, impl, p))
    return out


def render(results: dict[str, Any]) -> str:
    head = ["scenario", "impl", *(c[1] for c in COLUMNS)]
    table = [head]
    for name, impl, p in rows(results):
        cells = [name, impl]
        for key, _, digits in COLUMNS:
            v = p.get(key)
            if key == "reused" and impl == "reference":
                v = None
            elif key == "reused":
                v = "%d/%d" % (p["reused"], p["described"])
            cells.append(report.fmt(float(v) if isinstance(v, int)
                                    and digits else v, digits))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["Session reuse: %s" % ", ".join(impls_of(results))]
    for r in table:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths,
                                                              strict=True))))
    return "\n".join(lines)


def main() -> int:
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
