"""Named network namespaces, each optionally with an nfsd of its own.

Servers run inside their namespace (``ip netns exec``: a private mount
namespace with its own /run, nfsd filesystem and chroot state); client
mounts are made with ``nsenter --net`` so that they stay visible in the
initial mount namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab.nfs import OPTS, MountResult
from lab.procs import group_listeners
from lab.shell import TRIXIE, quote, sh

NETNS_RUN = Path("/run/netns")


def netns_exec(name: str, cmd: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``cmd`` in netns ``name`` and the initial mount namespace."""
    return sh("nsenter --net=%s/%s bash -c %s"
              % (NETNS_RUN, name, quote(cmd)), check=check,
              timeout=timeout)


_NS_NFS_SERVER = """
set -e
T={trixie}
mount -t tmpfs -o size=1m,mode=0755 tmpfs /run
mkdir -p /run/rpcbind
mount -t proc proc $T/proc
mount --rbind /dev $T/dev
mount --bind /run $T/run
umount /proc/fs/nfsd 2>/dev/null || true
mount -t nfsd nfsd /proc/fs/nfsd
mount -t nfsd nfsd $T/proc/fs/nfsd
mount -t tmpfs -o size=4m tmpfs $T/var/lib/nfs
mkdir -p $T/var/lib/nfs/rpc_pipefs $T/var/lib/nfs/v4recovery
mount --bind {exports} $T/etc/exports
echo 10 > /proc/fs/nfsd/nfsv4gracetime
echo 10 > /proc/fs/nfsd/nfsv4leasetime
chroot $T /bin/sh -c 'rpcbind -w && exportfs -ra && rpc.mountd -N 3'
rpc.nfsd -N 3 4
"""


NFS_DAEMONS = ("rpcbind", "rpc.mountd")


def _comm(pid: int) -> str:
    try:
        return Path("/proc/%d/comm" % pid).read_text().strip()
    except OSError:
        return ""


class NetnsSite:
    """A named network namespace, optionally with an nfsd of its own.

    Its export root is /srv/nfs-<name> (a tmpfs, bind-mounted at the same
    path inside the trixie chroot) holding ``whoami`` = the name, so a
    client can tell which server answered.
    """

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.export = "/srv/nfs-%s" % name
        self.target = "/mnt/netns-%s" % name
        self.nfs_running = False
        self.created = False

    @property
    def path(self) -> str:
        return str(NETNS_RUN / self.name)

    def create(self) -> None:
        sh("ip netns add %s && ip -n %s link set lo up"
           % (self.name, self.name))
        self.created = True

    def start_nfs(self, clients: list[str]) -> None:
        opts = OPTS + ",fsid=0,xprtsec=tls:mtls"
        exports = self.workdir / ("exports-%s" % self.name)
        exports.write_text("%s %s\n" % (
            self.export, " ".join("%s(%s)" % (c, opts) for c in clients)))
        sh("mkdir -p {e} {t}{e} && mount -t tmpfs -o size=16m tmpfs {e} "
           "&& mount --rbind {e} {t}{e}".format(e=self.export, t=TRIXIE))
        Path(self.export, "whoami").write_text(self.name + "\n")
        Path(self.export).chmod(0o1777)
        sh("touch %s/etc/exports" % TRIXIE)
        r = sh("ip netns exec %s bash -c %s" % (
            self.name, quote(_NS_NFS_SERVER.format(
                trixie=TRIXIE, exports=exports))), check=False)
        assert r.returncode == 0, "nfsd in netns %s: %s%s" % (
            self.name, r.stdout, r.stderr)
        self.nfs_running = True

    def pids(self) -> list[int]:
        out = sh("ip netns pids %s" % self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def mount(self, host: str = "127.0.0.1", xprtsec: str = "tls",
              extra: str = "", timeout: float = 90) -> MountResult:
        """Mount ``host:/`` from inside this namespace (its NFS client)."""
        os.makedirs(self.target, exist_ok=True)
        start = time.monotonic()
        r = netns_exec(
            self.name, "timeout %d mount -t nfs -o vers=4.2,xprtsec=%s%s "
            "%s:/ %s" % (timeout, xprtsec, extra, host, self.target),
            check=False, timeout=timeout + 10)
        return MountResult(r.returncode == 0, (r.stdout + r.stderr).strip(),
                           time.monotonic() - start)

    def umount(self) -> None:
        sh("umount %s" % self.target, check=False)

    def whoami(self) -> str:
        return Path(self.target, "whoami").read_text().strip()

    def destroy(self) -> None:
        self.umount()
        self.stop_nfs()
        self.delete()

    def stop_nfs(self) -> None:
        if self.nfs_running:
            # Only the NFS daemons started here: tlshd's worker for this
            # namespace is in it too, but in the initial mount namespace,
            # whose /proc/fs/nfsd is the initial namespace's nfsd.  Entering
            # the worker's namespaces to run "rpc.nfsd 0" stopped the
            # initial nfsd (every later mount there hung), and the SIGTERM
            # below killed the worker.
            pids = [p for p in self.pids() if _comm(p) in NFS_DAEMONS]
            if pids:
                # nfsd's own filesystem is mounted in the daemons' mount
                # namespace: stop its threads from there.
                sh("nsenter -t %d -m -n rpc.nfsd 0" % pids[0], check=False)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            sh("umount -l {t}{e}; umount -l {e}".format(
                e=self.export, t=TRIXIE), check=False)
            self.nfs_running = False

    def delete(self) -> None:
        if self.created:
            sh("ip netns del %s" % self.name, check=False)
            self.created = False


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """The calling thread inside netns ``name`` for the block."""
    from tlshd.supervisor import netns as nsmod

    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(str(NETNS_RUN / name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with nsmod.inside(fd, home):
                yield
        finally:
            os.close(fd)
    finally:
        os.close(home)


def tlshd_group_joined(name: str, group_id: int) -> bool:
    """Does some NETLINK_GENERIC socket in netns ``name`` listen to the
    tlshd group (docs/vm-harness.md, pitfall 10)?  Call from the main thread:
    /proc/self/net follows the thread-group leader's namespace."""
    try:
        with in_netns(name):
            text = Path("/proc/self/net/netlink").read_text()
    except FileNotFoundError:
        return False
    return group_listeners(group_id, text) > 0
