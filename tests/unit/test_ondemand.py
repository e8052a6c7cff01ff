"""On-demand workers: none until a namespace's first request, idle ones
exit after [netns] worker_idle_timeout, 0 keeps them for ever.

Real exec'd workers and the real loop; the kernel side is FakeNl
(supervisorfakes.py).  Every request still gets exactly one DONE: while
its worker starts, when that worker dies starting, at its deadline.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from supervisorfakes import (
    connected_fd,
    held,
    ready,
    run_until,
    serving,
    submit_closed,
)

from tlshd.shared import config


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[Any]:
    """A supervisor whose workers idle out after 1 s."""
    yield from serving(tmp_path, idle_timeout="1")


@pytest.fixture
def lasting(tmp_path: Path) -> Iterator[Any]:
    """worker_idle_timeout=300: started on demand, never idle in a test."""
    yield from serving(tmp_path, idle_timeout="300")


def served_request(s: Any, nl: Any, listener: Any, n: int) -> int:
    """Submit one request whose peer has gone; wait for DONE number n."""
    fd = submit_closed(nl, listener)
    run_until(s, lambda: len(nl.dones) == n)
    assert nl.dones[n - 1][0] == fd
    return fd


def test_no_worker_until_the_first_request(lasting, listener):
    s, nl, ns = lasting
    for _ in range(10):
        s.step(0.05)
    assert ns.worker is None and not s.pool.spawning
    served_request(s, nl, listener, 1)
    assert ready(ns)


def test_idle_worker_exits_and_the_next_request_starts_another(
        lazy, listener):
    s, nl, ns = lazy
    served_request(s, nl, listener, 1)
    first = ns.worker.pid
    run_until(s, lambda: ns.worker is None and not ns.retiring)
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # exited and reaped
    assert ns.restarts == 0  # an idle exit is not a failure
    served_request(s, nl, listener, 2)
    assert ns.worker.pid != first


def test_busy_worker_does_not_idle_out(lazy, listener):
    s, nl, ns = lazy
    fd, peer = connected_fd(listener)
    nl.submit(fd, timeout_ms=3000)  # a silent peer: held until 3 s
    run_until(s, lambda: ready(ns) and held(s, ns.worker))
    pid = ns.worker.pid
    run_until(s, lambda: nl.dones, timeout=10)
    assert nl.dones == [(fd, errno.ETIMEDOUT, ())]
    assert ns.worker is not None and ns.worker.pid == pid
    run_until(s, lambda: ns.worker is None)
    peer.close()


def test_worker_with_rekey_sessions_stays(lazy, listener):
    s, nl, ns = lazy
    served_request(s, nl, listener, 1)
    ns.worker.sessions = 1  # DONE named a session it keeps secrets for
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        s.step(0.1)
    assert ns.worker is not None and not ns.worker.retiring


def test_request_waits_for_the_worker_it_starts(lasting, listener):
    s, nl, ns = lasting
    fds = [submit_closed(nl, listener) for _ in range(3)]
    s.step(0.05)
    assert ns.worker is not None or s.pool.is_spawning(ns)
    run_until(s, lambda: len(nl.dones) == 3)
    assert sorted(d[0] for d in nl.dones) == sorted(fds)
    assert ns.restarts == 0


def test_worker_killed_while_starting_fails_its_requests_with_eio(
        lasting, listener):
    s, nl, ns = lasting
    fd, peer = connected_fd(listener)
    nl.submit(fd, timeout_ms=20000)
    run_until(s, lambda: ns.worker is not None)
    assert not ns.worker.ready
    os.kill(ns.worker.pid, signal.SIGKILL)
    took = run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.EIO, ())]
    assert took < 5.0  # at once, not at the deadline
    assert ns.worker is None and ns.restart_at is None  # none wanted now
    assert not s.requests
    # The next request starts a worker (after the back-off) and is served.
    served_request(s, nl, listener, 2)
    peer.close()


def test_request_never_waits_past_its_deadline_for_a_starting_worker(
        lasting, listener):
    s, nl, ns = lasting
    # The worker never gets started: its back-off runs for a minute.
    ns.not_before = time.monotonic() + 60
    fd, peer = connected_fd(listener)
    nl.submit(fd, timeout_ms=1200)
    took = run_until(s, lambda: nl.dones)
    assert nl.dones == [(fd, errno.ETIMEDOUT, ())]
    assert took < 3.0
    assert ns.worker is None and not s.requests
    peer.close()


def test_idle_timeout_zero_keeps_todays_behaviour(sup, listener):
    s, nl, ns = sup  # serving() default: worker_idle_timeout=0
    run_until(s, lambda: ready(ns))  # started with the namespace
    pid = ns.worker.pid
    served_request(s, nl, listener, 1)
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        s.step(0.1)
    assert ns.worker.pid == pid and not ns.worker.retiring
    assert s.pool.idle_check is None


def test_reload_to_zero_starts_workers_and_back_keeps_them_lazy(
        lazy, listener):
    s, _nl, ns = lazy
    conf = Path(s.cfg.path)
    text = conf.read_text()
    conf.write_text(text.replace("worker_idle_timeout=1",
                                 "worker_idle_timeout=0"))
    assert s.reload() == []
    run_until(s, lambda: ready(ns))  # no request needed any more
    conf.write_text(text)
    assert s.reload() == []
    run_until(s, lambda: ns.worker is None and not ns.successor
              and not ns.retiring)


@pytest.mark.parametrize("value,ok", [
    ("0", True), ("0.5", True), ("604800", True), ("-1", False),
    ("604801", False), ("nan", False), ("inf", False), ("ten", False),
])
def test_worker_idle_timeout_bounds(value, ok):
    text = "[netns]\nworker_idle_timeout=%s\n" % value
    if ok:
        assert config.parse(text).worker_idle_timeout == float(value)
    else:
        with pytest.raises(config.ConfigError,
                           match="worker_idle_timeout"):
            config.parse(text)


def test_worker_idle_timeout_default():
    assert config.parse("").worker_idle_timeout == 60.0


def test_template_forks_one_worker_for_a_burst(tmp_path, listener):
    """Requests that arrive while the template forks a worker wait for
    that one: no second spawn for the same namespace."""
    from supervisorfakes import FakeNl

    from tlshd.supervisor import netlink_family
    from tlshd.supervisor.arbiter import HANDLED_SIGNALS, Supervisor

    conf = tmp_path / "tlshd.conf"
    conf.write_text("[authenticate.client]\n[authenticate.server]\n"
                    "[netns]\nworker_idle_timeout=300\n")
    s = Supervisor(config.load(str(conf)), netlink_family.FamilyInfo(0x21, 5))
    s.pool.use_template()
    nl = FakeNl()
    nsfd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    ns = s.add_namespace("init", str(conf), nlsock=nl, nsfd=nsfd)
    spawns = []
    real_request = s.pool.template.request

    def counted(*args: Any) -> int:
        spawns.append(args[0])
        return real_request(*args)

    s.pool.template.request = counted
    try:
        for _ in range(5):
            s.step(0.02)
        assert spawns == [] and ns.worker is None
        fds = []
        for _ in range(4):
            fds.append(submit_closed(nl, listener))
            s.step(0.02)
        run_until(s, lambda: len(nl.dones) == 4)
        assert sorted(d[0] for d in nl.dones) == sorted(fds)
        assert spawns == ["init"]
    finally:
        s.stop()
        s.shutdown()
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def test_fd_limit_raised_to_the_hard_limit():
    """1024 served namespaces take about 5000 fds: the supervisor raises
    the soft limit systemd starts it with (1024) to the hard one."""
    import resource

    from tlshd.shared import linux

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        got = linux.raise_fd_limit(5376)
        expect = hard if hard != resource.RLIM_INFINITY else 5376
        assert got == expect
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (expect, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
