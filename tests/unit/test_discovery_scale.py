"""Discovery that scales (issue 17): /run/netns is re-read only where an
inotify event says something changed, and /proc is walked a bounded
slice at a time, so neither 1000 named namespaces nor 10,000 processes
hold up the supervisor's loop.  Real files, a real inotify watch, the
host's real /proc; no privileges needed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tlshd.supervisor import netns


def cache_of(tmp_path: Path, *names: str) -> netns.NamedCache:
    """A cache of a directory whose regular files count as namespaces."""
    for name in names:
        (tmp_path / name).write_text("")
    return netns.NamedCache(str(tmp_path), dev=os.stat(tmp_path).st_dev)


def keys(cache: netns.NamedCache) -> dict[str, netns.Key]:
    by_name = {f.label: f.key for f in cache.found()}
    # The index by key is kept along with the entries.
    assert {f.key: f.label for f in cache.by_key.values()} == {
        k: n for n, k in by_name.items()}
    assert all(cache.by_key[k].key == k for k in cache.by_key)
    return by_name


def test_a_full_read_finds_every_entry(tmp_path):
    cache = cache_of(tmp_path, "a", "b", "c")
    cache.refresh()
    assert sorted(keys(cache)) == ["a", "b", "c"]
    assert cache.found()[0].path == str(tmp_path / "a")
    assert cache.stats == 3


def test_only_marked_entries_are_looked_at_again(tmp_path):
    cache = cache_of(tmp_path, "a", "b", "c")
    cache.refresh()
    before = keys(cache)
    # "b" replaced with no event: the cache still has the old one ...
    (tmp_path / "b").unlink()
    (tmp_path / "b2").write_text("")  # keeps b's inode from being reused
    (tmp_path / "b").write_text("")
    cache.refresh()
    assert keys(cache) == before and cache.stats == 3
    # ... until an event names it: then only it is looked at.
    cache.mark(["b"])
    cache.refresh()
    assert cache.stats == 4
    assert keys(cache)["b"] != before["b"]
    assert keys(cache)["a"] == before["a"] and "b2" not in keys(cache)
    cache.mark(None)  # everything, as after an overflow
    cache.refresh()
    assert sorted(keys(cache)) == ["a", "b", "b2", "c"]


def test_a_deleted_entry_is_dropped(tmp_path):
    cache = cache_of(tmp_path, "a", "b")
    cache.refresh()
    (tmp_path / "a").unlink()
    cache.mark(["a"])
    cache.refresh()
    assert list(keys(cache)) == ["b"]


def test_placeholders_are_looked_at_at_every_refresh(tmp_path):
    # On another device than the "namespaces": not mounted yet.
    (tmp_path / "new").write_text("")
    cache = netns.NamedCache(str(tmp_path), dev=-1)
    cache.refresh()
    assert cache.found() == []
    ages = cache.placeholder_ages(time.time() + 10)
    assert len(ages) == 1 and 9 < ages[0] < 60
    cache.refresh()
    cache.refresh()
    assert cache.stats == 3
    (tmp_path / "new").unlink()
    cache.refresh()
    assert cache.placeholder_ages(time.time()) == []


def test_a_missing_directory_is_empty(tmp_path):
    cache = netns.NamedCache(str(tmp_path / "none"))
    cache.refresh()
    assert cache.found() == [] and cache.placeholder_ages(0.0) == []


def test_the_watcher_names_what_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(netns, "RUN_NETNS", str(tmp_path / "netns"))
    watcher = netns.Watcher()
    try:
        assert watcher.drain() == set()
        (tmp_path / "netns" / "x").write_text("")
        (tmp_path / "netns" / "y").write_text("")
        (tmp_path / "netns" / "x").unlink()
        assert watcher.drain() == {"x", "y"}
        assert watcher.drain() == set()
    finally:
        watcher.close()


def test_events_are_parsed_and_an_overflow_means_everything():
    def event(mask: int, name: bytes) -> bytes:
        padded = name + b"\0" * (16 - len(name))
        return netns.EVENT_HEADER.pack(1, mask, 0, len(padded)) + padded
    data = event(netns.IN_CREATE, b"a") + event(netns.IN_DELETE, b"bb")
    assert list(netns.parse_events(data)) == [(netns.IN_CREATE, "a"),
                                              (netns.IN_DELETE, "bb")]
    overflow = netns.EVENT_HEADER.pack(-1, netns.IN_Q_OVERFLOW, 0, 0)
    assert list(netns.parse_events(overflow)) == [(netns.IN_Q_OVERFLOW, "")]


def test_the_walk_over_proc_goes_in_bounded_slices():
    ours = netns.key_of("/proc/self/ns/net")
    walk = netns.ProcWalk(set())
    steps = 0
    while True:
        looked = walk.looked
        done = walk.step(0.0)  # the deadline has passed: one batch only
        assert walk.looked - looked <= netns.ProcWalk.CHECK_EVERY
        steps += 1
        if done:
            break
    processes = len([p for p in os.listdir("/proc") if p.isdigit()])
    assert steps >= processes // netns.ProcWalk.CHECK_EVERY
    assert ours in {f.key for f in walk.result()}
    assert walk.step(0.0) is True  # finished walks stay finished


class Everyone:
    def __contains__(self, pid: object) -> bool:
        return True


def test_the_walk_leaves_out_our_own_processes():
    assert netns.unnamed(set())
    assert netns.unnamed(Everyone()) == []


def test_a_closed_walk_gives_back_its_fd():
    fds = len(os.listdir("/proc/self/fd"))
    walk = netns.ProcWalk(set())
    walk.step(0.0)
    walk.close()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert walk.step(0.0) is True


def test_refresh_says_whether_the_namespaces_changed(tmp_path):
    """What lets a scan with nothing new skip its work: a refresh says
    whether a namespace came, went or was replaced."""
    cache = cache_of(tmp_path, "a", "b")
    assert cache.refresh()  # the first read finds them
    assert not cache.refresh()  # nothing marked, nothing changed
    cache.mark(["a"])
    assert not cache.refresh()  # looked at again: the same namespace
    (tmp_path / "c").write_text("")
    cache.mark(["c"])
    assert cache.refresh()  # came
    (tmp_path / "a").unlink()
    (tmp_path / "a2").write_text("")  # keeps a's inode from being reused
    (tmp_path / "a").write_text("")
    cache.mark(["a"])
    assert cache.refresh()  # replaced
    (tmp_path / "b").unlink()
    cache.mark(None)
    assert cache.refresh()  # went (a full read)
    cache.mark(None)
    assert not cache.refresh()  # a full read of the same


def test_placeholder_that_becomes_a_namespace_is_a_change(tmp_path):
    (tmp_path / "new").write_text("")
    cache = netns.NamedCache(str(tmp_path), dev=-1)
    assert not cache.refresh()  # a placeholder is not a namespace yet
    cache.dev = os.stat(tmp_path).st_dev  # "mounted"
    assert cache.refresh()
    assert list(keys(cache)) == ["new"]
