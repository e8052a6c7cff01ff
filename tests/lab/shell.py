"""Where things are in the guest, and running commands there.

The paths follow tools/setup's layout: the venv in .venv, the cache (the
trixie chroot with nfs-utils, nvme-cli and the reference tlshd) in .cache
or $TLSHD_CACHE.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
CACHE = Path(os.environ.get("TLSHD_CACHE") or REPO / ".cache")
TRIXIE = CACHE / "trixie-root"


class ShellError(subprocess.CalledProcessError):
    """A failed ``sh``, which says what the command printed."""

    def __str__(self) -> str:
        return "%s\n%s%s" % (super().__str__(), self.stdout, self.stderr)


def sh(
    cmd: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``cmd`` under bash, output captured; ``check``: raise ShellError
    unless it exits 0."""
    r = subprocess.run(
        ["bash", "-c", cmd],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and r.returncode != 0:
        raise ShellError(r.returncode, cmd, r.stdout, r.stderr)
    return r


def quote(s: str) -> str:
    """``s`` as one single-quoted shell word."""
    return "'" + s.replace("'", "'\\''") + "'"


def chroot_sh(
    cmd: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``cmd`` inside the trixie chroot."""
    return sh("chroot %s /bin/sh -c %s" % (TRIXIE, quote(cmd)), check=check)


def ensure_worker_user() -> None:
    """The packaging creates the worker's user; in the VM, the test does."""
    sh("id -u tlshd >/dev/null 2>&1 || useradd --system --no-create-home "
       "--shell /usr/sbin/nologin tlshd")
