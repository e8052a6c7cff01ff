"""The supervisor's control socket: what ``tlshdctl`` reads.

A root-only AF_UNIX stream socket (mode 0600 in a 0700 directory).  A
client sends one command line ("status", "status-json", "metrics",
"reload" or "reload-status") and reads the answer until EOF.  The
supervisor is single-threaded, so a client gets a short time to send its
line, and answers are small.

"reload" does what SIGHUP does and answers at once; new workers then load
the new configuration in the background.  Until each namespace has taken
it up (or failed to), "reload" and "reload-status" answer "pending";
then the report (see ReloadWatch), which tlshdctl polls for.

Certificates named by a namespace's configuration are read here for their
subject and expiry dates only; private keys are never opened by the
supervisor.
"""

from __future__ import annotations

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
from tlshd.supervisor.namespaces import Namespace
from tlshd.supervisor.workers import Worker

log = logging.getLogger(__name__)

DEFAULT_PATH = "/run/tlshd/control.sock"
EXPIRY_WARNING_DAYS = 30
CLIENT_TIMEOUT = 0.5
MAX_COMMAND = 64


class Served(Protocol):
    """What the control socket needs from the supervisor (the arbiter)."""

    @property
    def namespaces(self) -> Sequence[Namespace]: ...

    def reload(self) -> list[str]: ...

    def in_flight(self, ns: Namespace) -> int: ...

    def spawning(self, ns: Namespace) -> bool: ...


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


def certificates(cfg: config.Config) -> list[CertInfo]:
    """The certificates a configuration names (first of each file)."""
    # Imported here, not before the daemon listens: a second under
    # emulation (docs/benchmarks.md, Start-up).
    from cryptography import x509

    out = []
    for role, rc in (("client", cfg.client), ("server", cfg.server)):
        for what, path in ((role, rc.certificate),
                           (role + "-truststore", rc.truststore)):
            if not path:
                continue
            try:
                with open(path, "rb") as f:
                    certs = x509.load_pem_x509_certificates(f.read())
                first = certs[0]
                out.append(CertInfo(what, path, first.subject.rfc4514_string(),
                                    first.not_valid_after_utc))
            except (OSError, ValueError, IndexError) as e:
                out.append(CertInfo(what, path, "", None, str(e)))
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


def namespace_status(ns: Namespace, in_flight: int) -> dict[str, Any]:
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
        "held": ns.held,
        "held_reason": held_reason(ns) if ns.held else "",
        "worker_pid": worker.pid if worker else None,
        "worker_ready": bool(worker and worker.ready),
        "worker_uptime": (round(time.monotonic() - worker.started, 1)
                          if worker else None),
        "worker_restarts": ns.restarts,
        "in_flight": in_flight,
        "succeeded": ns.succeeded,
        "failed": ns.failed,
        "last_failure": ns.last_failure,
        "certificates": certs,
    }


def status(sup: Served) -> list[dict[str, Any]]:
    return [namespace_status(ns, sup.in_flight(ns)) for ns in sup.namespaces]


def render_status(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        out.append("netns %s (inode %s)%s" % (
            r["netns"], r["inode"], "  HELD until a reload"
            if r["held"] else ""))
        if r["held"]:
            out.append("  held:      %s" % r.get("held_reason", ""))
        out.append("  config:    %s" % r["config"])
        if r["worker_pid"]:
            out.append("  worker:    pid %d, %s, up %.0f s, %d restart(s)" % (
                r["worker_pid"], "ready" if r["worker_ready"] else "starting",
                r["worker_uptime"], r["worker_restarts"]))
        else:
            out.append("  worker:    none (%d restart(s))"
                       % r["worker_restarts"])
        out.append("  handshakes: %d succeeded, %d failed, %d in flight" % (
            r["succeeded"], r["failed"], r["in_flight"]))
        if r["last_failure"]:
            out.append("  last failure: %s" % r["last_failure"])
        for c in r["certificates"]:
            out.append("  %-18s %s  expires %s%s" % (
                c["role"] + ":", c["subject"] or c["path"],
                c["not_after"] or "?",
                "  ** %s **" % c["warning"] if c["warning"] else ""))
    return "\n".join(out) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render_metrics(rows: list[dict[str, Any]]) -> str:
    """Prometheus text exposition format."""
    lines = [
        "# HELP tlshd_handshakes_total Handshakes answered, by result.",
        "# TYPE tlshd_handshakes_total counter",
    ]
    for r in rows:
        ns = _label(r["netns"])
        lines.append('tlshd_handshakes_total{netns="%s",result="success"} %d'
                     % (ns, r["succeeded"]))
        lines.append('tlshd_handshakes_total{netns="%s",result="failure"} %d'
                     % (ns, r["failed"]))
    lines += ["# HELP tlshd_handshakes_in_flight Requests not yet answered.",
              "# TYPE tlshd_handshakes_in_flight gauge"]
    lines += ['tlshd_handshakes_in_flight{netns="%s"} %d'
              % (_label(r["netns"]), r["in_flight"]) for r in rows]
    lines += ["# HELP tlshd_worker_up 1 if the namespace's worker is ready.",
              "# TYPE tlshd_worker_up gauge"]
    lines += ['tlshd_worker_up{netns="%s"} %d'
              % (_label(r["netns"]), 1 if r["worker_ready"] else 0)
              for r in rows]
    lines += ["# HELP tlshd_worker_restarts_total Worker deaths.",
              "# TYPE tlshd_worker_restarts_total counter"]
    lines += ['tlshd_worker_restarts_total{netns="%s"} %d'
              % (_label(r["netns"]), r["worker_restarts"]) for r in rows]
    lines += ["# HELP tlshd_certificate_expiry_timestamp_seconds "
              "When a configured certificate expires (Unix time).",
              "# TYPE tlshd_certificate_expiry_timestamp_seconds gauge"]
    for r in rows:
        for c in r["certificates"]:
            if c["not_after"]:
                ts = datetime.datetime.fromisoformat(c["not_after"])
                lines.append(
                    'tlshd_certificate_expiry_timestamp_seconds{netns="%s",'
                    'role="%s",subject="%s"} %d'
                    % (_label(r["netns"]), _label(c["role"]),
                       _label(c["subject"]), int(ts.timestamp())))
    return "\n".join(lines) + "\n"


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
                command = conn.recv(MAX_COMMAND).decode(
                    errors="replace").strip()
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


def answer(sup: Served, command: str) -> str:
    rows = status(sup)
    if command == "status":
        return render_status(rows)
    if command == "status-json":
        return json.dumps(rows, indent=2) + "\n"
    if command == "metrics":
        return render_metrics(rows)
    return ("error: unknown command %r (status, status-json, metrics, "
            "reload, reload-status)\n" % command[:MAX_COMMAND])
