"""On-demand workers with the real NFS client and nfsd.

A served namespace has no worker until its first handshake request; the
request waits for the worker it starts.  A worker idle for [netns]
worker_idle_timeout exits, and the next mount starts another.  A worker
killed while it starts fails the request that waits for it with EIO (the
mount fails at once instead of at its timeout), and the next mount is
served.  worker_idle_timeout=0 keeps today's behaviour: a worker from
the start, for ever.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.kernel

READY = r"Worker (\d+) for netns init ready"


def on_demand(pki, idle: float) -> str:
    return pki.config(idle_timeout=idle)


def ready_pids(text: str) -> list[int]:
    return [int(p) for p in re.findall(READY, text)]


def wait_idle_exit(tlshd, mark: int, timeout: float = 60) -> int:
    """Wait until the init worker idled out and was reaped; its pid."""
    line = tlshd.wait_for(r"Worker \d+ for netns init idle for [\d.]+ s; "
                          r"stopping it", timeout, mark)
    pid = int(line.split()[1])
    tlshd.wait_for(r"Worker %d for netns init exited with status 0" % pid,
                   timeout, mark)
    return pid


def test_first_mount_starts_the_worker_and_waits_for_it(pki, tlshd, trace,
                                                        nfs):
    tlshd.start(on_demand(pki, 300))
    mark = tlshd.mark()
    time.sleep(1.0)
    assert ready_pids(tlshd.since(0)) == [], "a worker before any request"
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()
    log = tlshd.since(mark)
    accepted = log.index("Accepted request")
    started = re.search(READY, log)
    assert started and accepted < started.start(), log[-3000:]
    cold = trace.completions()
    assert len(cold) == 2 and all(c.status == 0 for c in cold), cold
    nfs.umount()
    trace.clear()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    warm = trace.completions()
    assert len(warm) == 2 and all(c.status == 0 for c in warm), warm
    assert len(ready_pids(tlshd.since(mark))) == 1  # the same worker
    print("READY->DONE: cold %s s, warm %s s" % (
        [round(c.seconds, 3) for c in cold],
        [round(c.seconds, 3) for c in warm]))


def test_worker_idles_out_and_the_next_mount_is_served(pki, tlshd, trace,
                                                       nfs):
    tlshd.start(on_demand(pki, 2))
    mark = tlshd.mark()
    assert nfs.mount("", "tls").ok
    nfs.umount()
    rekey = "Kernel re-key upcall: supported" in tlshd.since(0)
    if rekey:
        # Its worker keeps the session's re-key secrets: it stays.
        time.sleep(5)
        assert "idle for" not in tlshd.since(mark)
        return
    first = wait_idle_exit(tlshd, mark)
    assert ready_pids(tlshd.since(mark)) == [first]
    assert not os.path.exists("/proc/%d" % first)
    trace.clear()
    again = tlshd.mark()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()
    assert all(c.status == 0 for c in trace.completions())
    second = ready_pids(tlshd.since(again))
    assert len(second) == 1 and second[0] != first


def test_worker_killed_while_starting_gives_eio(pki, tlshd, trace, nfs):
    """SIGKILL the worker between its fork and its HELLO.  Under TCG a
    worker takes a second or more to get ready; should this one be
    ready before the kill lands, the attempt is made again (the kill
    leaves the namespace without a worker either way)."""
    tlshd.start(on_demand(pki, 300))
    for attempt in range(4):
        trace.clear()
        mark = tlshd.mark()
        m = subprocess.Popen(
            ["timeout", "60", "mount", "-t", "nfs", "-o",
             "vers=4.2,xprtsec=tls,retry=0", "127.0.0.1:/", nfs.target],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = tlshd.wait_for(r"Forked worker \d+ for netns init", 60, mark)
        pid = int(line.split()[2])
        os.kill(pid, signal.SIGKILL)
        out, _ = m.communicate(timeout=90)
        if m.returncode == 0:
            nfs.umount()
        if pid not in ready_pids(tlshd.since(mark)):
            break
    else:
        pytest.fail("every worker was ready before the kill landed")
    log = tlshd.since(mark)
    assert re.search(r"Worker %d for netns init killed by SIGKILL" % pid,
                     log), log[-3000:]
    statuses = [c.status for c in trace.completions()]
    # The request that waited for it: EIO at once (the NFS client may
    # then try again, with a new worker).
    assert statuses and statuses[0] == -errno.EIO, (statuses, out,
                                                    log[-3000:])
    trace.clear()
    again = tlshd.mark()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()
    print("attempt %d: worker %d killed starting, mount %s; then served "
          "by worker %s" % (attempt + 1, pid, m.returncode,
                            ready_pids(tlshd.since(again))))


def test_idle_timeout_zero_keeps_the_worker(pki, tlshd, nfs):
    tlshd.start(on_demand(pki, 0))  # start() waits for the init worker
    pids = ready_pids(tlshd.since(0))
    assert len(pids) == 1
    assert nfs.mount("", "tls").ok
    nfs.umount()
    time.sleep(3)
    log = tlshd.since(0)
    assert ready_pids(log) == pids and "idle for" not in log
    assert os.path.exists("/proc/%d" % pids[0])
