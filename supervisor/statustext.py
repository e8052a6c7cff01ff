"""What ``tlshdctl status`` and ``metrics`` print, from the status rows.

The rows (one dict per served namespace, control.namespace_status) are
also what ``status-json`` sends.  ``status`` begins with one summary
line; with a few namespaces every one follows in full, with many (a
container host) only those that need a look (held, a certificate
warning, a worker starting), at most ATTENTION_LINES of them, and
``status --netns NAME`` shows one in full.
"""

from __future__ import annotations

import datetime
from typing import Any

# Up to this many namespaces, "status" shows each in full.
DETAIL_MAX = 16
# With more, at most this many one-line entries of namespaces that need
# a look.
ATTENTION_LINES = 20

Row = dict[str, Any]


def render_summary(rows: list[Row]) -> str:
    """One line: namespaces, workers, requests in flight, handshakes."""
    running = sum(1 for r in rows if r["worker_ready"])
    starting = sum(1 for r in rows if r.get("worker_starting"))
    held = sum(1 for r in rows if r["held"])
    return ("%d namespace(s) served%s; workers: %d running, %d starting; "
            "%d request(s) in flight; handshakes: %d succeeded, %d failed"
            % (len(rows), " (%d held)" % held if held else "", running,
               starting, sum(r["in_flight"] for r in rows),
               sum(r["succeeded"] for r in rows),
               sum(r["failed"] for r in rows)))


def render_namespace(r: Row) -> list[str]:
    """One namespace in full."""
    out = ["netns %s (inode %s)%s" % (
        r["netns"], r["inode"], "  HELD until a reload" if r["held"] else "")]
    if r["held"]:
        out.append("  held:      %s" % r.get("held_reason", ""))
    out.append("  config:    %s" % r["config"])
    if r.get("source"):
        out.append("  source:    %s" % r["source"])
    if r["worker_pid"]:
        out.append("  worker:    pid %d, %s, up %.0f s, %d restart(s)" % (
            r["worker_pid"], "ready" if r["worker_ready"] else "starting",
            r["worker_uptime"], r["worker_restarts"]))
    else:
        out.append("  worker:    %s (%d restart(s))" % (
            "starting" if r.get("worker_starting") else "none",
            r["worker_restarts"]))
    out.append("  handshakes: %d succeeded, %d failed, %d in flight" % (
        r["succeeded"], r["failed"], r["in_flight"]))
    kinds = r.get("by_certificate") or {}
    if kinds:
        out.append("  server certificates: %s" % ", ".join(
            "%s %d" % (k, n) for k, n in sorted(kinds.items())))
    if r["last_failure"]:
        out.append("  last failure: %s" % r["last_failure"])
    for c in r["certificates"]:
        out.append("  %-18s %s  expires %s%s" % (
            c["role"] + ":", c["subject"] or c["path"],
            c["not_after"] or "?",
            "  ** %s **" % c["warning"] if c["warning"] else ""))
    return out


def _attention(r: Row) -> str | None:
    """Why a namespace needs a look, if it does."""
    why = []
    if r["held"]:
        why.append("HELD: %s" % r.get("held_reason", ""))
    if r.get("worker_starting") or (r["worker_pid"]
                                     and not r["worker_ready"]):
        why.append("worker starting")
    why += ["%s certificate %s" % (c["role"], c["warning"])
            for c in r["certificates"] if c["warning"]]
    return "; ".join(why) if why else None


def render_status(rows: list[Row]) -> str:
    """The summary line, then every namespace in full, or (with more than
    DETAIL_MAX) one line per namespace that needs a look."""
    out = [render_summary(rows)]
    if len(rows) <= DETAIL_MAX:
        for r in rows:
            out += render_namespace(r)
        return "\n".join(out) + "\n"
    flagged = [(r["netns"], why) for r in rows
               if (why := _attention(r)) is not None]
    for label, why in flagged[:ATTENTION_LINES]:
        out.append("netns %s: %s" % (label, why))
    if len(flagged) > ATTENTION_LINES:
        out.append("... and %d more that need a look (tlshdctl status-json)"
                   % (len(flagged) - ATTENTION_LINES))
    out.append("One namespace in full: tlshdctl status --netns NAME")
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
    lines += ["# HELP tlshd_handshakes_by_certificate_total Successful "
              "handshakes, by kind of server certificate.",
              "# TYPE tlshd_handshakes_by_certificate_total counter"]
    lines += ['tlshd_handshakes_by_certificate_total{netns="%s",kind="%s"} '
              '%d' % (_label(r["netns"]), kind, n)
              for r in rows
              for kind, n in sorted((r.get("by_certificate") or {}).items())]
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
