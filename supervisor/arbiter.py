"""The supervisor's loop: one thread, one selector, signals and timers.

Like gunicorn's arbiter, the loop only waits and calls verbs.  Callbacks
are bound to each registered fd: the signal wake-up pipe, the /run/netns
watch, each namespace's handshake netlink socket (READY: ACCEPT, then
``requests.submit``), each worker's channel (``monitor``) and pidfd
(``workerpool.on_exit``), the worker template and the control socket.
After every wake-up come the timers: overdue requests are completed with
ETIMEDOUT, paused namespaces are listened to again, scans run, idle workers
are retired, and workers that are wanted (a request waits, or workers are
kept for ever) and whose back-off has elapsed are started.

The parts, each with its own state: ``requests`` (the in-flight table,
the only sender of DONE), ``discovery`` (namespaces.Discovery, the served
namespaces), ``pool`` (workerpool.WorkerPool) and ``monitor`` (what
workers may send).  The arbiter hands each what it needs.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable

from tlshd.shared import config, tlsstat
from tlshd.shared.errors import ConfigError, ProtocolError
from tlshd.supervisor import (
    control,
    netlink_family,
    netlink_socket,
    netns,
    registry,
    sdnotify,
)
from tlshd.supervisor.monitor import Monitor
from tlshd.supervisor.namespace import Namespace
from tlshd.supervisor.namespaces import Discovery
from tlshd.supervisor.requests import Requests
from tlshd.supervisor.workerpool import Pollable, WorkerPool

log = logging.getLogger(__name__)

# How long a stopping supervisor lets in-flight handshakes finish.
STOP_GRACE = 5.0
# ACCEPTs per namespace per turn of the loop: one namespace's burst (or a
# tenant's flood of READYs) must not keep the others waiting.
MAX_ACCEPTS_PER_TURN = 16
# A namespace whose netlink socket is flooded with messages the kernel did
# not send is not listened to for this long (its own root is the only one
# who can send them there): its flood then costs the loop one bounded
# slice per pause instead of all its time, and the CPU stays with the
# handshakes of the other namespaces.
FLOOD_PAUSE = 0.2
# Signals the loop catches (through the wake-up fd): SIGTERM and SIGINT
# stop, SIGHUP and SIGUSR1 reload, SIGCHLD wakes the loop.  A stray
# SIGUSR2 or SIGALRM is logged and otherwise ignored, instead of killing
# the daemon (their default action) and every handshake in flight.
# SIGPIPE stays ignored (Python's start-up); see tlshd(8), SIGNALS.
IGNORED_SIGNALS = (signal.SIGUSR2, signal.SIGALRM)
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                   signal.SIGUSR1, signal.SIGCHLD, *IGNORED_SIGNALS)


class Supervisor:
    """The loop and the parts it hands events to (see the module doc)."""

    def __init__(self, cfg: config.Config, family: netlink_family.FamilyInfo,
                 debug: bool = False,
                 worker_ids: tuple[int, int] | None = None) -> None:
        self.cfg = cfg
        self.sel = selectors.DefaultSelector()
        self.stopping: float | None = None
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        # Workers keep each session's secrets for re-keying only when the
        # kernel can ask for it (re-key upcall) and kTLS can do it.
        self.requests = Requests(family.rekey_upcall
                                 and tlsstat.rekey_supported())
        self.discovery = Discovery(cfg, family, self.home, self._added,
                                   self._removing, watch_fd=self._watch_fd)
        self.pool = WorkerPool(self.requests, self._watch_fd,
                               self._unwatch_fd,
                               lambda ns, w: self.monitor.on_channel(ns, w),
                               debug, worker_ids, cfg.worker_idle_timeout)
        self.monitor = Monitor(self.requests, self.pool)
        self.control: control.ControlServer | None = None
        # systemd's notify socket (Type=notify), set by main once listening
        self.notify_address: str | bytes | None = None
        # Off until main has sent READY=1: parsing certificates imports
        # cryptography (a second under emulation); main then checks the
        # namespaces served so far.
        self.warn_certificates = False
        self._setup_signals()

    # ---- set-up ---------------------------------------------------------

    def _setup_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            # The handler does nothing: the wake-up fd carries the signal
            # number into the selector, where the real work happens.
            signal.signal(sig, lambda *_: None)
        self.sel.register(r, selectors.EVENT_READ, self.on_signal)

    def _watch_fd(self, f: Pollable | int,
                  callback: Callable[[], None]) -> None:
        self.sel.register(f, selectors.EVENT_READ, callback)

    def _unwatch_fd(self, f: Pollable | int) -> None:
        """Stop polling ``f``, if it is polled."""
        fd = f if isinstance(f, int) else f.fileno()
        if self.sel.get_map().get(fd) is not None:
            self.sel.unregister(f)

    @property
    def namespaces(self) -> list[Namespace]:
        return self.discovery.served

    def add_namespace(self, label: str, config_path: str,
                      nlsock: netlink_socket.HandshakeSocket | None = None,
                      key: netns.Key | None = None,
                      nsfd: int | None = None) -> Namespace:
        """Serve a namespace (see namespaces.Discovery.add)."""
        self.discovery.dirty = True
        return self.discovery.add(label, config_path, nlsock, key, nsfd)

    def _added(self, ns: Namespace) -> None:
        if self.warn_certificates:
            control.warn_expiring(ns.label, ns.cfg)
        self._listen(ns)
        self.pool.added(ns, time.monotonic())
        # The kernel may already hold requests for this namespace whose
        # READY no one here heard: sent to a supervisor that then died
        # (the pending list outlives its agent), or multicast to another
        # listener before this socket joined.  No READY will come for
        # them again, so ACCEPT until the kernel says none is pending
        # (accept_noted, at the end of this turn of the loop).
        ns.nlsock.note_pending()

    def remove_namespace(self, ns: Namespace) -> None:
        self.discovery.dirty = True
        self.discovery.remove(ns)

    def _removing(self, ns: Namespace) -> None:
        """``ns`` is gone: answer its requests, kill its workers."""
        self._unlisten(ns)
        self.requests.fail_all(errno.EIO, "namespace removed", namespace=ns)
        self.pool.kill_all(ns)

    def serve_control(self, path: str) -> None:
        """Answer tlshdctl on a root-only unix socket at ``path``."""
        server = self.control = control.ControlServer(path)
        # Registrations outlive a restart in the same private directory.
        self.registry.state_path = registry.state_path(path)
        self._watch_fd(server, lambda: server.handle(self))

    def serve_namespaces(self) -> None:
        """Serve the initial namespace and watch for the others."""
        self._watch_fd(self.discovery.watch(), self.on_watch)
        self.scan()

    def on_watch(self) -> None:
        if self.discovery.on_watch():
            self.scan(force=False)

    def scan(self, force: bool = True) -> None:
        """Bring the served set in line with the namespaces that exist
        (``force`` false: only if something changed)."""
        if self.stopping is None:
            self.discovery.scan(force)

    # ---- what control.py asks (control.Served) ---------------------------

    def in_flight(self, ns: Namespace) -> int:
        return sum(1 for r in self.requests if r.ns is ns)

    def spawning(self, ns: Namespace) -> bool:
        return self.pool.is_spawning(ns)

    @property
    def registry(self) -> registry.Registry:
        return self.discovery.registered.registry

    # ---- requests -------------------------------------------------------

    def on_netlink(self, ns: Namespace) -> None:
        """READY in ``ns``: ACCEPT what is pending, a bounded number.

        Nothing that happens here may stop the loop: it serves every
        other namespace too.
        """
        try:
            self._accept_some(ns)
        except Exception:
            log.exception("Error while handling netlink messages in netns "
                          "%s", ns.label)

    def _accept_some(self, ns: Namespace) -> None:
        ready = ns.nlsock.drain()
        if ns.nlsock.flooded and ns.paused_until is None:
            self.sel.unregister(ns.nlsock)
            ns.paused_until = time.monotonic() + FLOOD_PAUSE
        if not ready:
            return
        budget = ns.nlsock.take_readies()
        for done in range(MAX_ACCEPTS_PER_TURN):
            if self.stopping is not None:
                return
            if budget is not None and done >= budget:
                return  # each READY read has had its ACCEPT
            try:
                req = ns.nlsock.accept()
            except netlink_socket.AcceptFailed as e:
                log.error("Unusable ACCEPT reply in netns %s: %s",
                          ns.label, e)
                if e.sockfd is not None:
                    self.requests.refuse(ns, e.sockfd, errno.EIO)
                continue
            except (OSError, TimeoutError, ProtocolError) as e:
                log.error("ACCEPT failed in netns %s: %s", ns.label, e)
                return
            if req is None:
                return
            if self.requests.owns_fd(req.sockfd):
                # Never answer or close an fd a live request owns.
                log.error("ACCEPT reply in netns %s names fd %d, which a "
                          "request in flight owns; ignoring it", ns.label,
                          req.sockfd)
                continue
            self.requests.submit(ns, req)
            self.pool.demand(ns, time.monotonic())
        # More may be pending: carry on after the other namespaces' turn.
        ns.nlsock.note_pending()

    def _listen(self, ns: Namespace) -> None:
        """Listen to ``ns``'s READY socket."""
        self.sel.register(ns.nlsock, selectors.EVENT_READ,
                          lambda: self.on_netlink(ns))

    def _unlisten(self, ns: Namespace) -> None:
        """Stop listening to ``ns``'s netlink socket (for good)."""
        if ns.paused_until is None:
            self.sel.unregister(ns.nlsock)
        ns.paused_until = None

    def resume_paused(self, now: float) -> None:
        """Listen again to namespaces whose flood pause is over."""
        for ns in self.namespaces:
            if ns.paused_until is not None and now >= ns.paused_until:
                ns.paused_until = None
                self._listen(ns)

    def accept_noted(self) -> None:
        """ACCEPT where a READY was noted but not yet acted on.

        A namespace that used up its turn's ACCEPTs, or whose READYs were
        read while the socket showed nothing more (an ENOBUFS overrun), is
        noted ready: its socket may not be readable again, and without
        this its consumers would wait for their own timeout (NVMe: 10 s
        per queue).  So is a namespace whose group membership has just
        started (add_namespace): requests may be pending from before.
        """
        for ns in list(self.namespaces):
            if ns.nlsock.ready and ns.paused_until is None:
                self.on_netlink(ns)

    # ---- the loop -------------------------------------------------------

    def run(self) -> int:
        while not self.finished():
            self.step()
        self.shutdown()
        return 0

    def finished(self) -> bool:
        return self.stopping is not None and (
            not self.requests or time.monotonic() >= self.stopping)

    def step(self, max_wait: float | None = None) -> None:
        """Wait for one batch of events, handle them, then the timers."""
        timeout = self._next_wakeup(time.monotonic())
        if max_wait is not None:
            timeout = min(timeout, max_wait)
        for key, _ in self.discovery.unnamed.select(self.sel, timeout):
            callback: Callable[[], None] = key.data
            callback()
        now = time.monotonic()
        for worker in self.requests.expire(now):
            self.pool.close_if_idle(worker)
        self.requests.retry_stalled()
        self.resume_paused(now)
        try:
            if self.discovery.scan_due(now):
                self.scan(force=False)
        except Exception:
            # As on_netlink: the loop serves every other namespace.
            log.exception("Error while looking for namespaces")
        self.pool.retire_idle(self.namespaces, now)
        self.pool.manage(self.namespaces, now)
        self.accept_noted()

    def _next_wakeup(self, now: float) -> float:
        times = [ns.restart_at for ns in self.namespaces
                 if ns.restart_at is not None and ns.worker is None]
        for due in (self.requests.next_wakeup(), self.pool.idle_check):
            if due is not None:
                times.append(due)
        if self.stopping is not None:
            times.append(self.stopping)
        times += self.discovery.scans
        times += [ns.paused_until for ns in self.namespaces
                  if ns.paused_until is not None]
        if any(ns.nlsock.ready and ns.paused_until is None
               for ns in self.namespaces):
            times.append(now)  # a noted READY: accept_noted() at once
        return max(0.0, min(times) - now) if times else 60.0

    # ---- signals --------------------------------------------------------

    def on_signal(self) -> None:
        try:
            data = os.read(self.wakeup_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()
            elif signum in (signal.SIGHUP, signal.SIGUSR1):
                # SIGUSR1 as in ktls-utils' tlshd: a reload, not a death.
                self.reload()
            elif signum in IGNORED_SIGNALS:
                log.warning("%s ignored (SIGHUP or SIGUSR1 reloads, "
                            "SIGTERM stops)", signal.Signals(signum).name)

    def stop(self) -> None:
        if self.stopping is not None:
            return
        log.info("Shutting down; %d handshake(s) in flight",
                 len(self.requests))
        sdnotify.notify(self.notify_address, "STOPPING=1")
        self.stopping = time.monotonic() + STOP_GRACE
        self.pool.stopping = True
        for ns in self.namespaces:
            # Leave the group first: new consumers fail at once with ESRCH
            # instead of waiting for an agent that is going away.
            self._unlisten(ns)
            ns.nlsock.leave_group()
            self.requests.fail_all(errno.ETIMEDOUT, namespace=ns,
                                   pending_only=True)

    def reload(self) -> list[str]:
        """Re-read the configuration; new workers take the new requests.

        A successor worker starts with the new configuration while the
        current one keeps serving; once the successor is ready it takes
        over, and the old worker finishes what it holds, then exits.

        Returns what went wrong at once (the main configuration, or a
        namespace's, does not load); a successor that cannot load its
        credentials fails later (see control.ReloadWatch).
        """
        try:
            self.cfg = config.load(self.cfg.path)
        except ConfigError as e:
            log.error("Reload failed, keeping the old configuration: %s", e)
            return ["Reload failed, keeping the old configuration: %s" % e]
        problems = []
        log.info("Reloading configuration from %s", self.cfg.path)
        now = time.monotonic()
        self.discovery.reloaded(self.cfg)
        self.pool.set_idle_timeout(self.cfg.worker_idle_timeout, now)
        starting = 0
        for ns in self.namespaces:
            try:
                ns.cfg = config.load(ns.config_path)
                ns.held = False
                control.warn_expiring(ns.label, ns.cfg)
            except ConfigError as e:
                log.error("netns %s: %s", ns.label, e)
                problems.append("netns %s: %s" % (ns.label, e))
                ns.held = True
            starting += self.pool.reloaded(ns, now)
        log.info("Reload done: %d of %d namespace(s) start a worker with "
                 "the new configuration (the others at their next request)",
                 starting, len(self.namespaces))
        self.scan()
        return problems

    def shutdown(self) -> None:
        self.requests.fail_all(errno.ETIMEDOUT)
        self.pool.close(self.namespaces)
        for ns in self.namespaces:
            ns.nlsock.close()
            if ns.nsfd is not None:
                os.close(ns.nsfd)
        if self.control is not None:
            self.control.close()
        self.discovery.close()
        log.info("Shut down")
