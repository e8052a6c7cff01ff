"""A container's root floods tlshd's netlink socket (issue 15, 1).

An unprivileged user makes its own user and network namespace (``unshare
-Urn``, as a rootless container runtime does); tlshd serves it through
``[netns] unnamed=`` with ``unnamed_userns=true``.  Inside, the user is
root over the namespace: it finds the supervisor's port in
/proc/net/netlink and sends forged READYs and forged ACCEPT replies (next
sequence numbers, supervisor fds, a key serial) by unicast and multicast,
as fast as it can (tests/lab/netlink_attacker.py).  Meanwhile a real
NFS mount in the initial namespace must succeed; the forgeries must be
refused or dropped; the supervisor must stay alive with the fds it had.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import lab
import pytest
from lab.procs import fd_count

from tlshd.supervisor import netlink_family

pytestmark = pytest.mark.kernel

ATTACKER = Path(lab.__file__).with_name("netlink_attacker.py")
FLOOD_SECONDS = 300  # at most: stopped after the mount


def start_attacker(family: int, wait: float) -> subprocess.Popen[str]:
    """The attacker runs at nice 19: it floods whenever a vCPU is free,
    but does not take the CPU from the handshakes it shares the guest
    with (on a real host its container's CPU share limits it; CPU
    fairness between tenants is the cgroups' job, not tlshd's)."""
    return subprocess.Popen(
        ["nice", "-n", "19", "setpriv", "--reuid", "65534", "--regid",
         "65534", "--clear-groups", "unshare", "-Urn", "/usr/bin/python3",
         str(ATTACKER), str(family), str(FLOOD_SECONDS), str(wait)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def config(pki, tmp_path: Path, userns: bool) -> str:
    tenant = tmp_path / "tenant.conf"
    tenant.write_text(pki.config(idle_timeout=None))
    # worker_idle_timeout=0: the tests wait for the namespace's worker
    # before the attack, with no handshake to start it.
    return pki.config(idle_timeout=None) + (
        "[netns]\nunnamed=%s\nunnamed_userns=%s\nworker_idle_timeout=0\n"
        % (tenant, "true" if userns else "false"))


def test_flood_from_a_user_namespace_leaves_others_served(
        pki, tlshd, trace, nfs, tmp_path):
    tlshd.start(config(pki, tmp_path, userns=True))
    assert tlshd.proc is not None
    pid = tlshd.proc.pid
    family = netlink_family.probe_family().family_id
    attacker = start_attacker(family, wait=60)
    try:
        assert attacker.stdout is not None and attacker.stdin is not None
        port = int(attacker.stdout.readline().split()[1])
        assert port > 0, "the supervisor never listened in the namespace"
        label = str(os.stat("/proc/%d/ns/net" % attacker.pid).st_ino)
        tlshd.wait_for(r"Worker \d+ for netns %s ready" % label, 60)
        fds_before = fd_count(pid)
        mark = tlshd.mark()
        trace.clear()
        attacker.stdin.write("go\n")
        attacker.stdin.flush()
        assert attacker.stdout.readline().strip() == "flooding"
        time.sleep(2)  # the flood is under way
        r = nfs.mount("", "tls")
        print("mount during the flood: ok %s, %.2f s" % (r.ok, r.seconds))
        assert r.ok, "%s\n%s\n%s" % (r.output, tlshd.since(mark)[-4000:],
                                     trace.completions())
        assert tlshd.proc.poll() is None, "the supervisor died"
        nfs.write_and_read_back()
        nfs.umount()
        assert attacker.poll() is None, "the flood ended before the mount"
        # Before the attacker exits: its namespace dies with it, and the
        # supervisor stops serving it (closing that namespace's fds).
        fds_after = fd_count(pid)
        attacker.send_signal(signal.SIGTERM)
        out, _ = attacker.communicate(timeout=60)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    counts = json.loads(out.strip().splitlines()[-1])
    log = tlshd.since(mark)
    dropped = [int(n) for n in re.findall(
        r"Dropped (\d+) netlink message\(s\) not sent by the kernel in "
        r"netns %s" % label, log)]
    events = trace.events()
    t0 = events[0].stamp if events else 0.0
    for e in events:
        print("  %8.3f %-24s %-12s req=%s sk=%s status=%s" % (
            e.stamp - t0, e.event, e.comm, e.req, e.sk, e.status))
    print("attacker: %s" % counts)
    print("supervisor log: %d 'Dropped' lines, %d messages" % (
        len(dropped), sum(dropped)))
    print("supervisor fds %d -> %d" % (fds_before, fds_after))
    # What the tenants see first: the supervisor alive with the fds it
    # had, and the kernel's own record of the mount's two handshakes,
    # both status 0, and no DONE for anything the attacker named.
    assert tlshd.proc.poll() is None, "the supervisor died"
    assert fds_after == fds_before
    done = trace.completions()
    assert len(done) == 2 and all(c.status == 0 for c in done), done
    # The attack happened: multicasts got through to the socket...
    assert counts["multicast_sent"] > 1000, counts
    # ...unicasts never did: the sockets are connected to the kernel.
    assert counts["unicast_sent"] == 0, counts
    assert counts["unicast_refused"] > 1000, counts
    assert dropped and sum(dropped) > 0
    assert "Unusable ACCEPT reply" not in log
    assert "Traceback" not in log and "Error while handling" not in log


def test_user_namespace_not_served_by_default(pki, tlshd, tmp_path):
    tlshd.start(config(pki, tmp_path, userns=False))
    family = netlink_family.probe_family().family_id
    attacker = start_attacker(family, wait=10)
    out, _ = attacker.communicate(timeout=60)
    assert out.splitlines()[0] == "target 0", out
    assert attacker.returncode == 3
    tlshd.wait_for(r"netns \d+ is owned by a user namespace; not serving it",
                   10)
