"""The supervisor's event loop: namespaces, workers, requests, signals.

One thread and one selector.  Callbacks are bound to each registered fd:
the signal wake-up pipe, each namespace's handshake netlink socket, each
worker's channel and pidfd.  After every wake-up, overdue requests are
completed with ETIMEDOUT and workers whose back-off has elapsed are
started.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tlshd.shared import config, protocol, tlsstat, uapi
from tlshd.shared.errors import ConfigError, PeerGone, ProtocolError
from tlshd.supervisor import (
    control,
    keymaterial,
    netlink_codec,
    netlink_family,
    netlink_socket,
    netns,
    sdnotify,
    workercheck,
)
from tlshd.supervisor.backoff import Backoff
from tlshd.supervisor.workers import Template, Worker, spawn_worker

log = logging.getLogger(__name__)

# What the supervisor reads from kernel keys for one request: the x.509
# certificate and key (DER, empty: none) and a client's PSKs.
KeyMaterial = tuple[bytes, bytes, tuple[protocol.PskMaterial, ...]]

# The worker enforces each deadline itself and answers ETIMEDOUT; this much
# later the supervisor stops waiting for a worker that is stuck.
DEADLINE_GRACE = 1.0
# A request's own TIMEOUT is shortened by this much (at most a tenth of it).
TIMEOUT_MARGIN = 0.5
# How long a stopping supervisor lets in-flight handshakes finish.
STOP_GRACE = 5.0
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


def ktls_attached(sockfd: int) -> bool:
    """Whether kTLS is attached to the TCP socket ``sockfd`` (its ULP)."""
    sock = socket.socket(fileno=sockfd)
    try:
        ulp = sock.getsockopt(socket.IPPROTO_TCP, uapi.TCP_ULP, 16)
    except OSError:
        return False
    finally:
        sock.detach()
    return ulp.rstrip(b"\0") == uapi.TLS_ULP_NAME


@dataclass(eq=False)
class InFlight:
    """An ACCEPTed request the supervisor still owes a DONE."""

    req_id: int
    ns: Namespace
    sockfd: int
    request: netlink_codec.AcceptedRequest
    deadline: float
    worker: Worker | None = None
    lookups: int = 0  # PSK_LOOKUPs answered for it (MAX_LOOKUPS at most)
    # Key serials handed to its worker (client PSKs, PSKs found by a
    # lookup): the only ones its answer may name as the peer's identity.
    handed: set[int] = field(default_factory=set)


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
    restart_at: float | None = 0.0
    held: bool = False  # a configuration error: wait for SIGHUP
    pending: list[InFlight] = field(default_factory=list)
    removed: bool = False
    # Not listened to until then (a flood; see FLOOD_PAUSE).
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


class Supervisor:
    def __init__(self, cfg: config.Config, family: netlink_family.FamilyInfo,
                 debug: bool = False,
                 worker_ids: tuple[int, int] | None = None) -> None:
        self.cfg = cfg
        self.family = family
        self.debug = debug
        self.worker_ids = worker_ids
        self.sel = selectors.DefaultSelector()
        self.inflight: dict[int, InFlight] = {}
        self.next_id = 1
        self.stopping: float | None = None
        self.namespaces: list[Namespace] = []
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._home_key = self._fd_key(self.home)
        self._initial_userns = netns.initial_userns()
        self.watcher: netns.Watcher | None = None
        self.scans: list[float] = []
        self._unserved: set[netns.Key] = set()  # logged once each
        self.control: control.ControlServer | None = None
        self.template: Template | None = None
        # Template spawn requests awaiting an answer: (namespace, successor)
        self.spawning: dict[int, tuple[Namespace, bool]] = {}
        # systemd's notify socket (Type=notify), set by main once listening
        self.notify_address: str | bytes | None = None
        # Workers keep each session's secrets for re-keying only when the
        # kernel can ask for it (re-key upcall) and kTLS can do it.
        self.keep_secrets = (family.rekey_upcall
                             and tlsstat.rekey_supported())
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

    @staticmethod
    def _fd_key(fd: int) -> netns.Key:
        return netns.key_of("/proc/self/fd/%d" % fd)

    def add_namespace(self, label: str, config_path: str,
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
                       or self._fd_key(nsfd) == self._home_key)
        control.warn_expiring(label, cfg)
        self.namespaces.append(ns)
        self._watch(ns)
        # The kernel may already hold requests for this namespace whose
        # READY no one here heard: sent to a supervisor that then died
        # (the pending list outlives its agent), or multicast to another
        # listener before this socket joined.  No READY will come for
        # them again, so ACCEPT until the kernel says none is pending
        # (accept_noted, at the end of this turn of the loop).
        nlsock.ready = True
        log.info("Listening for handshake requests in netns %s", label)
        return ns

    def use_template(self) -> None:
        """Fork workers from a template that has imported the TLS stack
        (cheap per namespace) instead of exec'ing each one."""
        self.template = Template()
        self.sel.register(self.template, selectors.EVENT_READ,
                          self.on_template)

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
        if ns.removed or self.stopping is not None:
            worker.kill()
            worker.reap()
            return
        self._attach(ns, worker, successor)

    def _drop_template(self) -> None:
        assert self.template is not None
        self.sel.unregister(self.template)
        self.template.proc.kill()
        self.template.close()
        self.template = None
        waiting, self.spawning = self.spawning, {}
        now = time.monotonic()
        for ns, successor in waiting.values():
            if not ns.removed:
                self.start_worker(ns, now, successor)

    def serve_control(self, path: str) -> None:
        """Answer tlshdctl on a root-only unix socket at ``path``."""
        self.control = control.ControlServer(path)
        server = self.control
        self.sel.register(server, selectors.EVENT_READ,
                          lambda: server.handle(self))

    # ---- which namespaces -----------------------------------------------

    def serve_namespaces(self) -> None:
        """Serve the initial namespace and watch for the others."""
        self.watcher = netns.Watcher()
        self.sel.register(self.watcher, selectors.EVENT_READ, self.on_watch)
        self.scan()

    def on_watch(self) -> None:
        assert self.watcher is not None
        if self.watcher.drain():
            now = time.monotonic()
            self.scan()
            self.scans.extend(now + d for d in RESCAN_DELAYS)

    def _wanted(self) -> list[tuple[netns.Found, str]]:
        found = netns.initial()
        wanted = [(found, self.cfg.path)]
        for f in netns.named():
            path = self.cfg.netns_config(f.label)
            if path is None:
                if f.key not in self._unserved:
                    log.info("netns %s has no configuration; not serving it",
                             f.label)
                self._unserved.add(f.key)
                continue
            wanted.append((f, path))
        if self.cfg.netns_unnamed:
            ours = {os.getpid()}
            for ns in self.namespaces:
                for w in ns.workers():
                    ours.add(w.pid)
            for f in netns.unnamed(ours):
                wanted.append((f, self.cfg.netns_unnamed))
        return wanted

    def scan(self) -> None:
        """Bring the served set in line with the namespaces that exist."""
        if self.stopping is not None:
            return
        wanted: dict[netns.Key, tuple[netns.Found, str]] = {}
        for f, path in self._wanted():
            wanted.setdefault(f.key, (f, path))
        for ns in list(self.namespaces):
            if ns.key is not None and ns.key not in wanted:
                self.remove_namespace(ns)
        have = {ns.key for ns in self.namespaces}
        for key, (f, path) in wanted.items():
            if key in have:
                continue
            if len(self.namespaces) >= self.cfg.netns_max:
                self._not_served(key, "netns %s is not served: %d namespaces"
                                 " are, the most [netns] max_namespaces "
                                 "allows" % (f.label, len(self.namespaces)))
                continue
            try:
                nsfd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                if netns.key_of("/proc/self/fd/%d" % nsfd) != key:
                    os.close(nsfd)
                    continue  # replaced under us; the next scan sees it
                refused = self._refuse_unnamed(f, nsfd)
            except OSError as e:
                log.debug("netns %s vanished before it was served: %s",
                          f.label, e)
                continue
            if refused:
                os.close(nsfd)
                self._not_served(key, refused)
                continue
            try:
                self.add_namespace(f.label, path, key=key, nsfd=nsfd)
            except OSError as e:
                os.close(nsfd)
                log.error("Cannot serve netns %s: %s", f.label, e)
        self._rescan_placeholders(time.monotonic())

    def _refuse_unnamed(self, f: netns.Found, nsfd: int) -> str | None:
        """Why an unnamed namespace is not served (None: it is).

        The root of the user namespace that owns a network namespace can
        send netlink messages to our socket there; such namespaces are
        served only when the configuration says so.
        """
        if (f.named is not None or f.key == self._home_key
                or self.cfg.netns_unnamed_userns):
            return None
        if netns.owner_userns(nsfd) == self._initial_userns:
            return None
        return ("netns %s is owned by a user namespace; not serving it "
                "([netns] unnamed_userns is off)" % f.label)

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

    def remove_namespace(self, ns: Namespace) -> None:
        """Stop serving a namespace that is gone: answer, kill, close."""
        log.info("netns %s is gone; stopping its worker", ns.label)
        ns.removed = True
        self._unwatch(ns)
        for req in [r for r in self.inflight.values() if r.ns is ns]:
            if req.worker is not None:
                req.worker.inflight.discard(req.req_id)
            self.complete(req, errno.EIO, (), "namespace removed")
        ns.pending.clear()
        for worker in ns.workers():
            worker.kill()  # its exit is reaped through the pidfd
        ns.nlsock.close()
        if ns.nsfd is not None:
            os.close(ns.nsfd)
        self.namespaces.remove(ns)

    # ---- the loop -------------------------------------------------------

    def run(self) -> int:
        while not self.finished():
            self.step()
        self.shutdown()
        return 0

    def finished(self) -> bool:
        return self.stopping is not None and (
            not self.inflight or time.monotonic() >= self.stopping)

    def step(self, max_wait: float | None = None) -> None:
        """Wait for one batch of events, handle them, then the timers."""
        timeout = self._next_wakeup(time.monotonic())
        if max_wait is not None:
            timeout = min(timeout, max_wait)
        for key, _ in self.sel.select(timeout):
            callback: Callable[[], None] = key.data
            callback()
        now = time.monotonic()
        self.expire(now)
        self.resume_paused(now)
        if self.scans and now >= min(self.scans):
            self.scans = [t for t in self.scans if t > now]
            self.scan()
        if self.cfg.netns_unnamed and not self.scans:
            self.scans.append(now + UNNAMED_SCAN_INTERVAL)
        self.manage_workers(now)
        self.accept_noted()

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

    def _next_wakeup(self, now: float) -> float:
        times = [r.deadline + (DEADLINE_GRACE if r.worker else 0)
                 for r in self.inflight.values()]
        times += [ns.restart_at for ns in self.namespaces
                  if ns.restart_at is not None and ns.worker is None]
        if self.stopping is not None:
            times.append(self.stopping)
        times += self.scans
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
                 len(self.inflight))
        sdnotify.notify(self.notify_address, "STOPPING=1")
        self.stopping = time.monotonic() + STOP_GRACE
        for ns in self.namespaces:
            # Leave the group first: new consumers fail at once with ESRCH
            # instead of waiting for an agent that is going away.
            self._unwatch(ns)
            ns.nlsock.leave_group()
            for req in ns.pending:
                self.complete(req, errno.ETIMEDOUT, ())
            ns.pending.clear()

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
        self._unserved.clear()
        for ns in self.namespaces:
            try:
                ns.cfg = config.load(ns.config_path)
                ns.held = False
                control.warn_expiring(ns.label, ns.cfg)
            except ConfigError as e:
                log.error("netns %s: %s", ns.label, e)
                problems.append("netns %s: %s" % (ns.label, e))
                ns.held = True
            ns.backoff.failures = 0
            if ns.successor is not None:
                # Superseded before it was ready: it holds no request, and
                # finishing its start-up would only burn CPU.
                ns.successor.kill()
                self.retire(ns, ns.successor)
            if ns.worker is None:
                ns.restart_at = now
            elif not ns.held:
                self.start_worker(ns, now, successor=True)
        self.scan()
        return problems

    def retire(self, ns: Namespace, worker: Worker) -> None:
        worker.retiring = True
        if ns.worker is worker:
            ns.worker = None
        if ns.successor is worker:
            ns.successor = None
        ns.retiring.append(worker)
        self._close_if_idle(worker)

    def _close_if_idle(self, worker: Worker) -> None:
        if worker.retiring and not worker.inflight:
            # EOF on its channel tells the worker to exit.
            try:
                worker.channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- workers --------------------------------------------------------

    def manage_workers(self, now: float) -> None:
        if self.stopping is not None:
            return
        for ns in self.namespaces:
            if (ns.worker is None and not ns.held
                    and ns.restart_at is not None and now >= ns.restart_at):
                self.start_worker(ns, now)

    def start_worker(self, ns: Namespace, now: float,
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
        self._attach(ns, worker, successor)

    def _attach(self, ns: Namespace, worker: Worker,
                successor: bool) -> None:
        if successor:
            if ns.successor is not None:  # an older one, not ready yet
                ns.successor.kill()
                self.retire(ns, ns.successor)
            ns.successor = worker
        else:
            ns.worker = worker
        self.sel.register(worker.channel, selectors.EVENT_READ,
                          lambda: self.on_channel(ns, worker))
        self.sel.register(worker.pidfd, selectors.EVENT_READ,
                          lambda: self.on_exit(ns, worker))

    def on_channel(self, ns: Namespace, worker: Worker) -> None:
        if worker.returncode is not None:
            # Its exit came first in this batch of events: on_exit has
            # reaped it and closed the channel.
            return
        try:
            msg, req_id = worker.channel.recv_answer()
        except PeerGone:
            self.sel.unregister(worker.channel)  # the pidfd reports the exit
            return
        except (ProtocolError, OSError) as e:
            log.error("Worker %d (netns %s) broke the protocol: %s; "
                      "killing it", worker.pid, ns.label, e)
            worker.kill()
            self.sel.unregister(worker.channel)
            return
        if isinstance(msg, protocol.LogRecord):
            worker.logs.emit(msg.level, msg.text)
        elif isinstance(msg, protocol.Hello) and not worker.ready:
            self.answer_hello(ns, worker, msg)
        elif (isinstance(msg, protocol.HandshakeAnswer)
              and req_id in worker.inflight):
            self.answer_handshake(ns, worker, self.inflight[req_id], msg)
        elif (isinstance(msg, protocol.PskLookup)
              and req_id in worker.inflight
              and self._may_look_up(self.inflight[req_id])):
            self.answer_lookup(worker, self.inflight[req_id], msg.identity)
        elif (isinstance(msg, (protocol.HandshakeAnswer, protocol.PskLookup))
              and req_id in worker.expired):
            # Its deadline passed here first: a slow worker (a loaded
            # machine), not a hostile one.  Its other requests stay with
            # it; a lookup is not answered (the worker's own deadline
            # has passed too).
            if isinstance(msg, protocol.HandshakeAnswer):
                worker.expired.discard(req_id)
                log.info("Worker %d (netns %s) answered request %d after "
                         "its deadline; ignored", worker.pid, ns.label,
                         req_id)
        else:
            log.error("Worker %d (netns %s) sent an unexpected %s (request "
                      "%d); killing it", worker.pid, ns.label,
                      type(msg).__name__, req_id)
            worker.kill()
            self.sel.unregister(worker.channel)

    def answer_handshake(self, ns: Namespace, worker: Worker, req: InFlight,
                         msg: protocol.HandshakeAnswer) -> None:
        """A worker's result: checked, then sent to the kernel as DONE."""
        worker.inflight.discard(req.req_id)
        status, reason = msg.status, msg.reason
        why = self._bad_answer(req, msg)
        if why is not None:
            log.error("Worker %d (netns %s) answered request %d with %s; "
                      "killing it", worker.pid, ns.label, req.req_id, why)
            worker.kill()
            self.complete(req, errno.EIO, (), "worker's answer refused")
            return
        if status == 0 and not ktls_attached(req.sockfd):
            log.error("Worker %d (netns %s) reported success for request "
                      "%d but the socket has no kTLS", worker.pid, ns.label,
                      req.req_id)
            status, reason = errno.EIO, "no kTLS on the socket"
        self.complete(req, status, msg.remote_auth if status == 0 else (),
                      reason, msg.session_id)
        self._close_if_idle(worker)

    @staticmethod
    def _bad_answer(req: InFlight,
                    msg: protocol.HandshakeAnswer) -> str | None:
        """Why a worker's answer cannot be true (None: it may be).

        The peer identities a DONE carries authorise the peer to the
        consumer (NFSD's mtls exports, NVMe's key): a worker may name only
        keys it was handed for this request, or the marker of a verified
        certificate when it was asked to verify one.
        """
        allowed = set(req.handed) | {uapi.TLS_NO_PEERID}
        if req.request.auth_mode == uapi.AuthMode.X509:
            allowed.add(uapi.TLS_X509_PEERID)
        for peerid in msg.remote_auth:
            if peerid not in allowed:
                return "peer identity %08x it was not given" % peerid
        return None

    @staticmethod
    def _may_look_up(req: InFlight) -> bool:
        """Only a server PSK handshake looks up keys, a bounded number of
        times; any other lookup is a worker gone wrong."""
        return (req.request.auth_mode == uapi.AuthMode.PSK
                and req.request.msg_type == uapi.MsgType.SERVERHELLO
                and req.lookups < protocol.MAX_LOOKUPS)

    def answer_lookup(self, worker: Worker, req: InFlight,
                      identity: bytes) -> None:
        """Find the PSK a server worker's client offered, in the keyrings
        its namespace may use, and send it (or "not found") back."""
        req.lookups += 1
        psk = keymaterial.find_psk(
            identity, req.request.keyring or 0,
            initial=req.ns.initial, named=req.ns.cfg.keyrings)
        if psk is not None:
            req.handed.add(psk.serial)
        log.debug("PSK lookup for request %d in netns %s: %s", req.req_id,
                  req.ns.label, "key %08x" % psk.serial if psk else
                  "not found")
        try:
            worker.channel.send(protocol.PskFound(psk=psk), req.req_id)
        except (PeerGone, OSError) as e:
            # Its exit (pidfd) answers the request.
            log.error("Cannot answer worker %d's PSK lookup: %s",
                      worker.pid, e)

    def answer_hello(self, ns: Namespace, worker: Worker,
                     hello: protocol.Hello) -> None:
        wrong = workercheck.verify_hello(worker.pid, hello, self.worker_ids)
        if wrong:
            # Lying about its sandbox, or not sandboxed as told: a worker
            # not to be trusted with a request.  Its exit (pidfd) is then
            # handled as any worker's death.
            log.error("Worker %d (netns %s) is not what it claims or must "
                      "be: %s; killing it", worker.pid, ns.label,
                      "; ".join(wrong))
            worker.kill()
            self.sel.unregister(worker.channel)
            return
        worker.ready = True
        log.info("Worker %d for netns %s ready: uid %d gid %d CapEff %016x "
                 "NoNewPrivs %d Seccomp %d", worker.pid, ns.label, hello.uid,
                 hello.gid, hello.cap_eff, hello.no_new_privs, hello.seccomp)
        if worker is ns.successor:
            old = ns.worker
            ns.worker, ns.successor = worker, None
            if old is not None:
                self.retire(ns, old)
        if worker is not ns.worker:
            return  # retired before it was ready; it exits on EOF
        pending, ns.pending = ns.pending, []
        for req in pending:
            self.dispatch(req, worker)

    def on_exit(self, ns: Namespace, worker: Worker) -> None:
        self.sel.unregister(worker.pidfd)
        if self.sel.get_map().get(worker.channel.fileno()) is not None:
            self.sel.unregister(worker.channel)
        code = worker.reap()
        how = ("killed by %s" % signal.Signals(-code).name if code < 0
               else "exited with status %d" % code)
        lost = sorted(worker.inflight)
        level = (logging.INFO if ns.removed
                 or (worker.retiring and code == 0) else logging.ERROR)
        log.log(level, "Worker %d for netns %s %s; %d request(s) in flight",
                worker.pid, ns.label, how, len(lost))
        for req_id in lost:
            self.complete(self.inflight[req_id], errno.EIO, (),
                          "worker %s" % how)
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
        now = time.monotonic()
        if code == os.EX_CONFIG:
            log.error("Configuration error in netns %s; holding it until "
                      "the next reload (SIGHUP)", ns.label)
            ns.held = True
            for req in ns.pending:
                self.complete(req, errno.EIO, ())
            ns.pending.clear()
        else:
            ns.restarts += 1
            ns.restart_at = ns.backoff.failed(now)

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
        for _ in range(MAX_ACCEPTS_PER_TURN):
            if self.stopping is not None:
                return
            try:
                req = ns.nlsock.accept()
            except netlink_socket.AcceptFailed as e:
                log.error("Unusable ACCEPT reply in netns %s: %s",
                          ns.label, e)
                if e.sockfd is not None and not self._owned(e.sockfd):
                    self._done(ns, e.sockfd, errno.EIO, ())
                continue
            except (OSError, TimeoutError, ProtocolError) as e:
                log.error("ACCEPT failed in netns %s: %s", ns.label, e)
                return
            if req is None:
                return
            if self._owned(req.sockfd):
                # Never answer or close an fd a live request owns.
                log.error("ACCEPT reply in netns %s names fd %d, which a "
                          "request in flight owns; ignoring it", ns.label,
                          req.sockfd)
                continue
            self.submit(ns, req)
        # More may be pending: carry on after the other namespaces' turn.
        ns.nlsock.ready = True

    def _watch(self, ns: Namespace) -> None:
        """Listen to ``ns``'s READY socket."""
        self.sel.register(ns.nlsock, selectors.EVENT_READ,
                          lambda: self.on_netlink(ns))

    def _unwatch(self, ns: Namespace) -> None:
        """Stop listening to ``ns``'s netlink socket (for good)."""
        if ns.paused_until is None:
            self.sel.unregister(ns.nlsock)
        ns.paused_until = None

    def resume_paused(self, now: float) -> None:
        """Listen again to namespaces whose flood pause is over."""
        for ns in self.namespaces:
            if ns.paused_until is not None and now >= ns.paused_until:
                ns.paused_until = None
                self._watch(ns)

    def _owned(self, sockfd: int) -> bool:
        return any(r.sockfd == sockfd for r in self.inflight.values())

    def submit(self, ns: Namespace,
               req: netlink_codec.AcceptedRequest) -> None:
        now = time.monotonic()
        if req.timeout_ms:
            # The consumer (NVMe: 10 s) cancels at its TIMEOUT, counted from
            # its submit, a little before our ACCEPT: answer a bit earlier,
            # so that it hears our ETIMEDOUT rather than its own timer.
            timeout = req.timeout_ms / 1000.0
            timeout -= min(TIMEOUT_MARGIN, timeout / 10)
        elif req.msg_type == uapi.MsgType.CLIENTHELLO:
            timeout = ns.cfg.client_handshake_timeout
        else:
            timeout = ns.cfg.handshake_timeout
        inflight = InFlight(self.next_id, ns, req.sockfd, req, now + timeout)
        self.next_id += 1
        self.inflight[inflight.req_id] = inflight
        log.debug("Accepted request %d in netns %s: fd %d, type %d, auth %d,"
                  " peer %r, timeout %.1f s", inflight.req_id, ns.label,
                  req.sockfd, req.msg_type, req.auth_mode, req.peername,
                  timeout)
        if ns.held:
            log.error("Netns %s has no usable configuration", ns.label)
            self.complete(inflight, errno.EIO, ())
        elif ns.worker is not None and ns.worker.ready:
            self.dispatch(inflight, ns.worker)
        else:
            ns.pending.append(inflight)

    def _key_material(self, req: InFlight) -> KeyMaterial | None:
        """Read the kernel keys ``req`` names, for the worker (which can
        read none); None after answering the request if that fails."""
        accepted = req.request
        # Serials are read only from the keyrings its namespace may use.
        scope = keymaterial.Scope(accepted.keyring or 0, req.ns.initial,
                                  req.ns.cfg.keyrings)
        try:
            cert, key = keymaterial.x509_from_keys(accepted.certs, scope)
        except OSError as e:
            log.error("Failed to read certificate keys for request %d in "
                      "netns %s: %s", req.req_id, req.ns.label, e)
            self.complete(req, errno.ENOKEY, (),
                          "certificate keys unreadable")
            return None
        psks: list[protocol.PskMaterial] = []
        if (accepted.auth_mode == uapi.AuthMode.PSK
                and accepted.msg_type == uapi.MsgType.CLIENTHELLO):
            psks, skipped = keymaterial.client_psks(accepted.peerids,
                                                    scope)
            for why in skipped:
                log.error("Cannot use PSK %s [netns %s]", why, req.ns.label)
        return cert, key, tuple(psks)

    def dispatch(self, req: InFlight, worker: Worker) -> None:
        material = self._key_material(req)
        if material is None:
            return
        cert, key, psks = material
        remaining = max(1, int((req.deadline - time.monotonic()) * 1000))
        try:
            msg = protocol.HandshakeRequest(
                msg_type=req.request.msg_type,
                auth_mode=req.request.auth_mode,
                timeout_ms=remaining,
                peername=req.request.peername,
                keep_secrets=self.keep_secrets,
                key_update=req.request.key_update,
                session_id=req.request.session_id,
                x509_cert=cert, x509_key=key, psks=psks,
            )
            worker.channel.send(msg, req.req_id, (req.sockfd,))
        except ValueError as e:  # material too large for one message
            log.error("Cannot hand request %d to worker %d: %s", req.req_id,
                      worker.pid, e)
            self.complete(req, errno.EINVAL, (), str(e))
            return
        except (PeerGone, OSError) as e:
            log.error("Cannot hand request %d to worker %d: %s", req.req_id,
                      worker.pid, e)
            self.complete(req, errno.EIO, ())
            return
        req.worker = worker
        req.handed.update(p.serial for p in psks)
        worker.inflight.add(req.req_id)

    def expire(self, now: float) -> None:
        for req in list(self.inflight.values()):
            grace = DEADLINE_GRACE if req.worker is not None else 0.0
            if now < req.deadline + grace:
                continue
            log.error("Handshake request %d in netns %s timed out",
                      req.req_id, req.ns.label)
            if req.worker is not None:
                req.worker.inflight.discard(req.req_id)
                req.worker.expired.add(req.req_id)
                self._close_if_idle(req.worker)
            elif req in req.ns.pending:
                req.ns.pending.remove(req)
            self.complete(req, errno.ETIMEDOUT, (), "deadline passed")

    def complete(self, req: InFlight, status: int,
                 remote_auth: tuple[int, ...], reason: str = "",
                 session_id: int = 0) -> None:
        """Send the one DONE ``req`` is owed and forget it."""
        if self.inflight.pop(req.req_id, None) is None:
            raise AssertionError("request %d completed twice" % req.req_id)
        ns = req.ns
        if status == 0:
            ns.succeeded += 1
        else:
            ns.failed += 1
            ns.last_failure = "%s: %s" % (
                errno.errorcode.get(status, str(status)), reason or "?")
        self._done(ns, req.sockfd, status, remote_auth, session_id)

    def _done(self, ns: Namespace, sockfd: int, status: int,
              remote_auth: tuple[int, ...], session_id: int = 0) -> None:
        try:
            if session_id:
                err = ns.nlsock.done(sockfd, status, remote_auth,
                                     session_id=session_id)
            else:
                err = ns.nlsock.done(sockfd, status, remote_auth)
            if err:
                log.error("DONE for fd %d refused by the kernel: %s", sockfd,
                          os.strerror(err))
        except (OSError, TimeoutError, ProtocolError) as e:
            log.error("DONE for fd %d failed: %s", sockfd, e)
        finally:
            os.close(sockfd)

    def shutdown(self) -> None:
        for req in list(self.inflight.values()):
            if req.worker is not None:
                req.worker.inflight.discard(req.req_id)
            self.complete(req, errno.ETIMEDOUT, ())
        for ns in self.namespaces:
            for worker in ns.workers():
                worker.kill()
                worker.reap()
            ns.nlsock.close()
            if ns.nsfd is not None:
                os.close(ns.nsfd)
        if self.control is not None:
            self.control.close()
        if self.template is not None:
            self.template.close()
        log.info("Shut down")
