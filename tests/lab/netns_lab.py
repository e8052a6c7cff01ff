"""One tlshd serving the initial namespace and named namespaces a and b.

Each namespace has its own CA, credentials, nfsd and export.  Test
traffic stays on loopback inside each namespace and on a veth pair
between a and b (10.99.0.0/24, which exists only there).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.daemon import Tlshd
from lab.netns import NETNS_RUN, NetnsSite, in_netns, tlshd_group_joined
from lab.peers import RpcTlsPeer
from lab.pki import NsCreds
from lab.procs import fd_count, proc_status, rss_kib
from lab.shell import VENV_BIN, sh
from lab.trace import trace_events

VETH_NET = "10.99.0"  # a: .1, b: .2
CONTROL_SOCKET = "/run/tlshd/control.sock"
WORKER_PROBE = Path(__file__).with_name("worker_probe.py")


class NetnsLab:
    """tlshd serving init, a and b; see the section comment above."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.creds = {
            "init": NsCreds(workdir, "init", []),
            "a": NsCreds(workdir, "a", ["%s.1" % VETH_NET]),
            "b": NsCreds(workdir, "b", ["%s.2" % VETH_NET]),
            "default": NsCreds(workdir, "default", []),
        }
        self.sites: dict[str, NetnsSite] = {}
        self.daemon = Tlshd(workdir)
        self.default_config = workdir / "default.conf"
        self.default_config.write_text(self.creds["default"].config())
        self._group = 0
        # [netns] worker_idle_timeout of the main configuration.
        self.idle_timeout = "0"

    # -- configuration and sites --

    def netns_config(self, name: str, creds: NsCreds) -> Path:
        path = self.workdir / "netns" / name / "config"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(creds.config())
        return path

    def main_config(self) -> str:
        # Workers from the start, kept for ever: these tests look at each
        # namespace's worker before any handshake (on-demand workers:
        # test_ondemand.py).
        return self.creds["init"].config(
            "[netns]\ndefault=%s\nworker_idle_timeout=%s\n"
            % (self.default_config, self.idle_timeout))

    def new_creds(self, name: str, ips: list[str] | None = None
                  ) -> NsCreds:
        self.creds[name] = NsCreds(self.workdir, name, ips or [])
        return self.creds[name]

    def new_site(self, name: str) -> NetnsSite:
        """A site to create() later; destroyed with the lab."""
        site = NetnsSite(name, self.workdir)
        self.sites[name] = site
        return site

    def add_site(self, name: str, clients: list[str] | None = None,
                 nfs: bool = True) -> NetnsSite:
        """Write netns/<name>/config (own CA unless one exists), create
        the namespace, and start its nfsd."""
        if name not in self.creds:
            self.new_creds(name)
        self.netns_config(name, self.creds[name])
        site = self.new_site(name)
        site.create()
        if nfs:
            site.start_nfs(clients or ["127.0.0.1"])
        return site

    def remove_site(self, name: str) -> None:
        self.sites.pop(name).destroy()

    # -- the daemon --

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def status(self) -> dict[str, dict[str, Any]]:
        import json

        from tlshd.supervisor.ctl import query

        rows = json.loads(query(CONTROL_SOCKET, "status-json"))
        return {row["netns"]: row for row in rows}

    def poll_status(self, done: Callable[[dict[str, dict[str, Any]]],
                                        bool],
                    timeout: float, what: str) -> dict[str, dict[str, Any]]:
        """Poll status-json until ``done(rows)``; return those rows."""
        end = time.monotonic() + timeout
        while True:
            try:
                rows = self.status()
            except (OSError, ValueError):  # restarting (fault matrix)
                rows = {}
            if done(rows):
                return rows
            if time.monotonic() > end:
                raise AssertionError("%s within %s s: %r"
                                     % (what, timeout, rows))
            time.sleep(0.2)

    def wait_ready(self, labels: list[str], timeout: float = 180,
                   not_pid: dict[str, int] | None = None) -> dict[str, int]:
        """Wait until each label has a ready worker (other than
        ``not_pid[label]``); return label -> worker pid."""
        def ready(row: dict[str, Any], label: str) -> bool:
            return bool(row["worker_ready"]) and (
                row["worker_pid"] != (not_pid or {}).get(label))

        rows = self.poll_status(
            lambda rows: all(label in rows and ready(rows[label], label)
                             for label in labels),
            timeout, "workers not ready")
        return {label: rows[label]["worker_pid"] for label in labels}

    def wait_served(self, labels: list[str], timeout: float = 180,
                    no_workers: bool = False) -> None:
        """Wait until each label is served; with ``no_workers``, also
        until none has a worker (on-demand workers have idled out)."""
        def idle(row: dict[str, Any]) -> bool:
            return (row["worker_pid"] is None
                    and not row.get("worker_starting"))

        self.poll_status(
            lambda rows: all(label in rows
                             and (not no_workers or idle(rows[label]))
                             for label in labels),
            timeout, "not served" + (" without workers" if no_workers
                                     else ""))

    def group_id(self) -> int:
        """The tlshd multicast group's id, as the supervisor logged it."""
        if not self._group:
            m = re.search(r"group tlshd id (\d+)", self.daemon.log())
            assert m, "no group id in tlshd's log"
            self._group = int(m.group(1))
        return self._group

    def tree(self) -> dict[int, tuple[int, str]]:
        """Every process whose title is tlshd's: pid -> (ppid, title)."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                ppid = int(proc_status(int(entry.name))["PPid"])
            except (OSError, KeyError, ValueError):
                continue
            title = cmd.split(b"\0")[0].decode(errors="replace")
            if title.startswith("tlshd:"):
                out[int(entry.name)] = (ppid, title)
        return out

    # -- helpers the test module reaches through the fixture --

    in_netns = staticmethod(in_netns)
    trace_events = staticmethod(trace_events)
    proc_status = staticmethod(proc_status)
    fd_count = staticmethod(fd_count)
    rss_kib = staticmethod(rss_kib)

    def group_joined(self, name: str) -> bool:
        return tlshd_group_joined(name, self.group_id())

    def silent_peer(self, ns: str, port: int) -> RpcTlsPeer:
        """A hanging NFS-over-TLS peer listening inside netns ``ns``."""
        with in_netns(ns):
            return RpcTlsPeer(port, "hold")

    @staticmethod
    def drop_caches() -> None:
        sh("sync")
        Path("/proc/sys/vm/drop_caches").write_text("3")

    # -- a process booted exactly as a worker of one namespace --

    def probe(self, ns: str, action: str, target: str,
              seccomp_log: bool = False
              ) -> subprocess.CompletedProcess[str]:
        """One attempt in a worker sandbox of ``ns``; ``seccomp_log``: the
        filter only logs violations, to show the layers underneath."""
        import pwd

        pw = pwd.getpwnam("tlshd")
        config = self.workdir / "netns" / ns / "config"
        return subprocess.run(
            [str(VENV_BIN / "python"), str(WORKER_PROBE),
             "--netns", str(NETNS_RUN / ns), "--config", str(config),
             "--daemon-config", str(self.daemon.conf),
             "--uid", str(pw.pw_uid), "--gid", str(pw.pw_gid),
             *(["--seccomp-log"] if seccomp_log else []),
             action, target],
            capture_output=True, text=True, timeout=300, check=False)

    def open(self, nfs_root: str) -> None:
        """Namespaces a and b with their nfsd, then tlshd serving all
        three.  tlshd starts after a and b exist (test_netns adds "c"
        while it runs).  The veth pair joins a (10.99.0.1) and b
        (10.99.0.2); a's export admits both a's own loopback and b over
        the veth."""
        self.add_site("a", clients=["127.0.0.1", "%s.0/24" % VETH_NET])
        self.add_site("b")
        sh("ip link add va netns a type veth peer name vb netns b && "
           "ip -n a addr add {n}.1/24 dev va && ip -n a link set va up && "
           "ip -n b addr add {n}.2/24 dev vb && ip -n b link set vb up"
           .format(n=VETH_NET))
        started = time.monotonic()
        Path(nfs_root, "whoami").write_text("init\n")
        self.daemon.start(self.main_config())
        if self.idle_timeout == "0":
            self.wait_ready(["init", "a", "b"])
            print("tlshd up, workers for init, a, b ready after %.1f s"
                  % (time.monotonic() - started))
        else:
            self.wait_served(["init", "a", "b"])
            print("tlshd up, serving init, a, b (workers on demand) after "
                  "%.1f s" % (time.monotonic() - started))

    def close(self) -> None:
        self.daemon.stop()
        for name in list(self.sites):
            self.remove_site(name)
