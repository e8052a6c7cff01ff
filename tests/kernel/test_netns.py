"""One tlshd serving every network namespace, against the real kernel.

The lab (conftest ``netns_lab``): the initial namespace and named
namespaces a and b, each with its own CA, server and client certificates,
tlshd configuration ($W/tlshd.conf, $W/netns/a/config, $W/netns/b/config),
nfsd and export; a veth pair joins a (10.99.0.1) and b (10.99.0.2).  One
tlshd, started after a and b exist, serves them all; namespace c and the
add/delete cycles come while it runs.  What the kernel consumers saw comes
from the handshake:* tracepoints, which are global: events of every
namespace land in one buffer.

Key figures are printed so that ``pytest -rA`` output can be quoted.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from tlshd.shared import keys
from tlshd.supervisor import keymaterial

pytestmark = pytest.mark.kernel

FAKE_PORT = 20490
SERVED_WITHIN = 2.0  # seconds from "ip netns add" to the tlshd group joined


def by_netns(log: str, pattern: str) -> dict[str, int]:
    """Count log lines matching ``pattern`` per "[netns X]" tag."""
    out: dict[str, int] = {}
    for m in re.finditer(pattern + r".*\[netns (\S+)\]", log):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


TEMPLATE = "tlshd: worker template"
SERVING = ["tlshd: worker [netns %s]" % n for n in ("a", "b", "init")]


def serving(children):
    """The titles of the supervisor's children other than the template
    (at most one of those), sorted."""
    titles = sorted(children.values())
    assert titles.count(TEMPLATE) <= 1, titles
    return [t for t in titles if t != TEMPLATE]


def completions(lab):
    return [e for e in lab.trace_events() if e.event == "handshake_complete"]


def wait_until(what, predicate, timeout, interval=0.02):
    """Poll ``predicate``; return the seconds it took to become true."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("%s: not within %s s" % (what, timeout))
        time.sleep(interval)
    return time.monotonic() - start


def tlshd_ids():
    pw = pwd.getpwnam("tlshd")
    return pw.pw_uid, pw.pw_gid


def check_probe_hello(r):
    """The probe booted like a worker: same identity, fully locked down."""
    uid, gid = tlshd_ids()
    want = "HELLO uid=%d gid=%d cap_eff=0 no_new_privs=1 seccomp=2" % (
        uid, gid)
    assert want in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


# ---- three namespaces, six handshakes, one process tree -----------------


def test_three_namespaces_six_handshakes_one_tree(netns_lab, trace, nfs):
    lab = netns_lab
    lab.wait_ready(["init", "a", "b"])
    mark = lab.daemon.mark()
    seen, times = {}, {}
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    times["init"] = r.seconds
    seen["init"] = Path(nfs.target, "whoami").read_text().strip()
    nfs.write_and_read_back(16 * 1024)
    for name in ("a", "b"):
        site = lab.sites[name]
        r = site.mount()
        assert r.ok, (name, r.output)
        times[name] = r.seconds
        seen[name] = site.whoami()
        data = os.urandom(16 * 1024)
        Path(site.target, "probe.bin").write_bytes(data)
        lab.drop_caches()
        assert Path(site.target, "probe.bin").read_bytes() == data
        assert "xprtsec=tls" in Path("/proc/mounts").read_text()
    assert seen == {"init": "init", "a": "a", "b": "b"}, seen
    for site in lab.sites.values():
        site.umount()
    nfs.umount()

    events = lab.trace_events()
    accepts = [e for e in events if e.event == "handshake_cmd_accept"]
    dones = [e for e in events if e.event == "handshake_cmd_done"]
    completes = [e for e in events if e.event == "handshake_complete"]
    log = lab.daemon.since(mark)
    ok = by_netns(log, r"Handshake with '.*' \(.*\) succeeded")
    tree = lab.tree()
    workers = {pid: t for pid, (pp, t) in tree.items() if pp == lab.pid}
    print("mount seconds %s; handshakes: %d accepted, %d done, statuses %s;"
          " succeeded per netns %s; ACCEPT/DONE sent by pids %s; tlshd "
          "tree: supervisor %d, workers %s" % (
              {k: round(v, 2) for k, v in times.items()}, len(accepts),
              len(dones), [c.status for c in completes], ok,
              sorted({e.pid for e in accepts + dones}), lab.pid, workers))
    if len(completes) != 6:
        # The kernel consumers retried: show what happened.
        print("\n".join(
            "%.3f %s-%d %s req=%s status=%s" % (
                e.stamp, e.comm, e.pid, e.event, e.req, e.status)
            for e in events))
        print("\n".join(re.findall(
            r".*(?:Accepted request|Handshake with|timed out|Worker).*",
            log)))
    # Every handshake the kernel asked for succeeded, at least the two of
    # each mount (client and server end) in each namespace.
    assert all(c.status == 0 for c in completes), completes
    assert len(completes) >= 6, completes
    assert set(ok) == {"init", "a", "b"}, ok
    assert all(n >= 2 for n in ok.values()), ok
    # The kernel saw ACCEPT and DONE from one process: the supervisor.
    assert {e.pid for e in accepts + dones} == {lab.pid}
    # One tree: every tlshd process is the supervisor or its child: one
    # worker per namespace (and the template workers are forked from).
    assert set(tree) == {lab.pid, *workers}, tree
    assert serving(workers) == SERVING, workers


# ---- isolation: b does not trust a ---------------------------------------


def test_b_cannot_mount_a_because_b_does_not_trust_a(netns_lab, trace):
    lab = netns_lab
    lab.wait_ready(["a", "b"])
    a, b = lab.sites["a"], lab.sites["b"]
    # Control: a's server certificate names 10.99.0.1, and a's own client
    # (trusting a's CA) mounts through that address.
    r = a.mount(host="10.99.0.1")
    assert r.ok, r.output
    assert a.whoami() == "a"
    a.umount()
    trace.clear()
    mark = lab.daemon.mark()
    r = b.mount(host="10.99.0.1", extra=",retry=0", timeout=60)
    log = lab.daemon.since(mark)
    statuses = [c.status for c in completions(lab)]
    failures = re.findall(r"Handshake with .* failed.*", log)
    print("mount from b to a: ok=%s after %.1f s (%s); statuses %s; %s"
          % (r.ok, r.seconds, r.output, statuses, failures))
    assert not r.ok, "b mounted a's export although b's CA did not sign it"
    assert -errno.EACCES in statuses, (statuses, log[-3000:])
    # The refusal is b's client, verifying a's certificate against b's CA.
    assert re.search(r"Handshake with '10\.99\.0\.1' \(10\.99\.0\.1\) "
                     r"failed: EACCES \[netns b\]", log), log[-3000:]
    assert not by_netns(log, r"Handshake with .* succeeded").get("b")


# ---- the sandbox ----------------------------------------------------------


def test_workers_run_locked_down_in_their_namespace(netns_lab):
    lab = netns_lab
    pids = lab.wait_ready(["init", "a", "b"])
    uid, gid = tlshd_ids()
    for label, pid in sorted(pids.items()):
        st = lab.proc_status(pid)
        shown = {k: st.get(k) for k in (
            "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapAmb",
            "NoNewPrivs", "Seccomp", "Seccomp_filters")}
        print("worker %d [netns %s]: %s" % (pid, label, shown))
        assert st["CapEff"] == "0" * 16, shown
        assert st["CapPrm"] == "0" * 16, shown
        assert st["CapAmb"] == "0" * 16, shown
        assert st["NoNewPrivs"] == "1", shown
        assert st["Seccomp"] == "2", shown
        assert st["Uid"].split() == [str(uid)] * 4, shown
        assert st["Gid"].split() == [str(gid)] * 4, shown
        assert st["Groups"] == "", shown
        # Every thread (the handshake pool too) carries the filter.
        for task in Path("/proc/%d/task" % pid).iterdir():
            t = lab.proc_status(int(task.name))
            assert (t["Seccomp"], t["NoNewPrivs"], t["CapEff"]) == (
                "2", "1", "0" * 16), (pid, task.name, t)
        # And it lives in the namespace it serves.
        want = ("/proc/1/ns/net" if label == "init"
                else "/run/netns/%s" % label)
        assert (os.stat("/proc/%d/ns/net" % pid).st_ino
                == os.stat(want).st_ino), label


def test_worker_of_a_cannot_read_b_key_file(netns_lab):
    lab = netns_lab
    b_key = lab.creds["b"].path("server.key")
    a_key = lab.creds["a"].path("server.key")
    r = lab.probe("a", "read-file", b_key)
    print("probe in a's sandbox reading b's key: exit %s, %r"
          % (r.returncode, r.stdout.strip().splitlines()[-1:]))
    check_probe_hello(r)
    assert "ALLOWED" not in r.stdout, r.stdout
    # seccomp kills a worker that opens any file at all; were it not
    # there, the uid would refuse (below).
    assert (r.returncode == -signal.SIGSYS
            or "DENIED EACCES" in r.stdout), (r.returncode, r.stdout)
    # The layer underneath: the worker's user, without the filter.
    uid, gid = tlshd_ids()
    u = subprocess.run(
        ["setpriv", "--reuid", str(uid), "--regid", str(gid),
         "--clear-groups", "cat", b_key], capture_output=True, text=True,
        check=False)
    print("as uid %d without seccomp: exit %d, %s"
          % (uid, u.returncode, u.stderr.strip()))
    assert u.returncode != 0 and "Permission denied" in u.stderr
    # Informative: once locked down, not even a's own key can be opened;
    # everything the worker needs was loaded before.
    r = lab.probe("a", "read-file", a_key)
    print("probe in a's sandbox reading a's own key: exit %s, %r"
          % (r.returncode, r.stdout.strip().splitlines()[-1:]))
    check_probe_hello(r)
    assert "ALLOWED" not in r.stdout


def check_key_denied(lab, ns: str, action: str, target: str) -> None:
    """``action`` on ``target`` from ``ns``'s worker sandbox fails twice
    over: seccomp kills on any keyctl, and underneath (filter in log-only
    mode) the worker possesses nothing: its session keyring is empty."""
    r = lab.probe(ns, action, target)
    print("probe in %s's sandbox, %s %s: exit %s, %r"
          % (ns, action, target, r.returncode,
             r.stdout.strip().splitlines()[-1:]))
    check_probe_hello(r)
    assert "TRY %s" % action in r.stdout, r.stdout
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stdout)
    assert "ALLOWED" not in r.stdout and "FOUND" not in r.stdout
    r = lab.probe(ns, action, target, seccomp_log=True)
    print("  the same with seccomp only logging: exit %s, %r"
          % (r.returncode, r.stdout.strip().splitlines()[-1:]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"DENIED (EACCES|ENOKEY)", r.stdout), r.stdout


def test_worker_of_a_cannot_read_b_user_key(netns_lab):
    """A root-owned key of b's (possessor all, user view: 0x3f010000)."""
    lab = netns_lab
    # In the test process's own process keyring, which it surely
    # possesses: the user keyring is possessed only while the session
    # keyring links it, and the NVMe tests' add_key to the session keyring
    # made the kernel give this process a fresh anonymous one.
    ring = keys.add("keyring", "tlshd-test-b", b"",
                    keys.KEY_SPEC_PROCESS_KEYRING)
    serial = keys.add("user", "b-secret", b"secret of namespace b", ring)
    keys.setperm(serial, 0x3F010000)
    try:
        assert keys.read(serial) == b"secret of namespace b"  # root can
        check_key_denied(lab, "a", "read-key", str(serial))
    finally:
        keys.unlink(ring, keys.KEY_SPEC_PROCESS_KEYRING)


def test_worker_of_a_cannot_read_b_nvme_psk(netns_lab):
    """b's NVMe/TCP PSK where NVMe keeps it: in .nvme, created in b.

    The daemon's session keyring links ``.nvme`` (and ACCEPT links the
    consumers' keyrings into the supervisor's process keyring), so a
    worker that inherited it would possess every namespace's PSKs.
    Workers join an empty session keyring and may not call keyctl; the
    supervisor reads keys for them and searches a server's PSK only in
    the keyrings the request's namespace may use (the kernel's search of
    the global .nvme does not tell namespaces apart).
    """
    lab = netns_lab
    r = subprocess.run(["modprobe", "nvme-keyring"], check=False)
    assert r.returncode == 0
    nvme = keys.find_keyrings(".nvme")
    assert nvme, "no .nvme keyring after modprobe nvme-keyring"
    identity = ("NVMe0R01 nqn.2014-08.org.example:host-b "
                "nqn.2014-08.org.example:subsys-b")
    with lab.in_netns("b"):
        serial = keys.add("psk", identity, os.urandom(32), nvme[0])
    try:
        check_key_denied(lab, "a", "read-key", str(serial))
        check_key_denied(lab, "a", "search-psk", identity)
        # What the supervisor finds for a server worker's PSK_LOOKUP.  The
        # kernel's search does not tell namespaces apart (printed, not
        # asserted: that is the kernel's business), which is why a
        # namespace other than the initial one searches only keyrings of
        # its own: none for a, whose configuration names no keyring.
        ident = identity.encode()
        keys.link(nvme[0], keys.KEY_SPEC_PROCESS_KEYRING)  # possess it
        try:
            with lab.in_netns("a"):
                raw = keymaterial.lookup_psk(nvme, ident)
        finally:
            keys.unlink(nvme[0], keys.KEY_SPEC_PROCESS_KEYRING)
        from_a = keymaterial.find_psk(ident, nvme[0], False, ())
        from_b = keymaterial.find_psk(ident, nvme[0], False, (".nvme",))
        from_init = keymaterial.find_psk(ident, nvme[0], True, ())
        print("kernel search of .nvme from a finds b's key: %s; "
              "supervisor's lookup for a: %s, for b (keyrings=.nvme): %s, "
              "for the initial namespace: %s"
              % (raw is not None, from_a, from_b and from_b.serial,
                 from_init and from_init.serial))
        assert from_a is None
        assert from_b is not None and from_b.serial == serial
    finally:
        keys.unlink(serial, nvme[0])


# ---- namespaces come and go ----------------------------------------------


def test_namespace_added_later_is_served_and_removed(netns_lab, trace):
    lab = netns_lab
    lab.wait_ready(["init", "a", "b"])
    lab.group_id()
    lab.netns_config("c", lab.new_creds("c"))
    site = lab.new_site("c")
    start = time.monotonic()
    site.create()  # ip netns add c; ip -n c link set lo up
    created = time.monotonic()
    wait_until("tlshd group joined in c", lambda: lab.group_joined("c"),
               10)
    served = time.monotonic() - created
    site.start_nfs(["127.0.0.1"])
    pid = lab.wait_ready(["c"])["c"]
    ready = time.monotonic() - start
    mark = lab.daemon.mark()
    trace.clear()
    r = site.mount()
    assert r.ok, r.output
    assert site.whoami() == "c"
    site.umount()
    statuses = [c.status for c in completions(lab)]
    ok = by_netns(lab.daemon.since(mark),
                  r"Handshake with '.*' \(.*\) succeeded")
    site.stop_nfs()
    lab.sites.pop("c")
    site.delete()  # ip netns del c
    deleted = time.monotonic()
    wait_until("worker for c stopped",
               lambda: "c" not in lab.status()
               and not os.path.exists("/proc/%d" % pid), 30, 0.05)
    stopped = time.monotonic() - deleted
    print("netns c: served (group joined) %.2f s after ip netns add "
          "returned (%.2f s after it started); worker %d ready after "
          "%.1f s; mount %.1f s, statuses %s, succeeded %s; worker gone "
          "%.2f s after ip netns del returned"
          % (served, served + created - start, pid, ready, r.seconds,
             statuses, ok, stopped))
    assert served <= SERVED_WITHIN
    assert statuses == [0, 0], statuses
    assert ok == {"c": 2}, ok
    assert stopped <= SERVED_WITHIN
    assert "netns c is gone; stopping its worker" in lab.daemon.log()


def test_namespace_mounted_late_is_served(netns_lab):
    """``ip netns add`` creates /run/netns/NAME, sets the namespace up and
    only then mounts it there; that mount makes no inotify event.  Setting
    up can take seconds on a busy machine: here the mount comes 3 s after
    the file."""
    lab = netns_lab
    lab.wait_ready(["init"])
    lab.group_id()
    Path("/run/netns/late").touch()
    try:
        time.sleep(3.0)
        subprocess.run(["unshare", "--net=/run/netns/late", "true"],
                       check=True)
        mounted = time.monotonic()
        wait_until("tlshd group joined in late",
                   lambda: lab.group_joined("late"), 10)
        served = time.monotonic() - mounted
        pid = lab.wait_ready(["late"])["late"]
        print("netns mounted 3 s after its file appeared: served %.2f s "
              "after the mount; worker %d" % (served, pid))
        assert served <= SERVED_WITHIN
    finally:
        subprocess.run(["ip", "netns", "del", "late"], check=False)
    wait_until("late dropped", lambda: "late" not in lab.status(), 10)


def test_add_delete_cycles_leave_supervisor_flat(netns_lab):
    """50 add/delete cycles (after 5 for warm-up); the namespaces fall to
    ``[netns] default=``.  Most are deleted while their worker still
    boots; every tenth waits until it is ready."""
    lab = netns_lab
    base = lab.wait_ready(["init", "a", "b"])
    lab.group_id()
    served_times, add_times, cycle_times = [], [], []

    def cycle(i, wait_ready):
        name = "cyc%d" % i
        start = time.monotonic()
        subprocess.run(["ip", "netns", "add", name], check=True)
        created = time.monotonic()
        wait_until("group joined in " + name,
                   lambda: lab.group_joined(name), 10)
        served_times.append(time.monotonic() - created)
        add_times.append(created - start)
        if wait_ready:
            pid = lab.wait_ready([name])[name]
        else:
            rows = {}

            def started():
                nonlocal rows
                rows = lab.status()
                return rows.get(name, {}).get("worker_pid") is not None

            wait_until("worker started for " + name, started, 10, 0.05)
            pid = rows[name]["worker_pid"]
        subprocess.run(["ip", "netns", "del", name], check=True)
        wait_until("%s dropped and worker %d gone" % (name, pid),
                   lambda: name not in lab.status()
                   and not os.path.exists("/proc/%d" % pid), 30, 0.05)
        cycle_times.append(time.monotonic() - start)

    for i in range(5):
        cycle(i, wait_ready=(i == 0))
    fd0, rss0 = lab.fd_count(lab.pid), lab.rss_kib(lab.pid)
    for i in range(5, 55):
        cycle(i, wait_ready=(i % 10 == 0))
    fd1, rss1 = lab.fd_count(lab.pid), lab.rss_kib(lab.pid)
    tree = lab.tree()
    workers = serving({pid: t for pid, (pp, t) in tree.items()
                       if pp == lab.pid})
    measured = served_times[5:]
    print("50 cycles: supervisor fds %d -> %d, VmRSS %d -> %d KiB "
          "(%+d KiB); served after ip netns add returned: min %.2f median "
          "%.2f max %.2f s (ip netns add itself: median %.2f max %.2f s); "
          "cycle median %.1f s; workers left %s"
          % (fd0, fd1, rss0, rss1, rss1 - rss0, min(measured),
             statistics.median(measured), max(measured),
             statistics.median(add_times), max(add_times),
             statistics.median(cycle_times), workers))
    assert fd1 == fd0
    assert rss1 - rss0 < 2048
    assert max(measured) <= SERVED_WITHIN, measured
    assert workers == SERVING, tree
    # The long-lived workers were not disturbed.
    assert lab.wait_ready(["init", "a", "b"]) == base
    assert set(lab.status()) == {"init", "a", "b"}


# ---- a worker dies mid-handshake ------------------------------------------


def test_sigkill_worker_mid_handshake(netns_lab, trace):
    lab = netns_lab
    old = lab.wait_ready(["a"])["a"]
    site = lab.sites["a"]
    os.makedirs(site.target, exist_ok=True)
    peer = lab.silent_peer("a", FAKE_PORT)
    try:
        mark = lab.daemon.mark()
        trace.clear()
        start = time.monotonic()
        mount = subprocess.Popen(
            ["nsenter", "--net=/run/netns/a", "timeout", "90", "mount",
             "-t", "nfs", "-o", "vers=4.2,xprtsec=tls,port=%d,retry=0,soft,"
             "timeo=50,retrans=1" % FAKE_PORT, "127.0.0.1:/", site.target],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Worker a holds the request and its ClientHello went out.
        wait_until(
            "request accepted in a and ClientHello sent",
            lambda: re.search(r"Accepted request \d+ in netns a",
                              lab.daemon.since(mark)) and peer.hellos > 0,
            60, 0.05)
        os.kill(old, signal.SIGKILL)
        killed = time.monotonic()
        answered = wait_until("a DONE after the kill",
                              lambda: completions(lab), 30, 0.05)
        first = completions(lab)[0]
        out, _ = mount.communicate(timeout=120)
        after_kill = time.monotonic() - killed
    finally:
        peer.close()
        if mount.poll() is None:
            mount.kill()
    log = lab.daemon.since(mark)
    print("worker %d killed mid-handshake: kernel heard status %d %.2f s "
          "later; mount exit %d %.1f s after the kill (%.1f s in all): %s"
          % (old, first.status, answered, mount.returncode, after_kill,
             time.monotonic() - start, out.strip()))
    assert first.status == -errno.EIO, completions(lab)
    assert answered < 3.0
    assert re.search(r"Worker %d for netns a killed by SIGKILL; 1 "
                     r"request\(s\) in flight" % old, log), log[-3000:]
    assert mount.returncode != 0
    # Promptly: not at the NFS client's 20 s handshake timeout.
    assert after_kill < 15.0, after_kill
    # A new worker takes over, and the next mount in a succeeds.
    new = lab.wait_ready(["a"], not_pid={"a": old})["a"]
    trace.clear()
    r = site.mount()
    assert r.ok, r.output
    assert site.whoami() == "a"
    site.umount()
    statuses = [c.status for c in completions(lab)]
    print("respawned worker %d; next mount in a ok after %.1f s, statuses %s"
          % (new, r.seconds, statuses))
    assert statuses == [0, 0], statuses
