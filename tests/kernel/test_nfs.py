"""NFS over TLS (RFC 9289) with the kernel client and nfsd, served by tlshd.

Every mount makes two real upcalls: the NFS client's (ClientHello) and
nfsd's (ServerHello).  Both are answered by one tlshd process tree.  What
the kernel consumer saw is read from the handshake:* tracepoints.
"""

from __future__ import annotations

import errno
import re

import pytest

pytestmark = pytest.mark.kernel


def completed_ok(trace, n):
    done = trace.completions()
    assert len(done) >= n, done
    assert all(c.status == 0 for c in done), done
    return done


@pytest.mark.parametrize("mode", ["tls", "mtls"])
def test_mount_write_read(pki, tlshd, trace, nfs, mode):
    tlshd.start(pki.config())
    before = nfs.tls_stat()
    mark = tlshd.mark()
    r = nfs.mount("", mode)
    assert r.ok, r.output
    nfs.write_and_read_back()
    stat = nfs.tls_stat()
    # The client's and nfsd's sockets both run kTLS in both directions.
    assert stat["TlsCurrTxSw"] - before["TlsCurrTxSw"] >= 2
    assert stat["TlsCurrRxSw"] - before["TlsCurrRxSw"] >= 2
    print("%s: /proc/net/tls_stat %s" % (mode, {
        k: "%d -> %d" % (before[k], v) for k, v in stat.items()
        if k.startswith(("TlsCurr", "TlsTx", "TlsRx")) and v != before[k]}))
    assert "xprtsec=%s" % mode in open("/proc/mounts").read()
    nfs.umount()
    completed_ok(trace, 2)
    log = tlshd.since(mark)
    assert len(re.findall(r"Handshake with '.*' \(.*\) succeeded", log)) >= 2


@pytest.mark.parametrize(
    "suite,name",
    [
        ("TLS_AES_128_GCM_SHA256", "AES-128-GCM"),
        ("TLS_AES_256_GCM_SHA384", "AES-256-GCM"),
        ("TLS_CHACHA20_POLY1305_SHA256", "CHACHA20-POLY1305"),
    ],
)
def test_each_cipher_suite(pki, tlshd, trace, nfs, suite, name):
    tlshd.start(pki.config(extra_server="x509.ciphersuites=%s" % suite))
    mark = tlshd.mark()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()
    nfs.umount()
    completed_ok(trace, 2)
    descriptions = re.findall(r"Session description: (.*)", tlshd.since(mark))
    assert len(descriptions) >= 2
    assert all(suite in d or name in d for d in descriptions), descriptions
    print("\n".join("%s: Session description: %s" % (suite, d)
                    for d in descriptions))


def test_mtls_export_refuses_client_without_certificate(
    pki, tlshd, trace, nfs
):
    tlshd.start(pki.config())
    r = nfs.mount("mtls", "tls", extra=",retry=0")
    assert not r.ok, "mtls-only export accepted an anonymous TLS client"
    # The handshakes themselves succeeded; nfsd refused the transport
    # because REMOTE_AUTH was empty (no client certificate).
    assert all(c.status == 0 for c in trace.completions())
    r = nfs.mount("mtls", "mtls")
    assert r.ok, r.output
    nfs.write_and_read_back()


def failing_then_fixed(
    pki, tlshd, trace, nfs, bad_config, want_status, host="127.0.0.1"
):
    """Mount with ``bad_config`` (must fail with ``want_status`` in DONE),
    then reload a good configuration and mount again (must succeed)."""
    tlshd.start(bad_config)
    mark = tlshd.mark()
    r = nfs.mount("", "tls", host=host, extra=",retry=0", timeout=60)
    assert not r.ok, "mount succeeded with a bad certificate"
    statuses = {c.status for c in trace.completions()}
    # The trace prints the status as the kernel holds it: -errno.
    assert -want_status in statuses, (statuses, tlshd.since(mark)[-2000:])
    assert re.search(r"Handshake with .* failed", tlshd.since(mark))
    tlshd.reload(pki.config())
    trace.clear()
    r = nfs.mount("", "tls", host=host)
    assert r.ok, r.output
    nfs.write_and_read_back()
    completed_ok(trace, 2)
    return r


def test_untrusted_ca(pki, tlshd, trace, nfs):
    failing_then_fixed(
        pki, tlshd, trace, nfs, pki.config(server="untrusted"), errno.EACCES
    )


def test_expired_server_certificate(pki, tlshd, trace, nfs):
    failing_then_fixed(
        pki, tlshd, trace, nfs, pki.config(server="expired"), errno.EACCES
    )


def test_not_yet_valid_server_certificate(pki, tlshd, trace, nfs):
    failing_then_fixed(
        pki,
        tlshd,
        trace,
        nfs,
        pki.config(server="not-yet-valid"),
        errno.EACCES,
    )


def test_wrong_ip(pki, tlshd, trace, nfs):
    # The certificate names localhost but no IP: mounting by IP must fail
    # (peername 127.0.0.1), and the same daemon then serves a good mount.
    failing_then_fixed(
        pki, tlshd, trace, nfs, pki.config(server="dns-only"), errno.EACCES
    )


def test_wrong_name(pki, tlshd, trace, nfs):
    failing_then_fixed(
        pki,
        tlshd,
        trace,
        nfs,
        pki.config(server="wrong-name"),
        errno.EACCES,
        host="localhost",
    )
