"""The real worker (``python -m tlshd.worker``) under its real sandbox.

The Supervisor runs with the fake netlink socket of test_supervisor and
real credentials, so the worker does complete TLS 1.3 handshakes in both
roles (up to the kTLS hand-over, which this host kernel refuses with
ENOENT), fails verification, meets peers that hang up or stay silent, and
finally exits on its own.  Whatever it does, it must never die of SIGSYS:
the worker that answers the last request is the one that said HELLO, and
it exits with status 0.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from test_supervisor import FakeNl, connected_fd, ready, run_until

from tlshd.shared import config, protocol, uapi
from tlshd.supervisor import netlink_family, workercheck
from tlshd.supervisor.arbiter import Supervisor
from tlshd.worker.tlsengine import Engine, Outcome


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@dataclass
class Sandboxed:
    sup: Supervisor
    nl: FakeNl
    ns: Any
    hellos: list[protocol.Hello]
    ids: tuple[int, int] | None


def _ids(identity: str) -> tuple[int, int] | None:
    if identity == "as-is":
        return None
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


@pytest.fixture(params=[("nobody", "exec"), ("nobody", "template"),
                        ("as-is", "exec")],
                ids=["nobody-exec", "nobody-template", "as-is-exec"])
def sandboxed(request: pytest.FixtureRequest, tmp_path: Any, pki: Any,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandboxed]:
    """A Supervisor whose worker runs as ``nobody`` (or as we are), exec'd
    or forked from the worker template (which needs a namespace fd)."""
    identity, spawn = request.param
    if identity == "nobody" and os.geteuid() != 0:
        pytest.skip("dropping to nobody needs root")
    conf = tmp_path / "tlshd.conf"
    conf.write_text(
        "[authenticate]\nhandshake_timeout=5\n"
        "[authenticate.client]\nx509.truststore=%s\n"
        "[authenticate.server]\nx509.truststore=%s\n"
        "x509.certificate=%s\nx509.private_key=%s\n"
        "[netns]\nworker_idle_timeout=0\n"
        % (pki.ca, pki.ca, pki.server.cert, pki.server.key))
    ids = _ids(identity)
    s = Supervisor(config.load(str(conf)), netlink_family.FamilyInfo(0x21, 5),
                   worker_ids=ids)
    nsfd = None
    if spawn == "template":
        s.pool.use_template()
        nsfd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    hellos: list[protocol.Hello] = []
    verify_hello = workercheck.verify_hello

    def spy(pid: int, hello: protocol.Hello,
            ids: tuple[int, int] | None) -> list[str]:
        hellos.append(hello)
        return verify_hello(pid, hello, ids)

    monkeypatch.setattr(workercheck, "verify_hello", spy)
    nl = FakeNl()
    ns = s.add_namespace("init", str(conf), nlsock=nl, nsfd=nsfd)
    yield Sandboxed(s, nl, ns, hellos, ids)
    s.stop()
    deadline = time.monotonic() + 10
    while not s.finished() and time.monotonic() < deadline:
        s.step(0.1)
    s.shutdown()
    nl.close()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _peer(fn: Any, sock: socket.socket) -> tuple[threading.Thread,
                                                 list[Outcome]]:
    out: list[Outcome] = []
    t = threading.Thread(target=lambda: out.append(fn(sock)))
    t.start()
    return t, out


def test_sandboxed_worker_serves_every_path(
        sandboxed: Sandboxed, engine: Engine, pki: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    s, nl, ns = sandboxed.sup, sandboxed.nl, sandboxed.ns
    run_until(s, lambda: ready(ns))
    [hello] = sandboxed.hellos
    worker = ns.worker
    assert (hello.pid, hello.no_new_privs, hello.seccomp) == (
        worker.pid, 1, 2)
    if sandboxed.ids is not None:
        assert (hello.uid, hello.gid, hello.cap_eff) == (
            *sandboxed.ids, 0)
    listener = socket.create_server(("127.0.0.1", 0))
    peers: list[socket.socket] = []

    def submit(peer_fn: Any = None, **kw: Any
               ) -> tuple[threading.Thread, list[Outcome]] | None:
        fd, peer = connected_fd(listener)
        peers.append(peer)
        nl.submit(fd, **kw)
        return _peer(peer_fn, peer) if peer_fn else None

    def deadline() -> float:
        return time.monotonic() + 5

    # 1. Client handshake against a real server: all the way to kTLS.
    submit(lambda p: engine.server_handshake(p, x509=None,
                                             deadline=deadline()))
    run_until(s, lambda: len(nl.dones) == 1)
    # 2. Server handshake; the peer presents a client certificate.
    srv = submit(lambda p: engine.client_handshake(
        p, peername="localhost", use_certificate=True, deadline=deadline()),
        msg_type=uapi.MsgType.SERVERHELLO, auth=uapi.AuthMode.X509)
    run_until(s, lambda: len(nl.dones) == 2)
    # 3. A server the client cannot verify (a CA it does not trust).
    other = pki.pki.leaf("sandbox-other", ca="other")
    untrusted = Engine(pki.client_settings(), pki.settings(
        certificate=str(other.cert), private_key=str(other.key)))
    submit(lambda p: untrusted.server_handshake(p, x509=None,
                                                deadline=deadline()))
    run_until(s, lambda: len(nl.dones) == 3)
    # 4. A peer that hangs up; 5. a peer that never speaks.
    submit()
    peers[-1].close()
    run_until(s, lambda: len(nl.dones) == 4)
    submit(timeout_ms=1500)
    run_until(s, lambda: len(nl.dones) == 5)

    statuses = [d[1] for d in nl.dones]
    # kTLS is missing on this host, so a successful handshake ends in EIO
    # after "Failed to install kTLS keys: [Errno 2]"; with kTLS it is 0.
    ktls = "Failed to install kTLS keys: [Errno 2]" in caplog.text
    good = errno.EIO if ktls else 0
    assert statuses == [good, good, errno.EACCES, errno.ETIMEDOUT,
                        errno.ETIMEDOUT], caplog.text
    assert srv is not None
    srv[0].join(10)
    assert srv[1][0].status == 0  # the worker was a proper TLS server
    assert "certificate verify failed" in caplog.text
    # Still the first worker, alive: nothing killed it along the way.
    assert ns.worker is worker and _running(worker.pid)
    assert "SIGSYS" not in caplog.text
    # The worker's own way out: the channel closes, it exits cleanly.
    # (The supervisor's shutdown would SIGKILL it instead.)
    s.sel.unregister(worker.channel)
    worker.channel.sock.shutdown(socket.SHUT_RDWR)
    run_until(s, lambda: worker.returncode is not None, timeout=15)
    assert worker.returncode == 0, caplog.text
    for p in peers:
        p.close()
    listener.close()


def test_sandboxed_worker_concurrent_handshakes(
        sandboxed: Sandboxed, engine: Engine) -> None:
    """Many pool threads at once: new malloc arenas, OpenSSL per-thread
    state, all under the filter and the address-space limit."""
    s, nl, ns = sandboxed.sup, sandboxed.nl, sandboxed.ns
    run_until(s, lambda: ready(ns))
    worker = ns.worker
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    peers = []
    for _ in range(24):
        fd, peer = connected_fd(listener)
        thread, out = _peer(lambda p: engine.server_handshake(
            p, x509=None, deadline=time.monotonic() + 20), peer)
        peers.append((thread, out, peer))
        nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: len(nl.dones) == 24, timeout=60)
    for thread, out, peer in peers:
        thread.join(10)
        assert out[0].status == 0, out[0].reason
        peer.close()
    assert {d[1] for d in nl.dones} <= {0, errno.EIO}
    assert ns.worker is worker and _running(worker.pid)
    listener.close()
