"""One tlshd on a container host: tenants registered at run time.

The host (the initial namespace) runs tlshd and the NFS server; its
export admits 10.98.0.0/16 over mutual TLS only (``xprtsec=mtls``).
Each tenant has a CA of its own and a client certificate that CA signed
(CN ``client-tenant-<t>``), and a configuration that presents that
certificate and trusts the host's CA.  The host's server end trusts
every tenant's CA (one bundle), so the server side of each handshake
sees, and logs, which tenant's certificate came.  Each container's
namespace gets a veth to the host: the N-th is 10.98.N.0/24, host .1,
container .2; the host's server certificate names every host address.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from lab.daemon import Tlshd
from lab.nfs import OPTS
from lab.pki import NsCreds
from lab.podman import Podman
from lab.shell import VENV_BIN, chroot_sh, sh

CONTROL_SOCKET = "/run/tlshd/control.sock"
STATE_FILE = "/run/tlshd/netns-registrations.json"
NET = "10.98"
MAX_LINKS = 8
EXPORT_CLIENTS = NET + ".0.0/16"
WORKER_PROBE = Path(__file__).with_name("worker_probe.py")


def ns_inode(path: str) -> int:
    return os.stat(path).st_ino


class ContainerLab:
    """See the module's docstring.  ``tenants``: name -> credentials."""

    def __init__(self, workdir: Path, tenants: list[str]) -> None:
        self.workdir = workdir
        self.host = NsCreds(workdir, "host", [
            "%s.%d.1" % (NET, n) for n in range(1, MAX_LINKS + 1)])
        self.tenants = {t: NsCreds(workdir, "tenant-" + t, [])
                        for t in tenants}
        self.daemon = Tlshd(workdir)
        self.podman = Podman(workdir / "podman")
        self.links: list[str] = []
        # Processes holding namespaces of their own (start_holder).
        self.holders: list[subprocess.Popen[bytes]] = []

    # -- configuration --

    def tenant_config(self, name: str) -> Path:
        """The tenant's configuration file (written on first use)."""
        path = self.workdir / "tenants" / name / "config"
        if not path.exists():
            c = self.tenants[name]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join([
                "[authenticate.client]",
                "x509.truststore=%s" % self.host.path("ca.pem"),
                "x509.certificate=%s" % c.path("client.pem"),
                "x509.private_key=%s" % c.path("client.key"),
                "[authenticate.server]",
                "x509.truststore=%s" % c.path("ca.pem"),
                "x509.certificate=%s" % c.path("server.pem"),
                "x509.private_key=%s" % c.path("server.key"), ""]))
        return path

    def main_config(self) -> str:
        """The host's: its own certificates, every tenant's CA trusted by
        its server end; no [netns] default=, so a container that is not
        registered is not served."""
        bundle = self.workdir / "tenant-cas.pem"
        bundle.write_text("".join(
            Path(c.path("ca.pem")).read_text()
            for c in self.tenants.values()))
        h = self.host
        return "\n".join([
            "[debug]", "loglevel=1", "[authenticate.client]",
            "x509.truststore=%s" % h.path("ca.pem"),
            "x509.certificate=%s" % h.path("client.pem"),
            "x509.private_key=%s" % h.path("client.key"),
            "[authenticate.server]",
            "x509.truststore=%s" % bundle,
            "x509.certificate=%s" % h.path("server.pem"),
            "x509.private_key=%s" % h.path("server.key"),
            # Workers from the start: the tests look at a registered
            # namespace's worker before its first handshake.
            "[netns]", "worker_idle_timeout=0", ""])

    # -- the host --

    def open(self, nfs_root: str) -> None:
        Path(nfs_root, "whoami").write_text("init\n")
        chroot_sh("exportfs -o %s,fsid=0,xprtsec=mtls %s:%s"
                  % (OPTS, EXPORT_CLIENTS, nfs_root))
        self.nfs_root = nfs_root
        if os.path.exists(STATE_FILE):  # another module's daemon's
            os.unlink(STATE_FILE)
        self.daemon.start(self.main_config())

    def close(self) -> None:
        self.podman.remove_all()
        for p in self.holders:
            p.kill()
            p.wait()
        self.daemon.stop()
        for link in self.links:
            sh("ip link del %s" % link, check=False)
        chroot_sh("exportfs -u %s:%s" % (EXPORT_CLIENTS, self.nfs_root),
                  check=False)
        if os.path.exists(STATE_FILE):
            os.unlink(STATE_FILE)

    def start_holder(self, *unshare_args: str, nobody: bool = False
                     ) -> int:
        """A process alone in new namespaces (``unshare ARGS sleep``), as
        nobody if ``nobody``; its pid, once it is in a network namespace
        of its own."""
        pre = (["setpriv", "--reuid", "65534", "--regid", "65534",
                "--clear-groups"] if nobody else [])
        p = subprocess.Popen([*pre, "unshare", *unshare_args, "sleep",
                              "100000"])
        self.holders.append(p)
        home = ns_inode("/proc/self/ns/net")
        end = time.monotonic() + 30
        while ns_inode("/proc/%d/ns/net" % p.pid) == home:
            assert time.monotonic() < end, "no namespace of its own"
            time.sleep(0.05)
        return p.pid

    def connect(self, pid: int) -> str:
        """A veth from the host into the network namespace of ``pid``;
        returns the host's address on it."""
        n = len(self.links) + 1
        assert n <= MAX_LINKS
        link = "ctr%d" % n
        sh("ip link add {l} type veth peer name eth0 netns {p} && "
           "ip addr add {net}.{n}.1/24 dev {l} && ip link set {l} up && "
           "nsenter --net=/proc/{p}/ns/net sh -c 'ip link set lo up && "
           "ip addr add {net}.{n}.2/24 dev eth0 && ip link set eth0 up'"
           .format(l=link, p=pid, net=NET, n=n))
        self.links.append(link)
        return "%s.%d.1" % (NET, n)

    # -- tlshd's answers --

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "tlshdctl"), *args],
                              capture_output=True, text=True, timeout=60,
                              check=False)

    def status(self) -> dict[str, dict[str, Any]]:
        from tlshd.supervisor.ctl import query

        rows = json.loads(query(CONTROL_SOCKET, "status-json"))
        return {row["netns"]: row for row in rows}

    def wait_status(self, what: str, done: Any, timeout: float = 120
                    ) -> dict[str, dict[str, Any]]:
        """Poll status-json until ``done(rows)``."""
        end = time.monotonic() + timeout
        while True:
            try:
                rows = self.status()
            except (OSError, ValueError):  # restarting
                rows = {}
            if done(rows):
                return rows
            if time.monotonic() > end:
                raise AssertionError("%s: not within %s s: %r"
                                     % (what, timeout, sorted(rows)))
            time.sleep(0.2)

    def wait_worker(self, label: str, timeout: float = 120) -> int:
        """The pid of ``label``'s ready worker, once there is one."""
        rows = self.wait_status(
            "a ready worker for %s" % label,
            lambda rows: label in rows and rows[label]["worker_ready"],
            timeout)
        pid: int = rows[label]["worker_pid"]
        return pid

    def probe(self, netns_path: str, config: Path, action: str,
              target: str, seccomp_log: bool = False
              ) -> subprocess.CompletedProcess[str]:
        """One attempt in a worker sandbox booted for the namespace at
        ``netns_path`` with ``config`` (tests/lab/worker_probe.py)."""
        import pwd

        pw = pwd.getpwnam("tlshd")
        return subprocess.run(
            [str(VENV_BIN / "python"), str(WORKER_PROBE),
             "--netns", netns_path, "--config", str(config),
             "--daemon-config", str(self.daemon.conf),
             "--uid", str(pw.pw_uid), "--gid", str(pw.pw_gid),
             *(["--seccomp-log"] if seccomp_log else []), action, target],
            capture_output=True, text=True, timeout=300, check=False)
