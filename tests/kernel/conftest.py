"""Fixtures for tests against the real kernel (inside the VM only).

Everything here drives real kernel consumers: the kernel NFS client and
nfsd in the same guest, over loopback, with our tlshd serving both ends of
every handshake.  The NFS server side (exportfs, rpc.mountd) comes from the
trixie chroot, whose nfs-utils understands ``xprtsec=`` exports; bookworm's
2.6.2 does not.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
CACHE = Path(os.environ.get("TLSHD_CACHE") or REPO / ".cache")
TRIXIE = CACHE / "trixie-root"
TRACING = Path("/sys/kernel/tracing")
EXPORT_ROOT = "/srv/nfs"


def sh(
    cmd: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", cmd],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


# ---- certificates -------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass
class Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def make_ca(cn: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issuer(name, key, cert)


def make_leaf(
    ca: Issuer,
    cn: str,
    dns: list[str],
    ips: list[str],
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                ]
            ),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256()), key


class Pki:
    """Certificates written as PEM files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = make_ca("tlshd-test-ca")
        self.other_ca = make_ca("tlshd-other-ca")
        self.write_ca("ca", self.ca)
        self.write_ca("other-ca", self.other_ca)
        local = (["localhost"], ["127.0.0.1", "::1"])
        self.leaf("server", self.ca, *local)
        self.leaf("client", self.ca, *local)
        self.leaf("untrusted", self.other_ca, *local)
        self.leaf("dns-only", self.ca, ["localhost"], [])
        self.leaf("wrong-name", self.ca, ["other.example"], ["127.0.0.2"])
        self.leaf(
            "expired",
            self.ca,
            *local,
            not_before=NOW - 10 * DAY,
            not_after=NOW - DAY,
        )
        self.leaf(
            "not-yet-valid",
            self.ca,
            *local,
            not_before=NOW + DAY,
            not_after=NOW + 10 * DAY,
        )

    def write_ca(self, name: str, ca: Issuer) -> None:
        (self.root / ("%s.pem" % name)).write_bytes(
            ca.cert.public_bytes(serialization.Encoding.PEM)
        )

    def leaf(
        self,
        name: str,
        ca: Issuer,
        dns: list[str],
        ips: list[str],
        **kw: datetime.datetime,
    ) -> None:
        cert, key = make_leaf(ca, name, dns, ips, **kw)
        (self.root / ("%s.pem" % name)).write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
        )
        keyfile = self.root / ("%s.key" % name)
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        keyfile.chmod(0o600)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def config(
        self,
        server: str = "server",
        client: str = "client",
        client_ca: str = "ca",
        server_ca: str = "ca",
        extra_client: str = "",
        extra_server: str = "",
        timeout: float | None = None,
    ) -> str:
        lines = ["[debug]", "loglevel=1", "tls=0", "nl=0", "[authenticate]"]
        if timeout is not None:
            lines.append("handshake_timeout=%s" % timeout)
        lines += [
            "[authenticate.client]",
            "x509.truststore=%s" % self.path(client_ca + ".pem"),
        ]
        if client:
            lines += [
                "x509.certificate=%s" % self.path(client + ".pem"),
                "x509.private_key=%s" % self.path(client + ".key"),
            ]
        lines += [
            extra_client,
            "[authenticate.server]",
            "x509.truststore=%s" % self.path(server_ca + ".pem"),
            "x509.certificate=%s" % self.path(server + ".pem"),
            "x509.private_key=%s" % self.path(server + ".key"),
            extra_server,
        ]
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


# ---- the daemon ---------------------------------------------------------


def ensure_worker_user() -> None:
    """The packaging creates the worker's user; in the VM, the test does."""
    sh("id -u tlshd >/dev/null 2>&1 || useradd --system --no-create-home "
       "--shell /usr/sbin/nologin tlshd")


class Tlshd:
    """Our tlshd, started as ``tlshd -s -c FILE`` as the admin would."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.conf = workdir / "tlshd.conf"
        self.logfile = workdir / "tlshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, config_text: str, timeout: float = 120) -> None:
        ensure_worker_user()
        self.conf.write_text(config_text)
        self.log_offset = 0
        self._spawn(timeout)

    def _spawn(self, timeout: float) -> None:
        mark = self.mark() if self.logfile.exists() else 0
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "tlshd"), "-s", "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.wait_for(r"Worker \d+ for netns init ready", timeout, mark)

    def kill_and_restart(self, timeout: float = 120) -> tuple[float, float]:
        """SIGKILL the supervisor and start it again at once with the same
        configuration, as systemd's Restart=on-failure does (after its
        RestartSec).  Returns when the new one's init worker is ready:
        (time of the kill, time ready), time.monotonic()."""
        assert self.proc is not None
        killed = time.monotonic()
        self.proc.kill()
        self.proc.wait()
        self._spawn(timeout)
        return killed, time.monotonic()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def mark(self) -> int:
        """Remember the log's end; ``since`` returns what came after."""
        return len(self.log())

    def since(self, mark: int) -> str:
        return self.log()[mark:]

    def wait_for(self, pattern: str, timeout: float, mark: int = 0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.since(mark)
            m = re.search(pattern, text)
            if m:
                return m.group(0)
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    "tlshd exited (%s):\n%s"
                    % (self.proc.returncode, text[-3000:])
                )
            time.sleep(0.1)
        raise AssertionError(
            "no %r in tlshd's log within %s s:\n%s"
            % (pattern, timeout, self.since(mark)[-3000:])
        )

    def reload(self, config_text: str, timeout: float = 120) -> None:
        mark = self.mark()
        self.conf.write_text(config_text)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_for(r"Worker \d+ for netns init ready", timeout, mark)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def tlshd(tmp_path: Path) -> Iterator[Tlshd]:
    daemon = Tlshd(tmp_path)
    yield daemon
    daemon.stop()


# ---- kernel tracing -----------------------------------------------------


@dataclass
class Completion:
    req: str
    status: int
    seconds: float  # handshake_submit -> handshake_complete


class HandshakeTrace:
    """The kernel's own record of each request: handshake:* tracepoints."""

    def __init__(self) -> None:
        # One clock for every CPU: the default ("local") is per CPU, and
        # merging CPUs' events by it can put a request's events out of
        # order (a reused request address then looks like a new request
        # before the old one's last event).
        (TRACING / "trace_clock").write_text("mono")
        (TRACING / "events/handshake/enable").write_text("1")
        self.clear()

    def clear(self) -> None:
        (TRACING / "trace").write_text("")

    def events(self) -> list[TraceEvent]:
        """Every handshake:* event, with who emitted it."""
        return trace_events()

    def completions(self) -> list[Completion]:
        text = (TRACING / "trace").read_text()
        submitted: dict[str, float] = {}
        out = []
        for line in text.splitlines():
            m = re.search(r"\s(\d+\.\d+): (handshake_\w+): .*?req=(\S+)", line)
            if not m:
                continue
            stamp, event, req = float(m.group(1)), m.group(2), m.group(3)
            if event == "handshake_submit":
                submitted[req] = stamp
            elif event == "handshake_complete":
                st = re.search(r"status=(-?\d+)", line)
                status = int(st.group(1)) if st else -1
                out.append(
                    Completion(req, status, stamp - submitted.get(req, stamp))
                )
        return out


@pytest.fixture
def trace() -> HandshakeTrace:
    return HandshakeTrace()


# ---- NFS ----------------------------------------------------------------


def chroot_sh(
    cmd: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return sh("chroot %s /bin/sh -c %s" % (TRIXIE, _quote(cmd)), check=check)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


_OPTS = "rw,no_root_squash,insecure,no_subtree_check"
# The NFSv4 root is a tmpfs that allows tls and mtls; below it, a second
# tmpfs that only mtls clients may use.  Clients mount "/" and "/mtls".
EXPORTS = (
    "%s 127.0.0.1(%s,fsid=0,xprtsec=tls:mtls)\n" % (EXPORT_ROOT, _OPTS)
    + "%s/mtls 127.0.0.1(%s,fsid=2,xprtsec=mtls)\n" % (EXPORT_ROOT, _OPTS))


@pytest.fixture(scope="session")
def nfs_server() -> str:
    """Start nfsd with a tls and an mtls-only export; return the root.

    exportfs and rpc.mountd run in the trixie chroot (nfs-utils 2.8 knows
    xprtsec=); the exported tmpfs is mounted at the same path inside and
    outside the chroot so that every path resolves the same way.
    """
    if not TRIXIE.is_dir():
        pytest.fail("trixie chroot missing at %s (run tools/setup)" % TRIXIE)
    sh("modprobe tls && modprobe nfsd && modprobe nfsv4")
    for sub in ("proc", "dev", "run", "sys"):
        sh("mountpoint -q %s/%s || mount --rbind /%s %s/%s"
           % (TRIXIE, sub, sub, TRIXIE, sub))
    sh("mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd")
    sh("mkdir -p {r} && mount -t tmpfs -o size=32m tmpfs {r} && "
       "mkdir {r}/mtls && mount -t tmpfs -o size=16m tmpfs {r}/mtls && "
       "mkdir -p {t}{r} && mount --rbind {r} {t}{r}"
       .format(r=EXPORT_ROOT, t=TRIXIE))
    (TRIXIE / "etc/exports").write_text(EXPORTS)
    chroot_sh("mkdir -p /var/lib/nfs/rpc_pipefs /run/rpcbind; "
              "rpcbind -w && exportfs -ra && rpc.mountd -N 3")
    # bookworm's rpc.nfsd: trixie's 2.8 says "no version specified" here.
    sh("rpc.nfsd -N 3 4")
    return EXPORT_ROOT


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


@pytest.fixture
def nfs(nfs_server: str) -> Iterator[Nfs]:
    client = Nfs(nfs_server)
    yield client
    client.umount()


# ==== network namespaces (tests/kernel/test_netns.py) ====================
#
# One tlshd serving the initial namespace and named namespaces a and b,
# each with its own CA, credentials, nfsd and export.  Servers run inside
# their namespace (``ip netns exec``: a private mount namespace with its
# own /run, nfsd filesystem and chroot state); client mounts are made with
# ``nsenter --net`` so that they stay visible in the initial mount
# namespace.  Test traffic stays on loopback inside each namespace and on
# a veth pair between a and b (10.99.0.0/24, which exists only there).

NETNS_RUN = Path("/run/netns")
VETH_NET = "10.99.0"  # a: .1, b: .2
CONTROL_SOCKET = "/run/tlshd/control.sock"
WORKER_PROBE = Path(__file__).with_name("worker_probe.py")


def netns_exec(name: str, cmd: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``cmd`` in netns ``name`` and the initial mount namespace."""
    return sh("nsenter --net=%s/%s bash -c %s"
              % (NETNS_RUN, name, _quote(cmd)), check=check,
              timeout=timeout)


class NsCreds:
    """A namespace's own CA, server and client certificates, and config."""

    def __init__(self, root: Path, name: str, ips: list[str]) -> None:
        self.name = name
        self.dir = root / "creds" / name
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        self.ca = make_ca("ca-%s" % name)
        (self.dir / "ca.pem").write_bytes(
            self.ca.cert.public_bytes(serialization.Encoding.PEM))
        for leaf in ("server", "client"):
            cert, key = make_leaf(self.ca, "%s-%s" % (leaf, name),
                                  ["localhost"],
                                  ["127.0.0.1", "::1", *ips])
            (self.dir / ("%s.pem" % leaf)).write_bytes(
                cert.public_bytes(serialization.Encoding.PEM))
            keyfile = self.dir / ("%s.key" % leaf)
            keyfile.write_bytes(key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            keyfile.chmod(0o600)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def config(self, extra: str = "") -> str:
        lines = ["[debug]", "loglevel=1", "[authenticate]"]
        for role in ("client", "server"):
            lines += [
                "[authenticate.%s]" % role,
                "x509.truststore=%s" % self.path("ca.pem"),
                "x509.certificate=%s" % self.path(role + ".pem"),
                "x509.private_key=%s" % self.path(role + ".key"),
            ]
        return "\n".join(lines) + "\n" + extra


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
        opts = _OPTS + ",fsid=0,xprtsec=tls:mtls"
        exports = self.workdir / ("exports-%s" % self.name)
        exports.write_text("%s %s\n" % (
            self.export, " ".join("%s(%s)" % (c, opts) for c in clients)))
        sh("mkdir -p {e} {t}{e} && mount -t tmpfs -o size=16m tmpfs {e} "
           "&& mount --rbind {e} {t}{e}".format(e=self.export, t=TRIXIE))
        Path(self.export, "whoami").write_text(self.name + "\n")
        Path(self.export).chmod(0o1777)
        sh("touch %s/etc/exports" % TRIXIE)
        r = sh("ip netns exec %s bash -c %s" % (
            self.name, _quote(_NS_NFS_SERVER.format(
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
    bit = 1 << (group_id - 1)
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[1] == "16" and int(f[3], 16) & bit:
            return True
    return False


@dataclass
class TraceEvent:
    comm: str
    pid: int
    stamp: float
    event: str
    req: str
    status: int | None
    sk: str = ""


def trace_events() -> list[TraceEvent]:
    """Every handshake:* event in the trace buffer, with who emitted it."""
    out = []
    for line in (TRACING / "trace").read_text().splitlines():
        m = re.match(r"\s*(.+)-(\d+)\s+\[\d+\]\s+\S+\s+(\d+\.\d+): "
                     r"(handshake_\w+): .*?req=(\S+)(.*)", line)
        if not m:
            continue
        st = re.search(r"(?:status|err)=(-?\d+)", m.group(6))
        sk = re.search(r"sk=(\S+)", m.group(6))
        out.append(TraceEvent(m.group(1).strip(), int(m.group(2)),
                              float(m.group(3)), m.group(4), m.group(5),
                              int(st.group(1)) if st else None,
                              sk.group(1) if sk else ""))
    return out


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def fd_count(pid: int) -> int:
    """The fewest fds ``pid`` held over one second (10 looks).

    A single look can catch an fd that is open for a moment only (a worker
    being reaped, a control client being answered): once, a baseline of
    23 against 22 at the end failed the add/delete cycles.  A leaked fd
    stays, so it shows in the minimum all the same.
    """
    seen = []
    for _ in range(10):
        seen.append(len(os.listdir("/proc/%d/fd" % pid)))
        time.sleep(0.1)
    return min(seen)


@pytest.fixture
def fds_of() -> Callable[[int], int]:
    """``fd_count`` for test modules (which cannot import conftest)."""
    return fd_count


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


class RpcTlsPeer:
    """An NFS "server" that answers RPC with STARTTLS (RFC 9289), reads
    the ClientHello and then misbehaves, by ``mode``: "hold" never
    answers (a handshake that hangs), "close" closes the connection,
    "reset" resets it (SO_LINGER 0).  ``hellos`` counts ClientHellos."""

    MODES = ("hold", "close", "reset")

    def __init__(self, port: int, mode: str = "hold") -> None:
        import socket
        import threading

        assert mode in self.MODES, mode
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", port),
                                         reuse_port=True)
        self.sock.settimeout(0.2)
        self.hellos = 0
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._talk, args=(conn,),
                             daemon=True).start()

    def _talk(self, conn: Any) -> None:
        import socket
        import struct

        conn.settimeout(60)
        try:
            while True:
                head = conn.recv(4, socket.MSG_PEEK)
                if not head:
                    return
                if head[0] == 0x16:  # TLS handshake record
                    conn.recv(16384)
                    self.hellos += 1
                    if self.mode == "hold":
                        self.held.append(conn)
                        return
                    if self.mode == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    conn.close()
                    return
                (marker,) = struct.unpack("!I", conn.recv(4))
                size = marker & 0x7FFFFFFF
                call = b""
                while len(call) < size:
                    chunk = conn.recv(size - len(call))
                    if not chunk:
                        return
                    call += chunk
                # REPLY, MSG_ACCEPTED, verifier AUTH_NONE "STARTTLS",
                # SUCCESS.
                body = (call[:4] + struct.pack("!III", 1, 0, 0)
                        + struct.pack("!I", 8) + b"STARTTLS"
                        + struct.pack("!I", 0))
                conn.sendall(struct.pack("!I", 0x80000000 | len(body))
                             + body)
        except OSError:
            conn.close()

    def close(self) -> None:
        """Stop listening and drop the held connections; idempotent."""
        self.stop.set()
        self.thread.join()
        self.sock.close()
        for c in self.held:
            c.close()
        self.held.clear()


@pytest.fixture
def rpc_tls_peer() -> Iterator[Callable[[int, str], RpcTlsPeer]]:
    """Make RpcTlsPeer(port, mode)s in this namespace; all closed after
    the test (closing one earlier is fine)."""
    made: list[RpcTlsPeer] = []

    def make(port: int, mode: str) -> RpcTlsPeer:
        made.append(RpcTlsPeer(port, mode))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


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

    # -- configuration and sites --

    def netns_config(self, name: str, creds: NsCreds) -> Path:
        path = self.workdir / "netns" / name / "config"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(creds.config())
        return path

    def main_config(self) -> str:
        return self.creds["init"].config(
            "[netns]\ndefault=%s\n" % self.default_config)

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

    def wait_ready(self, labels: list[str], timeout: float = 180,
                   not_pid: dict[str, int] | None = None) -> dict[str, int]:
        """Wait until each label has a ready worker (other than
        ``not_pid[label]``); return label -> worker pid."""
        end = time.monotonic() + timeout
        while True:
            try:
                rows = self.status()
            except (OSError, ValueError):  # restarting (fault matrix)
                rows = {}
            pids = {
                label: rows[label]["worker_pid"]
                for label in labels
                if label in rows and rows[label]["worker_ready"]
                and rows[label]["worker_pid"] != (not_pid or {}).get(label)
            }
            if len(pids) == len(labels):
                return pids
            if time.monotonic() > end:
                raise AssertionError("workers not ready within %s s: %r"
                                     % (timeout, rows))
            time.sleep(0.2)

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

    def close(self) -> None:
        self.daemon.stop()
        for name in list(self.sites):
            self.remove_site(name)


@pytest.fixture(scope="module")
def netns_lab(nfs_server: str) -> Iterator[NetnsLab]:
    """Namespaces a and b with their nfsd, then tlshd serving all three.

    tlshd starts after a and b exist (test_netns adds "c" while it runs).
    The veth pair joins a (10.99.0.1) and b (10.99.0.2); a's export admits
    both a's own loopback and b over the veth.
    """
    import shutil
    import tempfile

    ensure_worker_user()
    workdir = Path(tempfile.mkdtemp(prefix="tlshd-netns-"))
    workdir.chmod(0o755)
    lab = NetnsLab(workdir)
    try:
        lab.add_site("a", clients=["127.0.0.1", "%s.0/24" % VETH_NET])
        lab.add_site("b")
        sh("ip link add va netns a type veth peer name vb netns b && "
           "ip -n a addr add {n}.1/24 dev va && ip -n a link set va up && "
           "ip -n b addr add {n}.2/24 dev vb && ip -n b link set vb up"
           .format(n=VETH_NET))
        started = time.monotonic()
        Path(nfs_server, "whoami").write_text("init\n")
        lab.daemon.start(lab.main_config())
        lab.wait_ready(["init", "a", "b"])
        print("tlshd up, workers for init, a, b ready after %.1f s"
              % (time.monotonic() - started))
        yield lab
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the namespace suite last, the fault matrix (namespaces deleted
    with handshakes in flight, workers killed) just before it: whatever a
    suite that kills and deletes leaves behind should show up there, not
    as a failure of an unrelated suite.

    Such a leak there was: NetnsSite.stop_nfs ran "rpc.nfsd 0" in the
    namespaces of a tlshd worker, which stopped the initial nfsd, and every
    later NFS mount hung.  Fixed; the order stays as a guard.
    """
    items.sort(key=lambda item: ("test_netns.py" in item.nodeid,
                                 "test_fault_matrix.py" in item.nodeid))
