"""The kernel NFS client and nfsd in one guest, over loopback.

The NFS server side (exportfs, rpc.mountd) comes from the trixie chroot,
whose nfs-utils understands ``xprtsec=`` exports; bookworm's 2.6.2 does
not.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lab.shell import TRIXIE, chroot_sh, sh

EXPORT_ROOT = "/srv/nfs"
OPTS = "rw,no_root_squash,insecure,no_subtree_check"
# The NFSv4 root is a tmpfs that allows tls and mtls; below it, a second
# tmpfs that only mtls clients may use.  Clients mount "/" and "/mtls".
EXPORTS = (
    "%s 127.0.0.1(%s,fsid=0,xprtsec=tls:mtls)\n" % (EXPORT_ROOT, OPTS)
    + "%s/mtls 127.0.0.1(%s,fsid=2,xprtsec=mtls)\n" % (EXPORT_ROOT, OPTS))


def start_server() -> str:
    """Start nfsd with a tls and an mtls-only export; return the root.

    exportfs and rpc.mountd run in the trixie chroot (nfs-utils 2.8 knows
    xprtsec=); the exported tmpfs is mounted at the same path inside and
    outside the chroot so that every path resolves the same way.
    """
    prepare_chroot()
    sh("mkdir -p {r} && mount -t tmpfs -o size=32m tmpfs {r} && "
       "mkdir {r}/mtls && mount -t tmpfs -o size=16m tmpfs {r}/mtls && "
       "mkdir -p {t}{r} && mount --rbind {r} {t}{r}"
       .format(r=EXPORT_ROOT, t=TRIXIE))
    start_daemons(EXPORTS, threads=4)
    return EXPORT_ROOT


def prepare_chroot() -> None:
    """The modules loaded, the chroot's /proc, /dev, /run and /sys bound,
    nfsd's filesystem mounted."""
    if not TRIXIE.is_dir():
        raise RuntimeError("trixie chroot missing at %s (run tools/setup)"
                           % TRIXIE)
    sh("modprobe tls && modprobe nfsd && modprobe nfsv4")
    for sub in ("proc", "dev", "run", "sys"):
        sh("mountpoint -q %s/%s || mount --rbind /%s %s/%s"
           % (TRIXIE, sub, sub, TRIXIE, sub))
    sh("mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd")


def start_daemons(exports: str, threads: int) -> None:
    """rpcbind, exportfs and rpc.mountd (chroot) serving ``exports``,
    then ``threads`` nfsd threads."""
    (TRIXIE / "etc/exports").write_text(exports)
    chroot_sh("mkdir -p /var/lib/nfs/rpc_pipefs /run/rpcbind; "
              "rpcbind -w && exportfs -ra && rpc.mountd -N 3")
    # A fresh nfsd refuses OPENs that create files (NFS4ERR_GRACE, which
    # the client retries) for its grace period, 90 s by default: a test
    # writing in its first 90 s would block.  It must be set before the
    # threads start.
    Path("/proc/fs/nfsd/nfsv4gracetime").write_text("10")
    # bookworm's rpc.nfsd: trixie's 2.8 says "no version specified" here.
    sh("rpc.nfsd -N 3 %d" % threads)


@dataclass
class MountResult:
    ok: bool
    output: str
    seconds: float


class Nfs:
    """The kernel NFS client, mounting our loopback nfsd's exports."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.target = "/mnt/nfs"

    def mount(
        self,
        export: str,
        xprtsec: str,
        host: str = "127.0.0.1",
        timeout: float = 90,
        extra: str = "",
    ) -> MountResult:
        os.makedirs(self.target, exist_ok=True)
        opts = "vers=4.2,xprtsec=%s%s" % (xprtsec, extra)
        start = time.monotonic()
        r = sh(
            "timeout %d mount -t nfs -o %s %s:/%s %s"
            % (timeout, opts, host, export, self.target),
            check=False,
            timeout=timeout + 10,
        )
        return MountResult(
            r.returncode == 0,
            (r.stdout + r.stderr).strip(),
            time.monotonic() - start,
        )

    def umount(self) -> None:
        sh("umount %s" % self.target, check=False)

    def write_and_read_back(self, size: int = 256 * 1024) -> None:
        data = os.urandom(size)
        path = Path(self.target) / "probe.bin"
        path.write_bytes(data)
        sh("sync")
        # Drop the client's page cache so the read really crosses the wire.
        Path("/proc/sys/vm/drop_caches").write_text("3")
        assert path.read_bytes() == data

    @staticmethod
    def tls_stat() -> dict[str, int]:
        out = {}
        for line in Path("/proc/net/tls_stat").read_text().splitlines():
            key, value = line.split()
            out[key] = int(value)
        return out
