"""Post-quantum (ML-DSA-65) certificates over real NFS mounts.

Our tlshd serves both ends (the kernel NFS client and nfsd), each with a
classical P-256 pair and an ML-DSA pair (``x509.pq.*``).  Both ends run
OpenSSL, whose default signature algorithms put ML-DSA first, so the
server presents the ML-DSA chain and, for mTLS, so does the client; the
peer verifies it, and data then flows over kTLS.  A wrong ML-DSA chain
is refused with EACCES, as the classical ones in test_badcerts.py; a
classical key named as the pq pair is skipped, loudly.  The reference
tlshd (ktls-utils 1.0 with GnuTLS, trixie chroot) as the NFS client,
which offers no ML-DSA, gets the classical chain from the same server.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from lab.netns import NetnsSite, tlshd_group_joined
from lab.pki import make_leaf, write_cert, write_key
from lab.shell import TRIXIE, VENV_BIN, ensure_worker_user, sh

pytestmark = pytest.mark.kernel

DESCRIPTION = r"Session description: (.*)"
ML_DSA = "ML-DSA-65, mldsa65"


def dual_config(pki, server_pq="pq-server", client_pq="pq-client"):
    """Both roles with both pairs; both trust the classical and the ML-DSA
    CA."""
    pki.add_pq()

    def pq(name):
        return ("x509.pq.certificate=%s\nx509.pq.private_key=%s"
                % (pki.path(name + ".pem"), pki.path(name + ".key")))

    return pki.config(client_ca="both-ca", server_ca="both-ca",
                      extra_client=pq(client_pq),
                      extra_server=pq(server_pq))


def status_rows():
    r = sh("%s status-json" % (VENV_BIN / "tlshdctl"))
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", ["tls", "mtls"])
def test_dual_certificates_present_ml_dsa(pki, tlshd, trace, nfs, mode):
    tlshd.start(dual_config(pki))
    before = nfs.tls_stat()
    mark = tlshd.mark()
    r = nfs.mount("mtls" if mode == "mtls" else "", mode)
    assert r.ok, r.output + tlshd.since(mark)[-2000:]
    nfs.write_and_read_back()
    stat = nfs.tls_stat()
    assert stat["TlsCurrTxSw"] - before["TlsCurrTxSw"] >= 2
    assert stat["TlsCurrRxSw"] - before["TlsCurrRxSw"] >= 2
    nfs.umount()
    done = trace.completions()
    assert len(done) >= 2 and all(c.status == 0 for c in done), done
    log = tlshd.since(mark)
    descriptions = re.findall(DESCRIPTION, log)
    print("\n".join("%s: Session description: %s" % (mode, d)
                    for d in descriptions))
    assert len(descriptions) >= 2, log[-2000:]
    # Both ends: the server's certificate and signature were ML-DSA-65.
    assert all("-(%s" % ML_DSA in d for d in descriptions), descriptions
    with_client = [d for d in descriptions if "; client " in d]
    if mode == "mtls":
        # The client presented its ML-DSA certificate as well.
        assert with_client and all("; client %s)" % ML_DSA in d
                                   for d in with_client), descriptions
        assert "Peer certificate: CN=pq-client" in log
    else:
        assert not with_client, descriptions
    assert "Peer certificate: CN=pq-server" in log
    # Counted by kind: every handshake of this namespace used ML-DSA.
    (row,) = [r for r in status_rows() if r["netns"] == "init"]
    assert row["by_certificate"].get("ml-dsa", 0) >= 2, row
    assert "classical" not in row["by_certificate"], row


@pytest.mark.parametrize("name,reason", [
    ("pq-untrusted", "self-signed certificate in certificate chain"),
    ("pq-expired", "certificate has expired"),
    ("pq-wrong-name", "IP address mismatch"),
])
def test_wrong_ml_dsa_chain_is_refused(pki, tlshd, trace, nfs, name,
                                       reason):
    tlshd.start(dual_config(pki, server_pq=name))
    mark = tlshd.mark()
    r = nfs.mount("", "tls", extra=",retry=0,soft,timeo=50,retrans=1",
                  timeout=60)
    assert not r.ok, "mounted with %s: %s" % (name, r.output)
    statuses = {c.status for c in trace.completions()}
    # The trace prints the status as the kernel holds it: -errno.
    assert -errno.EACCES in statuses, (statuses, tlshd.since(mark)[-2000:])
    failures = re.findall(r"Handshake with .*: certificate verify failed.*",
                          tlshd.since(mark))
    assert failures and reason in failures[0], failures
    assert "subject=CN=" in failures[0]
    # The same daemon with a good ML-DSA chain mounts.
    tlshd.reload(dual_config(pki))
    trace.clear()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()


def test_classical_key_as_pq_pair_is_skipped_loudly(pki, tlshd, trace, nfs):
    tlshd.start(dual_config(pki, server_pq="server"))
    assert re.search(r"server x509\.pq\.certificate .*server\.pem has a "
                     r"ECDSA-SECP256R1 key, not ML-DSA: IGNORED",
                     tlshd.log()), tlshd.log()[-2000:]
    mark = tlshd.mark()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()
    descriptions = re.findall(DESCRIPTION, tlshd.since(mark))
    assert descriptions and all(
        "-(ECDSA-SECP256R1, ecdsa_secp256r1_sha256)-" in d
        for d in descriptions), descriptions


# ---- the reference tlshd (ktls-utils, trixie chroot) as the client ----

REF_NET = "10.98.0"  # pqref .1 (the reference's NFS client), pqsrv .2


@pytest.fixture
def reference_client(pki, nfs_server, tlshd, tmp_path):
    """nfsd in netns pqsrv (10.98.0.2), served by our tlshd with dual
    certificates for 10.98.0.2; netns pqref (10.98.0.1), whose NFS client
    is served by the reference tlshd, trusting both CAs.  Yields
    (pqref site, reference log path)."""
    ensure_worker_user()
    pki.add_pq()
    srv, ref_site = NetnsSite("pqsrv", tmp_path), NetnsSite("pqref", tmp_path)
    ref = None
    try:
        for site in (srv, ref_site):
            site.create()
        sh("ip -n pqref link add vpq0 type veth peer name vpq1 netns pqsrv"
           " && ip -n pqref addr add {n}.1/24 dev vpq0"
           " && ip -n pqref link set vpq0 up"
           " && ip -n pqsrv addr add {n}.2/24 dev vpq1"
           " && ip -n pqsrv link set vpq1 up".format(n=REF_NET))
        srv.start_nfs(["%s.0/24" % REF_NET])
        # Our server's certificates must name 10.98.0.2.
        creds = tmp_path / "pqsrv"
        creds.mkdir()
        for name, ca, pq in (("server", pki.ca, False),
                             ("pq-server", pki.pq_ca, True)):
            cert, key = make_leaf(ca, "ref-" + name, [], ["%s.2" % REF_NET],
                                  pq=pq)
            write_cert(creds / (name + ".pem"), cert)
            write_key(creds / (name + ".key"), key)
        conf = tmp_path / "netns" / "pqsrv" / "config"
        conf.parent.mkdir(parents=True)
        conf.write_text(
            "[debug]\nloglevel=1\n[authenticate.server]\n"
            "x509.truststore={t}\n"
            "x509.certificate={c}/server.pem\nx509.private_key={c}/server.key\n"
            "x509.pq.certificate={c}/pq-server.pem\n"
            "x509.pq.private_key={c}/pq-server.key\n".format(
                t=pki.path("both-ca.pem"), c=creds))
        # Our daemon's main file (init); pqsrv's is beside it, pqref has
        # none and is left to the reference.
        tlshd.start(pki.config())
        # The reference reads its files inside the chroot.
        inside = Path("/tmp/tlshd-pq-ref")
        d = TRIXIE / str(inside).lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(pki.path("both-ca.pem"), d / "ca.pem")
        (d / "tlshd.conf").write_text(
            "[debug]\nloglevel=1\n[authenticate]\n[authenticate.client]\n"
            "x509.truststore={i}/ca.pem\n".format(i=inside))
        log_path = tmp_path / "reference.log"
        ref = subprocess.Popen(
            ["nsenter", "--net=/run/netns/pqref", "chroot", str(TRIXIE),
             "/usr/sbin/tlshd", "-s", "-c", str(inside / "tlshd.conf")],
            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        from tlshd.supervisor import netlink_family

        group = netlink_family.probe_family().group_id
        end = time.monotonic() + 60
        while not (tlshd_group_joined("pqref", group)
                   and tlshd_group_joined("pqsrv", group)):
            assert ref.poll() is None, log_path.read_text()
            assert time.monotonic() < end, "pqref or pqsrv not served"
            time.sleep(0.1)
        yield ref_site, log_path
    finally:
        ref_site.umount()
        if ref is not None:
            ref.terminate()
            try:
                ref.wait(30)
            except subprocess.TimeoutExpired:
                ref.kill()
                ref.wait()
        srv.stop_nfs()
        for site in (srv, ref_site):
            site.delete()


def test_reference_client_gets_the_classical_certificate(
        tlshd, trace, reference_client):
    """ktls-utils' tlshd (GnuTLS) as the NFS client against our server
    with dual certificates: it does not offer ML-DSA, so it gets the
    classical chain, and the mount works."""
    site, ref_log = reference_client
    mark = tlshd.mark()
    r = site.mount(host="%s.2" % REF_NET)
    assert r.ok, (r.output, tlshd.since(mark)[-2000:],
                  ref_log.read_text(errors="replace")[-2000:])
    assert site.whoami() == "pqsrv"
    site.umount()
    log = tlshd.since(mark)
    descriptions = re.findall(DESCRIPTION + r"\[netns pqsrv\]", log)
    print("\n".join("reference client -> ours: Session description: %s" % d
                    for d in descriptions))
    assert descriptions, log[-2000:]
    assert all("-(ECDSA-SECP256R1, ecdsa_secp256r1_sha256)-" in d
               for d in descriptions), descriptions
    (row,) = [r for r in status_rows() if r["netns"] == "pqsrv"]
    assert row["by_certificate"] == {"classical": len(descriptions)}, row
    # The reference's side of it (ktls-utils 1.0's wording).
    ref_text = ref_log.read_text(errors="replace")
    assert "Handshake with %s.2 (%s.2) was successful" % (
        REF_NET, REF_NET) in ref_text, ref_text[-2000:]
    assert re.search(r"Session description: .*-\(ECDSA-SECP256R1-SHA256\)-",
                     ref_text), ref_text[-2000:]
