"""The bad-certificate matrix: each bad peer certificate is refused.

Client role: the kernel NFS client mounts (``xprtsec=tls``), our client
end verifies the server certificate that is presented to it.  Server
role: a client presents a bad certificate to nfsd (``xprtsec=mtls``),
our server end verifies it.  Whenever our daemon can load the bad
certificate, it presents it itself from the other end of a real mount.
Weak credentials (RSA-1024, a SHA-1 signature) it refuses to load as
its own (OpenSSL security level 2), so a small Python peer presents
those: a fake NFS server answering the client's RPC-with-TLS probe, or a
fake NFS client probing nfsd; the kernel's upcall is the same.

Every case records the DONE status the kernel saw (handshake:*
tracepoints), what the consumer reported, and the daemon's log line,
and asserts that the verifying end accepted nothing and named the
reason.  ``TLSHD_BADCERT_REPORT=FILE`` appends one JSON line per case.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lab.pki import DAY, NOW, Issuer

pytestmark = pytest.mark.kernel


FAKE_SERVER_PORT = 20491
NFS_PORT = 2049

# One key for every EC leaf: the cases differ in what is signed, not in
# the key (a fresh key per leaf would only cost time under TCG).
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())
BOTH_EKU = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
LOCAL_SANS: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
]


def pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return bytes(obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@dataclass
class Leaf:
    """What one leaf differs in from a good one."""

    cn: str = "bad"
    sans: list[x509.GeneralName] | None = field(
        default_factory=lambda: list(LOCAL_SANS))
    not_before: datetime.datetime = NOW - DAY
    not_after: datetime.datetime = NOW + 30 * DAY
    eku: list[x509.ObjectIdentifier] | None = field(
        default_factory=lambda: list(BOTH_EKU))
    key_usage: x509.KeyUsage | None = None
    rsa_bits: int = 0  # 0: LEAF_KEY (EC P-256)


def key_usage(**on: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment",
             "data_encipherment", "key_agreement", "key_cert_sign",
             "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


def build_leaf(spec: Leaf, issuer: Issuer | None,
               ) -> tuple[x509.Certificate, Any]:
    """Sign ``spec`` by ``issuer`` (None: self-signed); return cert, key."""
    key: Any = (rsa.generate_private_key(65537, spec.rsa_bits)
                if spec.rsa_bits else LEAF_KEY)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.cn)])
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(issuer.name if issuer else subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(spec.not_before)
         .not_valid_after(spec.not_after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                        critical=True))
    if spec.eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(spec.eku), critical=False)
    if spec.key_usage is not None:
        b = b.add_extension(spec.key_usage, critical=True)
    if spec.sans:
        b = b.add_extension(x509.SubjectAlternativeName(spec.sans),
                            critical=False)
    return b.sign(issuer.key if issuer else key, hashes.SHA256()), key


def make_intermediate(root: Issuer) -> Issuer:
    """A CA below ``root``, as lab.pki's Issuer (any class with the
    same three fields will do: the test only reads them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         "tlshd-test-intermediate")])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(root.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                           critical=True)
            .add_extension(key_usage(digital_signature=True,
                                     key_cert_sign=True, crl_sign=True),
                           critical=True)
            .sign(root.key, hashes.SHA256()))
    return type(root)(name, key, cert)


def sha1_leaf(root: Issuer, workdir: Path, cn: str) -> bytes:
    """A leaf signed with SHA-1 by ``root``: cryptography refuses to make
    one, the openssl command (OpenSSL 3.0) still does.  The LEAF_KEY."""
    ca_key = workdir / "sha1-ca.key"
    ca_key.write_bytes(pem(root.key))
    ca_pem = workdir / "sha1-ca.pem"
    ca_pem.write_bytes(pem(root.cert))
    leaf_key = workdir / "sha1-leaf.key"
    leaf_key.write_bytes(pem(LEAF_KEY))
    ext = workdir / "sha1.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "basicConstraints=critical,CA:FALSE\n")
    csr = subprocess.run(
        ["openssl", "req", "-new", "-key", str(leaf_key), "-subj",
         "/CN=%s" % cn], check=True, capture_output=True).stdout
    return subprocess.run(
        ["openssl", "x509", "-req", "-sha1", "-days", "30",
         "-CA", str(ca_pem), "-CAkey", str(ca_key), "-set_serial", "4242",
         "-extfile", str(ext)],
        input=csr, check=True, capture_output=True).stdout


@dataclass(frozen=True)
class Case:
    name: str
    reason: str  # regex the daemon's log line must match
    roles: tuple[str, ...] = ("client", "server")
    host: str = "127.0.0.1"  # what the client mounts (its peer name)
    python_peer: bool = False  # our daemon refuses to load it as its own
    accepted: bool = False  # a control case


CASES = [
    Case("expired", "certificate has expired"),
    Case("not-yet-valid", "certificate is not yet valid"),
    # Server certificates only: a server does not check client names
    # (neither does ktls-utils; nfsd gets no name to check against).
    Case("wrong-dns-name", "hostname mismatch", roles=("client",),
         host="localhost"),
    Case("wrong-ip", "IP address mismatch", roles=("client",)),
    Case("missing-san", "hostname mismatch", roles=("client",),
         host="localhost"),
    Case("untrusted-ca", "unable to get local issuer certificate"),
    Case("revoked", "certificate revoked"),
    Case("rsa-1024", "EE certificate key too weak", python_peer=True),
    Case("sha1-signature", "CA signature digest algorithm too weak",
         python_peer=True),
    Case("wrong-eku", "(unsupported|unsuitable) certificate purpose"),
    Case("wrong-key-usage", "(unsupported|unsuitable) certificate purpose"),
    Case("self-signed", "self-signed certificate"),
    Case("truncated-chain", "unable to get local issuer certificate"),
    # Controls: the same machinery with a good certificate is accepted.
    Case("control-chain", "", accepted=True),
    Case("control-python-peer", "", python_peer=True, accepted=True),
]


class BadPki:
    """Every case's certificate for one role, written under ``root``.

    The trust anchor is the session's test CA (``pki.ca``); the other
    end's good credentials are the session's too.
    """

    def __init__(self, pki: Any, root: Path, role: str) -> None:
        self.pki = pki
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        ca: Issuer = pki.ca
        wrong_eku = (ExtendedKeyUsageOID.CLIENT_AUTH if role == "client"
                     else ExtendedKeyUsageOID.SERVER_AUTH)
        specs: dict[str, tuple[Leaf, Issuer | None]] = {
            "expired": (Leaf(not_before=NOW - 10 * DAY,
                             not_after=NOW - DAY), ca),
            "not-yet-valid": (Leaf(not_before=NOW + DAY,
                                   not_after=NOW + 10 * DAY), ca),
            "wrong-dns-name": (Leaf(sans=[x509.DNSName("other.example")]),
                               ca),
            "wrong-ip": (Leaf(sans=[
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.2"))]), ca),
            "missing-san": (Leaf(cn="localhost", sans=None), ca),
            "untrusted-ca": (Leaf(), pki.other_ca),
            "revoked": (Leaf(), ca),
            "rsa-1024": (Leaf(rsa_bits=1024), ca),
            "wrong-eku": (Leaf(eku=[wrong_eku]), ca),
            "wrong-key-usage": (Leaf(key_usage=key_usage(
                data_encipherment=True)), ca),
            "self-signed": (Leaf(), None),
            "control-python-peer": (Leaf(), ca),
        }
        self.certs: dict[str, x509.Certificate] = {}
        for name, (spec, issuer) in specs.items():
            spec.cn = "%s-%s" % (role, name) if spec.cn == "bad" else spec.cn
            cert, key = build_leaf(spec, issuer)
            self.certs[name] = cert
            self.write(name, pem(cert), pem(key))
        inter = make_intermediate(ca)
        cert, key = build_leaf(Leaf(cn="%s-chain" % role), inter)
        self.write("truncated-chain", pem(cert), pem(key))
        self.write("control-chain", pem(cert) + pem(inter.cert), pem(key))
        self.write("sha1-signature",
                   sha1_leaf(ca, root, "%s-sha1-signature" % role),
                   pem(LEAF_KEY))
        crl = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.name)
               .last_update(NOW - DAY).next_update(NOW + 30 * DAY)
               .add_revoked_certificate(
                   x509.RevokedCertificateBuilder()
                   .serial_number(self.certs["revoked"].serial_number)
                   .revocation_date(NOW - DAY).build())
               .sign(ca.key, hashes.SHA256()))
        (root / "crl.pem").write_bytes(
            crl.public_bytes(serialization.Encoding.PEM))

    def write(self, name: str, cert: bytes, key: bytes) -> None:
        (self.root / ("%s.pem" % name)).write_bytes(cert)
        keyfile = self.root / ("%s.key" % name)
        keyfile.write_bytes(key)
        keyfile.chmod(0o600)

    def path(self, name: str, ext: str = "pem") -> str:
        return str(self.root / ("%s.%s" % (name, ext)))

    def config(self, case: Case, role: str) -> str:
        """Our daemon's configuration: the presenting end uses the case's
        certificate (unless a Python peer presents it); the verifying end
        (``role``) the test CA and the CRL."""
        pki = self.pki
        presenter = "server" if role == "client" else "client"
        lines = ["[debug]", "loglevel=1", "[authenticate]"]
        for end in ("client", "server"):
            cert, key = pki.path(end + ".pem"), pki.path(end + ".key")
            if end == presenter and not case.python_peer:
                cert, key = self.path(case.name), self.path(case.name, "key")
            lines += ["[authenticate.%s]" % end,
                      "x509.truststore=%s" % pki.path("ca.pem"),
                      "x509.certificate=%s" % cert,
                      "x509.private_key=%s" % key]
            if end == role:
                lines.append("x509.crl=%s" % self.path("crl"))
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def badpki(pki: Any, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, BadPki]:
    root = tmp_path_factory.mktemp("badpki")
    return {role: BadPki(pki, root / role, role)
            for role in ("client", "server")}


# ---- Python peers for what our daemon will not present -----------------


def weak_context(server: bool, cert: str, key: str) -> ssl.SSLContext:
    """The system OpenSSL at security level 0, so that it loads and uses
    a weak certificate; TLS 1.3 only, as the kernel's consumers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    # No NewSessionTicket after the handshake: our client takes bytes that
    # follow the Finished as a failed handshake (EIO), as kTLS would have
    # to carry them (the consumers' peers send none).
    if server:
        ctx.num_tickets = 0
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    return ctx


def rpc_record(body: bytes) -> bytes:
    return struct.pack("!I", 0x80000000 | len(body)) + body


def read_record(conn: socket.socket) -> bytes:
    (marker,) = struct.unpack("!I", _read(conn, 4))
    return _read(conn, marker & 0x7FFFFFFF)


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


class WeakNfsServer:
    """Answers the client's RPC-with-TLS probe with STARTTLS (RFC 9289),
    then runs the TLS server handshake presenting ``cert``."""

    def __init__(self, cert: str, key: str) -> None:
        self.ctx = weak_context(True, cert, key)
        self.sock = socket.create_server(("127.0.0.1", FAKE_SERVER_PORT),
                                         reuse_port=True)
        self.sock.settimeout(0.5)
        self.stop = threading.Event()
        self.handshakes: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._talk, args=(conn,),
                             daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        try:
            while conn.recv(1, socket.MSG_PEEK)[:1] != b"\x16":
                call = read_record(conn)
                # REPLY, MSG_ACCEPTED, verifier AUTH_NONE "STARTTLS",
                # SUCCESS.
                conn.sendall(rpc_record(
                    call[:4] + struct.pack("!III", 1, 0, 0)
                    + struct.pack("!I", 8) + b"STARTTLS"
                    + struct.pack("!I", 0)))
            tls = self.ctx.wrap_socket(conn, server_side=True)
            self.handshakes.append("completed")
            # Long enough for the client to install kTLS and answer.
            time.sleep(2)
            tls.close()
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            self.handshakes.append("failed: %s" % exc)
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def weak_nfs_client(cert: str, key: str) -> str:
    """Probe nfsd with an AUTH_TLS NULL call (RFC 9289), then run the TLS
    client handshake presenting ``cert``; return what happened."""
    ctx = weak_context(False, cert, key)
    with socket.create_connection(("127.0.0.1", NFS_PORT), timeout=30) as s:
        # xid, CALL, RPC v2, NFS (100003) v4, NULL; cred AUTH_TLS (7),
        # verifier AUTH_NONE.
        s.sendall(rpc_record(struct.pack(
            "!IIIIIIIIII", 0x7151D001, 0, 2, 100003, 4, 0, 7, 0, 0, 0)))
        reply = read_record(s)
        if b"STARTTLS" not in reply:
            return "nfsd did not offer STARTTLS: %r" % reply
        try:
            tls = ctx.wrap_socket(s, server_hostname=None)
            # TLS 1.3: the client is done before the server has judged its
            # certificate; the verdict (an alert or EOF) comes next.
            tls.settimeout(5)
            got = tls.recv(1)
            return "handshake completed, then read %r" % got
        except TimeoutError:
            return "handshake completed, no verdict within 5 s"
        except (OSError, ssl.SSLError) as exc:
            return "refused: %s" % exc


# ---- the matrix ---------------------------------------------------------


def mount_errno(output: str) -> str:
    """The errno the mount reported, as text (mount.nfs prints strerror
    or its own wording for EACCES)."""
    for code, text in ((errno.EACCES, "access denied"),
                       (errno.EACCES, "Permission denied"),
                       (errno.EIO, "Input/output error"),
                       (errno.ETIMEDOUT, "timed out"),
                       (errno.ECONNREFUSED, "Connection refused"),
                       (errno.EPIPE, "Broken pipe"),
                       (errno.EKEYREJECTED, "Key was rejected")):
        if text.lower() in output.lower():
            return errno.errorcode[code]
    return "?"


def report(row: dict[str, Any]) -> None:
    print("BADCERT %s" % json.dumps(row, sort_keys=True))
    path = os.environ.get("TLSHD_BADCERT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


@dataclass
class Sides:
    """The kernel's record of this test's requests, by consumer: nfsd (the
    server end) or the NFS client, told apart by who submitted them."""

    done: dict[str, list[int]]  # DONE statuses
    submitted: dict[str, int]


def by_side(trace: Any) -> Sides:
    """Requests submitted since the trace was cleared; one submitted before
    (an earlier test's) is left out, whenever it completes."""
    submitter: dict[str, str] = {}
    out = Sides({"server": [], "client": []}, {"server": 0, "client": 0})
    for ev in trace.events():
        if ev.event == "handshake_submit":
            submitter[ev.req] = ev.comm
            out.submitted[side_of(ev.comm)] += 1
        elif ev.event == "handshake_complete" and ev.req in submitter:
            out.done[side_of(submitter.pop(ev.req))].append(
                ev.status if ev.status is not None else -1)
    return out


def side_of(comm: str) -> str:
    return "server" if comm.startswith("nfsd") else "client"


PARAMS = [pytest.param(role, case, id="%s-%s" % (role, case.name))
          for role in ("client", "server") for case in CASES
          if role in case.roles]


@pytest.mark.parametrize("role,case", PARAMS)
def test_bad_certificate(badpki, tlshd, trace, nfs, role, case):
    bad = badpki[role]
    tlshd.start(bad.config(case, role))
    mark = tlshd.mark()
    consumer = ""
    if role == "client" and case.python_peer:
        peer = WeakNfsServer(bad.path(case.name), bad.path(case.name, "key"))
        try:
            r = nfs.mount("", "tls", host=case.host, timeout=30, extra=(
                ",port=%d,retry=0,soft,timeo=50,retrans=1"
                % FAKE_SERVER_PORT))
        finally:
            peer.close()
        consumer = "mount: %s; peer: %s" % (r.output, peer.handshakes)
        mounted = r.ok
    elif role == "server" and case.python_peer:
        consumer = weak_nfs_client(bad.path(case.name),
                                   bad.path(case.name, "key"))
        mounted = False
    else:
        xprtsec = "tls" if role == "client" else "mtls"
        export = "" if role == "client" else "mtls"
        r = nfs.mount(export, xprtsec, host=case.host, timeout=60,
                      extra=",retry=0,soft,timeo=50,retrans=1")
        consumer = r.output
        mounted = r.ok
        if r.ok:
            nfs.umount()
    # The kernel NFS client goes on reconnecting for a while after a
    # refused mount(8) has returned, so a connection of an earlier case can
    # reach both ends of this case's daemon.  Each such straggler is one
    # request on each side.  A Python peer's connection is one request of
    # the verifying end only: the other side's requests count the
    # stragglers.
    other = "server" if role == "client" else "client"

    def stragglers(sides: Sides) -> int:
        return sides.submitted[other] if case.python_peer else 0

    # A Python client hears our server's alert before the supervisor has
    # sent DONE: wait for the kernel to record the verifying end's answer.
    end = time.monotonic() + 20
    sides = by_side(trace)
    while (len(sides.done[role]) <= stragglers(sides)
           and time.monotonic() < end):
        time.sleep(0.2)
        sides = by_side(trace)
    verifier = sides.done[role]
    log = tlshd.since(mark)
    # Requests whose socket our end found closed when it installed the
    # keys (see below).
    closed = "|".join(str(e) for e in (errno.ENOTCONN, errno.ECONNRESET,
                                       errno.EPIPE))
    gone = len(re.findall(r"Failed to install kTLS keys: \[Errno (?:%s)\]"
                          % closed, log))
    failures = re.findall(r"Handshake with .*: certificate verify failed.*",
                          log)
    report({"role": role, "case": case.name, "verifier_done": verifier,
            "other_done": sides.done[other],
            "stragglers": stragglers(sides),
            "peer_gone_at_install": gone,
            "mounted": mounted, "consumer": consumer,
            "consumer_errno": mount_errno(consumer),
            "log": failures[0] if failures else "",
            "errors": re.findall(r"Handshake with '[^']*' \([^)]*\): .*",
                                 log)[:3]})
    assert verifier, "no request of the verifying end completed: %s" % sides
    expected = 0 if case.accepted else -errno.EACCES
    # Every request of the verifying end got the expected answer (0, or
    # EACCES: refused), apart from at most one per straggler.
    assert expected in verifier, (verifier, log[-2000:])
    others = [s for s in verifier if s != expected]
    # The NFS client may close a connection as soon as its own end of the
    # handshake is done (seen on 6.12: a mount that made two connections,
    # the second closed right after its handshake); our server end, still
    # finishing, then finds the socket closed when it installs the keys
    # and answers EIO.  Such a request had passed verification, so it can
    # only excuse an answer in an accepted case.
    excused = stragglers(sides) + (
        min(gone, others.count(-errno.EIO)) if case.accepted else 0)
    assert len(others) <= excused, (verifier, sides, log[-2000:])
    if case.accepted:
        return
    assert not mounted, "mounted with a bad certificate: %s" % consumer
    assert failures, log[-2000:]
    assert any(re.search(case.reason, f, re.I) for f in failures), failures
