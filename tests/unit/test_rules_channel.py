"""Channel rules: what the supervisor accepts from a worker, and how a
datagram's fds and control data are checked."""

import os
import socket
import struct

import pytest

from tlshd.shared import protocol
from tlshd.shared.channel import Channel, socketpair
from tlshd.shared.errors import PeerGone, ProtocolError

PSK = protocol.PskMaterial(serial=1, identity=b"i", secret=b"k")
# Sent by the supervisor (or the template's parent) only.
TO_WORKER = [
    (protocol.HandshakeRequest(msg_type=1, auth_mode=3, timeout_ms=1,
                               peername=None), 1),
    (protocol.PskFound(psk=PSK), 0),
    (protocol.PskFound(psk=None), 0),
    (protocol.SpawnRequest(label="n", config_path="/c", uid=1, gid=1,
                           debug=0), 2),
]
# What a worker or the template may send.
TO_SUPERVISOR = [
    protocol.HandshakeAnswer(status=0, remote_auth=()),
    protocol.Hello(pid=1, uid=1, gid=1, cap_eff=0, no_new_privs=1,
                   seccomp=2),
    protocol.LogRecord(level=20, text="t"),
    protocol.SpawnAnswer(pid=3),
    protocol.PskLookup(identity=b"id"),
]


@pytest.fixture
def pair():
    a, b = socketpair()
    with a, b:
        yield Channel(a), Channel(b)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("msg,nfds", TO_WORKER,
                         ids=[type(m).__name__ for m, _ in TO_WORKER])
def test_supervisor_refuses_what_only_it_sends(pair, msg, nfds):
    """A worker sending a request-side message is refused, and the fds
    it brought are closed rather than left open in the supervisor."""
    worker, supervisor = pair
    before = open_fds()
    r, w = os.pipe()
    worker.send(msg, 9, (r, w)[:nfds])
    os.close(r)
    os.close(w)
    with pytest.raises(ProtocolError,
                       match="sent by the supervisor, not the worker"):
        supervisor.recv_answer()
    assert open_fds() == before


@pytest.mark.parametrize("msg", TO_SUPERVISOR,
                         ids=[type(m).__name__ for m in TO_SUPERVISOR])
def test_supervisor_accepts_what_workers_send(pair, msg):
    worker, supervisor = pair
    worker.send(msg, 7)
    assert supervisor.recv_answer() == (msg, 7)


def test_default_request_id_is_zero(pair):
    a, b = pair
    a.send(protocol.SpawnAnswer(pid=3))
    assert b.recv() == (protocol.SpawnAnswer(pid=3), 0, [])


def test_empty_datagram_from_a_live_peer_is_an_error_not_eof(pair):
    a, b = pair
    a.sock.send(b"")
    b.sock.settimeout(5)
    with pytest.raises(ProtocolError, match="empty"):
        b.recv()
    a.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(PeerGone):
        b.recv()


def test_credentials_control_message_is_refused(pair):
    """Only SCM_RIGHTS is expected; SCM_CREDENTIALS (or any other
    control message) makes the datagram a protocol error."""
    a, b = pair
    b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
    a.sock.sendmsg([protocol.encode(protocol.SpawnAnswer(pid=3))],
                   [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
    with pytest.raises(ProtocolError, match="control message"):
        b.recv()


def test_send_checks_the_fd_count(pair):
    a, _ = pair
    with pytest.raises(ValueError):
        a.send(protocol.SpawnAnswer(pid=3), 0, (0,))
    with pytest.raises(ValueError):
        a.send(TO_WORKER[0][0], 0, ())


def test_peer_closing_with_unread_messages_is_peer_gone(pair):
    """A worker that dies with messages still unread in its queue makes
    the kernel reset the channel (ECONNRESET, not EOF): that too is the
    peer gone, not an error that would escape the supervisor's loop."""
    a, b = pair
    b.send(protocol.SpawnAnswer(pid=3))  # left unread in a's queue
    a.close()
    with pytest.raises(PeerGone, match="reset"):
        b.recv()


def test_a_message_of_exactly_max_msg_bytes_passes(pair):
    """The receive buffer holds a whole MAX_MSG datagram: the largest
    message the encoder allows is not refused as truncated."""
    a, b = pair
    empty = protocol.HandshakeRequest(msg_type=1, auth_mode=3,
                                      timeout_ms=1, peername=None)
    room = protocol.MAX_MSG - len(protocol.encode(empty))
    msg = protocol.HandshakeRequest(
        msg_type=1, auth_mode=3, timeout_ms=1, peername=None,
        x509_cert=b"c" * (room // 2), x509_key=b"k" * (room - room // 2))
    assert len(protocol.encode(msg, 5)) == protocol.MAX_MSG
    r, w = os.pipe()
    try:
        a.send(msg, 5, (r,))
        got, req_id, fds = b.recv()
    finally:
        os.close(r)
        os.close(w)
    for fd in fds:
        os.close(fd)
    assert (got, req_id, len(fds)) == (msg, 5, 1)
