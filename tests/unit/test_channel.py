"""The SEQPACKET channel with real SCM_RIGHTS fd passing."""

import array
import os
import socket

import pytest

from tlshd.shared import protocol
from tlshd.shared.channel import Channel, socketpair
from tlshd.shared.errors import PeerGone, ProtocolError

REQ = protocol.HandshakeRequest(
    msg_type=1, auth_mode=1, timeout_ms=100, peername="127.0.0.1")


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def test_fd_passes_and_is_cloexec():
    a, b = socketpair()
    tx, rx = Channel(a), Channel(b)
    r, w = os.pipe()
    tx.send(REQ, 7, (w,))
    msg, req_id, fds = rx.recv()
    assert msg == REQ and req_id == 7 and len(fds) == 1
    assert not os.get_inheritable(fds[0])
    os.write(fds[0], b"hi")  # really the same pipe
    assert os.read(r, 2) == b"hi"
    for fd in (r, w, *fds):
        os.close(fd)
    tx.close()
    rx.close()


def test_surplus_fds_closed_and_rejected():
    a, b = socketpair()
    rx = Channel(b)
    r, w = os.pipe()
    data = protocol.encode(protocol.HandshakeAnswer(status=0,
                                                    remote_auth=()))
    before = open_fds()
    a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        array.array("i", [r, w]).tobytes())])
    with pytest.raises(ProtocolError, match="fds"):
        rx.recv()
    # Nothing received was left open.
    assert open_fds() == before
    for fd in (r, w):
        os.close(fd)


def test_too_many_fds_for_buffer_closes_all():
    a, b = socketpair()
    rx = Channel(b)
    pipes = [os.pipe() for _ in range(10)]
    fds = [fd for p in pipes for fd in p]
    data = protocol.encode(REQ)
    before = open_fds()
    a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        array.array("i", fds).tobytes())])
    with pytest.raises(ProtocolError):
        rx.recv()
    assert open_fds() == before
    for fd in fds:
        os.close(fd)


def test_eof_is_peer_gone():
    a, b = socketpair()
    a.close()
    with pytest.raises(PeerGone):
        Channel(b).recv()
    b.close()


def test_send_to_closed_peer_is_peer_gone():
    a, b = socketpair()
    b.close()
    with pytest.raises(PeerGone):
        Channel(a).send(protocol.HandshakeAnswer(status=0, remote_auth=()))
    a.close()


def test_send_checks_fd_count():
    a, b = socketpair()
    with pytest.raises(ValueError):
        Channel(a).send(REQ, 1, ())
    a.close()
    b.close()
