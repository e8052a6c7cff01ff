#!/usr/bin/env python3
"""Summarise py-spy's raw (collapsed) output: where the samples are.

    bench/pyspy_summary.py results/profile-*/profile/py-spy-nfs-tls-worker.txt

Prints the share of samples per leaf function (self time) and per
function anywhere on the stack (inclusive), top N each.
"""

from __future__ import annotations

import collections
import re
import sys


def frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    path = m.group(2)
    short = "/".join(path.split("/")[-2:])
    return "%s (%s)" % (m.group(1), short)


def main() -> int:
    top = 25
    for path in sys.argv[1:]:
        leaf: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        total = 0
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                n = int(count)
                frames = [frame_name(x) for x in stack.split(";")]
                # py-spy puts the thread first: "thread (0x...)"
                frames = [x for x in frames if not x.startswith(
                    ("thread ", "process "))]
                if not frames:
                    continue
                total += n
                leaf[frames[-1]] += n
                for name in set(frames):
                    incl[name] += n
        print("== %s: %d samples" % (path, total))
        print("-- self")
        for name, n in leaf.most_common(top):
            print("%5.1f%%  %s" % (100 * n / total, name))
        print("-- inclusive")
        for name, n in incl.most_common(top):
            print("%5.1f%%  %s" % (100 * n / total, name))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
