"""Summarise tools/test's pytest runs from their junit XML files.

Usage: junit_summary.py NAME:STATUS:XML [NAME:STATUS:XML ...]

STATUS is "ok" or "failed" (the run's exit status, already judged by
tools/test).  Prints one line per run and, last, the combined line
"tlshd-tests: N passed, M failed".  A failed run whose XML shows no
failing test (no tests collected, an internal error, a VM that never
booted, no XML at all) counts as one failure, so that the closing line
never says "0 failed" for a failing run.  Exit status 1 if any run failed.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(xml: Path) -> dict[str, int] | None:
    """tests/failures/errors/skipped summed over the test suites."""
    try:
        root = ET.parse(xml).getroot()  # our own pytest output
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    total = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
    return total


def main(argv: list[str]) -> int:
    passed = failed = 0
    any_failed = False
    for spec in argv:
        name, status, xml = spec.split(":", 2)
        c = counts(Path(xml))
        if c is None:
            p, f, s, note = 0, 1, 0, " (no junit xml)"
        else:
            f = c["failures"] + c["errors"]
            s = c["skipped"]
            p = c["tests"] - f - s
            note = ""
        if status != "ok" and f == 0:
            f, note = 1, note or " (run failed)"
        any_failed |= status != "ok" or f > 0
        print(f"  {name}: {p} passed, {f} failed, {s} skipped{note}")
        passed += p
        failed += f
    print(f"tlshd-tests: {passed} passed, {failed} failed")
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
