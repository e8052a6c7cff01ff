"""The supervisor loop with real worker processes and a fake netlink socket.

The host kernel has no handshake family, so the kernel side is replaced by
FakeNl (supervisorfakes.py), which hands out real TCP sockets as
"ACCEPTed" requests and records every DONE.  Everything else is real: the
exec'd worker, the channel, fd passing, deadlines, worker death.  What is
checked is the invariant: every accepted fd gets exactly one DONE, with the
right status, promptly.  Malformed worker messages: test_supervisor_ipc.py.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time

import pytest
from supervisorfakes import (
    FakeNl,
    connected_fd,
    held,
    ready,
    run_until,
    serving,
    submit_closed,
    worker_channel_fd,
)

from tlshd.shared import config, protocol, uapi
from tlshd.shared.config import RoleConfig
from tlshd.shared.protocol import PskMaterial
from tlshd.supervisor import (
    keymaterial,
    netlink_codec,
    netlink_family,
)
from tlshd.supervisor.arbiter import Supervisor
from tlshd.worker.tlsengine import Engine
from tlshd.worker.tlsoutcome import Outcome


def material(serial: int, identity: bytes, secret: bytes) -> PskMaterial:
    return PskMaterial(serial=serial, identity=identity, secret=secret)


def test_worker_reports_hello_and_answers(sup, listener):
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)
    # The peer closes at once: the client handshake fails, quickly.
    peer.close()
    nl.submit(fd)
    run_until(s, lambda: nl.dones)
    assert len(nl.dones) == 1
    sockfd, status, auth = nl.dones[0]
    assert sockfd == fd
    assert sockfd == fd and status != 0 and auth == ()
    assert not s.requests
    with pytest.raises(OSError):
        os.fstat(fd)  # the supervisor closed its copy after DONE


def test_silent_peer_gets_etimedout_at_deadline(sup, listener):
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)
    nl.submit(fd, timeout_ms=1500)
    took = run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.ETIMEDOUT, ())]
    assert 1.0 < took < 5.0
    peer.close()


def test_default_deadline_by_role(sup, listener):
    """Without a TIMEOUT attribute: a client request (the NFS client,
    which cancels after 10 s) gets the client default, a server request
    (nfsd, 20 s) the server default; with one, a little less than it."""
    s, nl, ns = sup
    ns.cfg = ns.cfg.replace(handshake_timeout=15.0,
                            client_handshake_timeout=8.0)
    run_until(s, lambda: ready(ns))
    client_fd, client_peer = connected_fd(listener)
    server_fd, server_peer = connected_fd(listener)
    nvme_fd, nvme_peer = connected_fd(listener)
    start = time.monotonic()
    nl.submit(client_fd)
    nl.submit(server_fd, msg_type=uapi.MsgType.SERVERHELLO)
    nl.submit(nvme_fd, timeout_ms=3000)
    run_until(s, lambda: len(s.requests) == 3)
    left = {f.sockfd: f.deadline - start for f in s.requests}
    assert 7.0 < left[client_fd] <= 8.5, left
    assert 14.0 < left[server_fd] <= 15.5, left
    # A TIMEOUT from the kernel, minus a margin (a tenth of it, at most
    # 0.5 s) that makes our DONE arrive before the consumer cancels.
    assert 2.0 < left[nvme_fd] <= 2.71, left
    for peer in (client_peer, server_peer, nvme_peer):
        peer.close()
    run_until(s, lambda: len(nl.dones) == 3)


def test_exec_worker_with_high_channel_fd(tmp_path, listener):
    """A supervisor serving many namespaces holds many fds, so an exec'd
    worker inherits its channel at a high number: above the sandbox's
    fd limit (96) unless the worker moves it down.  It must still start
    and serve."""
    spare = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
             for _ in range(150)]
    try:
        gen = serving(tmp_path)
        s, nl, ns = next(gen)
        try:
            run_until(s, lambda: ready(ns))
            assert ns.worker.channel.fileno() > 96
            fd, peer = connected_fd(listener)
            peer.close()
            nl.submit(fd)
            run_until(s, lambda: nl.dones)
            assert nl.dones[0][0] == fd
        finally:
            next(gen, None)
    finally:
        for f in spare:
            os.close(f)


def test_worker_killed_mid_handshake(sup, listener):
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)
    nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: held(s, ns.worker))
    first = ns.worker.pid
    os.kill(first, signal.SIGKILL)
    took = run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.EIO, ())]
    assert took < 5.0  # promptly, not at the deadline
    # A new worker comes up and serves the next request.
    run_until(s, lambda: ready(ns) and ns.worker.pid != first)
    fd2, peer2 = connected_fd(listener)
    peer2.close()
    nl.submit(fd2)
    run_until(s, lambda: len(nl.dones) == 2)
    assert nl.dones[1][0] == fd2
    peer.close()


def test_requests_before_worker_ready_are_queued(sup, listener):
    s, nl, _ns = sup
    fds = [submit_closed(nl, listener) for _ in range(3)]
    run_until(s, lambda: len(nl.dones) == 3)
    assert sorted(d[0] for d in nl.dones) == sorted(fds)


def test_many_concurrent_requests_each_done_once(sup, listener):
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    peers = []
    fds = []
    for _ in range(20):
        fd, peer = connected_fd(listener)
        fds.append(fd)
        peers.append(peer)
        nl.submit(fd, timeout_ms=3000)
    # Half the peers hang up, half stay silent until the deadline.
    for p in peers[::2]:
        p.close()
    run_until(s, lambda: len(nl.dones) == 20)
    assert sorted(d[0] for d in nl.dones) == sorted(fds)
    assert not s.requests
    for p in peers[1::2]:
        p.close()



def test_status_and_metrics_over_control_socket(sup, listener, tmp_path):
    import threading

    from tlshd.supervisor import ctl

    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)
    peer.close()
    nl.submit(fd)
    run_until(s, lambda: nl.dones)
    path = str(tmp_path / "ctl" / "control.sock")
    s.serve_control(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    out: dict[str, str] = {}

    def ask(cmd):
        out[cmd] = ctl.query(path, cmd)

    for cmd in ("status", "metrics", "bogus"):
        t = threading.Thread(target=ask, args=(cmd,))
        t.start()
        run_until(s, lambda cmd=cmd: cmd in out, timeout=10)
        t.join()
    assert "netns init" in out["status"]
    assert "0 succeeded, 1 failed" in out["status"]
    assert "last failure: ETIMEDOUT" in out["status"]
    assert 'tlshd_handshakes_total{netns="init",result="failure"} 1' in (
        out["metrics"])
    assert 'tlshd_worker_up{netns="init"} 1' in out["metrics"]
    assert out["bogus"].startswith("error:")


def test_reload_storm_does_not_starve_requests(sup, listener):
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    submitted = []
    start = time.monotonic()
    next_reload = start
    while time.monotonic() - start < 4.0:
        now = time.monotonic()
        if now >= next_reload:
            s.reload()  # what SIGHUP does
            next_reload = now + 0.3  # faster than a worker can start
        if len(submitted) < 10 and now - start > len(submitted) * 0.35:
            fd, peer = connected_fd(listener)
            peer.close()
            nl.submit(fd, timeout_ms=20000)
            submitted.append((fd, now))
        s.step(0.05)
    run_until(s, lambda: len(nl.dones) == len(submitted), timeout=30)
    # Answered by a worker (the peer hung up: ETIMEDOUT from the TLS
    # engine), never by the deadline or a worker's death.
    assert len(nl.dones) == 10
    assert all(status == errno.ETIMEDOUT for _, status, _ in nl.dones)
    waits = [nl.done_at[fd] - t for fd, t in submitted]
    # Starved requests would wait for their 20 s deadline; served ones
    # take well under half of it even on a loaded machine.
    assert max(waits) < 10.0, waits
    assert not s.requests


def test_workers_forked_from_template(tmp_path, listener):
    conf = tmp_path / "tlshd.conf"
    conf.write_text("[authenticate.client]\n[authenticate.server]\n"
                    "[netns]\nworker_idle_timeout=0\n")
    s = Supervisor(config.load(str(conf)), netlink_family.FamilyInfo(0x21, 5))
    s.pool.use_template()
    nl = FakeNl()
    nsfd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    ns = s.add_namespace("init", str(conf), nlsock=nl, nsfd=nsfd)
    try:
        run_until(s, lambda: ready(ns))
        pid = ns.worker.pid
        with open("/proc/%d/stat" % pid) as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid == os.getpid()  # re-parented to us, the subreaper
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            assert b"worker [netns init]" in f.read()
        fd, peer = connected_fd(listener)
        peer.close()
        nl.submit(fd)
        run_until(s, lambda: nl.dones)
        assert nl.dones[0][0] == fd
        os.kill(pid, signal.SIGKILL)
        run_until(s, lambda: ready(ns) and ns.worker.pid != pid)
        assert ns.restarts == 1
    finally:
        s.stop()
        s.shutdown()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                    signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)


def test_ready_consumed_while_waiting_for_done(sup, listener):
    """A READY read while DONE waited for its answer still gets the next
    request ACCEPTed at once, not at the consumer's timeout."""
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fd1, peer1 = connected_fd(listener)
    fd2, peer2 = connected_fd(listener)
    peer1.close()
    peer2.close()
    nl.ready_during_done.append(netlink_codec.AcceptedRequest(
        sockfd=fd2, msg_type=uapi.MsgType.CLIENTHELLO,
        auth_mode=uapi.AuthMode.UNAUTH, timeout_ms=None, peerids=(),
        certs=(), peername="127.0.0.1", keyring=None))
    nl.submit(fd1)
    took = run_until(s, lambda: len(nl.dones) == 2, timeout=10)
    assert [d[0] for d in nl.dones] == [fd1, fd2]
    assert took < 1.5, took  # well before the 2 s request deadline


def test_request_pending_before_join_is_accepted(tmp_path, listener):
    """A restarted supervisor (or a namespace served from now on) ACCEPTs
    what the kernel already holds: requests whose READY went to the
    supervisor that died.  No READY comes for them again; without an
    ACCEPT at join they wait for the consumer's own timeout."""
    nl = FakeNl()
    fds = []
    for _ in range(2):
        fd, peer = connected_fd(listener)
        peer.close()  # the handshake then fails quickly
        nl.submit(fd, ready=False)
        fds.append(fd)
    gen = serving(tmp_path, nl)
    s, nl, _ns = next(gen)
    try:
        run_until(s, lambda: not nl.queue, timeout=5)
        assert len(s.requests) + len(nl.dones) == 2
        run_until(s, lambda: len(nl.dones) == 2)
        assert sorted(d[0] for d in nl.dones) == sorted(fds)
        assert all(status != 0 for _fd, status, _auth in nl.dones)
        # Once the queue is empty the loop does not keep asking.
        assert not nl.ready
    finally:
        next(gen, None)


# ---- PSK material: read by the supervisor, never by the worker ----------

PSK_ID = b"NVMe0R01 nqn.2014-08.org.example:host nqn.2014-08.org.example:sub"
PSK_SECRET = bytes(range(32))


def _psk_peer(role: str, sock: socket.socket, lookup_seen: list[bytes]
              ) -> tuple[threading.Thread, dict[str, Outcome]]:
    """Our engine at the far end of a PSK request, in a thread."""
    engine = Engine(RoleConfig(), RoleConfig())
    result: dict[str, Outcome] = {}

    def lookup(identity: bytes) -> PskMaterial | None:
        lookup_seen.append(identity)
        if identity != PSK_ID:
            return None
        return material(0x77, identity, PSK_SECRET)

    def run() -> None:
        deadline = time.monotonic() + 15
        if role == "client":
            result["peer"] = engine.psk.client(
                sock, psks=[material(0x77, PSK_ID, PSK_SECRET)],
                deadline=deadline)
        else:
            result["peer"] = engine.psk.server(
                sock, lookup=lookup, deadline=deadline)

    return threading.Thread(target=run, daemon=True), result


def test_server_psk_lookup_goes_through_the_supervisor(sup, listener,
                                                       monkeypatch):
    """The worker parses the ClientHello and asks; the supervisor searches
    (here: a stand-in for the keyring search) and answers with one key."""
    s, nl, ns = sup
    asked: list[bytes] = []

    def lookup_psk(rings, identity, key_type="psk"):
        asked.append(identity)
        return (protocol.PskMaterial(serial=0x1234, identity=identity,
                                     secret=PSK_SECRET)
                if identity == PSK_ID else None)

    monkeypatch.setattr(keymaterial, "lookup_psk", lookup_psk)
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)
    t, result = _psk_peer("client", peer, [])
    nl.submit(fd, timeout_ms=20000, msg_type=uapi.MsgType.SERVERHELLO,
              auth=uapi.AuthMode.PSK)
    t.start()
    run_until(s, lambda: nl.dones)
    t.join(15)
    assert asked == [PSK_ID]
    # Only the key the supervisor handed over completes the handshake.
    assert result["peer"].status == 0, result["peer"].reason
    # The host has no kTLS: the worker's install fails after the handshake.
    sockfd, status, auth = nl.dones[0]
    assert sockfd == fd
    assert (status, auth) in ((0, (0x1234,)), (errno.EIO, ()))
    peer.close()


def test_client_psks_come_with_the_request(sup, listener, monkeypatch):
    s, nl, ns = sup
    read: list[tuple[int, ...]] = []

    def client_psks(peerids, scope):
        read.append(peerids)
        return [protocol.PskMaterial(serial=0x99, identity=PSK_ID,
                                     secret=PSK_SECRET)], []

    monkeypatch.setattr(keymaterial, "client_psks", client_psks)
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)
    seen: list[bytes] = []
    t, result = _psk_peer("server", peer, seen)
    t.start()
    nl.queue.append(netlink_codec.AcceptedRequest(
        sockfd=fd, msg_type=uapi.MsgType.CLIENTHELLO,
        auth_mode=uapi.AuthMode.PSK, timeout_ms=20000, peerids=(0x99,),
        certs=(), peername="127.0.0.1", keyring=None))
    nl.w.send(b"R")
    run_until(s, lambda: nl.dones)
    t.join(15)
    assert read == [(0x99,)] and seen == [PSK_ID]
    assert result["peer"].status == 0, result["peer"].reason
    peer.close()


def test_psk_lookup_outside_a_server_psk_request_kills_worker(sup,
                                                              listener):
    """Only a server PSK handshake may ask for keys; a client request's
    worker asking is a worker gone wrong."""
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)
    nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: held(s, ns.worker))
    worker = ns.worker
    (req_id,) = held(s, worker)
    stolen = worker_channel_fd(worker.pid, worker.pidfd)
    os.write(stolen, protocol.encode(protocol.PskLookup(identity=PSK_ID),
                                     req_id=req_id))
    os.close(stolen)
    run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.EIO, ())]
    run_until(s, lambda: ready(ns) and ns.worker is not worker)
    assert worker.returncode == -signal.SIGKILL
    peer.close()


def test_request_expired_while_worker_starts_is_not_dispatched(sup,
                                                               listener):
    """A request whose deadline passes while the namespace's worker is
    still starting gets exactly one DONE (ETIMEDOUT) then, and the
    worker, once ready, is never handed it."""
    s, nl, ns = sup
    fd, peer = connected_fd(listener)
    nl.submit(fd, timeout_ms=20000)
    s.step(0)  # ACCEPTed; the worker is being started
    (req,) = s.requests
    assert req.worker is None and not ready(ns)
    req.deadline = 0.0  # overdue, as if its worker took long to start
    s.step(0)
    assert nl.dones == [(fd, errno.ETIMEDOUT, ())]
    assert not s.requests
    run_until(s, lambda: ready(ns))
    worker = ns.worker
    for _ in range(5):
        s.step(0.05)
    assert nl.dones == [(fd, errno.ETIMEDOUT, ())]
    assert held(s, worker) == set()
    assert worker.returncode is None  # not killed over a stale request
    peer.close()
