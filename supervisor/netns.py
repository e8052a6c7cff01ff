"""Which network namespaces exist, and how to act inside one.

A namespace's identity is (st_dev, st_ino) of its nsfs inode: names can be
reused, inode numbers cannot while the namespace lives.  Sources:

- the initial namespace (the supervisor's own);
- named namespaces: the nsfs bind mounts in /run/netns (``ip netns add``),
  watched with inotify and kept in a ``NamedCache``: an event re-examines
  only the entries it names, and entries that are not a namespace yet.
  ``ip netns add`` creates the file first and bind-mounts the namespace
  onto it a moment later, and a mount makes no inotify event, so an event
  triggers a few re-scans over the next second; a mount or unmount with
  no event at all is caught by an occasional full re-read;
- when configured, unnamed namespaces found through /proc/*/ns/net (the
  container runtimes that do not name theirs), found by walking /proc
  every few seconds (``ProcWalk``, on a thread of its own: see
  tlshd.supervisor.procwalk), so ten thousand processes never hold up
  the loop.  By default only those
  owned by the initial user namespace: the root of a user namespace holds
  CAP_NET_ADMIN over the network namespaces it owns, so it can talk to
  our netlink socket there (see tlshd.supervisor.netlink_socket); serving
  those is opt-in.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
import time
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tlshd.shared import linux

log = logging.getLogger(__name__)

RUN_NETNS = "/run/netns"

IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_DELETE_SELF = 0x400
IN_ATTRIB = 0x4
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
# struct inotify_event: wd, mask, cookie, len, then len bytes of name.
EVENT_HEADER = struct.Struct("iIII")

# ioctl(2) on a namespace fd: an fd of the user namespace that owns it
# (<linux/nsfs.h>, _IO(0xb7, 0x1)).
NS_GET_USERNS = 0xB701

_libc = ctypes.CDLL(None, use_errno=True)

Key = tuple[int, int]


@dataclass(frozen=True)
class Found:
    """A namespace that exists: where to open it, what to call it."""

    key: Key
    path: str
    label: str


def nsfs_device() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def key_of(path: str) -> Key:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def initial() -> Found:
    key = key_of("/proc/self/ns/net")
    return Found(key, "/proc/self/ns/net", "init")


def named() -> list[Found]:
    """The namespaces bind-mounted in /run/netns right now."""
    cache = NamedCache()
    cache.refresh()
    return cache.found()


class NamedCache:
    """The entries of /run/netns, re-examined only where something changed.

    ``mark(names)`` says which entries an inotify event named (None: all
    of them, as after an overflow); ``refresh`` then stats only those and
    the entries that are not a namespace yet (placeholders: "ip netns add"
    mounts the namespace onto its file with no event).  The other entries
    keep their key without a system call, so a scan after one change costs
    the same with 1000 namespaces as with 10.  ``dev``: the nsfs device
    (the tests pass another one).
    """

    def __init__(self, directory: str | None = None,
                 dev: int | None = None) -> None:
        self.directory = RUN_NETNS if directory is None else directory
        self.dev = nsfs_device() if dev is None else dev
        self._found: dict[str, Found] = {}  # the namespaces, by name
        self.by_key: dict[Key, Found] = {}  # the same, by key
        # The placeholders: name -> when it appeared (ctime).
        self._pending: dict[str, float] = {}
        self._marked: set[str] | None = None  # None: re-read everything
        self.stats = 0  # stat(2) calls made, for the tests and benchmarks

    def mark(self, names: Iterable[str] | None) -> None:
        """Re-examine ``names`` (None: every entry) at the next refresh."""
        if names is None or self._marked is None:
            self._marked = None
        else:
            self._marked.update(names)

    def refresh(self) -> bool:
        """Stat what was marked, and every placeholder; True if the
        namespaces found changed (one came, went, or another is there)."""
        full = self._marked is None
        if full:
            try:
                names: Iterable[str] = os.listdir(self.directory)
            except FileNotFoundError:
                names = []
            before = self._keys(self._found)
            self._found, self.by_key, self._pending = {}, {}, {}
        else:
            assert self._marked is not None
            names = self._marked | self._pending.keys()
            before = self._keys(names)
        self._marked = set()
        for name in names:
            self._forget(name)
            path = os.path.join(self.directory, name)
            self.stats += 1
            try:
                st = os.stat(path)
            except OSError:
                continue
            # Until "ip netns add" has mounted the namespace onto the file,
            # it is an empty regular file on tmpfs: not (yet) a namespace.
            if st.st_dev != self.dev:
                self._pending[name] = st.st_ctime
            else:
                f = Found((st.st_dev, st.st_ino), path, name)
                self._found[name] = self.by_key[f.key] = f
        return self._keys(self._found if full else names) != before

    def _keys(self, names: Iterable[str]) -> dict[str, Key]:
        """The namespace each of ``names`` is (placeholders left out)."""
        return {name: f.key for name in names
                if (f := self._found.get(name)) is not None}

    def _forget(self, name: str) -> None:
        self._pending.pop(name, None)
        old = self._found.pop(name, None)
        if old is not None:
            del self.by_key[old.key]

    def found(self) -> list[Found]:
        """The namespaces, by name."""
        return [f for _, f in sorted(self._found.items())]

    def placeholder_ages(self, now: float) -> list[float]:
        """Seconds since each entry that is not (yet) a namespace appeared
        (``now``: time.time()).  Setting a namespace up can take more than
        a second on a busy machine."""
        return [max(0.0, now - t) for t in self._pending.values()]


def unnamed(exclude_pids: Container[int]) -> list[Found]:
    """Namespaces that some process (not one of ours) is in, in one go."""
    walk = ProcWalk(exclude_pids)
    while not walk.step(float("inf")):
        pass
    return walk.result()


class ProcWalk:
    """One pass over /proc/<pid>/ns/net, a slice at a time.

    ``step`` looks at processes until the deadline passes (at least one
    batch of CHECK_EVERY), so the walk can be stopped between two steps.
    /proc is read as a directory stream: pids
    that come and go during the pass are seen or not, as with any scan.
    The walk owns an fd of /proc until it is finished or closed.
    """

    CHECK_EVERY = 32  # processes between two looks at the clock

    def __init__(self, exclude_pids: Container[int],
                 proc: str = "/proc") -> None:
        self.exclude = exclude_pids
        self.proc = proc
        self.dev = nsfs_device()
        self._it: Iterator[os.DirEntry[str]] | None = os.scandir(proc)
        self._seen: dict[Key, Found] = {}
        self.looked = 0  # processes looked at

    def step(self, deadline: float) -> bool:
        """Walk on until ``deadline`` (time.monotonic()); True when done."""
        it = self._it
        if it is None:
            return True
        while True:
            for _ in range(self.CHECK_EVERY):
                entry = next(it, None)
                if entry is None:
                    self.close()
                    return True
                self._look(entry.name)
            if time.monotonic() >= deadline:
                return False

    def _look(self, name: str) -> None:
        if not name.isdigit() or int(name) in self.exclude:
            return
        self.looked += 1
        path = "%s/%s/ns/net" % (self.proc, name)
        try:
            st = os.stat(path)
        except OSError:
            return  # gone, or a kernel thread
        key = (st.st_dev, st.st_ino)
        if st.st_dev == self.dev and key not in self._seen:
            self._seen[key] = Found(key, path, str(st.st_ino))

    def result(self) -> list[Found]:
        """The namespaces found (complete once ``step`` said done)."""
        return list(self._seen.values())

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None:
            it.close()  # type: ignore[attr-defined]


def owner_userns(nsfd: int) -> Key:
    """The (dev, inode) of the user namespace that owns namespace ``nsfd``."""
    userns = fcntl.ioctl(nsfd, NS_GET_USERNS)
    try:
        st = os.fstat(userns)
    finally:
        os.close(userns)
    return st.st_dev, st.st_ino


def initial_userns() -> Key:
    """The (dev, inode) of the supervisor's (the initial) user namespace."""
    return key_of("/proc/self/ns/user")


@contextmanager
def inside(nsfd: int, home: int) -> Iterator[None]:
    """Run the block with the calling thread in namespace ``nsfd``.

    ``home`` is an fd of the namespace to return to.  If returning fails,
    the process is in an unknown namespace and every later socket would
    be created in the wrong place: that is fatal.
    """
    linux.setns(nsfd)
    try:
        yield
    finally:
        try:
            linux.setns(home)
        except OSError as e:  # pragma: no cover - nothing sane to do
            log.critical("Cannot return to the initial network namespace: "
                         "%s", e)
            os._exit(70)


class Watcher:
    """inotify on /run/netns; readable when something there changed."""

    def __init__(self) -> None:
        os.makedirs(RUN_NETNS, mode=0o755, exist_ok=True)
        fd = int(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "inotify_init1: %s" % os.strerror(err))
        self.fd = fd
        mask = (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
                | IN_ATTRIB | IN_DELETE_SELF)
        if _libc.inotify_add_watch(fd, RUN_NETNS.encode(), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, "inotify_add_watch %s: %s"
                          % (RUN_NETNS, os.strerror(err)))

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> set[str] | None:
        """Consume pending events: the names they concern (empty: none),
        or None when any entry may have changed (the queue overflowed, or
        the directory itself went away)."""
        names: set[str] | None = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            if not data:
                return names
            for mask, name in parse_events(data):
                if mask & (IN_Q_OVERFLOW | IN_DELETE_SELF | IN_IGNORED):
                    names = None
                elif names is not None and name:
                    names.add(name)

    def close(self) -> None:
        os.close(self.fd)


def parse_events(data: bytes) -> Iterator[tuple[int, str]]:
    """(mask, name) of each inotify event in ``data``."""
    offset = 0
    while offset + EVENT_HEADER.size <= len(data):
        _, mask, _, size = EVENT_HEADER.unpack_from(data, offset)
        offset += EVENT_HEADER.size
        raw = data[offset:offset + size]
        offset += size
        yield mask, raw.split(b"\0", 1)[0].decode(errors="surrogateescape")
