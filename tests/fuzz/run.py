#!/usr/bin/env python3
"""The long fuzz run, outside CI: many mutated inputs per decoder.

    .venv/bin/python tests/fuzz/run.py                # 1,000,000 each
    .venv/bin/python tests/fuzz/run.py -n 20000 accept protocol

A plain mutation loop over the targets of tests/unit/fuzzcases.py (the
same ones the hypothesis tests use), reproducible from ``--seed``.  The
corpus starts from valid seeds; a mutant that still decodes joins it
(bounded), so later mutations start from deeper inside the format.
Prints, per decoder: inputs tried, how many were accepted or rejected,
distinct rejection messages, crashes (unique), time, the slowest input (wall)
and the process's peak RSS.  Each unique crash is saved as JSON under
``--crash-dir`` so that it can become a regression test.  Exits 1 if
anything crashed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import resource
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "unit"))

import fuzzcases

CORPUS_MAX = 2000
DISTINCT_MAX = 10000  # rejection messages remembered, to stay bounded


def _shape(detail: str) -> str:
    """A rejection or crash message without its numbers and quotes."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", detail)
    return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", text)[:120]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fuzz(target: fuzzcases.Target, n: int, rng: random.Random,
         crash_dir: str, max_seconds: float) -> dict[str, object]:
    corpus = list(target.seeds())
    counts = {"ok": 0, "rejected": 0, "crash": 0}
    rejections: set[str] = set()
    crashes: dict[str, int] = {}
    slowest = 0.0
    # The first input opens what the harness keeps (the channel target's
    # socket pair and the fds it passes): count fds only after it.
    fuzzcases.classify(target, corpus[0])
    fds_before = len(os.listdir("/proc/self/fd"))
    start = time.monotonic()
    tried = 0
    while tried < n:
        if tried % 1000 == 0 and time.monotonic() - start > max_seconds:
            break
        tried += 1
        inp = fuzzcases.generate(target, rng, corpus)
        t0 = time.monotonic()
        kind, detail = fuzzcases.classify(target, inp)
        slowest = max(slowest, time.monotonic() - t0)
        counts[kind] += 1
        if kind == "ok" and rng.random() < 0.01:
            if len(corpus) >= CORPUS_MAX:
                corpus[rng.randrange(len(corpus))] = inp
            else:
                corpus.append(inp)
        elif kind == "rejected" and len(rejections) < DISTINCT_MAX:
            rejections.add(_shape(detail))
        elif kind == "crash":
            key = _shape(detail)
            if key not in crashes:
                _save(crash_dir, target.name, len(crashes), detail, inp)
                print("  CRASH %s: %s" % (target.name, detail[:200]),
                      flush=True)
            crashes[key] = crashes.get(key, 0) + 1
        if tried % 100000 == 0:
            print("  %s: %d inputs, %.0f s" % (target.name, tried,
                                               time.monotonic() - start),
                  flush=True)
    took = time.monotonic() - start
    leaked = len(os.listdir("/proc/self/fd")) - fds_before
    return {"target": target.name, "inputs": tried, **counts,
            "distinct_rejections": len(rejections),
            "unique_crashes": len(crashes), "seconds": round(took, 1),
            "inputs_per_second": round(tried / took), "slowest_input_ms":
            round(slowest * 1000, 1), "peak_rss_mb": round(_peak_rss_mb()),
            "fds_leaked": leaked}


def _save(crash_dir: str, name: str, k: int, detail: str,
          inp: fuzzcases.Input) -> None:
    os.makedirs(crash_dir, exist_ok=True)
    path = os.path.join(crash_dir, "%s-%d.json" % (name, k))
    with open(path, "w") as f:
        json.dump({"target": name, "crash": detail,
                   "fields": [b.hex() for b in inp]}, f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("targets", nargs="*",
                    help="decoders (default: all of %s)"
                    % ", ".join(fuzzcases.TARGETS))
    ap.add_argument("-n", "--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=float("inf"),
                    help="stop a decoder's run early (reports the inputs "
                    "actually tried)")
    ap.add_argument("--crash-dir", default="results/fuzz-crashes")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    # The decoders log what they reject (config warnings), and mutated
    # certificates with a zero serial warn: neither is a finding.
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    names = args.targets or list(fuzzcases.TARGETS)
    results = []
    for name in names:
        print("%s: %d inputs, seed %d" % (name, args.inputs, args.seed),
              flush=True)
        rng = random.Random("%d/%s" % (args.seed, name))
        results.append(fuzz(fuzzcases.TARGETS[name], args.inputs, rng,
                            args.crash_dir, args.max_seconds))
        print("  " + json.dumps(results[-1]), flush=True)
    print("\n%-9s %10s %9s %9s %9s %7s %8s %9s %7s" % (
        "decoder", "inputs", "accepted", "rejected", "distinct", "crashes",
        "seconds", "slowest", "rss MB"))
    for r in results:
        print("%-9s %10d %9d %9d %9d %7d %8.0f %7.1fms %7d" % (
            r["target"], r["inputs"], r["ok"], r["rejected"],
            r["distinct_rejections"], r["crash"], r["seconds"],
            r["slowest_input_ms"], r["peak_rss_mb"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any(r["crash"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
