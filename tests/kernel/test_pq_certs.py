"""Post-quantum (ML-DSA-65) certificates over real NFS mounts.

Our tlshd serves both ends (the kernel NFS client and nfsd), each with a
classical P-256 pair and an ML-DSA pair (``x509.pq.*``).  Both ends run
OpenSSL, whose default signature algorithms put ML-DSA first, so the
server presents the ML-DSA chain and, for mTLS, so does the client; the
peer verifies it, and data then flows over kTLS.  A wrong ML-DSA chain
is refused with EACCES, as the classical ones in test_badcerts.py; a
classical key named as the pq pair is skipped, loudly.
"""

from __future__ import annotations

import errno
import json
import re

import pytest
from lab.shell import VENV_BIN, sh

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
