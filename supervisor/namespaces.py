"""The served namespaces, and which ones to serve ([netns] policy).

``Namespace`` is one served network namespace: its netlink socket, its
configuration, its worker slots and its counters.  ``Discovery`` keeps
the served set in line with the namespaces that exist (``scan``), within
the [netns] policy: only configured named namespaces; unnamed ones only
when ``[netns] unnamed`` is set, and those owned by a user namespace
other than ours only with ``unnamed_userns``; at most ``max_namespaces``.
It is handed what to do when a namespace is added or is gone; requests
and workers are not its business.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tlshd.shared import config
from tlshd.shared.errors import ConfigError
from tlshd.supervisor import netlink_family, netlink_socket, netns
from tlshd.supervisor.backoff import Backoff
from tlshd.supervisor.workers import Worker

log = logging.getLogger(__name__)

# After a change in /run/netns, look again this much later: "ip netns add"
# mounts the namespace onto its file after creating it, unseen by inotify.
RESCAN_DELAYS = (0.05, 0.3, 1.0)
# How often to look for unnamed namespaces, when they are served.
UNNAMED_SCAN_INTERVAL = 2.0
# While a /run/netns entry is not (yet) a namespace, look again this often;
# once it is older than PENDING_FAST_FOR (most likely a file a failed
# "ip netns add" left behind), only every PENDING_SLOW seconds.
PENDING_RESCAN = 0.25
PENDING_FAST_FOR = 30.0
PENDING_SLOW = 5.0


def fd_key(fd: int) -> netns.Key:
    """The identity of the namespace open as ``fd``."""
    return netns.key_of("/proc/self/fd/%d" % fd)


@dataclass(eq=False)
class Namespace:
    """One served network namespace."""

    label: str
    config_path: str
    nlsock: netlink_socket.HandshakeSocket
    cfg: config.Config
    key: netns.Key | None = None
    nsfd: int | None = None  # keeps the namespace open; workers enter it
    backoff: Backoff = field(default_factory=Backoff)
    worker: Worker | None = None
    # After a reload: the worker with the new configuration, starting up.
    # The current worker keeps serving until the successor is ready, so a
    # burst of reloads cannot starve requests.
    successor: Worker | None = None
    retiring: list[Worker] = field(default_factory=list)
    # When to start a worker; None: none is wanted now (on-demand workers
    # start at the namespace's first request, see workerpool).
    restart_at: float | None = None
    # The back-off after a worker's death: none starts before this.
    not_before: float = 0.0
    held: bool = False  # a configuration error: wait for SIGHUP
    removed: bool = False
    # Not listened to until then (a flood; see arbiter.FLOOD_PAUSE).
    paused_until: float | None = None
    # The supervisor's own (initial) namespace: the only one whose server
    # PSK lookups search the global keyrings (see keymaterial).
    initial: bool = False

    # For status reports.
    succeeded: int = 0
    failed: int = 0
    restarts: int = 0
    last_failure: str = ""

    def workers(self) -> list[Worker]:
        """Every live worker of this namespace."""
        current = [w for w in (self.worker, self.successor) if w is not None]
        return current + self.retiring


@dataclass(frozen=True)
class Wanted:
    """A namespace that should be served, and with which configuration."""

    found: netns.Found
    config_path: str
    unnamed: bool  # found through /proc, not /run/netns


class Discovery:
    """The served namespaces, and the scans that keep them current.

    ``added(ns)`` is called once a namespace is served (its socket is in
    the tlshd group); ``removing(ns)`` before a gone namespace's socket
    and fd are closed.
    """

    def __init__(self, cfg: config.Config, family: netlink_family.FamilyInfo,
                 home: int, added: Callable[[Namespace], None],
                 removing: Callable[[Namespace], None]) -> None:
        self.cfg = cfg
        self.family = family
        self.home = home  # an fd of our own namespace
        self._home_key = fd_key(home)
        self._initial_userns = netns.initial_userns()
        self._added = added
        self._removing = removing
        self.served: list[Namespace] = []
        self.watcher: netns.Watcher | None = None
        self.scans: list[float] = []  # when to scan again
        self._unserved: set[netns.Key] = set()  # logged once each

    def add(self, label: str, config_path: str,
            nlsock: netlink_socket.HandshakeSocket | None = None,
            key: netns.Key | None = None,
            nsfd: int | None = None) -> Namespace:
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
                       or fd_key(nsfd) == self._home_key)
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

    # ---- which namespaces -----------------------------------------------

    def watch(self) -> netns.Watcher:
        """Start watching /run/netns; the caller polls the watcher."""
        self.watcher = netns.Watcher()
        return self.watcher

    def on_watch(self) -> bool:
        """/run/netns changed: True if a scan is due now (then the next
        few are set up, see RESCAN_DELAYS)."""
        assert self.watcher is not None
        if not self.watcher.drain():
            return False
        now = time.monotonic()
        self.scans.extend(now + d for d in RESCAN_DELAYS)
        return True

    def scan_due(self, now: float) -> bool:
        """Whether a timed scan is due; sets up the next unnamed scan."""
        due = bool(self.scans) and now >= min(self.scans)
        if due:
            self.scans = [t for t in self.scans if t > now]
        if self.cfg.netns_unnamed and not self.scans:
            self.scans.append(now + UNNAMED_SCAN_INTERVAL)
        return due

    def _wanted(self) -> list[Wanted]:
        wanted = [Wanted(netns.initial(), self.cfg.path, False)]
        for f in netns.named():
            path = self.cfg.netns_config(f.label)
            if path is None:
                if f.key not in self._unserved:
                    log.info("netns %s has no configuration; not serving it",
                             f.label)
                self._unserved.add(f.key)
                continue
            wanted.append(Wanted(f, path, False))
        if self.cfg.netns_unnamed:
            ours = {os.getpid()}
            for ns in self.served:
                ours.update(w.pid for w in ns.workers())
            for f in netns.unnamed(ours):
                wanted.append(Wanted(f, self.cfg.netns_unnamed, True))
        return wanted

    def scan(self) -> None:
        """Bring the served set in line with the namespaces that exist."""
        wanted: dict[netns.Key, Wanted] = {}
        for w in self._wanted():
            wanted.setdefault(w.found.key, w)
        for ns in list(self.served):
            if ns.key is not None and ns.key not in wanted:
                self.remove(ns)
        have = {ns.key for ns in self.served}
        for key, w in wanted.items():
            if key in have:
                continue
            if len(self.served) >= self.cfg.netns_max:
                self._not_served(key, "netns %s is not served: %d namespaces"
                                 " are, the most [netns] max_namespaces "
                                 "allows" % (w.found.label,
                                             len(self.served)))
                continue
            self._serve(w)
        self._rescan_placeholders(time.monotonic())

    def _serve(self, w: Wanted) -> None:
        """Open, check and serve one wanted namespace."""
        f = w.found
        try:
            nsfd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
            if fd_key(nsfd) != f.key:
                os.close(nsfd)
                return  # replaced under us; the next scan sees it
            refused = self._refuse_unnamed(w, nsfd)
        except OSError as e:
            log.debug("netns %s vanished before it was served: %s",
                      f.label, e)
            return
        if refused:
            os.close(nsfd)
            self._not_served(f.key, refused)
            return
        try:
            self.add(f.label, w.config_path, key=f.key, nsfd=nsfd)
        except OSError as e:
            os.close(nsfd)
            log.error("Cannot serve netns %s: %s", f.label, e)

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
        ages = netns.placeholder_ages()
        if not ages:
            return
        delay = (PENDING_RESCAN if min(ages) < PENDING_FAST_FOR
                 else PENDING_SLOW)
        if not any(t <= now + delay for t in self.scans):
            self.scans.append(now + delay)
