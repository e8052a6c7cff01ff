"""Fakes and helpers for driving a real Supervisor loop on the host.

The host kernel has no handshake family, so the kernel side is replaced by
FakeNl, which hands out real TCP sockets as "ACCEPTed" requests and records
every DONE.  Everything else is real: the exec'd worker, the channel, fd
passing, deadlines, worker death.  Imported by name (this folder is on
sys.path, see conftest.py); the fixtures are imported into the test
modules that use them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlshd.shared import config, uapi
from tlshd.supervisor import netlink_codec, netlink_family
from tlshd.supervisor.arbiter import HANDLED_SIGNALS, Supervisor
from tlshd.supervisor.namespace import Namespace
from tlshd.supervisor.workers import Worker


# Netlink attributes built by hand, independently of netlink_codec, so
# that the codec's tests do not check it against itself.
def attr(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return (struct.pack("=HH", length, atype) + payload
            + b"\0" * ((-length) % 4))


def u32(atype: int, v: int) -> bytes:
    return attr(atype, struct.pack("=I", v))


def s32(atype: int, v: int) -> bytes:
    return attr(atype, struct.pack("=i", v))


class FakeNl:
    """Stands in for netlink_socket.HandshakeSocket."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.queue: list[netlink_codec.AcceptedRequest] = []
        self.dones: list[tuple[int, int, tuple[int, ...]]] = []
        self.done_at: dict[int, float] = {}
        self.closed_fds: list[int] = []
        # READY seen (and consumed) while waiting for an ACCEPT or DONE
        # answer, as netlink_socket.HandshakeSocket notes it.
        self.ready = False
        # READYs counted, as HandshakeSocket.readies (None: unknown).
        self.readies: int | None = None
        self.flooded = False  # see netlink_socket.HandshakeSocket.drain
        self.ready_during_done: list[netlink_codec.AcceptedRequest] = []
        self.accepts = 0  # ACCEPT calls, the empty ones too

    def fileno(self) -> int:
        return self.r.fileno()

    def drain(self) -> bool:
        self.r.setblocking(False)
        noted, self.ready = self.ready, False
        try:
            data = self.r.recv(4096)  # one byte per READY
        except BlockingIOError:
            return noted
        if self.readies is not None:
            self.readies += len(data)
        return bool(data) or noted

    def note_pending(self) -> None:
        self.ready = True
        self.readies = None

    def take_readies(self) -> int | None:
        n, self.readies = self.readies, 0
        return n

    def accept(self) -> netlink_codec.AcceptedRequest | None:
        self.accepts += 1
        return self.queue.pop(0) if self.queue else None

    def done(self, sockfd: int, status: int,
             remote_auth: tuple[int, ...]) -> int:
        # The fd must still be open (the supervisor closes it after DONE).
        os.fstat(sockfd)
        self.dones.append((sockfd, status, remote_auth))
        self.done_at[sockfd] = time.monotonic()
        if self.ready_during_done:
            # The kernel queued a request and multicast READY while we
            # waited for DONE's answer: the socket shows nothing.
            self.queue.append(self.ready_during_done.pop(0))
            self.ready = True
            if self.readies is not None:
                self.readies += 1
        return 0

    def leave_group(self) -> None:
        pass

    def close(self) -> None:
        self.r.close()
        self.w.close()

    def submit(self, sockfd: int, timeout_ms: int | None = None,
               msg_type: int = uapi.MsgType.CLIENTHELLO,
               auth: int = uapi.AuthMode.UNAUTH,
               ready: bool = True) -> None:
        """Queue a request and multicast READY; ``ready=False``: the
        READY went to someone else (a supervisor that has since died)."""
        self.queue.append(netlink_codec.AcceptedRequest(
            sockfd=sockfd, msg_type=msg_type, auth_mode=auth,
            timeout_ms=timeout_ms, peerids=(), certs=(),
            peername="127.0.0.1", keyring=None))
        if ready:
            self.w.send(b"R")  # READY


def tcp_listener() -> Iterator[socket.socket]:
    """Body of a ``listener`` fixture: a loopback TCP server socket."""
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def connected_fd(listener: socket.socket) -> tuple[int, socket.socket]:
    """A client socket fd (handed to tlshd) and the peer's end."""
    cli = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    return cli.detach(), peer


def serving(tmp_path: Path, nl: FakeNl | None = None,
            idle_timeout: str = "0"
            ) -> Iterator[tuple[Supervisor, FakeNl, Namespace]]:
    """Body of a ``sup`` fixture: a Supervisor serving one namespace
    through FakeNl (``nl``, which may hold requests already); stopped,
    shut down and its signals restored after.  ``idle_timeout``: the
    [netns] worker_idle_timeout (0, the default here: a worker from the
    start, kept for ever)."""
    conf = tmp_path / "tlshd.conf"
    conf.write_text("[authenticate]\nhandshake_timeout=2\n"
                    "[authenticate.client]\n[authenticate.server]\n"
                    "[netns]\nworker_idle_timeout=%s\n" % idle_timeout)
    cfg = config.load(str(conf))
    s = Supervisor(cfg, netlink_family.FamilyInfo(0x21, 5))
    if nl is None:
        nl = FakeNl()
    ns = s.add_namespace("init", str(conf), nlsock=nl)
    yield s, nl, ns
    s.stop()
    deadline = time.monotonic() + 10
    while not s.finished() and time.monotonic() < deadline:
        s.step(0.1)
    s.shutdown()
    release(s)


def release(s: Supervisor) -> None:
    """Close what a Supervisor holds for its life and restore the signals.
    A real supervisor exits after shutdown(); here the test process goes
    on, and these fds would pile up until exec'd workers get a channel fd
    above the sandbox's fd limit."""
    os.close(signal.set_wakeup_fd(-1))
    os.close(s.wakeup_r)
    os.close(s.home)
    s.discovery.close()
    s.sel.close()
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def submit_closed(nl: FakeNl, listener: socket.socket) -> int:
    """Submit a request whose peer has already gone (its handshake fails
    at once); return its fd."""
    fd, peer = connected_fd(listener)
    peer.close()
    nl.submit(fd)
    return fd


def run_until(s: Supervisor, cond, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in %s s" % timeout)
        s.step(0.05)
    return time.monotonic() - start


def ready(ns) -> bool:
    return ns.worker is not None and ns.worker.ready


def held(s: Supervisor, worker: Worker) -> set[int]:
    """The ids of the requests ``worker`` holds (the request table's
    word: no request is kept anywhere else)."""
    return {r.req_id for r in s.requests.held_by(worker)}




def worker_channel_fd(pid: int, pidfd: int) -> int:
    """Steal a copy of the worker's end of its channel (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for name in os.listdir("/proc/%d/fd" % pid):
        target = os.readlink("/proc/%d/fd/%s" % (pid, name))
        if target.startswith("socket:"):
            fd = libc.syscall(438, pidfd, int(name), 0)  # pidfd_getfd
            if fd < 0:
                pytest.skip("pidfd_getfd: errno %d" % ctypes.get_errno())
            s = socket.socket(fileno=fd)
            if s.type == socket.SOCK_SEQPACKET:
                return s.detach()
            s.close()
    raise AssertionError("worker has no channel socket")


