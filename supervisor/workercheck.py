"""Check a worker's HELLO against what the kernel says about it.

A worker reports who it runs as once it is locked down (HELLO).  That is
the worker's word; the supervisor reads the truth from
/proc/<pid>/status (and each thread's, under task/) and refuses a worker
whose claims differ or whose sandbox is not what it was asked for, as
OpenSSH proves a privilege drop instead of assuming it.

Policy: every worker sets no_new_privs and installs a seccomp filter
(worker/sandbox.py does both whatever its identity), so NoNewPrivs must
be 1 and Seccomp 2 (filter mode) on every thread.  A worker told to
drop to a uid and gid (the supervisor runs as root) must run as exactly
those, in all four Uid/Gid fields, with every capability set empty.  A
worker without ids (a supervisor that is not root: tests) keeps the
supervisor's identity, which is then not checked beyond the claims.
"""

from __future__ import annotations

import os

from tlshd.shared import linux, protocol

_CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapAmb")
NO_CAPS = "0" * 16


def _read(path: str) -> dict[str, str] | None:
    """A status file's fields; None if the thread has gone."""
    try:
        with open(path) as f:
            return linux.parse_status(f.read())
    except FileNotFoundError:
        return None


def _ids(fields: dict[str, str], key: str) -> list[str]:
    return fields.get(key, "").split()


def _claims(hello: protocol.Hello, pid: int,
            main: dict[str, str]) -> list[str]:
    """Where the HELLO differs from the main thread's status."""
    wrong = []
    if hello.pid != pid:
        wrong.append("pid %d, but it is %d" % (hello.pid, pid))
    for what, claim, key in (("uid", hello.uid, "Uid"),
                             ("gid", hello.gid, "Gid")):
        if _ids(main, key) != [str(claim)] * 4:
            wrong.append("%s %d, but %s is %r" % (what, claim, key,
                                                  main.get(key)))
    for what, value, key, base in (
            ("CapEff", hello.cap_eff, "CapEff", 16),
            ("NoNewPrivs", hello.no_new_privs, "NoNewPrivs", 10),
            ("Seccomp", hello.seccomp, "Seccomp", 10)):
        try:
            actual = int(main.get(key, ""), base)
        except ValueError:
            actual = -1
        if value != actual:
            wrong.append("%s %x, but it is %r" % (what, value,
                                                  main.get(key)))
    return wrong


def _policy(tid: str, fields: dict[str, str],
            ids: tuple[int, int] | None) -> list[str]:
    """Where thread ``tid`` is not sandboxed as required."""
    want = {"NoNewPrivs": "1", "Seccomp": "2"}
    if ids is not None:
        want.update((f, NO_CAPS) for f in _CAP_FIELDS)
    wrong = ["thread %s: %s %r, must be %s" % (tid, k, fields.get(k), v)
             for k, v in want.items() if fields.get(k) != v]
    if ids is not None:
        for key, value in (("Uid", ids[0]), ("Gid", ids[1])):
            if _ids(fields, key) != [str(value)] * 4:
                wrong.append("thread %s: %s %r, must be %d" % (
                    tid, key, fields.get(key), value))
    return wrong


def verify_hello(pid: int, hello: protocol.Hello,
                 ids: tuple[int, int] | None) -> list[str]:
    """What is wrong with worker ``pid`` and its HELLO; empty if nothing.

    ``pid`` must be an unreaped child (the supervisor's own, or one
    re-parented to it), so the number cannot be reused meanwhile.
    ``ids``: the (uid, gid) the worker was told to drop to, or None.
    """
    main = _read("/proc/%d/status" % pid)
    if main is None:
        return ["no /proc/%d/status" % pid]
    wrong = _claims(hello, pid, main)
    task_dir = "/proc/%d/task" % pid
    try:
        tids = sorted(os.listdir(task_dir), key=int)
    except OSError as e:
        return [*wrong, "cannot list %s: %s" % (task_dir, e.strerror)]
    for tid in tids:
        fields = _read("%s/%s/status" % (task_dir, tid))
        if fields is not None:
            wrong += _policy(tid, fields, ids)
    return wrong
