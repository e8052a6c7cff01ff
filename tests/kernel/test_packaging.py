"""The Debian package, installed in the VM and run by a real systemd.

The .deb is built on the host by tests/unit/test_packaging.py (tools/test
runs the host tests before booting the VM) and must match the tree
(``packaging/build-deb --check``).  The VM's root is a RAM overlay, so
installing writes nothing to the host; the package is purged afterwards
all the same, so that later tests see the VM as before.

The last test runs ``tlshd.service`` as shipped, with all its hardening,
under systemd 252 as PID 1 of a new PID namespace (own mount and UTS
namespaces, private /run), and mounts NFS with mutual TLS through it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("TLSHD_CACHE") or REPO / ".cache")

UNIT = "/lib/systemd/system/tlshd.service"
TEST_TARGET = Path("/etc/systemd/system/tlshd-test.target")
ETC = Path("/etc/tlshd")
NETNS = "tlshd-pkg-test"
# CAP_KILL 5, CAP_SETGID 6, CAP_SETUID 7, CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21
UNIT_CAPS = (1 << 5) | (1 << 6) | (1 << 7) | (1 << 12) | (1 << 21)


# Generous limits: under TCG on a loaded host the guest's clock can run
# several times faster than the wall clock.
TIMEOUT = 600


def sh(cmd: str, check: bool = True,
       timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError("%s: exit %d\n%s%s" % (cmd, r.returncode,
                                                     r.stdout, r.stderr))
    return r


def built_deb() -> Path:
    """The .deb the host tests built; it must match the tree in CI.

    Outside CI a tree being edited while the tests run (the VM reads it
    live) only earns a warning: the .deb is then a few edits behind.
    """
    out = CACHE / "deb"
    debs = sorted(out.glob("tlshd_*.deb"))
    if not debs:
        pytest.fail("no .deb in %s: run the host tests first "
                    "(tests/unit/test_packaging.py builds it)" % out)
    r = sh("%s --check %s" % (REPO / "packaging/build-deb", out),
           check=False)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("%s was not built from this tree" % debs[-1])
        print("warning: the tree changed since %s was built" % debs[-1])
    return debs[-1]


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    path = built_deb()
    # man-db's trigger would rebuild the whole manual page index, for a
    # minute under TCG, on install and again on purge.  The overlay forgets
    # this change with the VM.
    Path("/var/lib/man-db/auto-update").unlink(missing_ok=True)
    r = sh("dpkg -i %s" % path, check=False, timeout=2 * TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    yield path
    shutil.rmtree(ETC / "test", ignore_errors=True)
    shutil.rmtree(ETC / "netns", ignore_errors=True)
    sh("dpkg --purge tlshd", timeout=2 * TIMEOUT)
    # Nothing left behind: no byte code written at run time, no conffile.
    assert not os.path.exists("/usr/lib/tlshd")
    assert not os.path.exists(ETC)


def test_files_installed(deb: Path) -> None:
    for path in ("/usr/sbin/tlshd", "/usr/sbin/tlshdctl"):
        assert os.access(path, os.X_OK), path
    for path in (UNIT, "/etc/tlshd/config", "/usr/lib/sysusers.d/tlshd.conf",
                 "/usr/lib/tmpfiles.d/tlshd.conf"):
        assert os.path.isfile(path), path
    conffiles = sh("dpkg-query -W -f='${Conffiles}' tlshd").stdout
    assert "/etc/tlshd/config" in conffiles
    # enabled by postinst (deb-systemd-helper), without a running systemd
    assert os.path.islink("/etc/systemd/system/remote-fs.target.wants/"
                          "tlshd.service")
    # tmpfiles created the directory the supervisor watches
    assert os.path.isdir("/run/netns")


def test_man_pages(deb: Path) -> None:
    found = sh("man -w tlshd tlshd.conf tlshdctl").stdout.split()
    assert found == ["/usr/share/man/man8/tlshd.8.gz",
                     "/usr/share/man/man5/tlshd.conf.5.gz",
                     "/usr/share/man/man8/tlshdctl.8.gz"]
    text = sh("MANWIDTH=80 man 5 tlshd.conf").stdout
    assert "x509.truststore" in text


def test_version_and_usage(deb: Path) -> None:
    out = sh("/usr/sbin/tlshd --version").stdout
    assert re.fullmatch(r"tlshd, built from tlshd \(Python\) \S+\n", out)
    assert "--check-config" in sh("/usr/sbin/tlshd --help").stdout
    # No daemon is running: tlshdctl says so with EX_UNAVAILABLE.
    r = sh("/usr/sbin/tlshdctl status", check=False)
    assert r.returncode == 69, r.stdout + r.stderr


def test_ktls_utils_shipped_config_accepted(deb: Path) -> None:
    # The file Debian's ktls-utils package installs (trixie chroot made by
    # tools/setup), read in place, byte for byte.  The unit tests parse
    # upstream's newer sample; this is the one administrators have on disk.
    shipped = CACHE / "trixie-root/etc/tlshd.conf"
    assert "This file is part of ktls-utils" in shipped.read_text()
    r = sh("/usr/sbin/tlshd --check-config -c %s" % shipped, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == "%s: ok" % shipped, r.stdout


def test_worker_user(deb: Path, tmp_path: Path) -> None:
    # postinst ran systemd-sysusers (a no-op if earlier tests of this
    # session already created the user with useradd).
    pw = pwd.getpwnam("tlshd")
    assert 0 < pw.pw_uid < 1000 and pw.pw_gid != 0
    # What the sysusers entry creates, applied to an empty root.
    (tmp_path / "etc").mkdir()
    sh("systemd-sysusers --root=%s - </usr/lib/sysusers.d/tlshd.conf"
       % tmp_path)
    entry = [line.split(":") for line in
             (tmp_path / "etc/passwd").read_text().splitlines()
             if line.startswith("tlshd:")]
    assert len(entry) == 1
    _, _, uid, gid, _, home, shell = entry[0]
    assert 0 < int(uid) < 1000 and int(gid) != 0
    assert (home, shell) == ("/nonexistent", "/usr/sbin/nologin")
    assert "tlshd:" in (tmp_path / "etc/group").read_text()


def test_systemd_analyze_verify(deb: Path) -> None:
    r = sh("systemd-analyze verify %s" % UNIT, check=False)
    assert r.returncode == 0 and r.stdout + r.stderr == "", (
        r.stdout + r.stderr)


class ServiceManager:
    """systemd as PID 1 of a new PID namespace, booting only tlshd.

    The VM's PID 1 is a shell, so systemd gets a PID namespace of its own,
    plus mount and UTS namespaces and a private /run, which keep what it
    sets up (cgroup mount, hostname, /run/systemd) from leaking into the
    rest of the test session.  Commands reach it through nsenter.
    """

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's PID in the VM's namespace

    def start(self) -> None:
        TEST_TARGET.write_text(
            "[Unit]\nDescription=tlshd alone\nDefaultDependencies=no\n"
            "Wants=tlshd.service systemd-journald.service\n")
        # Not systemd-tmpfiles-setup.service: Debian's tmp.conf would empty
        # the VM's /tmp under the running tests.  Only the package's entry
        # (/run/netns) is applied.
        # Shared propagation, as systemd sets up on a real boot (it skips
        # that here, believing itself in a container): mounts made later,
        # such as "ip netns add", then reach the services' namespaces.
        boot = ("mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run && "
                "mount --make-rshared / && "
                "systemd-tmpfiles --create /usr/lib/tmpfiles.d/tlshd.conf && "
                "exec /lib/systemd/systemd --system "
                "--unit=%s --log-target=kmsg --log-level=notice"
                % TEST_TARGET.name)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--mount", "--uts", "--fork",
                 "--mount-proc", "--propagation", "slave", "sh", "-c", boot],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        children = Path("/proc/%d/task/%d/children"
                        % (self.proc.pid, self.proc.pid))
        self.pid = int(wait_for(lambda: children.read_text().strip(), 120))

    def run(self, cmd: str, check: bool = True,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return sh("nsenter -t %d -m -p -- sh -c '%s'" % (self.pid, cmd),
                  check=check, timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None:
            # SIGKILL to the namespace's PID 1 ends every process in it.
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(120)
            self.proc = None
        TEST_TARGET.unlink(missing_ok=True)


def wait_for(probe: Callable[[], Any], timeout: float,
             what: str = "") -> str:
    end = time.monotonic() + timeout
    while True:
        try:
            got = probe()
        except OSError:
            got = None
        if got:
            return str(got)
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for %s" % (what or probe))
        time.sleep(1)


@pytest.fixture
def systemd(deb: Path, tmp_path: Path) -> Iterator[ServiceManager]:
    manager = ServiceManager(tmp_path / "systemd.log")
    yield manager
    manager.stop()


def served(manager: ServiceManager) -> dict[str, dict[str, Any]]:
    """The served namespaces, by label (tlshdctl status-json)."""
    rows = json.loads(manager.run("tlshdctl status-json").stdout)
    return {row["netns"]: row for row in rows}


def proc_status(manager: ServiceManager, pid: str) -> dict[str, str]:
    text = manager.run("cat /proc/%s/status" % pid).stdout
    return dict(line.split(":\t", 1) for line in text.splitlines()
                if ":\t" in line)


def test_service_under_systemd(systemd: ServiceManager, pki: Any,
                               trace: Any, nfs: Any) -> None:
    """tlshd.service as shipped serves both ends of an NFS mTLS mount."""
    # The service cannot see /tmp (PrivateTmp): credentials go to /etc.
    creds = ETC / "test"
    shutil.rmtree(creds, ignore_errors=True)
    shutil.copytree(pki.root, creds)
    # tlshd's defaults: workers on demand.
    config = pki.config(idle_timeout=None).replace(str(pki.root),
                                                   str(creds))
    (ETC / "config").write_text(config)
    (ETC / "netns" / NETNS).mkdir(parents=True, exist_ok=True)
    (ETC / "netns" / NETNS / "config").write_text(config)
    systemd.start()
    wait_for(lambda: systemd.run("systemctl is-active tlshd.service",
                                 check=False).returncode == 0,
             TIMEOUT, "tlshd.service to become active")
    # Type=notify: systemd calls it active only after READY=1, which the
    # supervisor sends once it listens in the initial namespace.
    assert systemd.run("systemctl show -p Type --value tlshd.service"
                       ).stdout.strip() == "notify"
    # READY=1 comes as soon as the supervisor listens for handshakes,
    # before it has imported its loop and opened the control socket: a
    # loaded machine may take a few seconds more to answer tlshdctl.
    wait_for(lambda: "netns init" in systemd.run(
        "tlshdctl status", check=False).stdout, TIMEOUT,
        "tlshdctl status to answer")
    # Workers start on demand: none until the first handshake.
    assert served(systemd)["init"]["worker_pid"] is None

    # The sandbox as the kernel sees it.
    main = systemd.run("systemctl show -p MainPID --value tlshd.service")
    sup = proc_status(systemd, main.stdout.strip())
    assert int(sup["CapBnd"], 16) == UNIT_CAPS
    assert int(sup["CapEff"], 16) == UNIT_CAPS
    assert sup["NoNewPrivs"] == "1" and sup["Seccomp"] == "2"

    # Both ends of an NFS mount with mutual TLS go through the service.
    trace.clear()
    r = nfs.mount("", "mtls")
    assert r.ok, r.output + systemd.run(
        "journalctl --no-pager -u tlshd.service", check=False).stdout
    nfs.write_and_read_back()
    nfs.umount()
    done = trace.completions()
    assert len(done) >= 2 and all(c.status == 0 for c in done), done

    # The worker the mount started (not the worker template, which stays
    # root to fork the workers).
    pgrep = systemd.run("pgrep -f \"^tlshd: worker .netns init\"")
    worker_pid = pgrep.stdout.split()[0]
    worker = proc_status(systemd, worker_pid)
    uid = str(pwd.getpwnam("tlshd").pw_uid)
    assert worker["Uid"].split() == [uid] * 4
    assert int(worker["CapEff"], 16) == 0
    assert worker["NoNewPrivs"] == "1"
    status = systemd.run("tlshdctl status").stdout
    assert re.search(r"handshakes: [2-9]\d* succeeded, 0 failed", status), (
        status)

    # A namespace added while the service runs is found and served: its
    # mount propagates into the service, which enters it (setns, allowed
    # by RestrictNamespaces=net and CAP_SYS_ADMIN).
    systemd.run("ip netns add %s" % NETNS)
    try:
        wait_for(lambda: NETNS in served(systemd), TIMEOUT,
                 "netns %s to be served" % NETNS)
    except AssertionError as e:
        raise AssertionError("%s\n%s\n%s" % (
            e, systemd.run("tlshdctl status", check=False).stdout,
            systemd.run("journalctl --no-pager -o cat -u tlshd.service",
                        check=False).stdout)) from None
    systemd.run("ip netns del %s" % NETNS)

    # Reload (SIGHUP through ExecReload): the init worker the mount
    # started, unless it has idled out since, is replaced by one with the
    # new configuration.  Then stop.
    systemd.run("systemctl reload tlshd.service")

    def journal_text() -> str:
        return systemd.run("journalctl --no-pager -o cat -u tlshd.service",
                           check=False).stdout

    wait_for(lambda: "Reload done" in journal_text(), TIMEOUT,
             "the reload")
    if "netns init: starting a worker" in journal_text():
        wait_for(lambda: served(systemd)["init"]["worker_pid"] not in (
            None, int(worker_pid)) and served(systemd)["init"][
                "worker_ready"], TIMEOUT, "the worker after the reload")
    systemd.run("systemctl stop tlshd.service")
    state = systemd.run("systemctl show -p ActiveState -p Result "
                        "tlshd.service").stdout
    assert "ActiveState=inactive" in state and "Result=success" in state, (
        state)

    # The log went to the journal (syslog through /dev/log), and nothing
    # was refused by the unit's sandbox (EPERM from the system call filter
    # or a missing capability) or crashed.
    journal = systemd.run("journalctl --no-pager -o cat -u tlshd.service",
                          check=False).stdout
    assert "Listening for handshake requests in netns init" in journal, (
        journal)
    for bad in ("Operation not permitted", "Permission denied",
                "Traceback", "Read-only file system"):
        assert bad not in journal, journal
