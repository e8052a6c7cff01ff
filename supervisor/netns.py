"""Which network namespaces exist, and how to act inside one.

A namespace's identity is (st_dev, st_ino) of its nsfs inode: names can be
reused, inode numbers cannot while the namespace lives.  Sources:

- the initial namespace (the supervisor's own);
- named namespaces: the nsfs bind mounts in /run/netns (``ip netns add``),
  watched with inotify.  ``ip netns add`` creates the file first and
  bind-mounts the namespace onto it a moment later, and a mount makes no
  inotify event, so an event triggers a few re-scans over the next second;
- when configured, unnamed namespaces found through /proc/*/ns/net (the
  container runtimes that do not name theirs), found by scanning processes
  with psutil, every few seconds.  By default only those owned by the
  initial user namespace: the root of a user namespace holds CAP_NET_ADMIN
  over the network namespaces it owns, so it can talk to our netlink
  socket there (see tlshd.supervisor.netlink_socket); serving those is opt-in.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import time
from collections.abc import Iterator
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
    dev = nsfs_device()
    out = []
    try:
        names = sorted(os.listdir(RUN_NETNS))
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(RUN_NETNS, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        # Until "ip netns add" has mounted the namespace onto the file, it
        # is an empty regular file on tmpfs: not (yet) a namespace.
        if st.st_dev != dev:
            continue
        out.append(Found((st.st_dev, st.st_ino), path, name))
    return out


def placeholder_ages() -> list[float]:
    """Seconds since each /run/netns entry that is not (yet) a namespace
    appeared.  "ip netns add" creates the file, then sets the namespace up
    and mounts it there, which inotify does not report; setting a
    namespace up can take more than a second on a busy machine."""
    dev = nsfs_device()
    now = time.time()
    ages = []
    try:
        names = os.listdir(RUN_NETNS)
    except FileNotFoundError:
        return []
    for name in names:
        try:
            st = os.stat(os.path.join(RUN_NETNS, name))
        except OSError:
            continue
        if st.st_dev != dev:
            ages.append(max(0.0, now - st.st_ctime))
    return ages


def unnamed(exclude_pids: set[int]) -> list[Found]:
    """Namespaces that some process (not one of ours) is in."""
    # Imported here: only [netns] unnamed= needs it, and it costs most of
    # a second under emulation before the daemon listens.
    import psutil

    dev = nsfs_device()
    seen: dict[Key, Found] = {}
    for proc in psutil.process_iter([]):
        if proc.pid in exclude_pids:
            continue
        path = "/proc/%d/ns/net" % proc.pid
        try:
            st = os.stat(path)
        except OSError:
            continue  # gone, or a kernel thread
        key = (st.st_dev, st.st_ino)
        if st.st_dev == dev and key not in seen:
            seen[key] = Found(key, path, str(st.st_ino))
    return list(seen.values())


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

    def drain(self) -> bool:
        """Consume pending events; True if there were any.

        What changed is not read from the events: any change means "scan
        /run/netns again" (a scan compares the whole directory anyway).
        """
        changed = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return changed
            if not data:
                return changed
            changed = True

    def close(self) -> None:
        os.close(self.fd)
