"""Which unnamed namespaces the supervisor serves (issue 15, 1).

The root of a user namespace holds CAP_NET_ADMIN over the network
namespaces it owns and can talk to our netlink socket there, so an
unnamed namespace owned by a user namespace other than ours is served
only with ``[netns] unnamed_userns=true``; and no more than ``[netns]
max_namespaces`` are served at all.  Real namespaces made with unshare(1)
on the host, a real Supervisor's scan().
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from supervisorfakes import release

from tlshd.shared import config
from tlshd.supervisor import namespaces, netlink_family, netns, procwalk
from tlshd.supervisor.arbiter import Supervisor

FAMILY = netlink_family.FamilyInfo(0x3F00, 5)


def holder(*unshare_args: str) -> Iterator[netns.Key]:
    """A process in a new network namespace; yields that namespace's key."""
    proc = subprocess.Popen(["unshare", *unshare_args, "sleep", "120"])
    try:
        ours = netns.key_of("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:
            key = netns.key_of("/proc/%d/ns/net" % proc.pid)
            if key != ours:
                break
            if time.monotonic() > deadline:
                raise AssertionError("unshare did not make a namespace")
            time.sleep(0.01)
        yield key
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def userns_owned() -> Iterator[netns.Key]:
    """Like a rootless container: ``unshare -Urn``."""
    yield from holder("-Urn")


@pytest.fixture
def root_owned() -> Iterator[netns.Key]:
    yield from holder("-n")


def supervisor(tmp_path: Path, netns_lines: str) -> Supervisor:
    tenant = tmp_path / "tenant.conf"
    tenant.write_text("[authenticate.client]\n")
    conf = tmp_path / "tlshd.conf"
    conf.write_text("[netns]\nunnamed=%s\n%s" % (tenant, netns_lines))
    return Supervisor(config.load(str(conf)), FAMILY)


def served(s: Supervisor) -> set[netns.Key | None]:
    return {ns.key for ns in s.namespaces}


def scan(s: Supervisor, finish: bool = True) -> None:
    """Walk /proc to the end (on the walk's thread, asked each turn as
    the loop does), then scan (unnamed namespaces come from the last
    complete walk).  The clock is moved past the pause between two walks.
    ``finish``: also run the scans that serve what did not fit in the
    first (SERVE_SLICE)."""
    walks = s.discovery.unnamed.count
    deadline = time.monotonic() + 30
    while s.discovery.unnamed.count == walks:
        later = time.monotonic() + procwalk.INTERVAL
        if s.discovery.scan_due(later):
            s.scan()
        if time.monotonic() > deadline:
            raise AssertionError("the walk over /proc never finished")
        time.sleep(0.001)
    for _ in range(10000 if finish else 0):
        soon = time.monotonic() + 1.0  # before the next walk
        if min(s.discovery.scans) > soon:
            return
        if s.discovery.scan_due(soon):
            s.scan()


@pytest.fixture
def scanning(monkeypatch, tmp_path) -> Iterator[list[Supervisor]]:
    """Supervisors made by the test, torn down after it; /run/netns is
    left out (other tests may have named namespaces there)."""
    monkeypatch.setattr(netns, "RUN_NETNS", str(tmp_path / "netns"))
    made: list[Supervisor] = []
    yield made
    for s in made:
        for ns in list(s.namespaces):
            s.remove_namespace(ns)
        release(s)


def test_userns_owned_namespace_is_not_served_by_default(
        tmp_path, scanning, userns_owned, root_owned, caplog):
    caplog.set_level(logging.INFO, logger="tlshd")
    s = supervisor(tmp_path, "")
    scanning.append(s)
    scan(s)
    assert root_owned in served(s)
    assert userns_owned not in served(s)
    said = [r.getMessage() for r in caplog.records
            if "owned by a user namespace" in r.getMessage()]
    assert said == ["netns %d is owned by a user namespace; not serving it "
                    "([netns] unnamed_userns is off)" % userns_owned[1]]
    scan(s)  # said once, not at every scan
    assert len([r for r in caplog.records
                if "owned by a user namespace" in r.getMessage()]) == 1


def test_userns_owned_namespace_served_when_configured(
        tmp_path, scanning, userns_owned):
    s = supervisor(tmp_path, "unnamed_userns=true\n")
    scanning.append(s)
    scan(s)
    assert userns_owned in served(s)


def test_no_more_than_max_namespaces(tmp_path, scanning, root_owned,
                                     caplog):
    caplog.set_level(logging.INFO, logger="tlshd")
    s = supervisor(tmp_path, "max_namespaces=1\n")
    scanning.append(s)
    scan(s)
    assert len(s.namespaces) == 1 and s.namespaces[0].label == "init"
    assert root_owned not in served(s)
    assert any("max_namespaces" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["0", "65537", "many"])
def test_max_namespaces_is_checked(tmp_path, value):
    conf = tmp_path / "tlshd.conf"
    conf.write_text("[netns]\nmax_namespaces=%s\n" % value)
    with pytest.raises(config.ConfigError):
        config.load(str(conf))


def test_the_walk_runs_off_the_loop_and_wakes_it(tmp_path, scanning,
                                                root_owned):
    """While a walk is under way the loop sleeps (no wake-up time of
    discovery's): the walk's thread wakes it through the fd the loop
    polls, and the scan that follows serves what the walk found."""
    s = supervisor(tmp_path, "")
    scanning.append(s)
    s.scan()
    assert root_owned not in served(s)  # no walk has completed yet
    s.step(0)  # starts the walk
    walker = s.discovery.unnamed
    assert walker.count == 0
    assert walker.running or walker.count == 1
    assert walker.wake_at is None or not walker.running
    start = time.monotonic()
    while walker.count == 0:
        s.step(30.0)  # returns early only when woken
    # Nothing else here wakes the loop within 30 s: the walk's thread did.
    assert time.monotonic() - start < 15
    assert root_owned in served(s)
    # The next walk waits for INTERVAL.
    assert min(s.discovery.scans) > time.monotonic() + 1.0


def test_new_namespaces_are_served_a_slice_at_a_time(
        tmp_path, scanning, userns_owned, root_owned, monkeypatch):
    """Serving a namespace is a setns, a socket and a file read: a scan
    that finds many serves them for SERVE_SLICE, then comes back."""
    monkeypatch.setattr(namespaces, "SERVE_SLICE", 0.0)
    s = supervisor(tmp_path, "unnamed_userns=true\n")
    scanning.append(s)
    scan(s, finish=False)  # the walk's end: only the first is served
    assert [ns.label for ns in s.namespaces] == ["init"]
    assert min(s.discovery.scans) <= time.monotonic() + 1.0
    for _ in range(1000):
        before = len(s.namespaces)
        s.scan()
        assert len(s.namespaces) <= before + 1
        if {userns_owned, root_owned} <= served(s):
            break
    assert {userns_owned, root_owned} <= served(s)


def test_walk_that_cannot_open_proc_is_logged_and_tried_later(
        tmp_path, scanning, monkeypatch, caplog):
    """Out of fds (EMFILE) when a walk starts: a log line, the next walk
    after UNNAMED_SCAN_INTERVAL, and the loop goes on."""
    def no_fds(*args, **kwargs):
        raise OSError(24, "Too many open files")

    s = supervisor(tmp_path, "")
    scanning.append(s)
    monkeypatch.setattr(netns, "ProcWalk", no_fds)
    caplog.set_level(logging.ERROR)
    s.step(0)
    assert any("Cannot look for unnamed namespaces in /proc" in r.message
               for r in caplog.records)
    assert min(s.discovery.scans) > time.monotonic() + 1.0
    s.step(0)  # still running


def test_a_scan_with_nothing_changed_skips_its_work(
        tmp_path, scanning, root_owned, monkeypatch):
    """Churn in /run/netns wakes the loop for several scans a second;
    one that finds nothing changed does not go over every namespace
    (the set arithmetic and a lookup per namespace not served)."""
    s = supervisor(tmp_path, "")
    scanning.append(s)
    scan(s)
    assert root_owned in served(s)
    worked: list[None] = []  # a scan that does its work asks this first
    initial = netns.initial

    def counted() -> netns.Found:
        worked.append(None)
        return initial()

    monkeypatch.setattr(netns, "initial", counted)
    for _ in range(3):
        s.scan(force=False)
    assert worked == []
    # Dropped from outside: the next scan looks again, and serves it.
    ns = next(ns for ns in s.namespaces if ns.key == root_owned)
    s.remove_namespace(ns)
    s.scan(force=False)
    assert len(worked) == 1 and root_owned in served(s)
    s.scan(force=False)
    assert len(worked) == 1
    # A forced scan (a reload, a registration) always does the work.
    s.scan()
    assert len(worked) == 2
