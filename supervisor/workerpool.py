"""Each namespace's workers: start, attach, ready, retire, reap, restart.

The verbs on a namespace's worker slots (``Namespace.worker``,
``successor``, ``retiring``) and its restart back-off, gunicorn's
spawn/reap/manage.

Workers are on demand: a namespace has none until a request arrives
(``demand``), and one with nothing in flight for ``idle_timeout`` seconds
exits (``retire_idle``), unless it keeps re-key secrets the kernel may
still ask for.  With ``idle_timeout`` 0, every namespace keeps a worker
from the moment it is served.  Kept apart from workers.py (one process) because
namespaces.py needs the Worker type, and these verbs need Namespace and
the request table: one module for both would be an import cycle.

The pool is handed how to watch an fd (the arbiter's selector), what to
call when a worker's channel is readable (the monitor), and the request
table, whose requests it fails when a worker dies and dispatches when one
is ready.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Protocol

from tlshd.shared.errors import PeerGone, ProtocolError
from tlshd.supervisor.namespace import Namespace
from tlshd.supervisor.requests import Requests
from tlshd.supervisor.workers import Template, Worker, spawn_worker

log = logging.getLogger(__name__)


class Pollable(Protocol):
    def fileno(self) -> int: ...


Watch = Callable[[Pollable | int, Callable[[], None]], None]
Unwatch = Callable[[Pollable | int], None]


class WorkerPool:
    """The workers of every served namespace."""

    def __init__(self, requests: Requests, watch: Watch, unwatch: Unwatch,
                 on_message: Callable[[Namespace, Worker], None], debug: bool,
                 worker_ids: tuple[int, int] | None,
                 idle_timeout: float = 0.0) -> None:
        self.requests = requests
        self._watch = watch
        self._unwatch = unwatch
        self._on_message = on_message
        self.debug = debug
        self.worker_ids = worker_ids  # (uid, gid) workers drop to
        self.template: Template | None = None
        # Template spawn requests awaiting an answer: (namespace, successor)
        self.spawning: dict[int, tuple[Namespace, bool]] = {}
        self.stopping = False  # no new workers once set
        # Seconds an idle worker lives (0: for ever), and when to look
        # for idle workers next (None: none can be idle).
        self.idle_timeout = idle_timeout
        self.idle_check: float | None = None

    # ---- the worker template --------------------------------------------

    def use_template(self) -> None:
        """Fork workers from a template that has imported the TLS stack
        (cheap per namespace) instead of exec'ing each one."""
        self.template = Template()
        self._watch(self.template, self.on_template)

    def on_template(self) -> None:
        assert self.template is not None
        try:
            req_id, worker = self.template.answer()
        except (PeerGone, ProtocolError, OSError) as e:
            log.error("Worker template failed (%s); exec'ing workers from "
                      "now on", e)
            self._drop_template()
            return
        ns, successor = self.spawning.pop(req_id)
        if ns.removed or self.stopping:
            worker.kill()
            worker.reap()
            return
        self.attach(ns, worker, successor)

    def _drop_template(self) -> None:
        assert self.template is not None
        self._unwatch(self.template)
        self.template.proc.kill()
        self.template.close()
        self.template = None
        waiting, self.spawning = self.spawning, {}
        now = time.monotonic()
        for ns, successor in waiting.values():
            if not ns.removed:
                self.start(ns, now, successor)

    def is_spawning(self, ns: Namespace) -> bool:
        return any(n is ns for n, _ in self.spawning.values())

    # ---- start ----------------------------------------------------------

    def added(self, ns: Namespace, now: float) -> None:
        """``ns`` is served: start its worker now, unless on demand."""
        if self.idle_timeout <= 0:
            ns.restart_at = now

    def demand(self, ns: Namespace, now: float) -> None:
        """A request waits in ``ns``: start a worker for it, unless one is
        starting, or the back-off or a configuration error says wait."""
        if (ns.worker is None and ns.restart_at is None and not ns.held
                and not self.stopping and not self.is_spawning(ns)):
            ns.restart_at = max(now, ns.not_before)

    def manage(self, namespaces: list[Namespace], now: float) -> None:
        """Start the workers whose back-off has elapsed."""
        if self.stopping:
            return
        for ns in namespaces:
            if (ns.worker is None and not ns.held
                    and ns.restart_at is not None and now >= ns.restart_at):
                self.start(ns, now)

    def start(self, ns: Namespace, now: float,
              successor: bool = False) -> None:
        ns.restart_at = None
        ns.backoff.started(now)
        try:
            if self.template is not None and ns.nsfd is not None:
                req_id = self.template.request(
                    ns.label, ns.config_path, self.debug, ns.nsfd,
                    self.worker_ids)
                self.spawning[req_id] = (ns, successor)
                return
            worker = spawn_worker(ns.label, ns.config_path, self.debug,
                                  ns.nsfd, self.worker_ids)
        except (OSError, PeerGone) as e:
            log.error("Cannot start a worker for netns %s: %s", ns.label, e)
            ns.restart_at = ns.backoff.failed(now)
            return
        self.attach(ns, worker, successor)

    def attach(self, ns: Namespace, worker: Worker,
               successor: bool) -> None:
        if successor:
            if ns.successor is not None:  # an older one, not ready yet
                ns.successor.kill()
                self.retire(ns, ns.successor)
            ns.successor = worker
        else:
            ns.worker = worker
        self._watch(worker.channel, lambda: self._on_message(ns, worker))
        self._watch(worker.pidfd, lambda: self.on_exit(ns, worker))

    def ready(self, ns: Namespace, worker: Worker) -> None:
        """``worker`` said HELLO and passed its check: it takes over from
        its predecessor, and the namespace's pending requests."""
        worker.ready = True
        worker.last_busy = time.monotonic()
        self._note_idle(worker.last_busy)
        if worker is ns.successor:
            old = ns.worker
            ns.worker, ns.successor = worker, None
            if old is not None:
                self.retire(ns, old)
        if worker is not ns.worker:
            return  # retired before it was ready; it exits on EOF
        for req in self.requests.pending(ns):
            self.requests.dispatch(req, worker)

    # ---- stop -----------------------------------------------------------

    def kill(self, worker: Worker) -> None:
        """Kill a worker gone wrong; its exit (pidfd) is handled as any
        worker's death.  Nothing more it sends is read."""
        worker.kill()
        self._unwatch(worker.channel)

    def kill_all(self, ns: Namespace) -> None:
        """Kill every worker of ``ns`` (gone); each exit is reaped through
        its pidfd, as any worker's."""
        for worker in ns.workers():
            worker.kill()

    def unwatch_channel(self, worker: Worker) -> None:
        """Read no more from ``worker`` (it closed its end)."""
        self._unwatch(worker.channel)

    def retire(self, ns: Namespace, worker: Worker) -> None:
        worker.retiring = True
        if ns.worker is worker:
            ns.worker = None
        if ns.successor is worker:
            ns.successor = None
        ns.retiring.append(worker)
        self.close_if_idle(worker)

    def close_if_idle(self, worker: Worker) -> None:
        """``worker`` may hold nothing now: a retiring one is told to exit,
        another may idle out later (see retire_idle)."""
        if not worker.retiring:
            self._note_idle(time.monotonic())
        elif (worker.returncode is None
                and not self.requests.held_by(worker)):
            # EOF on its channel tells the worker to exit.
            try:
                worker.channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def set_idle_timeout(self, seconds: float, now: float) -> None:
        """A reload changed ``worker_idle_timeout``: look again from
        ``now`` (the next look also finds workers idle already)."""
        self.idle_timeout = seconds
        self.idle_check = None
        self._note_idle(now)

    def _note_idle(self, now: float) -> None:
        """A worker may have become idle at ``now``: look then."""
        if self.idle_timeout > 0 and self.idle_check is None:
            self.idle_check = now + self.idle_timeout

    def retire_idle(self, namespaces: list[Namespace], now: float) -> None:
        """Retire every worker idle for ``idle_timeout``; note when the
        next one may be.  Only when due: it looks at every namespace."""
        if self.idle_check is None or now < self.idle_check:
            return
        self.idle_check = None
        if self.idle_timeout <= 0 or self.stopping:
            return
        busy = self.requests.busy_workers()
        for ns in namespaces:
            worker = ns.worker
            if (worker is None or not worker.ready or worker.sessions
                    or ns.successor is not None or worker in busy):
                continue
            due = worker.last_busy + self.idle_timeout
            if now < due:
                self.idle_check = min(due, self.idle_check or due)
                continue
            log.info("Worker %d for netns %s idle for %.0f s; stopping it "
                     "(the next request starts another)", worker.pid,
                     ns.label, now - worker.last_busy)
            self.retire(ns, worker)

    def reloaded(self, ns: Namespace, now: float) -> bool:
        """``ns`` has a new configuration: start a successor worker, or a
        first one if workers are kept for ever or a request waits.
        Returns whether a worker starts."""
        ns.backoff.failures = 0
        if ns.successor is not None:
            # Superseded before it was ready: it holds no request, and
            # finishing its start-up would only burn CPU.
            ns.successor.kill()
            self.retire(ns, ns.successor)
        starts = False
        if ns.worker is None:
            ns.not_before = 0.0
            if ((self.idle_timeout <= 0 or self.requests.pending(ns))
                    and not self.is_spawning(ns)):
                ns.restart_at = now
                starts = True
        elif not ns.held:
            self.start(ns, now, successor=True)
            starts = True
        if starts:
            log.info("netns %s: starting a worker with the new "
                     "configuration", ns.label)
        return starts

    def on_exit(self, ns: Namespace, worker: Worker) -> None:
        """Reap a worker; fail what it held; restart or hold its slot."""
        self._unwatch(worker.pidfd)
        self._unwatch(worker.channel)
        code = worker.reap()
        how = ("killed by %s" % signal.Signals(-code).name if code < 0
               else "exited with status %d" % code)
        level = (logging.INFO if ns.removed
                 or (worker.retiring and code == 0) else logging.ERROR)
        log.log(level, "Worker %d for netns %s %s; %d request(s) in flight",
                worker.pid, ns.label, how,
                len(self.requests.held_by(worker)))
        self.requests.fail_all(errno.EIO, "worker %s" % how, worker=worker)
        if ns.removed:
            return
        if worker in ns.retiring:
            ns.retiring.remove(worker)
            return
        if worker is ns.successor:
            # The new configuration does not work; the current worker goes
            # on serving with the old one.
            ns.successor = None
            log.error("netns %s keeps its previous configuration: the "
                      "reloaded one failed to start (%s)", ns.label, how)
            return
        ns.worker = None
        if code == os.EX_CONFIG:
            log.error("Configuration error in netns %s; holding it until "
                      "the next reload (SIGHUP)", ns.label)
            ns.held = True
            self.requests.fail_all(errno.EIO, namespace=ns,
                                   pending_only=True)
            return
        ns.restarts += 1
        ns.not_before = ns.backoff.failed(time.monotonic())
        if not worker.ready:
            # It died starting: the requests that wait for it get their
            # DONE now instead of waiting out the back-off.
            self.requests.fail_all(errno.EIO, "worker %s while starting"
                                   % how, namespace=ns, pending_only=True)
        ns.restart_at = ns.not_before if self.idle_timeout <= 0 else None
        if self.requests.pending(ns):
            # Requests it had not taken yet (its channel was full): the
            # next worker takes them.
            self.demand(ns, time.monotonic())

    def close(self, namespaces: list[Namespace]) -> None:
        """Kill and reap every worker; close the template."""
        for ns in namespaces:
            for worker in ns.workers():
                worker.kill()
                worker.reap()
        if self.template is not None:
            self.template.close()
