"""``tlshdctl``: the operator's view of a running tlshd (to be filled in)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("tlshdctl: no commands yet", file=sys.stderr)
    return 64  # EX_USAGE
