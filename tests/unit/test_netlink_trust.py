"""Only the kernel is heard on a handshake netlink socket (issue 15, 1).

The root of a container holds CAP_NET_ADMIN over its network namespace,
so it can unicast to our netlink port there (found in /proc/net/netlink)
and multicast to the tlshd group.  These tests play that attacker against
a real netlink_socket.HandshakeSocket on the host: the host kernel has no
handshake family, but generic netlink sockets, their ports, groups and
the kernel's refusal of unicasts to a connected socket are all real.
The attacker runs as root here; in a container it holds the same powers
over its namespace.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

import pytest
from supervisorfakes import (
    FakeNl,
    connected_fd,
    ready,
    run_until,
)

from tlshd.shared import uapi
from tlshd.supervisor import netlink_codec, netlink_family, netlink_socket

# A family id no kernel registers (ids are allocated from 0x10 upward):
# the kernel answers our ACCEPT with ENOENT, which is all the host can do.
FAMILY = netlink_family.FamilyInfo(0x3F00, 5)
GROUP_BIT = 1 << (FAMILY.group_id - 1)


@pytest.fixture
def hs():
    sock = netlink_socket.HandshakeSocket(FAMILY, "tenant")
    yield sock
    sock.close()


@pytest.fixture
def attacker():
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                         netlink_socket.NETLINK_GENERIC)
    sock.bind((0, 0))
    yield sock
    sock.close()


def ready_msg(seq: int = 0) -> bytes:
    return netlink_codec.encode_request(
        FAMILY.family_id, uapi.HANDSHAKE_CMD_READY, b"", seq, 0)


def accept_reply(seq: int, sockfd: int) -> bytes:
    """A well-formed ACCEPT reply naming ``sockfd`` and key serials."""
    def attr(atype: int, payload: bytes) -> bytes:
        return netlink_codec.NLA_HDR.pack(4 + len(payload), atype) + payload

    attrs = (attr(uapi.HANDSHAKE_A_ACCEPT_SOCKFD, struct.pack("=i", sockfd))
             + attr(uapi.HANDSHAKE_A_ACCEPT_MESSAGE_TYPE,
                    struct.pack("=I", uapi.MsgType.CLIENTHELLO))
             + attr(uapi.HANDSHAKE_A_ACCEPT_AUTH_MODE,
                    struct.pack("=I", uapi.AuthMode.PSK))
             + attr(uapi.HANDSHAKE_A_ACCEPT_PEER_IDENTITY,
                    struct.pack("=I", 0x12345678)))
    return netlink_codec.encode_request(
        FAMILY.family_id, uapi.HANDSHAKE_CMD_ACCEPT, attrs, seq, 0)


def port_of(hs: netlink_socket.HandshakeSocket) -> int:
    return int(hs.sock.getsockname()[0])


def test_unicast_from_another_sender_is_refused(hs, attacker):
    """The forged READY never reaches the socket: the kernel refuses it."""
    with pytest.raises(ConnectionRefusedError):
        attacker.sendto(ready_msg(), (port_of(hs), 0))
    assert hs.drain() is False


def test_forged_accept_reply_unicast_is_refused(hs, attacker):
    """A forged ACCEPT reply for the next (predictable) sequence number,
    naming one of our own fds, to either socket: refused by the kernel,
    and the ACCEPT sees only the kernel's answer."""
    for port in (port_of(hs), int(hs.txn.getsockname()[0])):
        with pytest.raises(ConnectionRefusedError):
            attacker.sendto(accept_reply(hs.seq + 1, hs.fileno()),
                            (port, 0))
    with pytest.raises(OSError) as exc:
        hs.accept()
    assert exc.value.errno == errno.ENOENT  # the kernel's own answer


def test_multicast_ready_from_a_process_is_dropped(hs, attacker, caplog):
    """Multicasts to the group still arrive from anyone allowed to send
    them; they are not from port 0 and are dropped, with a log line."""
    caplog.set_level(logging.WARNING, logger="tlshd")
    for _ in range(3):
        attacker.sendto(ready_msg(), (0, GROUP_BIT))
    assert hs.drain() is False
    assert hs.foreign == 3
    lines = [r.getMessage() for r in caplog.records
             if "not sent by the kernel" in r.getMessage()]
    # One line for the burst (rate-limited), naming the namespace.
    assert len(lines) == 1 and "netns tenant" in lines[0], lines


def test_multicast_accept_reply_is_dropped(hs, attacker):
    """A forged ACCEPT reply multicast just before our ACCEPT: it never
    reaches the socket that waits for the kernel's answer, and the READY
    socket drops it."""
    attacker.sendto(accept_reply(hs.seq + 1, hs.fileno()), (0, GROUP_BIT))
    with pytest.raises(OSError) as exc:
        hs.accept()
    assert exc.value.errno == errno.ENOENT
    assert hs.drain() is False
    assert hs.foreign == 1


def test_multicast_flood_cannot_crowd_out_the_kernels_answers(hs,
                                                              attacker):
    """The READY socket's buffer full of forgeries: ACCEPT and DONE still
    get the kernel's answers at once (their socket is in no group)."""
    last = -1
    for _ in range(1000):  # until the buffer is full: it stops growing
        for _ in range(100):
            attacker.sendto(ready_msg(), (0, GROUP_BIT))
        queued = _queued(hs)
        if queued == last:
            break
        last = queued
    # Full (the kernel doubles SO_RCVBUF).
    assert queued >= netlink_socket.RCVBUF
    for _ in range(3):
        with pytest.raises(OSError) as exc:
            hs.accept()
        assert exc.value.errno == errno.ENOENT


def _queued(hs: netlink_socket.HandshakeSocket) -> int:
    """Bytes queued on the READY socket (/proc/net/netlink's Rmem)."""
    port = port_of(hs)
    with open("/proc/self/net/netlink") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[2]) == port:
                return int(fields[4])
    return 0


def test_flood_is_read_in_bounded_slices(hs, attacker):
    """One drain() reads at most MAX_DRAIN datagrams: a flood in one
    namespace cannot hold the loop that serves all of them."""
    n = 3 * netlink_socket.MAX_DRAIN
    for _ in range(n):
        attacker.sendto(ready_msg(), (0, GROUP_BIT))
    assert hs.drain() is False
    assert hs.foreign == netlink_socket.MAX_DRAIN
    while hs.foreign < n:
        hs.drain()
    assert hs.foreign == n


# ---- the SOCKFD of an ACCEPT reply ----------------------------------------

def test_check_sockfd_accepts_the_fresh_tcp_socket(listener):
    expected = netlink_socket.lowest_free_fd(listener.fileno())
    fd, peer = connected_fd(listener)
    try:
        assert fd == expected
        assert netlink_socket.check_sockfd(fd, expected) is None
        assert netlink_socket.check_sockfd(fd, None) is None
        # The peer's address, read from the socket for the log lines.
        assert netlink_socket.inspect_sockfd(fd, None) == (None, "127.0.0.1")
    finally:
        os.close(fd)
        peer.close()


@pytest.mark.parametrize("kind", ["pipe", "udp", "unix", "netlink",
                                  "closed"])
def test_check_sockfd_refuses_what_is_no_tcp_socket(kind):
    keep: list[int] = []
    if kind == "pipe":
        r, w = os.pipe()
        keep, fd = [r, w], r
    elif kind == "closed":
        fd = 999
    else:
        family, stype, proto = {
            "udp": (socket.AF_INET, socket.SOCK_DGRAM, 0),
            "unix": (socket.AF_UNIX, socket.SOCK_STREAM, 0),
            "netlink": (socket.AF_NETLINK, socket.SOCK_RAW, 16),
        }[kind]
        fd = socket.socket(family, stype, proto).detach()
        keep = [fd]
    try:
        why = netlink_socket.check_sockfd(fd, None)
        assert why is not None and ("fd %d" % fd) in why
        if kind != "closed":
            os.fstat(fd)  # checking never closes it
    finally:
        for k in keep:
            os.close(k)


def test_check_sockfd_refuses_an_fd_that_was_open_before(listener):
    """An old TCP socket of ours (another request's) is not what the
    kernel installed: the number must be the lowest free one."""
    fd, peer = connected_fd(listener)
    try:
        expected = netlink_socket.lowest_free_fd(listener.fileno())
        assert fd != expected
        why = netlink_socket.check_sockfd(fd, expected)
        assert why is not None and "installs at" in why
    finally:
        os.close(fd)
        peer.close()


# ---- the supervisor loop ----------------------------------------------------

class Raising(FakeNl):
    """A netlink socket whose next ACCEPT raises what it is given."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error: BaseException | None = error

    def accept(self) -> netlink_codec.AcceptedRequest | None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return super().accept()


def test_sockfd_owned_by_a_live_request_is_never_answered(sup, listener):
    """An ACCEPT reply naming the fd of a request in flight: ignored; the
    request keeps its fd and gets exactly one DONE, later."""
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)
    nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: len(s.requests) == 1)
    nl.submit(fd, timeout_ms=20000)  # the same fd again
    run_until(s, lambda: not nl.queue)
    s.step(0.1)
    assert nl.dones == [] and len(s.requests) == 1
    os.fstat(fd)  # not closed
    peer.close()  # the handshake fails: one DONE for the one request
    run_until(s, lambda: nl.dones)
    s.step(0.2)
    assert [d[0] for d in nl.dones] == [fd]


@pytest.mark.parametrize("error", [
    OSError(errno.EBADF, "Bad file descriptor"),
    RuntimeError("a bug"),
    netlink_socket.AcceptFailed(
        "SOCKFD refused: fd 999: Bad file descriptor", None),
])
def test_netlink_errors_are_contained(sup, listener, tmp_path, error,
                                      caplog):
    """Whatever one namespace's netlink socket throws is logged; the loop
    goes on serving that namespace and every other."""
    s, nl, ns = sup
    bad = Raising(error)
    other = s.add_namespace("tenant", ns.config_path, nlsock=bad)
    run_until(s, lambda: ready(ns) and ready(other))
    bad.w.send(b"R")  # READY, answered by the raising ACCEPT
    s.step(0.1)
    assert bad.dones == [] and bad.closed_fds == []
    # Both namespaces are still served.
    for sock in (nl, bad):
        fd, peer = connected_fd(listener)
        peer.close()
        sock.submit(fd, timeout_ms=20000)
        run_until(s, lambda sock=sock: sock.dones)
        assert sock.dones[0][0] == fd and sock.dones[0][1] != 0
    assert any("tenant" in r.getMessage() for r in caplog.records
               if r.levelno >= logging.ERROR)


def test_accepts_per_turn_are_bounded(sup, listener):
    """A burst in one namespace is ACCEPTed a slice per turn of the
    loop; the rest is taken on the following turns."""
    from tlshd.supervisor import arbiter

    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    n = arbiter.MAX_ACCEPTS_PER_TURN * 2 + 3
    peers = []
    for _ in range(n):
        fd, peer = connected_fd(listener)
        peers.append(peer)
        nl.queue.append(netlink_codec.AcceptedRequest(
            sockfd=fd, msg_type=uapi.MsgType.CLIENTHELLO,
            auth_mode=uapi.AuthMode.UNAUTH, timeout_ms=20000, peerids=(),
            certs=(), peername="127.0.0.1", keyring=None))
    nl.w.send(b"R" * n)  # one READY per request, as the kernel sends
    s.on_netlink(ns)
    assert len(s.requests) == arbiter.MAX_ACCEPTS_PER_TURN
    assert nl.ready  # noted: the loop comes back at once
    run_until(s, lambda: len(s.requests) + len(nl.dones) == n)
    for p in peers:
        p.close()
    run_until(s, lambda: len(nl.dones) == n)


def test_one_accept_per_ready_and_none_that_only_hears_eagain(sup, listener):
    """The kernel multicasts one READY per queued request: that many
    ACCEPTs, and no extra one to hear EAGAIN.  When READYs may have been
    missed (a new group member, an overrun), ACCEPT runs until EAGAIN."""
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    peers = []
    for _ in range(2):
        fd, peer = connected_fd(listener)
        peers.append(peer)
        nl.submit(fd, timeout_ms=20000)
    before = nl.accepts
    s.on_netlink(ns)
    assert nl.accepts - before == 2 and len(s.requests) == 2
    fd, peer = connected_fd(listener)
    peers.append(peer)
    nl.submit(fd, timeout_ms=20000, ready=False)
    nl.note_pending()
    before = nl.accepts
    s.on_netlink(ns)
    assert nl.accepts - before == 2  # the request, then EAGAIN
    assert len(s.requests) == 3
    for p in peers:
        p.close()
    run_until(s, lambda: len(nl.dones) == 3)


def test_flooded_namespace_is_paused_others_served(sup, listener, attacker):
    """A namespace whose socket is flooded with forgeries is not listened
    to for FLOOD_PAUSE: its flood costs the loop a slice per pause, and
    the other namespaces keep being served meanwhile."""
    from tlshd.supervisor import arbiter

    s, nl, ns = sup
    hs = netlink_socket.HandshakeSocket(FAMILY, "tenant")
    tenant = s.add_namespace("tenant", ns.config_path, nlsock=hs)
    run_until(s, lambda: ready(ns) and ready(tenant))
    for _ in range(4 * netlink_socket.MAX_DRAIN):
        attacker.sendto(ready_msg(), (0, GROUP_BIT))
    s.step(0.1)
    assert tenant.paused_until is not None
    assert hs.foreign == netlink_socket.MAX_DRAIN  # one slice, then the pause
    fd, peer = connected_fd(listener)
    peer.close()
    nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: nl.dones)  # the other namespace is served
    run_until(s, lambda: tenant.paused_until is None and hs.foreign
              >= 2 * netlink_socket.MAX_DRAIN,
              timeout=5 * arbiter.FLOOD_PAUSE + 5)
