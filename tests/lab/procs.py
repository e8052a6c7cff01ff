"""What the guest's /proc says about processes and netlink sockets."""

from __future__ import annotations

import os
import time
from pathlib import Path


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def fd_count(pid: int) -> int:
    """The fewest fds ``pid`` held over one second (10 looks).

    A single look can catch an fd that is open for a moment only (a worker
    being reaped, a control client being answered): once, a baseline of
    23 against 22 at the end failed the add/delete cycles.  A leaked fd
    stays, so it shows in the minimum all the same.
    """
    seen = []
    for _ in range(10):
        seen.append(len(os.listdir("/proc/%d/fd" % pid)))
        time.sleep(0.1)
    return min(seen)


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def group_listeners(group_id: int, netlink: str | None = None) -> int:
    """NETLINK_GENERIC sockets joined to multicast group ``group_id``
    (docs/vm-harness.md, pitfall 10), from ``netlink`` (the text of a
    /proc/.../net/netlink) or this process's namespace's."""
    if netlink is None:
        netlink = Path("/proc/net/netlink").read_text()
    bit = 1 << (group_id - 1)
    n = 0
    for line in netlink.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[1] == "16" and int(f[3], 16) & bit:
            n += 1
    return n
