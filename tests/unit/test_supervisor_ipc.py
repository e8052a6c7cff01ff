"""Malformed messages from a worker: a real Supervisor loop, real workers.

A worker that sends a message of the wrong type, length, fd count or
request id is killed; each request it held is answered exactly once, with
EIO; a new worker serves the next request; the supervisor neither crashes
nor keeps an fd that came with the message.  The test plays the
misbehaving worker: it takes a copy of the worker's end of the channel
(pidfd_getfd) and sends on it.
"""

from __future__ import annotations

import array
import errno
import gc
import os
import select
import signal
import socket
import struct

import pytest
from supervisorfakes import (
    FakeNl,
    connected_fd,
    held,
    ready,
    run_until,
    worker_channel_fd,
)

from tlshd.shared import protocol

P = protocol


def answer(req_id: int, status: int = 0) -> bytes:
    return P.encode(P.HandshakeAnswer(status=status, remote_auth=()), req_id)


def with_length(data: bytes, length: int) -> bytes:
    return data[:4] + struct.pack("!I", length) + data[8:]


def header(magic: int = P.MAGIC, version: int = P.PROTOCOL_VERSION,
           mtype: int = P.Msg.HANDSHAKE_ANS, body: bytes = b"",
           req_id: int = 1) -> bytes:
    return P.HEADER.pack(magic, version, mtype, len(body), req_id) + body


REQ = P.HandshakeRequest(msg_type=1, auth_mode=1, timeout_ms=1,
                         peername=None)
SPAWN = P.SpawnRequest(label="x", config_path="/x", uid=0, gid=0, debug=0)
HELLO = P.Hello(pid=1, uid=0, gid=0, cap_eff=0, no_new_privs=0, seccomp=0)

# name -> (datagram for the in-flight request ids, fds to attach); every
# one of them must cost the worker its life.
MALFORMED = {
    # wrong type
    "garbage": (lambda ids: b"garbage", 0),
    "bad magic": (lambda ids: header(magic=0x1234), 0),
    "bad version": (lambda ids: header(version=P.PROTOCOL_VERSION + 1), 0),
    "unknown type": (lambda ids: header(mtype=99), 0),
    "request type, with its fd": (lambda ids: P.encode(REQ, ids[0]), 1),
    "spawn request, with its fds": (lambda ids: P.encode(SPAWN, 1), 2),
    "spawn answer": (lambda ids: P.encode(P.SpawnAnswer(pid=1), ids[0]), 0),
    "PSK answer": (lambda ids: P.encode(P.PskFound(psk=None), ids[0]), 0),
    "second hello": (lambda ids: P.encode(HELLO), 0),
    # wrong length
    "empty datagram": (lambda ids: b"", 0),
    "short header": (lambda ids: answer(ids[0])[:10], 0),
    "length field too long": (
        lambda ids: with_length(answer(ids[0]), len(answer(0)) - 15), 0),
    "length field too short": (
        lambda ids: with_length(answer(ids[0]), len(answer(0)) - 17), 0),
    "body truncated": (lambda ids: with_length(answer(ids[0])[:-1],
                                               len(answer(0)) - 17), 0),
    "trailing bytes": (lambda ids: with_length(answer(ids[0]) + b"\0",
                                               len(answer(0)) - 15), 0),
    "larger than MAX_MSG": (
        lambda ids: header(body=b"\0" * P.MAX_MSG, req_id=ids[0]), 0),
    # wrong fd count
    "answer with an fd": (lambda ids: answer(ids[0]), 1),
    "answer with 10 fds": (lambda ids: answer(ids[0]), 10),
    "fds alone": (lambda ids: b"", 2),
    # wrong request id
    "unknown request id": (lambda ids: answer(999), 0),
    "request id 0": (lambda ids: answer(0), 0),
    "request id 2**64-1": (lambda ids: answer(2**64 - 1), 0),
}


def send_as_worker(worker, data: bytes, nfds: int) -> list[int]:
    """Send ``data`` with ``nfds`` pipe write ends on the worker's channel;
    return the read ends (EOF once no copy of the write ends is left)."""
    sock = socket.socket(fileno=worker_channel_fd(worker.pid, worker.pidfd))
    pipes = [os.pipe() for _ in range(nfds)]
    anc = []
    if pipes:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                array.array("i", [w for _, w in pipes]).tobytes())]
    sock.sendmsg([data], anc)
    sock.close()
    for _, w in pipes:
        os.close(w)
    return [r for r, _ in pipes]


def open_fds() -> int:
    gc.collect()  # sockets of earlier tests, closed when collected
    return len(os.listdir("/proc/self/fd"))


def hold_requests(s, nl, ns, listener, n: int):
    """Submit ``n`` requests whose peers stay silent; wait until the
    worker holds them all.  Returns (fds, peers)."""
    fds, peers = [], []
    for _ in range(n):
        fd, peer = connected_fd(listener)
        fds.append(fd)
        peers.append(peer)
        nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: len(held(s, ns.worker)) == n)
    return fds, peers


def served_by_a_worker(s, nl, ns, listener) -> None:
    """The next request is answered by a (new) worker, not by a death or
    a deadline: quickly, and not with EIO."""
    before = len(nl.dones)
    fd, peer = connected_fd(listener)
    peer.close()  # the handshake fails at once, in the worker
    nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: len(nl.dones) > before, timeout=10)
    # (fd numbers are reused: only the count tells the new DONE apart)
    assert nl.dones[before:] == [(fd, nl.dones[-1][1], ())]
    assert nl.dones[-1][1] != 0
    assert not ns.last_failure.startswith("EIO: worker"), ns.last_failure


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_kills_worker(sup, listener, case):
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    baseline = open_fds()
    fds, peers = hold_requests(s, nl, ns, listener, 2)
    worker = ns.worker
    build, nfds = MALFORMED[case]
    readers = send_as_worker(worker, build(sorted(held(s, worker))), nfds)
    took = run_until(s, lambda: len(nl.dones) == 2)
    assert took < 5.0  # at once, not at the 20 s deadline
    assert sorted(nl.dones) == sorted((fd, errno.EIO, ()) for fd in fds)
    run_until(s, lambda: worker.returncode is not None)
    assert worker.returncode == -signal.SIGKILL
    run_until(s, lambda: ready(ns) and ns.worker is not worker)
    served_by_a_worker(s, nl, ns, listener)
    assert len(nl.dones) == 3  # nothing answered twice
    for p in peers:
        p.close()
    # The supervisor kept no fd: not the requests', not the message's.
    for r in readers:
        os.set_blocking(r, False)  # a leaked write end: BlockingIOError
        assert os.read(r, 1) == b""  # EOF: every write end is closed
        os.close(r)
    assert open_fds() == baseline


def test_answer_twice_is_answered_once(sup, listener):
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    (fd_a, fd_b), peers = hold_requests(s, nl, ns, listener, 2)
    worker = ns.worker
    id_a = min(held(s, worker))  # fd_a was submitted first
    send_as_worker(worker, answer(id_a, errno.EACCES), 0)
    run_until(s, lambda: len(nl.dones) == 1)
    send_as_worker(worker, answer(id_a, errno.EACCES), 0)
    run_until(s, lambda: len(nl.dones) == 2)
    assert nl.dones == [(fd_a, errno.EACCES, ()), (fd_b, errno.EIO, ())]
    run_until(s, lambda: ready(ns) and ns.worker is not worker)
    assert worker.returncode == -signal.SIGKILL
    served_by_a_worker(s, nl, ns, listener)
    for p in peers:
        p.close()


def test_other_workers_request_id(sup, listener, tmp_path):
    """A worker answering a request another namespace's worker holds is
    killed; the other request stays with its own worker."""
    s, nl, ns = sup
    nl2 = FakeNl()
    ns2 = s.add_namespace("second", ns.config_path, nlsock=nl2)
    run_until(s, lambda: ready(ns) and ready(ns2))
    (fd,), peers = hold_requests(s, nl, ns, listener, 1)
    (fd2,), peers2 = hold_requests(s, nl2, ns2, listener, 1)
    worker, other = ns.worker, ns2.worker
    send_as_worker(worker, answer(min(held(s, other))), 0)
    run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.EIO, ())]
    run_until(s, lambda: worker.returncode is not None)
    assert worker.returncode == -signal.SIGKILL
    assert nl2.dones == [] and ns2.worker is other and held(s, other)
    os.fstat(fd2)  # still held for the other worker, not closed
    for p in peers + peers2:
        p.close()


def test_message_read_after_worker_reaped(sup, listener):
    """The worker's death and a message on its channel reported in one
    batch, the death first: the message is not read from a closed
    channel, and the supervisor does not crash."""
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    (fd,), peers = hold_requests(s, nl, ns, listener, 1)
    worker = ns.worker
    sock = socket.socket(fileno=worker_channel_fd(worker.pid, worker.pidfd))
    os.kill(worker.pid, signal.SIGKILL)
    select.select([worker.pidfd], [], [], 10)  # dead: the pidfd is ready
    sock.send(b"garbage")  # the channel is ready only now
    sock.close()
    run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.EIO, ())]
    assert worker.returncode == -signal.SIGKILL
    run_until(s, lambda: ready(ns) and ns.worker is not worker)
    served_by_a_worker(s, nl, ns, listener)
    for p in peers:
        p.close()


def test_success_on_a_socket_without_ktls_is_eio(sup, listener):
    """DONE(0) tells the consumer to send over kTLS: the supervisor
    checks the socket's upper-layer protocol first.  (The host has no
    kTLS, so a success here can only be a worker's claim.)"""
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    (fd,), peers = hold_requests(s, nl, ns, listener, 1)
    worker = ns.worker
    send_as_worker(worker, answer(min(held(s, worker)), 0), 0)
    run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.EIO, ())]
    assert "no kTLS" in ns.last_failure
    assert ns.worker is worker and worker.returncode is None
    for p in peers:
        p.close()


@pytest.mark.parametrize("peerid", [0x4242, 0xFFFFFFFF])
def test_answer_naming_a_key_it_was_not_given(sup, listener, peerid):
    """REMOTE_AUTH authorises the peer to the consumer: a worker may name
    only keys handed to it for this request (none here: an anonymous
    x.509-less request), never a serial of its choosing."""
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    (fd,), peers = hold_requests(s, nl, ns, listener, 1)
    worker = ns.worker
    msg = P.HandshakeAnswer(status=0, remote_auth=(peerid,))
    send_as_worker(worker, P.encode(msg, min(held(s, worker))), 0)
    run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.EIO, ())]
    run_until(s, lambda: worker.returncode is not None)
    assert worker.returncode == -signal.SIGKILL
    run_until(s, lambda: ready(ns) and ns.worker is not worker)
    served_by_a_worker(s, nl, ns, listener)
    for p in peers:
        p.close()


def test_late_answer_after_deadline_is_not_a_violation(sup, listener):
    """A worker slowed down by a loaded machine answers after the
    supervisor gave up on the request: the answer is ignored, the worker
    and its other requests are left alone (before, it was killed and
    every request it held failed with EIO)."""
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    (fd_a, fd_b), (peer_a, peer_b) = hold_requests(s, nl, ns, listener, 2)
    worker = ns.worker
    id_a = min(held(s, worker))
    s.requests.get(id_a).deadline = 0.0  # overdue, as if the loop was slow
    run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd_a, errno.ETIMEDOUT, ())]
    peer_a.close()  # the worker's handshake fails: it answers, late
    assert s.requests.is_late(worker, id_a)
    # its answer came:
    run_until(s, lambda: not s.requests.is_late(worker, id_a))
    for _ in range(5):
        s.step(0.05)
    assert worker.returncode is None and ns.worker is worker
    assert len(nl.dones) == 1 and len(held(s, worker)) == 1
    peer_b.close()
    run_until(s, lambda: len(nl.dones) == 2)
    assert nl.dones[1][0] == fd_b and ns.worker is worker


# ---- the monitor's table: well-formed, but not permitted ------------------

# name -> (datagram for the in-flight request ids, the class logged); each
# decodes fine, but its row in monitor.MON_TABLE does not permit it now,
# or there is no row for it.
UNPERMITTED = {
    "hello twice": (lambda ids: P.encode(HELLO), "Hello"),
    "answer for a request it does not hold": (
        lambda ids: answer(max(ids) + 1000), "HandshakeAnswer"),
    "lookup for a client request": (
        lambda ids: P.encode(P.PskLookup(identity=b"x"), ids[0]),
        "PskLookup"),
    "type with no row": (
        lambda ids: P.encode(P.SpawnAnswer(pid=1), ids[0]), "SpawnAnswer"),
}


@pytest.mark.parametrize("case", list(UNPERMITTED))
def test_unpermitted_message_kills_worker(sup, listener, case, caplog):
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fds, peers = hold_requests(s, nl, ns, listener, 2)
    worker = ns.worker
    build, name = UNPERMITTED[case]
    send_as_worker(worker, build(sorted(held(s, worker))), 0)
    run_until(s, lambda: len(nl.dones) == 2)
    assert sorted(nl.dones) == sorted((fd, errno.EIO, ()) for fd in fds)
    run_until(s, lambda: worker.returncode is not None)
    assert worker.returncode == -signal.SIGKILL
    said = [r.getMessage() for r in caplog.records
            if "unpermitted" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "Worker %d (netns init) sent an unpermitted %s (request "
        % (worker.pid, name)), said
    run_until(s, lambda: ready(ns) and ns.worker is not worker)
    served_by_a_worker(s, nl, ns, listener)
    assert len(nl.dones) == 3
    for p in peers:
        p.close()
