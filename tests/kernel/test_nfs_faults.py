"""Hostile or broken NFS peers: the kernel client's handshake must end
promptly with the right status, and tlshd must serve the next mount.

The fake server (conftest's RpcTlsPeer) speaks just enough ONC RPC to
answer the client's AUTH_TLS probe with STARTTLS (RFC 9289), then
misbehaves during the TLS handshake.
"""

from __future__ import annotations

import errno
import time

import pytest

from tlshd.shared.config import DEFAULT_CLIENT_HANDSHAKE_TIMEOUT

pytestmark = pytest.mark.kernel

FAKE_PORT = 20490


def fake_mount(nfs, timeout):
    return nfs.mount("", "tls", timeout=timeout,
                     extra=",port=%d,retry=0,soft,timeo=50,retrans=1"
                     % FAKE_PORT)


def test_peer_closes_mid_handshake(pki, tlshd, trace, nfs, rpc_tls_peer):
    tlshd.start(pki.config())
    fake = rpc_tls_peer(FAKE_PORT, "close")
    try:
        r = fake_mount(nfs, timeout=15)
    finally:
        fake.close()
    assert not r.ok
    assert fake.hellos >= 1, "the kernel never started TLS"
    done = trace.completions()
    assert done, "no handshake completed"
    first = done[0]
    # Premature termination: ETIMEDOUT, which asks the consumer to retry.
    assert first.status == -errno.ETIMEDOUT, done
    assert first.seconds < 5.0, done
    # The daemon is unharmed: a real mount works next.
    trace.clear()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()


def test_silent_peer_times_out_at_our_deadline(pki, tlshd, trace, nfs,
                                              rpc_tls_peer):
    tlshd.start(pki.config(timeout=3))
    fake = rpc_tls_peer(FAKE_PORT, "hold")
    try:
        start = time.monotonic()
        r = fake_mount(nfs, timeout=12)
        elapsed = time.monotonic() - start
    finally:
        fake.close()
    assert not r.ok
    assert fake.hellos >= 1
    done = trace.completions()
    assert done, "no handshake completed"
    first = done[0]
    assert first.status == -errno.ETIMEDOUT, done
    # At our 3 s deadline, well before the NFS client's own 10 s.
    assert 2.5 <= first.seconds < 8.0, done
    assert elapsed < 20
    trace.clear()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()


def test_client_certificate_missing_for_mtls(pki, tlshd, trace, nfs):
    tlshd.start(pki.config(client=""))
    mark = tlshd.mark()
    r = nfs.mount("", "mtls", extra=",retry=0", timeout=30)
    assert not r.ok, "mtls mount succeeded without a client certificate"
    statuses = {c.status for c in trace.completions()}
    # The client end fails locally (EIO: nothing to present).
    assert -errno.EIO in statuses, statuses
    assert "no client certificate configured" in tlshd.since(mark)
    # tls (no client certificate needed) still works with this config.
    trace.clear()
    r = nfs.mount("", "tls")
    assert r.ok, r.output


def test_our_default_deadline_is_under_the_nfs_clients(pki, tlshd, trace,
                                                       nfs, rpc_tls_peer):
    """Measure how long the kernel's NFS client waits for a handshake
    before it cancels (sunrpc's XS_TLS_HANDSHAKE_TO; the request carries
    no TIMEOUT), and check that our default deadline for such requests
    answers first: a stalled peer must end by our DONE(ETIMEDOUT), not by
    the consumer giving up on us."""
    tlshd.start(pki.config(timeout=60))
    fake = rpc_tls_peer(FAKE_PORT, "hold")
    try:
        fake_mount(nfs, timeout=50)
        # The mount command can give up (timeo/retrans) a moment before
        # the client's handshake timer fires, so wait for the cancel to
        # reach the trace; the peer must still be holding meanwhile.
        cancel, events = None, []
        give_up = time.monotonic() + 15.0
        while cancel is None and time.monotonic() < give_up:
            events = trace.events()
            # The kernel reuses a request's address when the client
            # retries, so pair the first cancel with the submit that came
            # just before it, not with the last submit of that address.
            cancel = next((e for e in events
                           if e.event == "handshake_cancel"), None)
            if cancel is None:
                time.sleep(0.25)
    finally:
        fake.close()
    assert cancel, "the NFS client never cancelled: %s" % events
    submit = max(e.stamp for e in events
                 if e.event == "handshake_submit" and e.req == cancel.req
                 and e.stamp <= cancel.stamp)
    waited = cancel.stamp - submit
    print("NFS client cancelled after %.2f s" % waited)
    assert DEFAULT_CLIENT_HANDSHAKE_TIMEOUT + 1.0 < waited, waited
