"""The SEQPACKET channel with real SCM_RIGHTS fd passing."""

import array
import os
import socket
import typing

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


# ---- direction: who may send what ----------------------------------

SUPERVISOR, WORKER = protocol.Side.SUPERVISOR, protocol.Side.WORKER
HELLO = protocol.Hello(pid=5, uid=998, gid=998, cap_eff=0, no_new_privs=1,
                       seccomp=2)


def test_every_message_type_has_a_sender():
    classes = typing.get_args(protocol.Message)
    assert len(classes) == len(protocol.Msg)
    assert {cls.TYPE for cls in classes} == set(protocol.Msg)
    for cls in classes:
        assert isinstance(cls.SENT_BY, protocol.Side), cls
    # recv_answer returns no fds: nothing a worker sends may carry any.
    assert all(cls.NFDS == 0 for cls in classes if cls.SENT_BY is WORKER)
    assert {cls.__name__ for cls in classes if cls.SENT_BY is SUPERVISOR} \
        == {"HandshakeRequest", "PskFound", "SpawnRequest"}


def test_decode_refuses_a_type_the_sender_does_not_send():
    # Checked before the body: an unparsable body still gets this error.
    data = bytearray(protocol.encode(REQ))
    data[protocol.HEADER.size:] = b"\xff" * (len(data) - protocol.HEADER.size)
    with pytest.raises(ProtocolError, match="sent by the supervisor"):
        protocol.decode(bytes(data), 1, WORKER)
    with pytest.raises(ProtocolError, match="sent by the worker"):
        protocol.decode(protocol.encode(HELLO), 0, SUPERVISOR)
    assert protocol.decode(protocol.encode(HELLO), 0, WORKER)[0] == HELLO


def test_supervisor_end_refuses_a_supervisor_message_and_closes_its_fd():
    a, b = socketpair()
    r, w = os.pipe()
    before = open_fds()
    for rx in (Channel(b, SUPERVISOR).recv, Channel(b).recv_answer):
        Channel(a).send(REQ, 3, (w,))
        with pytest.raises(ProtocolError, match="sent by the supervisor"):
            rx()
        assert open_fds() == before
    Channel(a, WORKER).send(HELLO, 4)
    assert Channel(b, SUPERVISOR).recv() == (HELLO, 4, [])
    Channel(a, WORKER).send(HELLO, 5)
    assert Channel(b).recv_answer() == (HELLO, 5)
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()


def test_worker_end_refuses_a_worker_message():
    a, b = socketpair()
    Channel(a).send(HELLO)
    with pytest.raises(ProtocolError, match="sent by the worker"):
        Channel(b, WORKER).recv()
    found = protocol.PskFound(psk=None)
    Channel(a, SUPERVISOR).send(found, 6)
    assert Channel(b, WORKER).recv() == (found, 6, [])
    a.close()
    b.close()


@pytest.mark.parametrize("side,msg", [(WORKER, REQ), (SUPERVISOR, HELLO)])
def test_an_end_refuses_to_send_what_its_side_does_not(side, msg):
    a, b = socketpair()
    r, w = os.pipe()
    with pytest.raises(ValueError, match="does not send"):
        Channel(a, side).send(msg, 1, (w,) * msg.NFDS)
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)  # nothing went out
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()
