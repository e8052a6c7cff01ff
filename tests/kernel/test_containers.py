"""Real containers served by one tlshd, registered at run time (issue 18).

The runtime is Debian's podman (4.3) with crun, on a local root
directory (``--rootfs``; no image, no registry; tests/lab/podman.py),
``--network none`` plus a veth the test moves into the container's
namespace, and tlshd's OCI hook files from packaging/oci-hooks: at
createRuntime the hook registers the container's /proc/PID/ns/net with
the configuration its annotation ``org.tlshd.config`` names, at poststop
it removes the registration.  The lab (tests/lab/containers.py): the host
runs tlshd and the NFS server, whose export admits the containers' veths
over mutual TLS only; each tenant has a CA and a client certificate of
its own; the host's server end trusts every tenant's CA.

Mounts are made inside the container's mount and network namespaces
(``nsenter -t PID -m -n -r``, what ``podman exec`` does, without its
10 s of start-up under TCG); the kernel's NFS client then asks tlshd in
the container's network namespace for the handshake.

The tests run in order and share the lab: containers A and B (hook),
a rootless-style namespace (``unshare -Urn`` as nobody, registered with
``tlshdctl netns add --allow-userns``), then the faults, then a restart
with B and the rootless one still registered.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab.containers import STATE_FILE, ContainerLab, ns_inode
from lab.podman import wait_gone
from lab.shell import ensure_worker_user, sh

pytestmark = pytest.mark.kernel

TENANTS = ["a", "b", "u"]
SUCCEEDED = r"Handshake with '.*' \(.*\) succeeded"


@pytest.fixture(scope="module")
def lab(nfs_server: str) -> Iterator[ContainerLab]:
    ensure_worker_user()
    workdir = Path(tempfile.mkdtemp(prefix="tlshd-containers-"))
    workdir.chmod(0o755)
    lab = ContainerLab(workdir, TENANTS)
    try:
        lab.open(nfs_server)
        yield lab
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)


# What the tests pass along (they run in order).
seen: dict[str, object] = {}


def by_netns(log: str, pattern: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in re.finditer(pattern + r".*\[netns (\S+)\]", log):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def ctr_sh(pid: int, cmd: str, timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
    """``cmd`` in the container's mount and network namespaces and
    root, as ``podman exec`` runs it."""
    return sh("nsenter -t %d -m -n -r -w sh -c '%s'" % (pid, cmd),
              check=False, timeout=timeout)


def mount_and_read(pid: int, host: str) -> str:
    """Mount the host's export over mTLS from inside the namespaces of
    ``pid``, read its whoami, unmount; returns what it read."""
    r = ctr_sh(pid, "timeout 90 mount -t nfs -o vers=4.2,xprtsec=mtls,"
               "retry=0 %s:/ /mnt && cat /mnt/whoami; s=$?; umount /mnt; "
               "exit $s" % host)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout.strip()


def start_container(lab: ContainerLab, name: str) -> tuple[str, int]:
    """podman run with the tenant's configuration in the annotation;
    returns (container id, pid of its first process)."""
    start = time.monotonic()
    r = lab.podman.run(name, {
        "org.tlshd.config": str(lab.tenant_config(name))})
    assert r.returncode == 0, (r.stdout, r.stderr)
    cid = r.stdout.strip().splitlines()[-1]
    pid = lab.podman.pid(name)
    print("container %s (%s) up in %.1f s, pid %d"
          % (name, cid[:12], time.monotonic() - start, pid))
    return cid, pid


def check_worker_in(lab: ContainerLab, label: str, netns_path: str) -> int:
    """``label``'s worker: ready, locked down, in that namespace."""
    pid = lab.wait_worker(label)
    st = dict(line.split(":\t", 1) for line in
              Path("/proc/%d/status" % pid).read_text().splitlines()
              if ":\t" in line)
    assert st["CapEff"].strip() == "0" * 16, st
    assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1"
    assert ns_inode("/proc/%d/ns/net" % pid) == ns_inode(netns_path)
    return pid


# ---- two containers, two tenants, one host ---------------------------------


def test_two_containers_mount_with_their_own_certificates(lab, trace):
    mark = lab.daemon.mark()
    ids = {}
    for name in ("a", "b"):
        cid, pid = start_container(lab, name)
        ids[name] = (cid, pid)
        # The hook registered it under the container's id, before its
        # process ran; the source says so.
        rows = lab.wait_status("%s served" % name, lambda r: cid in r)
        assert rows[cid]["source"] == (
            "registered by oci %s: /proc/%d/ns/net" % (cid, pid)), rows[cid]
        assert rows[cid]["config"] == str(lab.tenant_config(name))
        seen[name + "_worker"] = check_worker_in(
            lab, cid, "/proc/%d/ns/net" % pid)
        seen[name + "_host"] = lab.connect(pid)
    seen["ids"] = ids
    for name in ("a", "b"):
        cid, pid = ids[name]
        assert mount_and_read(pid, seen[name + "_host"]) == "init"
    log = lab.daemon.since(mark)
    peers = re.findall(r".*Peer certificate: .*", log)
    print("\n".join(peers))
    ok = by_netns(log, SUCCEEDED)
    print("handshakes succeeded per netns: %s" % ok)
    # The server end (the host) saw each tenant's own client certificate;
    # each container's end saw the host's server certificate.
    for name in ("a", "b"):
        cid = ids[name][0]
        assert re.search(r"Peer certificate: .*client-tenant-%s\b.*"
                         r"\[netns init\]" % name, log), peers
        assert re.search(r"Peer certificate: .*server-host\b.*\[netns %s\]"
                         % cid, log), peers
        assert ok.get(cid, 0) >= 1, ok
    assert ok.get("init", 0) >= 2, ok
    assert all(c.status == 0 for c in trace.events()
               if c.event == "handshake_complete")


def test_container_b_worker_cannot_read_a_key(lab):
    _b_cid, b_pid = seen["ids"]["b"]
    a_key = lab.tenants["a"].path("client.key")
    b_ns = "/proc/%d/ns/net" % b_pid
    r = lab.probe(b_ns, lab.tenant_config("b"), "read-file", a_key)
    print("probe in B's worker sandbox reading A's key: exit %s, %r"
          % (r.returncode, r.stdout.strip().splitlines()[-1:]))
    assert "HELLO uid=" in r.stdout and "cap_eff=0 no_new_privs=1 " \
        "seccomp=2" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert "ALLOWED" not in r.stdout
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stdout)
    # Underneath the filter: the worker's user cannot open it either.
    r = lab.probe(b_ns, lab.tenant_config("b"), "read-file", a_key,
                  seccomp_log=True)
    print("  with seccomp only logging: exit %s, %r"
          % (r.returncode, r.stdout.strip().splitlines()[-1:]))
    assert "DENIED EACCES" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_stopping_container_a_removes_its_registration(lab):
    a_cid, _a_pid = seen["ids"]["a"]
    b_cid, _b_pid = seen["ids"]["b"]
    a_worker, b_worker = seen["a_worker"], seen["b_worker"]
    mark = lab.daemon.mark()
    start = time.monotonic()
    r = lab.podman.stop("a")
    assert r.returncode == 0, r.stderr
    rows = lab.wait_status("A's registration gone",
                           lambda rows: a_cid not in rows, 30)
    gone = wait_gone(a_worker, 30)
    log = lab.daemon.since(mark)
    print("podman stop a: registration gone %.1f s, its worker %d %.1f s "
          "after; %s" % (time.monotonic() - start, a_worker, gone,
                         re.findall(r".*registration.*", log)))
    # Removed by the poststop hook, or dropped by tlshd's own check of
    # the path (every 2 s): the container's process is gone before
    # podman's clean-up runs the hook, so either may come first; the
    # hook then finds nothing to remove, which is no error.
    how = re.search(r"netns %s \(/proc/\d+/ns/net\): registration "
                    r"(removed|dropped: .* no longer leads to its "
                    r"namespace)" % a_cid, log)
    assert how, log[-3000:]
    print("removed by %s" % ("the poststop hook" if how.group(1) ==
                             "removed" else "tlshd's own check"))
    # B is not disturbed.
    assert rows[b_cid]["worker_pid"] == b_worker
    assert mount_and_read(seen["ids"]["b"][1], seen["b_host"]) == "init"


# ---- a namespace a user namespace owns ------------------------------------


def test_rootless_namespace_needs_allow_userns(lab, trace):
    pid = lab.start_holder("-Urn", nobody=True)
    path = "/proc/%d/ns/net" % pid
    config = str(lab.tenant_config("u"))
    r = lab.ctl("netns", "add", "--path", path, "--config", config,
                "--name", "rootless")
    print("without --allow-userns: exit %d, %s" % (r.returncode,
                                                   r.stdout.strip()))
    assert r.returncode == 1
    assert "owned by a user namespace other than tlshd's" in r.stdout
    assert "--allow-userns" in r.stdout
    assert "rootless" not in lab.status()
    r = lab.ctl("netns", "add", "--path", path, "--config", config,
                "--name", "rootless", "--allow-userns", "--source",
                "rootless test")
    print("with --allow-userns: exit %d, %s" % (r.returncode,
                                                r.stdout.strip()))
    assert r.returncode == 0, r.stdout + r.stderr
    check_worker_in(lab, "rootless", path)
    host = lab.connect(pid)
    mark = lab.daemon.mark()
    target = "/mnt/ctr-rootless"
    os.makedirs(target, exist_ok=True)
    m = sh("nsenter --net=%s timeout 90 mount -t nfs -o vers=4.2,"
           "xprtsec=mtls,retry=0 %s:/ %s && cat %s/whoami; s=$?; "
           "umount %s; exit $s" % (path, host, target, target, target),
           check=False, timeout=120)
    assert m.returncode == 0, (m.stdout, m.stderr)
    assert m.stdout.strip() == "init"
    log = lab.daemon.since(mark)
    print("\n".join(re.findall(r".*Peer certificate: .*", log)))
    assert re.search(r"Peer certificate: .*client-tenant-u\b.*"
                     r"\[netns init\]", log), log[-3000:]
    assert by_netns(log, SUCCEEDED).get("rootless", 0) >= 1
    seen["rootless"] = pid


# ---- registration faults ----------------------------------------------------


def test_faults_leave_the_others_served(lab, tmp_path):
    b_cid = seen["ids"]["b"][0]
    before = lab.status()
    pid = lab.start_holder("-n")
    path = "/proc/%d/ns/net" % pid
    bad = tmp_path / "bad.conf"
    bad.write_text("[authenticate.client\nx509.certificate=\n")
    writable = tmp_path / "writable.conf"
    writable.write_text(lab.tenant_config("a").read_text())
    writable.chmod(0o666)
    cases = [
        (path, str(bad), r"error: configuration %s: " % re.escape(str(bad))),
        (path, str(writable), r"error: configuration .*writable"),
        ("/etc/hostname", str(lab.tenant_config("a")),
         r"error: /etc/hostname is not a namespace"),
        ("/proc/%d/ns/uts" % pid, str(lab.tenant_config("a")),
         r"error: /proc/\d+/ns/uts is a namespace, but not a network"),
        ("/proc/self/ns/net", str(lab.tenant_config("a")),
         r"error: .*tlshd's own network namespace"),
        ("/no/such/ns", str(lab.tenant_config("a")),
         r"error: cannot open /no/such/ns: No such file"),
    ]
    for p, c, want in cases:
        r = lab.ctl("netns", "add", "--path", p, "--config", c,
                    "--name", "faulty")
        print("netns add --path %s --config %s: exit %d, %s"
              % (p, os.path.basename(c), r.returncode, r.stdout.strip()))
        assert r.returncode == 1 and re.search(want, r.stdout), r.stdout
    after = lab.status()
    assert sorted(after) == sorted(before), (sorted(before), sorted(after))
    for label, row in before.items():
        assert after[label]["worker_pid"] == row["worker_pid"], label
    assert b_cid in after


def test_namespace_dying_while_registered_is_dropped(lab):
    pid = lab.start_holder("-n")
    r = lab.ctl("netns", "add", "--path", "/proc/%d/ns/net" % pid,
                "--config", str(lab.tenant_config("a")), "--name", "doomed")
    assert r.returncode == 0, r.stdout + r.stderr
    worker = lab.wait_worker("doomed")
    others = {k: v["worker_pid"] for k, v in lab.status().items()
              if k != "doomed"}
    mark = lab.daemon.mark()
    holder = next(p for p in lab.holders if p.pid == pid)
    holder.kill()
    holder.wait()
    start = time.monotonic()
    rows = lab.wait_status("doomed dropped",
                           lambda rows: "doomed" not in rows, 30)
    gone = wait_gone(worker, 30)
    log = lab.daemon.since(mark)
    print("namespace's last process killed: registration dropped after "
          "%.1f s, worker %d gone %.1f s later; %s"
          % (time.monotonic() - start, worker, gone,
             re.findall(r".*doomed.*", log)))
    assert re.search(r"netns doomed \(/proc/%d/ns/net\): registration "
                     r"dropped: .* no longer leads to its namespace" % pid,
                     log), log[-3000:]
    assert {k: v["worker_pid"] for k, v in rows.items()} == others


def test_restart_serves_the_registrations_again(lab):
    b_cid, b_pid = seen["ids"]["b"]
    rootless = seen["rootless"]
    state = Path(STATE_FILE).read_text()
    print("state file before the restart: %s" % state)
    assert b_cid in state and "rootless" in state
    assert "doomed" not in state and seen["ids"]["a"][0] not in state
    mark = lab.daemon.mark()
    killed, ready = lab.daemon.kill_and_restart()
    b_worker = check_worker_in(lab, b_cid, "/proc/%d/ns/net" % b_pid)
    check_worker_in(lab, "rootless", "/proc/%d/ns/net" % rootless)
    served = time.monotonic()
    log = lab.daemon.since(mark)
    print("SIGKILL and restart: listening after %.1f s, B and rootless "
          "served with workers after %.1f s; %s"
          % (ready - killed, served - killed,
             re.findall(r".*registered.*", log)))
    rows = lab.status()
    assert rows["rootless"]["source"].startswith(
        "registered by rootless test: ")
    assert b_worker != seen["b_worker"]
    assert mount_and_read(b_pid, seen["b_host"]) == "init"
    # And B's stop still removes it, through the new daemon.
    r = lab.podman.stop("b")
    assert r.returncode == 0, r.stderr
    lab.wait_status("B's registration gone", lambda rows: b_cid not in rows,
                    30)
