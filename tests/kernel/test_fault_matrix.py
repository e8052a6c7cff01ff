"""Fault matrix under load: NFS mounts in parallel while peers reset,
peers stall, the worker is SIGKILLed, SIGHUP reloads the configuration,
namespaces with a handshake in flight are deleted, and the supervisor
itself is SIGKILLed and started again (as systemd's Restart=on-failure
would, without its RestartSec).

The kernel's handshake:* tracepoints are the judge: every request a
consumer submitted is completed exactly once (by our DONE; none by the
consumer giving up), every ACCEPTed socket gets exactly one DONE, and the
supervisor's fd count and RSS are flat afterwards.  A supervisor restart
is the one exception the kernel forces: what the dead supervisor had
ACCEPTed and not yet answered can only end by its consumer's timeout
(no one else can send DONE for an fd of a dead process); every other
request, those still queued in the kernel at the kill among them, gets
exactly one DONE from the new supervisor.

tools/test runs it at CI length (TLSHD_FAULT_SECONDS, default 45 s);
tools/fault-matrix runs the long version (600 s).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from lab import nvme

pytestmark = pytest.mark.kernel

SECONDS = float(os.environ.get("TLSHD_FAULT_SECONDS", "45"))
PARALLEL = int(os.environ.get("TLSHD_FAULT_MOUNTS", "3"))
NCONNECT = int(os.environ.get("TLSHD_FAULT_NCONNECT", "4"))
RESET_PORT = 20494
STALL_PORT = 20495
NS_STALL_PORT = 20496
PEER_OPTS = ",retry=0,soft,timeo=50,retrans=1,port=%d"
# NVMe/TCP load: I/O queues connected at once per cycle (0: no NVMe).
NVME_QUEUES = int(os.environ.get("TLSHD_FAULT_NVME_QUEUES", "16"))
# Workers on demand (conftest's netns_lab reads this), idling out after
# 5 s: the init worker exits in the gaps of the load (after a supervisor
# restart, while mounts fail) and the next request starts another; the
# namespaces of the deletion loop start theirs with their one mount.
WORKER_IDLE_TIMEOUT = "5"


def mount(target: str, opts: str, source: str = "127.0.0.1:/",
          netns: str | None = None, timeout: int = 40,
          failures: list[str] | None = None) -> bool:
    os.makedirs(target, exist_ok=True)
    cmd = ["timeout", str(timeout), "mount", "-t", "nfs", "-o",
           "vers=4.2," + opts, source, target]
    if netns:
        cmd = ["nsenter", "--net=/run/netns/" + netns, *cmd]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           timeout=timeout + 20)
    except subprocess.TimeoutExpired:
        # timeout(1)'s SIGTERM did not end mount.nfs (waiting in the
        # kernel): a failed mount, not the end of the load loop.
        if failures is not None:
            failures.append("mount did not end within %d s" % (timeout + 20))
        return False
    if r.returncode and failures is not None:
        failures.append((r.stdout + r.stderr).strip()[-200:])
    return r.returncode == 0


def umount(target: str) -> None:
    subprocess.run(["umount", target], capture_output=True, check=False)


class Lifetime:
    """One request's events, from its handshake_submit on."""

    def __init__(self) -> None:
        self.events: collections.Counter[str] = collections.Counter()
        self.status: int | None = None
        self.raw: list[str] = []  # for the failure message
        self.submitted: float | None = None  # trace clock (monotonic)
        # ACCEPTs and DONEs (done_err too) by the pid that sent them.
        self.accepts: collections.Counter[int] = collections.Counter()
        self.dones: collections.Counter[int] = collections.Counter()

    def orphaned(self, dead: set[int]) -> bool:
        """ACCEPTed by a supervisor that was killed before its DONE."""
        return any(self.dones[pid] < n for pid, n in self.accepts.items()
                   if pid in dead)

    def dones_match(self, dead: set[int]) -> bool:
        """Each ACCEPT answered by exactly one DONE from the same process;
        a killed supervisor's may be missing."""
        pids = set(self.accepts) | set(self.dones)
        return all(self.dones[p] == self.accepts[p]
                   or (p in dead and self.dones[p] < self.accepts[p])
                   for p in pids)


FINISHED = ("handshake_complete", "handshake_destruct")


def lifetimes(events: list[Any]) -> list[Lifetime]:
    """Split the trace into request lifetimes.

    Three kernel details shape this:

    * the kernel reuses request addresses, so ``req=`` alone does not
      name a request: a submit starts a new lifetime;
    * handshake_req_submit traces the submit only after it has queued the
      request and multicast READY, so the agent's ACCEPT can be traced a
      few microseconds *before* the submit: an accept (or DONE) for an
      address whose lifetime has finished starts the next lifetime, which
      the submit then joins;
    * a DONE for a request the consumer has already cancelled finds no
      request: it is traced as handshake_cmd_done_err with a NULL req, so
      such an event is given to the newest lifetime of its socket (sk).
    """
    current: dict[str, Lifetime] = {}
    by_sock: dict[str, Lifetime] = {}
    out = []

    def start(req: str) -> Lifetime:
        life = Lifetime()
        current[req] = life
        out.append(life)
        return life

    for ev in events:
        life = current.get(ev.req)
        finished = life is not None and any(life.events[e] for e in FINISHED)
        if ev.event == "handshake_submit":
            if life is None or life.events["handshake_submit"] or finished:
                life = start(ev.req)
        elif ev.event in ("handshake_cmd_accept", "handshake_cmd_done"):
            if life is None or finished:
                life = start(ev.req)
        elif ev.event == "handshake_cmd_done_err" and (life is None
                                                       or finished):
            life = by_sock.get(ev.sk)
        if life is None:
            continue
        if ev.sk:
            by_sock[ev.sk] = life
        life.events[ev.event] += 1
        if ev.event == "handshake_submit":
            life.submitted = ev.stamp
        elif ev.event == "handshake_cmd_accept":
            life.accepts[ev.pid] += 1
        elif ev.event in ("handshake_cmd_done", "handshake_cmd_done_err"):
            life.dones[ev.pid] += 1
        life.raw.append("%.6f %s-%d %s req=%s sk=%s %s" % (
            ev.stamp, ev.comm, ev.pid, ev.event, ev.req, ev.sk, ev.status))
        if ev.event == "handshake_complete":
            life.status = ev.status
    return out


def settled(lab: Any, timeout: float = 120) -> None:
    """Wait until every worker has idled out and been reaped (each held a
    pidfd and a channel): the supervisor's fds are then its own."""
    end = time.monotonic() + timeout
    while True:
        lab.wait_served(["init", "a", "b"], timeout=timeout,
                        no_workers=True)
        children = [pid for pid, (ppid, title) in lab.tree().items()
                    if ppid == lab.pid and "template" not in title]
        if not children or time.monotonic() > end:
            return
        time.sleep(0.5)


@pytest.fixture
def nvme_target() -> Iterator[ModuleType | None]:
    """nvmet with a TLS port and a retained SHA-256 PSK in .nvme
    (the lab.nvme module), or None without NVMe load."""
    if not NVME_QUEUES:
        yield None
        return
    target = nvme.Target()
    psks = nvme.PskKeys()
    try:
        target.setup()
        psks.add(nvme.identity("01"), os.urandom(32))
        yield nvme
    finally:
        target.teardown()
        psks.remove()


def test_fault_matrix_under_load(netns_lab, trace, nvme_target,
                                 rpc_tls_peer):
    lab = netns_lab
    nvme = nvme_target
    # Room for every event of the run (default: 1.4 MiB per CPU).
    Path("/sys/kernel/tracing/buffer_size_kb").write_text("16384")
    trace.clear()
    # Warm up, then take the supervisor's baseline.  The write also waits
    # out nfsd's grace period, should it still run (a file is created):
    # the load's writes would otherwise block until it ends.
    assert mount("/mnt/fm-warm", "xprtsec=tls"), "warm-up mount failed"
    Path("/mnt/fm-warm/warm").write_bytes(b"warm")
    umount("/mnt/fm-warm")
    settled(lab)
    fd0, rss0 = lab.fd_count(lab.pid), lab.rss_kib(lab.pid)
    trace.clear()
    mark = lab.daemon.mark()
    stop = threading.Event()
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    load_failures: list[str] = []
    # Successful load mounts: (start, end), time.monotonic().
    mounted: list[tuple[float, float]] = []
    # Supervisor restarts: (killed pid, new pid, time of the kill, time
    # the new one was ready).
    restarts: list[tuple[int, int, float, float]] = []
    # Load steps that took over 8 s: (step, load, began, seconds).
    slow: list[tuple[str, int, float, float]] = []

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def load(i: int) -> None:
        mode = ("tls", "mtls")[i % 2]
        export = ("", "mtls")[i % 2]
        target = "/mnt/fm-%d" % i
        def timed(step: str, since: float) -> float:
            now = time.monotonic()
            if now - since > 8:
                with lock:
                    slow.append((step, i, since, now - since))
            return now

        while not stop.is_set():
            began = time.monotonic()
            ok = mount(target, "xprtsec=%s,nconnect=%d" % (mode, NCONNECT),
                       "127.0.0.1:/%s" % export, failures=load_failures)
            ended = timed("mount", began)
            count("load mount ok" if ok else "load mount failed")
            if not ok:
                # Not a tight loop while no agent listens (ESRCH at once):
                # it would starve the restarting supervisor of CPU.
                stop.wait(1.0)
            else:
                with lock:
                    mounted.append((began, ended))
                try:
                    Path(target, "f%d" % i).write_bytes(os.urandom(4096))
                except OSError:
                    count("load write failed")
                written = timed("write", ended)
                umount(target)
                timed("umount", written)

    def peer_mounts(port: int, mode: str, target: str, timeout: int,
                    mounts_key: str, hellos_key: str) -> None:
        """Mount from a misbehaving peer (conftest's RpcTlsPeer) until
        stopped; count the mounts and the ClientHellos it saw."""
        peer = rpc_tls_peer(port, mode)
        try:
            while not stop.is_set():
                began = time.monotonic()
                mount(target, "xprtsec=tls" + PEER_OPTS % port,
                      timeout=timeout)
                count(mounts_key)
                if time.monotonic() - began < 1.0:
                    stop.wait(1.0)  # ESRCH: no agent (a restart)
        finally:
            peer.close()
            counts[hellos_key] = peer.hellos

    def namespaces() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            name = "fm%d" % n
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"],
                           check=True)
            peer = None
            try:
                lab.wait_served([name], timeout=600)
                peer = lab.silent_peer(name, NS_STALL_PORT)
                nsmark = lab.daemon.mark()
                m = subprocess.Popen(
                    ["nsenter", "--net=/run/netns/" + name, "timeout", "40",
                     "mount", "-t", "nfs", "-o", "vers=4.2,xprtsec=tls"
                     + PEER_OPTS % NS_STALL_PORT, "127.0.0.1:/",
                     "/mnt/fm-ns"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                end = time.monotonic() + 30
                while (time.monotonic() < end and not re.search(
                        r"Accepted request \d+ in netns %s\b" % name,
                        lab.daemon.since(nsmark))):
                    time.sleep(0.05)
                subprocess.run(["ip", "netns", "del", name], check=True)
                count("netns deleted in flight")
                m.wait(60)
            finally:
                if peer is not None:
                    peer.close()
                subprocess.run(["ip", "netns", "del", name],
                               capture_output=True, check=False)

    def nvme_load() -> None:
        """Connect NVME_QUEUES I/O queues at once (TLS 1.3 PSK from
        .nvme, a handshake per queue at both ends), move a block on the
        first controller, disconnect; again."""
        split = nvme.queue_split(NVME_QUEUES, os.cpu_count() or 1)
        while not stop.is_set():
            conns: list[Any] = [None] * len(split)

            def one(i: int, opt: str) -> None:
                conns[i] = nvme.connect_with(
                    opt + (",duplicate_connect" if len(split) > 1 else ""))

            ts = [threading.Thread(target=one, args=(i, opt))
                  for i, opt in enumerate(split)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            ok = [c.instance for c in conns if c is not None and c.ok]
            count("nvme connects ok" if len(ok) == len(split)
                  else "nvme connects failed")
            count("nvme controllers ok %d" % len(ok))
            if len(ok) < len(split):
                stop.wait(1.0)  # as the NFS load: no tight loop
            try:
                if ok:
                    nvme.write_read_back(nvme.block_device(ok[0]))
                    count("nvme block read back")
            except (AssertionError, OSError):
                count("nvme block failed")
            finally:
                for inst in ok:
                    nvme.disconnect(inst)

    def signals() -> None:
        i = 0
        # Gentle enough for a loaded 2-vCPU TCG guest, where a worker
        # takes seconds to start: every 10 s a reload or a kill; the
        # worker is killed every 30 s, the supervisor at 40 s and then
        # every 60 s (started again at once; the next signal waits until
        # its init worker is ready).
        while not stop.wait(10.0):
            i += 1
            if i % 6 == 4:
                old = lab.pid
                # Starting takes 20-100 s in a loaded TCG guest.
                killed, ready = lab.daemon.kill_and_restart(timeout=600)
                with lock:
                    restarts.append((old, lab.pid, killed, ready))
                count("supervisor SIGKILL")
            elif i % 3 == 0:
                pid = lab.wait_ready(["init"], timeout=60)["init"]
                os.kill(pid, signal.SIGKILL)
                count("worker SIGKILL")
            else:
                lab.daemon.proc.send_signal(signal.SIGHUP)
                count("SIGHUP")

    threads = [threading.Thread(target=load, args=(i,))
               for i in range(PARALLEL)]
    threads += [
        threading.Thread(target=peer_mounts, args=(
            RESET_PORT, "reset", "/mnt/fm-reset", 20, "reset mount",
            "peer resets")),
        threading.Thread(target=peer_mounts, args=(
            STALL_PORT, "hold", "/mnt/fm-stall", 30, "stall mount",
            "stall hellos")),
    ]
    threads += [threading.Thread(target=f) for f in (namespaces, signals)]
    if NVME_QUEUES:
        threads.append(threading.Thread(target=nvme_load))
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(SECONDS)

    def served_by_new(new: int, killed: float,
                      events: list[Any]) -> list[float]:
        """Ends of the load mounts begun after the kill during which the
        new supervisor completed a handshake (a mount that reused another
        mount's transport needed none, and proves nothing)."""
        served = [ev.stamp for ev in events
                  if ev.event == "handshake_complete" and ev.pid == new
                  and ev.status == 0]
        with lock:
            after = [(b, e) for b, e in mounted if b > killed]
        return [e for b, e in after if any(b <= t <= e for t in served)]

    def recovered() -> bool:
        with lock:
            if not restarts:
                return False
            _, new, killed, _ = restarts[-1]
        return bool(served_by_new(new, killed, trace.events()))

    # The schedule slips on a loaded host: keep the load going until a
    # supervisor restart has happened and a mount begun after it was
    # served by the new supervisor (or 5 minutes more; the checks below
    # then fail).
    end = time.monotonic() + 300
    while not recovered() and time.monotonic() < end:
        time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(180)
    elapsed = time.monotonic() - start
    # Let the last requests finish, the workers come back.
    time.sleep(5)
    settled(lab)
    fd1, rss1 = lab.fd_count(lab.pid), lab.rss_kib(lab.pid)
    events = trace.events()
    lives = lifetimes(events)
    dead = {pid for pid, _, _, _ in restarts}
    statuses = collections.Counter(life.status for life in lives)
    cancelled = [life for life in lives if life.events["handshake_cancel"]]
    lost = [life for life in lives
            if life.events["handshake_complete"]
            + life.events["handshake_cancel"] != 1]
    bad_done = [life for life in lives if not life.dones_match(dead)]
    # What a killed supervisor held: only its consumer's timeout ends it.
    orphaned = [life for life in lives if life.orphaned(dead)]
    # Queued in the kernel at a kill, not yet ACCEPTed: the new supervisor
    # ACCEPTs them when it joins (no READY comes for them again).
    queued = [life for life in lives if any(
        life.submitted is not None and life.submitted < killed
        and life.accepts[new] for _, new, killed, _ in restarts)]
    # Kill -> the end of the first successful load mount begun after the
    # kill during which the new supervisor completed a handshake (one
    # that needed none reused another mount's transport), and kill ->
    # the end of any successful load mount begun after it.
    recovery: list[tuple[float, float | None, float | None]] = []
    for _, new, killed, ready in restarts:
        after = [(began, end) for began, end in mounted if began > killed]
        needed = served_by_new(new, killed, events)
        recovery.append((ready - killed,
                         min(needed) - killed if needed else None,
                         min(e for _, e in after) - killed if after
                         else None))
    log = lab.daemon.since(mark)
    print("fault matrix: %.0f s, %d parallel loads (nconnect=%d): %s; "
          "requests submitted %d, completed by DONE %d, statuses %s, "
          "cancelled by the consumer %d, not completed exactly once %d, "
          "DONE != ACCEPT %d; tracebacks in the log %d; supervisor fds "
          "%d -> %d, VmRSS %d -> %d KiB"
          % (elapsed, PARALLEL, NCONNECT, dict(counts), len(lives),
             sum(life.events["handshake_complete"] for life in lives),
             dict(statuses), len(cancelled), len(lost), len(bad_done),
             log.count("Traceback"), fd0, fd1, rss0, rss1))
    print("supervisor restarts %d: ACCEPTed by a killed supervisor and "
          "unanswered %d (ended by the consumer's cancel %d); queued in "
          "the kernel at the kill and ACCEPTed by the new one %d (DONE "
          "%d, of them after the consumer's cancel %d); kill -> new init "
          "worker ready / -> end of the first load mount begun after the "
          "kill that the new supervisor served / -> any such mount: %s"
          % (len(restarts), len(orphaned),
             sum(bool(life.events["handshake_cancel"]) for life in orphaned),
             len(queued),
             sum(sum(life.dones.values()) for life in queued),
             sum(bool(life.events["handshake_cancel"]) for life in queued),
             "; ".join(" / ".join("%.1f s" % t if t is not None else "never"
                                  for t in row) for row in recovery)))
    durations = sorted(end - began for began, end in mounted)
    if durations:
        print("load mount durations: median %.1f s, max %.1f s"
              % (durations[len(durations) // 2], durations[-1]))
    print("load mount failures (last 3): %s" % load_failures[-3:])
    print("load steps over 8 s (step, load, began after the start, "
          "seconds): %s" % [(st, n, round(b - start, 1), round(d, 1))
                            for st, n, b, d in slow])
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True,
                           check=False).stdout.splitlines()
    print("dmesg, NFS and RPC lines (last 15): %s"
          % [ln for ln in dmesg if re.search(r"nfs|rpc|NFS", ln)][-15:])
    # How the load came back after each supervisor kill, in seconds from
    # the kill: the load mounts around it, and the new supervisor's DONEs.
    for old, new, killed, ready in restarts:
        around = sorted((b - killed, e - killed) for b, e in mounted
                        if e > killed - 5)[:12]
        dones = [(round(ev.stamp - killed, 1), ev.status) for ev in events
                 if ev.event == "handshake_complete" and ev.pid == new][:20]
        print("restart %d -> %d, ready %.1f s: load mounts (began, ended) "
              "%s; the new supervisor's first DONEs (time, status) %s"
              % (old, new, ready - killed,
                 ", ".join("(%.1f, %.1f)" % m for m in around), dones))
    assert lab.daemon.proc.poll() is None, "the supervisor died"
    assert counts["load mount ok"] > 0
    assert counts["worker SIGKILL"] > 0 and counts["SIGHUP"] > 0
    assert counts["supervisor SIGKILL"] > 0
    assert counts["netns deleted in flight"] > 0
    assert counts["peer resets"] > 0 and counts["stall mount"] > 0
    assert not lost, [life.raw for life in lost[:5]]
    # A stalled peer may outlast the consumer's own wait (the lab's
    # configuration keeps the 15 s default deadline): those, and only as
    # many, may end by the consumer's cancel.  So may what a killed
    # supervisor held (nothing else can answer it), and what waited in
    # the kernel while no supervisor ran (its consumer's timer runs from
    # its submit).
    excused = {id(life) for life in orphaned}
    for _, _, killed, ready in restarts:
        excused.update(id(life) for life in lives
                       if life.submitted is not None
                       and killed - 15 < life.submitted < ready)
    stalled = counts["stall mount"] + counts["netns deleted in flight"]
    unexcused = [life for life in cancelled if id(life) not in excused]
    assert len(unexcused) <= stalled, (len(unexcused), dict(counts))
    assert not bad_done, [life.raw for life in bad_done[:5]]
    # Every request the new supervisor ACCEPTed got exactly one DONE from
    # it (dones_match), and the mount loop came back without waiting for
    # a consumer's timeout (NFS client: 10 s) on the way.
    for restart_time, served_after, _ in recovery:
        assert served_after is not None, recovery
        assert served_after < restart_time + 10 + max(durations), recovery
    assert "Traceback" not in log, log[-3000:]
    assert fd1 == fd0
    assert rss1 - rss0 < 4096
