"""Lock the worker down once its credentials are loaded.

Today: no_new_privs.  The full sandbox (dedicated uid/gid, no capabilities,
seccomp allow-list, rlimits) belongs to the per-namespace work; whatever is
applied, the worker reports the resulting state in HELLO, read back from
the kernel rather than assumed.
"""

from __future__ import annotations

import os

from tlshd.shared import linux, protocol


def lock_down(uid: int | None, gid: int | None,
              max_fds: int) -> protocol.Hello:
    if uid is not None and gid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    linux.set_no_new_privs()
    return current_state()


def current_state() -> protocol.Hello:
    status = linux.proc_status()
    return protocol.Hello(
        pid=os.getpid(),
        uid=os.getuid(),
        gid=os.getgid(),
        cap_eff=int(status.get("CapEff", "0"), 16),
        no_new_privs=int(status.get("NoNewPrivs", "0")),
        seccomp=int(status.get("Seccomp", "0")),
    )
