"""Which namespaces to serve ([netns] policy), and serving them.

``Discovery`` keeps the served set (namespace.Namespace) in line with
the namespaces that exist (``scan``), within the [netns] policy:
registered namespaces (see registry), configured named namespaces;
unnamed ones only when ``[netns] unnamed`` is set, and those owned by a
user namespace other than ours only with ``unnamed_userns``; at most
``max_namespaces``.  It is handed what to do when a namespace is added
or is gone; requests and workers are not its business.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from tlshd.shared import config
from tlshd.shared.errors import ConfigError
from tlshd.supervisor import netlink_family, netlink_socket, netns, procwalk
from tlshd.supervisor.dropins import Registered
from tlshd.supervisor.namespace import Namespace
from tlshd.supervisor.registry import Registration, Registry

log = logging.getLogger(__name__)

# After a change in /run/netns, look again this much later: "ip netns add"
# mounts the namespace onto its file after creating it, unseen by inotify.
RESCAN_DELAYS = (0.05, 0.3, 1.0)
# How long one scan may spend starting to serve new namespaces (at least
# one); the rest are served by another scan SERVE_PAUSE later, after the
# loop's other work (a start with 1000 named namespaces: each is a setns,
# a netlink socket and its configuration file read).
SERVE_SLICE = 0.005
SERVE_PAUSE = 0.01
# How often /run/netns is read in full, to catch a mount or unmount that
# came with no inotify event (the entries events name are read at once).
NAMED_RESYNC = 30.0
# While a /run/netns entry is not (yet) a namespace, look again this often;
# once it is older than PENDING_FAST_FOR (most likely a file a failed
# "ip netns add" left behind), only every PENDING_SLOW seconds.
PENDING_RESCAN = 0.25
PENDING_FAST_FOR = 30.0
PENDING_SLOW = 5.0


def fd_key(fd: int) -> netns.Key:
    """The identity of the namespace open as ``fd``."""
    return netns.key_of("/proc/self/fd/%d" % fd)


@dataclass(frozen=True)
class Wanted:
    """A namespace that should be served, and with which configuration."""

    found: netns.Found
    config_path: str  # "": a named one's, not looked up yet
    unnamed: bool  # found through /proc, not /run/netns
    registration: Registration | None = None

    @property
    def source(self) -> str:
        r = self.registration
        if r is not None:
            return "registered by %s: %s" % (r.source, r.path)
        return "/proc" if self.unnamed else "ip netns"


class Discovery:
    """The served namespaces, and the scans that keep them current.

    ``added(ns)`` is called once a namespace is served (its socket is in
    the tlshd group); ``removing(ns)`` before a gone namespace's socket
    and fd are closed.
    """

    def __init__(self, cfg: config.Config, family: netlink_family.FamilyInfo,
                 home: int, added: Callable[[Namespace], None],
                 removing: Callable[[Namespace], None],
                 state_path: str | None = None,
                 watch_fd: Callable[[procwalk.WalkThread,
                                     Callable[[], None]], None] | None = None
                 ) -> None:
        self.cfg = cfg
        self.family = family
        self.home = home  # an fd of our own namespace
        self._home_key = fd_key(home)
        self._initial_userns = netns.initial_userns()
        self._added = added
        self._removing = removing
        self.served: list[Namespace] = []
        self.watcher: netns.Watcher | None = None
        self._scans: list[float] = []  # when to scan again
        self._unserved: set[netns.Key] = set()  # logged once each
        self._named = netns.NamedCache()
        self._resync_at: float | None = None  # once watching
        # The walks over /proc for unnamed namespaces, off the loop.
        self.unnamed = procwalk.Walks(watch_fd)
        self._recheck = False  # look at served namespaces' files again
        # Something a scan looks at may have changed besides /run/netns
        # (which NamedCache.refresh reports): the registry, a walk over
        # /proc, a namespace served or dropped from outside, a serve that
        # failed or was put off.  A scan with nothing changed skips the
        # set arithmetic over every namespace, which churn would
        # otherwise run several times a second (docs/benchmarks.md).
        self.dirty = True
        self.registered = Registered(Registry(
            state_path, self._home_key,
            lambda fd: netns.owner_userns(fd) != self._initial_userns))

    def add(self, label: str, config_path: str,
            nlsock: netlink_socket.HandshakeSocket | None = None,
            key: netns.Key | None = None,
            nsfd: int | None = None, source: str = "",
            registered: bool = False) -> Namespace:
        """Serve a namespace: ``nsfd`` (owned from now on), or the current.

        The netlink socket is created inside the namespace and joined to
        the tlshd group before anything else: until then the kernel fails
        that namespace's consumers with ESRCH.
        """
        if nlsock is None:
            if nsfd is None:
                nlsock = netlink_socket.HandshakeSocket(self.family, label)
            else:
                with netns.inside(nsfd, self.home):
                    nlsock = netlink_socket.HandshakeSocket(self.family, label)
        try:
            cfg = config.load(config_path)
            held = False
        except ConfigError as e:
            log.error("netns %s: %s; its requests fail until a reload",
                      label, e)
            cfg, held = config.Config(path=config_path), True
        ns = Namespace(label, config_path, nlsock, cfg, key, nsfd,
                       held=held, initial=nsfd is None
                       or fd_key(nsfd) == self._home_key, source=source,
                       registered=registered)
        self.served.append(ns)
        self._added(ns)
        log.info("Listening for handshake requests in netns %s", label)
        return ns

    def remove(self, ns: Namespace) -> None:
        """Stop serving a namespace that is gone."""
        log.info("netns %s is gone; stopping its worker", ns.label)
        ns.removed = True
        self._removing(ns)
        ns.nlsock.close()
        if ns.nsfd is not None:
            os.close(ns.nsfd)
        self.served.remove(ns)

    def reloaded(self, cfg: config.Config) -> None:
        """A new main configuration: say again what is not served."""
        self.cfg = cfg
        self._unserved.clear()
        self._recheck = True
        self.registered.reloaded(cfg.path)
        if not cfg.netns_unnamed:
            self.unnamed.stop()

    # ---- which namespaces -----------------------------------------------

    def watch(self) -> netns.Watcher:
        """Start watching /run/netns; the caller polls the watcher."""
        self.watcher = netns.Watcher()
        self.registered.start(self.cfg.path)
        self._named.mark(None)
        self._resync_at = time.monotonic() + NAMED_RESYNC
        return self.watcher

    def on_watch(self) -> bool:
        """/run/netns changed: True if a scan is due now (then the next
        few are set up, see RESCAN_DELAYS)."""
        assert self.watcher is not None
        changed = self.watcher.drain()
        if changed is not None and not changed:
            return False
        self._named.mark(changed)
        now = time.monotonic()
        self._scans.extend(now + d for d in RESCAN_DELAYS)
        return True

    @property
    def scans(self) -> list[float]:
        """When discovery wants the loop to wake up (a walk over /proc
        under way wakes it through its thread's eventfd)."""
        times = list(self._scans)
        if self._resync_at is not None:
            times.append(self._resync_at)
        registered = self.registered.wake_at()
        if registered is not None:
            times.append(registered)
        walk_at = self.unnamed.wake_at
        if self.cfg.netns_unnamed and walk_at is not None:
            times.append(walk_at)
        return times

    def scan_due(self, now: float) -> bool:
        """Whether a scan is due; starts a walk over /proc when it is time
        (unnamed namespaces served), due when one has completed."""
        due = bool(self._scans) and now >= min(self._scans)
        if due:
            self._scans = [t for t in self._scans if t > now]
        if self._resync_at is not None and now >= self._resync_at:
            # The full re-read, and a full scan whatever it finds.
            self._named.mark(None)
            self._resync_at = now + NAMED_RESYNC
            self.dirty = due = True
        if self.cfg.netns_unnamed and self.unnamed.due(now, self._ours):
            self.dirty = due = True
        if self.registered.due(now):
            self.dirty = due = True
        return due

    def _ours(self) -> set[int]:
        """Our pids, which a walk over /proc leaves out."""
        ours = {os.getpid()}
        for ns in self.served:
            ours.update(w.pid for w in ns.workers())
        return ours

    def close(self) -> None:
        """Stop the walk under way; close its eventfd."""
        self.unnamed.close()

    def _candidate(self, key: netns.Key,
                   initial: netns.Found) -> Wanted | None:
        """What serving ``key`` would be: the initial namespace, a named
        one (from the cache of /run/netns) or an unnamed one (from the
        last complete walk over /proc), in that order.  A named one's
        configuration path is looked up later, only when needed (it
        costs a stat)."""
        if key == initial.key:
            return Wanted(initial, self.cfg.path, False)
        r = self.registered.registry.by_key.get(key)
        if r is not None:
            return Wanted(r.found(), r.config_path, False, r)
        f = self._named.by_key.get(key)
        if f is not None:
            return Wanted(f, "", False)
        f = self.unnamed.found.get(key)
        if f is not None and self.cfg.netns_unnamed:
            return Wanted(f, self.cfg.netns_unnamed, True)
        return None

    def _configured(self, w: Wanted) -> Wanted | None:
        """``w`` with its configuration path (None: not to be served)."""
        if w.config_path:
            return w
        path = self.cfg.netns_config(w.found.label)
        if path is None:
            if w.found.key not in self._unserved:
                log.info("netns %s has no configuration; not serving it",
                         w.found.label)
            self._unserved.add(w.found.key)
            return None
        return Wanted(w.found, path, False)

    def scan(self, force: bool = True) -> None:
        """Bring the served set in line with the namespaces that exist
        (unless ``force`` is false and nothing changed: see ``dirty``).

        The work is set arithmetic on keys plus a system call per
        namespace that changed: a served named namespace keeps its
        configuration file until a reload, when whether it has one is
        looked at again.  New namespaces are served for SERVE_SLICE at
        most, the rest by the next scan.
        """
        named_changed = self._named.refresh()
        if not (force or named_changed or self.dirty or self._recheck):
            self._rescan_placeholders(time.monotonic())
            return
        self.dirty = False
        initial = netns.initial()
        registered = self.registered.registry.by_key
        exist = (self._named.by_key.keys() | {initial.key}
                 | registered.keys())
        if self.cfg.netns_unnamed:
            exist |= self.unnamed.found.keys()
        recheck, self._recheck = self._recheck, False
        served = {ns.key for ns in self.served}
        # Served otherwise and registered since, or the reverse, or
        # registered again with another configuration: served anew.
        gone = (served - exist - {None}) | {
            ns.key for ns in self.served
            if ns.key is not None and (
                ns.registered != (ns.key in registered) or (
                    ns.registered and ns.config_path
                    != registered[ns.key].config_path))}
        if gone or recheck:
            for ns in list(self.served):
                w = None if ns.key is None else self._candidate(ns.key,
                                                                initial)
                if ns.key in gone or (w is not None and recheck
                                      and self._configured(w) is None):
                    self.remove(ns)
            served = {ns.key for ns in self.served}
        new = [w for key in exist - served
               if (w := self._candidate(key, initial)) is not None]
        # The order in which they come when max_namespaces is short.
        new.sort(key=lambda w: (w.found.key != initial.key, w.unnamed,
                                w.found.label))
        deadline = time.monotonic() + SERVE_SLICE
        for i, w in enumerate(new):
            wanted = self._configured(w)
            if wanted is None:
                continue
            if len(self.served) >= self.cfg.netns_max:
                self._not_served(w.found.key, "netns %s is not served: %d "
                                 "namespaces are, the most [netns] "
                                 "max_namespaces allows"
                                 % (w.found.label, len(self.served)))
                continue
            self._serve(wanted)
            now = time.monotonic()
            if now >= deadline and i + 1 < len(new):
                self._scans.append(now + SERVE_PAUSE)
                self.dirty = True  # the rest are still to be served
                break
        self._rescan_placeholders(time.monotonic())

    def _serve(self, w: Wanted) -> None:
        """Open, check and serve one wanted namespace."""
        f = w.found
        try:
            nsfd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
            if fd_key(nsfd) != f.key:
                os.close(nsfd)
                self.dirty = True  # replaced under us; the next scan sees it
                return
            refused = self._refuse_unnamed(w, nsfd)
        except OSError as e:
            log.debug("netns %s vanished before it was served: %s",
                      f.label, e)
            self.dirty = True
            return
        if refused:
            os.close(nsfd)
            self._not_served(f.key, refused)
            return
        try:
            self.add(f.label, w.config_path, key=f.key, nsfd=nsfd,
                     source=w.source, registered=w.registration is not None)
        except OSError as e:
            os.close(nsfd)
            log.error("Cannot serve netns %s: %s", f.label, e)
            self.dirty = True  # tried again at the next scan, as before

    def _refuse_unnamed(self, w: Wanted, nsfd: int) -> str | None:
        """Why an unnamed namespace is not served (None: it is).

        The root of the user namespace that owns a network namespace can
        send netlink messages to our socket there; such namespaces are
        served only when the configuration says so.
        """
        if (not w.unnamed or w.found.key == self._home_key
                or self.cfg.netns_unnamed_userns):
            return None
        if netns.owner_userns(nsfd) == self._initial_userns:
            return None
        return ("netns %s is owned by a user namespace; not serving it "
                "([netns] unnamed_userns is off)" % w.found.label)

    def _not_served(self, key: netns.Key, why: str) -> None:
        """Log once (per reload) why a namespace is not served."""
        if key not in self._unserved:
            log.info("%s", why)
        self._unserved.add(key)

    def _rescan_placeholders(self, now: float) -> None:
        """Look again while a /run/netns entry is not a namespace yet: the
        mount that makes it one comes unseen by inotify, and may come
        later than the last of RESCAN_DELAYS."""
        ages = self._named.placeholder_ages(time.time())
        if not ages:
            return
        delay = (PENDING_RESCAN if min(ages) < PENDING_FAST_FOR
                 else PENDING_SLOW)
        if not any(t <= now + delay for t in self._scans):
            self._scans.append(now + delay)
