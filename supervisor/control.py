"""The supervisor's control socket: what ``tlshdctl`` reads.

A root-only AF_UNIX stream socket (mode 0600 in a 0700 directory).  A
client sends one command line ("status", "status-netns NAME",
"status-json", "metrics", "reload", "reload-status", or "netns-add" and
"netns-remove" with their JSON, see netnscmd) and reads the answer until
EOF.  The supervisor is single-threaded, so a client gets a
short time to send its line.  What the answers say is built in
statustext from the rows ``status`` makes here.

"reload" does what SIGHUP does and answers at once; new workers then load
the new configuration in the background.  Until each namespace has taken
it up (or failed to), "reload" and "reload-status" answer "pending";
then the report (see ReloadWatch), which tlshdctl polls for.

Certificates named by a namespace's configuration are read here for their
subject and expiry dates only, and kept by path until the file changes
(a thousand namespaces usually share a few files); private keys are never
opened by the supervisor.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tlshd.shared import config
from tlshd.shared.errors import ConfigError
from tlshd.supervisor import netnscmd, paths, statustext
from tlshd.supervisor.namespace import Namespace
from tlshd.supervisor.registry import Registry
from tlshd.supervisor.workers import Worker

log = logging.getLogger(__name__)

DEFAULT_PATH = paths.CONTROL_SOCKET
EXPIRY_WARNING_DAYS = 30
CLIENT_TIMEOUT = 0.5
# A command line: "status-netns " and a name of up to 255 bytes, or a
# registration's JSON.
MAX_COMMAND = 320 + netnscmd.MAX_REQUEST
# Certificate files read, by path; emptied when it grows past this.
CERT_CACHE_MAX = 4096


class Served(Protocol):
    """What the control socket needs from the supervisor (the arbiter)."""

    @property
    def namespaces(self) -> Sequence[Namespace]: ...

    def reload(self) -> list[str]: ...

    def in_flight(self, ns: Namespace) -> int: ...

    def spawning(self, ns: Namespace) -> bool: ...

    @property
    def registry(self) -> Registry: ...

    def scan(self) -> None: ...


@dataclass(frozen=True)
class CertInfo:
    role: str  # "client", "server", "client-ca", ...
    path: str
    subject: str
    not_after: datetime.datetime | None
    error: str = ""

    def days_left(self, now: datetime.datetime) -> float | None:
        if self.not_after is None:
            return None
        return (self.not_after - now).total_seconds() / 86400


_cert_cache: dict[str, tuple[tuple[int, int, int], CertInfo]] = {}


def certificate(role: str, path: str) -> CertInfo:
    """The first certificate of ``path``, read again only if the file
    changed (its inode, size or modification time)."""
    try:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _cert_cache.get(path)
        if cached is not None and cached[0] == stamp:
            return dataclasses.replace(cached[1], role=role)
        # Imported here, not before the daemon listens: a second under
        # emulation (docs/benchmarks.md, Start-up).
        from cryptography import x509

        with open(path, "rb") as f:
            first = x509.load_pem_x509_certificates(f.read())[0]
        info = CertInfo(role, path, first.subject.rfc4514_string(),
                        first.not_valid_after_utc)
    except (OSError, ValueError, IndexError) as e:
        return CertInfo(role, path, "", None, str(e))
    if len(_cert_cache) >= CERT_CACHE_MAX:
        _cert_cache.clear()
    _cert_cache[path] = (stamp, info)
    return info


def certificates(cfg: config.Config) -> list[CertInfo]:
    """The certificates a configuration names (first of each file)."""
    out = []
    for role, rc in (("client", cfg.client), ("server", cfg.server)):
        for what, path in ((role, rc.certificate),
                           (role + "-pq", rc.pq_certificate),
                           (role + "-truststore", rc.truststore)):
            if path:
                out.append(certificate(what, path))
    return out


def warn_expiring(label: str, cfg: config.Config) -> None:
    now = datetime.datetime.now(datetime.UTC)
    for c in certificates(cfg):
        left = c.days_left(now)
        if left is not None and left < EXPIRY_WARNING_DAYS:
            log.warning("netns %s: %s certificate %s (%s) %s", label, c.role,
                        c.path, c.subject,
                        "has expired" if left < 0 else
                        "expires in %.0f days" % left)


class WorkerErrors(logging.Handler):
    """Remembers the last error each namespace's workers logged.

    A worker that cannot load its credentials logs why, then exits with
    EX_CONFIG and its namespace is held: ``status`` and ``reload`` show
    that line as the reason.  Worker records reach the supervisor's log
    through workerlog.WorkerLog.emit as (text, netns label).
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2:
            self.last[str(args[1])] = str(args[0])


WORKER_ERRORS = WorkerErrors()
WORKER_LOGGER = "tlshd.supervisor.workerlog"


def held_reason(ns: Namespace) -> str:
    """Why a held namespace is held, as well as can be told now."""
    try:
        config.load(ns.config_path)
    except ConfigError as e:
        return str(e)
    last = WORKER_ERRORS.last.get(ns.label)
    if last:
        return "its worker could not load the configuration: %s" % last
    return ("configuration error (%s loads now: tlshdctl reload)"
            % ns.config_path)


def namespace_status(ns: Namespace, in_flight: int,
                     spawning: bool = False) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    worker = ns.worker
    certs = []
    for c in certificates(ns.cfg):
        left = c.days_left(now)
        certs.append({
            "role": c.role, "path": c.path, "subject": c.subject,
            "not_after": c.not_after.isoformat() if c.not_after else None,
            "days_left": None if left is None else round(left, 1),
            "warning": (c.error or ("expired" if left is not None and left < 0
                        else "expires soon" if left is not None
                        and left < EXPIRY_WARNING_DAYS else "")),
        })
    return {
        "netns": ns.label,
        "inode": ns.key[1] if ns.key else None,
        "config": ns.config_path,
        "source": ns.source,
        "held": ns.held,
        "held_reason": held_reason(ns) if ns.held else "",
        "worker_pid": worker.pid if worker else None,
        "worker_ready": bool(worker and worker.ready),
        "worker_starting": spawning or bool(worker and not worker.ready),
        "worker_uptime": (round(time.monotonic() - worker.started, 1)
                          if worker else None),
        "worker_restarts": ns.restarts,
        "in_flight": in_flight,
        "succeeded": ns.succeeded,
        "failed": ns.failed,
        "by_certificate": dict(ns.by_certificate),
        "last_failure": ns.last_failure,
        "certificates": certs,
    }


def status(sup: Served) -> list[dict[str, Any]]:
    return [namespace_status(ns, sup.in_flight(ns), sup.spawning(ns))
            for ns in sup.namespaces]


@dataclass(eq=False)
class Watched:
    ns: Namespace
    old: Worker | None  # its worker when the reload began
    restarts: int


class ReloadWatch:
    """One reload asked for over the socket, until each namespace has
    taken up the new configuration or failed to."""

    def __init__(self, sup: Served) -> None:
        self.started = time.monotonic()
        self.finished: float | None = None
        # Only what the new workers log counts as the reason they failed.
        for ns in sup.namespaces:
            WORKER_ERRORS.last.pop(ns.label, None)
        self.watched = [Watched(ns, ns.worker, ns.restarts)
                        for ns in sup.namespaces]
        self.problems = sup.reload()
        # The main configuration did not load: nothing was reloaded.
        self.failed = any(p.startswith("Reload failed")
                          for p in self.problems)

    def _state(self, sup: Served, w: Watched) -> tuple[str, str]:
        """("pending" | "ok" | "problem", what to print)."""
        ns = w.ns
        name = "netns %s" % ns.label
        if ns.removed:
            return "ok", "%s: gone" % name
        if ns.held:
            return "problem", "%s: HELD: %s" % (name, held_reason(ns))
        last = WORKER_ERRORS.last.get(ns.label, "")
        why = ": %s" % last if last else " (see the log)"
        spawning = sup.spawning(ns)
        worker = ns.worker
        if ns.restarts != w.restarts:
            return "problem", ("%s: its new worker failed to start%s"
                               % (name, why))
        if ns.successor is not None or spawning or (
                worker is not None and worker is not w.old
                and not worker.ready) or (
                worker is None and ns.restart_at is not None):
            return "pending", ""
        if worker is not None and worker is w.old:
            return "problem", ("%s: keeps its previous configuration, the "
                               "new worker failed%s" % (name, why))
        if worker is not None:
            return "ok", ("%s: new configuration in use (worker %d)"
                          % (name, worker.pid))
        return "problem", "%s: no worker%s" % (name, why)

    def report(self, sup: Served) -> str:
        if self.failed:
            return "".join("error: %s\n" % p for p in self.problems)
        states = [self._state(sup, w) for w in self.watched]
        if any(state == "pending" for state, _ in states):
            return "pending\n"
        if self.finished is None:
            self.finished = time.monotonic()
        bad = sum(state == "problem" for state, _ in states)
        head = ("reload finished in %.1f s: %d of %d namespace(s) on the "
                "new configuration" % (self.finished - self.started,
                                       len(states) - bad, len(states)))
        if bad:
            head = "error: %s, %d with problems" % (head, bad)
        return "\n".join([head] + [text for _, text in states]) + "\n"


class ControlServer:
    """Listening socket; ``handle`` answers one client synchronously."""

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        if os.path.exists(path):
            os.unlink(path)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.reload_watch: ReloadWatch | None = None
        logging.getLogger(WORKER_LOGGER).addHandler(WORKER_ERRORS)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        logging.getLogger(WORKER_LOGGER).removeHandler(WORKER_ERRORS)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def handle(self, sup: Served) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            try:
                command = receive(conn).decode(errors="replace").strip()
                if command == "reload":
                    log.info("Reload asked for over the control socket")
                    self.reload_watch = ReloadWatch(sup)
                if command in ("reload", "reload-status"):
                    text = (self.reload_watch.report(sup)
                            if self.reload_watch is not None
                            else "error: no reload asked for\n")
                else:
                    text = answer(sup, command)
                conn.sendall(text.encode())
            except OSError as e:
                log.debug("control client: %s", e)


def receive(conn: socket.socket) -> bytes:
    """The client's command: all it sends before it shuts its side down,
    at most MAX_COMMAND bytes (within CLIENT_TIMEOUT each read)."""
    data = b""
    while len(data) <= MAX_COMMAND:
        chunk = conn.recv(MAX_COMMAND + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data[:MAX_COMMAND]


def answer(sup: Served, command: str) -> str:
    verb, _, arg = command.partition(" ")
    if verb == "status-netns":
        return status_of(sup, arg)
    if verb == "netns-add":
        return netnscmd.add(sup.registry, sup.scan,
                            lambda: sup.namespaces, arg)
    if verb == "netns-remove":
        return netnscmd.remove(sup.registry, sup.scan, arg)
    rows = status(sup)
    if command == "status":
        return statustext.render_status(rows)
    if command == "status-json":
        return json.dumps(rows, indent=2) + "\n"
    if command == "metrics":
        return statustext.render_metrics(rows)
    return ("error: unknown command %r (status, status-netns NAME, "
            "status-json, metrics, reload, reload-status, netns-add, "
            "netns-remove)\n" % command[:80])


def status_of(sup: Served, name: str) -> str:
    """One namespace in full: by name, or by inode number."""
    for ns in sup.namespaces:
        if name in (ns.label, str(ns.key[1] if ns.key else None)):
            row = namespace_status(ns, sup.in_flight(ns), sup.spawning(ns))
            return "\n".join(statustext.render_namespace(row)) + "\n"
    return "error: no namespace %r is served (tlshdctl status)\n" % name
