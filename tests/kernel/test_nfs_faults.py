"""Hostile or broken NFS peers: the kernel client's handshake must end
promptly with the right status, and tlshd must serve the next mount.

The fake server speaks just enough ONC RPC to answer the client's AUTH_TLS
probe with STARTTLS (RFC 9289), then misbehaves during the TLS handshake.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time

import pytest

from tlshd.shared.config import DEFAULT_CLIENT_HANDSHAKE_TIMEOUT

pytestmark = pytest.mark.kernel

FAKE_PORT = 20490


class FakeRpcTlsServer:
    """Answer every RPC call with STARTTLS; then close or go silent."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", FAKE_PORT),
                                         reuse_port=True)
        self.sock.settimeout(0.5)
        self.stop = threading.Event()
        self.client_hellos = 0
        self.held: list[socket.socket] = []
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
        conn.settimeout(30)
        try:
            while True:
                head = conn.recv(4, socket.MSG_PEEK)
                if not head:
                    return
                if head[0] == 0x16:  # a TLS record: the ClientHello
                    conn.recv(16384)
                    self.client_hellos += 1
                    if self.mode == "close":
                        conn.close()
                    else:
                        self.held.append(conn)  # silent, never answers
                    return
                self._answer_rpc(conn)
        except OSError:
            conn.close()

    @staticmethod
    def _answer_rpc(conn: socket.socket) -> None:
        (marker,) = struct.unpack("!I", conn.recv(4))
        call = b""
        while len(call) < marker & 0x7FFFFFFF:
            call += conn.recv((marker & 0x7FFFFFFF) - len(call))
        xid = call[:4]
        # REPLY, MSG_ACCEPTED, verifier AUTH_NONE "STARTTLS", SUCCESS.
        body = (xid + struct.pack("!III", 1, 0, 0) + struct.pack("!I", 8)
                + b"STARTTLS" + struct.pack("!I", 0))
        conn.sendall(struct.pack("!I", 0x80000000 | len(body)) + body)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()
        for c in self.held:
            c.close()


def fake_mount(nfs, timeout):
    return nfs.mount("", "tls", timeout=timeout,
                     extra=",port=%d,retry=0,soft,timeo=50,retrans=1"
                     % FAKE_PORT)


def test_peer_closes_mid_handshake(pki, tlshd, trace, nfs):
    tlshd.start(pki.config())
    fake = FakeRpcTlsServer("close")
    try:
        r = fake_mount(nfs, timeout=15)
    finally:
        fake.close()
    assert not r.ok
    assert fake.client_hellos >= 1, "the kernel never started TLS"
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


def test_silent_peer_times_out_at_our_deadline(pki, tlshd, trace, nfs):
    tlshd.start(pki.config(timeout=3))
    fake = FakeRpcTlsServer("silent")
    try:
        start = time.monotonic()
        r = fake_mount(nfs, timeout=12)
        elapsed = time.monotonic() - start
    finally:
        fake.close()
    assert not r.ok
    assert fake.client_hellos >= 1
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
                                                       nfs):
    """Measure how long the kernel's NFS client waits for a handshake
    before it cancels (sunrpc's XS_TLS_HANDSHAKE_TO; the request carries
    no TIMEOUT), and check that our default deadline for such requests
    answers first: a stalled peer must end by our DONE(ETIMEDOUT), not by
    the consumer giving up on us."""
    tlshd.start(pki.config(timeout=60))
    fake = FakeRpcTlsServer("silent")
    try:
        fake_mount(nfs, timeout=50)
    finally:
        fake.close()
    events = trace.events()
    submits = {e.req: e.stamp for e in events if e.event == "handshake_submit"}
    cancels = [e for e in events if e.event == "handshake_cancel"]
    assert cancels, "the NFS client never cancelled: %s" % events
    waited = cancels[0].stamp - submits[cancels[0].req]
    print("NFS client cancelled after %.2f s" % waited)
    assert DEFAULT_CLIENT_HANDSHAKE_TIMEOUT + 1.0 < waited, waited
