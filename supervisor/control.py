"""The supervisor's control socket: what ``tlshdctl`` reads.

A root-only AF_UNIX stream socket (mode 0600 in a 0700 directory).  A
client sends one command line ("status", "status-json" or "metrics") and
reads the answer until EOF.  The supervisor is single-threaded, so a
client gets a short time to send its line, and answers are small.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509

from tlshd.shared import config

if TYPE_CHECKING:
    from tlshd.supervisor.loop import Namespace, Supervisor

log = logging.getLogger(__name__)

DEFAULT_PATH = "/run/tlshd/control.sock"
EXPIRY_WARNING_DAYS = 30
CLIENT_TIMEOUT = 0.5
MAX_COMMAND = 64


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


def namespace_status(ns: Namespace) -> dict[str, Any]:
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
        "worker_pid": worker.pid if worker else None,
        "worker_ready": bool(worker and worker.ready),
        "worker_uptime": (round(time.monotonic() - worker.started, 1)
                          if worker else None),
        "worker_restarts": ns.restarts,
        "in_flight": sum(1 for r in ns.pending) + (
            len(worker.inflight) if worker else 0),
        "succeeded": ns.succeeded,
        "failed": ns.failed,
        "last_failure": ns.last_failure,
        "certificates": certs,
    }


def status(sup: Supervisor) -> list[dict[str, Any]]:
    return [namespace_status(ns) for ns in sup.namespaces]


def render_status(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        out.append("netns %s (inode %s)%s" % (
            r["netns"], r["inode"], "  HELD: configuration error"
            if r["held"] else ""))
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

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def handle(self, sup: Supervisor) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            try:
                command = conn.recv(MAX_COMMAND).decode(errors="replace")
                conn.sendall(answer(sup, command.strip()).encode())
            except OSError as e:
                log.debug("control client: %s", e)


def answer(sup: Supervisor, command: str) -> str:
    rows = status(sup)
    if command == "status":
        return render_status(rows)
    if command == "status-json":
        return json.dumps(rows, indent=2) + "\n"
    if command == "metrics":
        return render_metrics(rows)
    return "error: unknown command %r (status, status-json, metrics)\n" % (
        command[:MAX_COMMAND])
