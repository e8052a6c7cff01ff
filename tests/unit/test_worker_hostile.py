"""A compromised worker against the supervisor (issue 15, parts 3 and 4).

A worker parses peer data, so the test assumes it is the attacker's:
it floods the supervisor's log through the channel, lies in its HELLO,
or writes to the fds it inherited.  A real Supervisor loop with FakeNl
(supervisorfakes.py); the attacker is either the real worker's channel,
stolen with pidfd_getfd, or a fake worker process spawned instead.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
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
    worker_channel_fd,
)

from tlshd.shared import config, protocol, uapi
from tlshd.shared.channel import Channel, socketpair
from tlshd.supervisor import (
    keymaterial,
    netlink_family,
    workerpool,
)
from tlshd.supervisor.arbiter import Supervisor
from tlshd.supervisor.workers import Worker

# What a line from a worker may cost in the supervisor's log: the text
# cap (1000 characters and a marker) and the " [netns init]" tag.
LINE_MAX = 1100
FLOOD = 5000


def worker_lines(caplog) -> list[logging.LogRecord]:
    """The records the supervisor logged on a worker's behalf."""
    return [r for r in caplog.records
            if r.name.startswith("tlshd.supervisor")
            and r.getMessage().endswith(" [netns init]")]


def served(s, nl, ns, listener) -> None:
    """The worker still answers a request itself (not EIO, no death)."""
    before = len(nl.dones)
    fd, peer = connected_fd(listener)
    peer.close()  # the handshake fails at once, in the worker
    nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: len(nl.dones) > before, timeout=10)
    assert nl.dones[-1][0] == fd and nl.dones[-1][1] != errno.EIO


# ---- part 3: the log ------------------------------------------------------

def test_log_flood_is_one_line_each_capped_and_limited(sup, listener,
                                                       caplog):
    caplog.set_level(logging.DEBUG)
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    worker = ns.worker
    stolen = socket.socket(fileno=worker_channel_fd(worker.pid,
                                                    worker.pidfd))
    hostile = [
        (50, "CRITICAL-forged\nJan  1 00:00:00 host sshd[1]: Accepted "
             "password for root"),
        (50, "\x1b[2J\x1b[31mred\x1b[0m\r\x07\x00bell\u202eevil\u2028x"),
        (40, "A" * protocol.MAX_STR),  # the most the protocol carries
    ]
    hostile += [(10, "flood %d\n" % i) for i in range(FLOOD)]

    def attack() -> None:
        for level, text in hostile:
            stolen.send(protocol.encode(protocol.LogRecord(level=level,
                                                           text=text)))

    sender = threading.Thread(target=attack)
    sender.start()  # thousands a second, while the loop below reads them
    run_until(s, lambda: not sender.is_alive(), timeout=60)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # drain what is still queued
        s.step(0.05)
    # A line after the flood: the count of dropped lines comes first.
    stolen.send(protocol.encode(protocol.LogRecord(level=20,
                                                   text="after flood")))
    stolen.close()
    run_until(s, lambda: any("after flood" in r.getMessage()
                             for r in caplog.records))

    lines = worker_lines(caplog)
    for r in lines:
        text = r.getMessage()
        assert text.isprintable(), "control characters: %r" % text[:200]
        assert len(text) <= LINE_MAX, "%d characters" % len(text)
        assert r.levelno <= logging.ERROR, (r.levelname, text[:80])
    forged = [r for r in lines if "CRITICAL-forged" in r.getMessage()]
    assert len(forged) == 1 and forged[0].levelno == logging.ERROR
    assert "sshd[1]" in forged[0].getMessage()  # kept, on the same line
    assert any("\\x1b[31m" in r.getMessage() for r in lines)
    flood = [r for r in lines if r.getMessage().startswith("flood ")]
    summaries = [r.getMessage() for r in caplog.records
                 if "suppressed" in r.getMessage()]
    assert summaries, "no 'suppressed' summary; %d of %d flood lines " \
        "logged" % (len(flood), FLOOD)
    assert summaries[0].startswith("Worker %d (netns init): suppressed "
                                   % worker.pid)
    dropped = sum(int(m.split("suppressed ")[1].split()[0])
                  for m in summaries)
    assert len(flood) < FLOOD / 2
    assert len(flood) + dropped == FLOOD
    # The supervisor (and the worker) carry on.
    assert ns.worker is worker and worker.returncode is None
    served(s, nl, ns, listener)


# ---- part 4: the HELLO ----------------------------------------------------

# A "worker" that claims a sandbox it does not have (or, honest, says what
# it is), then waits.
LIAR = r"""
import os, socket, sys, time
from tlshd.shared import linux, protocol
st = linux.proc_status()
honest = sys.argv[2] == "honest"
hello = protocol.Hello(
    pid=os.getpid(), uid=os.getuid(), gid=os.getgid(),
    cap_eff=int(st["CapEff"], 16) if honest else 0,
    no_new_privs=int(st["NoNewPrivs"]) if honest else 1,
    seccomp=int(st["Seccomp"]) if honest else 2)
socket.socket(fileno=int(sys.argv[1])).send(protocol.encode(hello))
time.sleep(120)
"""


def spawn_liar(how: str):
    def spawn(label, config_path, debug, nsfd=None, ids=None):
        ours, theirs = socketpair()
        proc = subprocess.Popen(
            [sys.executable, "-c", LIAR, str(theirs.fileno()), how],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        proc.returncode = 0  # reaped by Worker.reap
        return Worker(label, proc.pid, Channel(ours),
                      os.pidfd_open(proc.pid), time.monotonic())
    return spawn


@pytest.mark.parametrize("how, ids", [
    # Claims CapEff 0, NoNewPrivs 1, Seccomp 2; /proc says otherwise.
    ("lies", None),
    # Tells the truth, but was told to drop to uid/gid 65534 and did not.
    ("honest", (65534, 65534)),
])
def test_hello_checked_against_proc(tmp_path, listener, monkeypatch,
                                    caplog, how, ids):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(workerpool, "spawn_worker", spawn_liar(how))
    gen = serving(tmp_path)
    s, nl, ns = next(gen)
    try:
        s.pool.worker_ids = ids
        fd, peer = connected_fd(listener)
        nl.submit(fd, timeout_ms=20000)  # waits for the worker
        run_until(s, lambda: ns.worker is not None)
        liar = ns.worker
        run_until(s, lambda: liar.returncode is not None or liar.ready,
                  timeout=15)
        assert not liar.ready, "the lying worker was trusted"
        assert liar.returncode == -signal.SIGKILL
        assert any("Worker %d (netns init) is not what it claims" % liar.pid
                   in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)
        # The request that waited for it fails at once (a worker that
        # died starting), rather than at its deadline.
        run_until(s, lambda: nl.dones, timeout=5)
        assert nl.dones == [(fd, errno.EIO, ())]
        # A real worker (the template is not used here) takes over and
        # answers the next request.
        monkeypatch.undo()
        s.pool.worker_ids = None
        peer.close()
        fd2, peer2 = connected_fd(listener)
        peer2.close()
        nl.submit(fd2)
        run_until(s, lambda: len(nl.dones) == 2, timeout=30)
        assert nl.dones[1][0] == fd2 and nl.dones[1][1] != errno.EIO
        assert ready(ns) and ns.worker is not liar
    finally:
        next(gen, None)


# ---- part 3: the worker's fds 0, 1 and 2 -----------------------------------

def stdio_of(pid: int) -> list[str]:
    return [os.readlink("/proc/%d/fd/%d" % (pid, fd)) for fd in (0, 1, 2)]


def test_exec_worker_stdio_is_dev_null(sup):
    s, _nl, ns = sup
    run_until(s, lambda: ready(ns))
    assert stdio_of(ns.worker.pid) == ["/dev/null"] * 3


def test_template_worker_stdio_is_dev_null(tmp_path):
    conf = tmp_path / "tlshd.conf"
    conf.write_text("[authenticate.client]\n[authenticate.server]\n"
                    "[netns]\nworker_idle_timeout=0\n")
    s = Supervisor(config.load(str(conf)), netlink_family.FamilyInfo(0x21, 5))
    s.pool.use_template()
    nsfd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    ns = s.add_namespace("init", str(conf), nlsock=FakeNl(), nsfd=nsfd)
    try:
        run_until(s, lambda: ready(ns))
        assert stdio_of(ns.worker.pid) == ["/dev/null"] * 3
    finally:
        s.stop()
        s.shutdown()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                    signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)


# ---- the PSK lookup limit -------------------------------------------------

def test_lookups_beyond_the_limit_kill_the_worker(sup, listener,
                                                  monkeypatch, caplog):
    """A server PSK request's worker may look up MAX_LOOKUPS keys; one
    more kills it, and the request gets one DONE, EIO (the worker's
    death), not an answer the worker chose."""
    caplog.set_level(logging.DEBUG, logger="tlshd.supervisor")
    asked: list[bytes] = []

    def find_psk(identity, keyring, initial, named):
        asked.append(identity)
        return None

    monkeypatch.setattr(keymaterial, "find_psk", find_psk)
    s, nl, ns = sup
    run_until(s, lambda: ready(ns))
    fd, peer = connected_fd(listener)  # silent: the worker waits for it
    nl.submit(fd, timeout_ms=20000, msg_type=uapi.MsgType.SERVERHELLO,
              auth=uapi.AuthMode.PSK)
    run_until(s, lambda: held(s, ns.worker))
    worker = ns.worker
    (req_id,) = held(s, worker)
    stolen = socket.socket(fileno=worker_channel_fd(worker.pid,
                                                    worker.pidfd))
    for i in range(protocol.MAX_LOOKUPS + 1):
        stolen.send(protocol.encode(
            protocol.PskLookup(identity=b"id-%d" % i), req_id))
    stolen.close()
    run_until(s, lambda: nl.dones)
    run_until(s, lambda: worker.returncode is not None)
    assert nl.dones == [(fd, errno.EIO, ())]
    assert worker.returncode == -signal.SIGKILL
    assert asked == [b"id-%d" % i for i in range(protocol.MAX_LOOKUPS)]
    assert any("Worker %d (netns init) sent an unpermitted PskLookup"
               % worker.pid in r.getMessage() for r in caplog.records)
    for _ in range(5):
        s.step(0.05)
    assert len(nl.dones) == 1
    peer.close()
