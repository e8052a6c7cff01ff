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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "tlshd"), "-s", "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.wait_for(r"Worker \d+ for netns init ready", timeout)

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
        (TRACING / "events/handshake/enable").write_text("1")
        self.clear()

    def clear(self) -> None:
        (TRACING / "trace").write_text("")

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
