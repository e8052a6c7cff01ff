"""The kernel's own record of each handshake: the handshake:* tracepoints.

Events carry ``req=`` (the request's address, reused soon after it is
freed: a submit always starts a new request), the emitting task, and for
the end events a status.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TRACING = Path("/sys/kernel/tracing")
EVENT = re.compile(r"^\s*(.+?)-(\d+)\s+\[\d+\]\s+\S+\s+(\d+\.\d+): "
                   r"(handshake_\w+): .*?req=(\S+)(.*)$")


def enable(buffer_kib: int | None = None) -> None:
    """Turn the handshake events on, on the ``mono`` clock, and clear.

    One clock for every CPU: the default ("local") is per CPU, and merging
    CPUs' events by it can put a request's events out of order (a reused
    request address then looks like a new request before the old one's
    last event).  ``mono`` is also time.monotonic()'s clock.
    """
    (TRACING / "trace_clock").write_text("mono")
    if buffer_kib:
        (TRACING / "buffer_size_kb").write_text(str(buffer_kib))
    (TRACING / "events/handshake/enable").write_text("1")
    clear()


def clear() -> None:
    (TRACING / "trace").write_text("")


@dataclass
class Completion:
    req: str
    status: int
    seconds: float  # handshake_submit -> handshake_complete


class HandshakeTrace:
    """The kernel's own record of each request: handshake:* tracepoints."""

    def __init__(self) -> None:
        enable()

    def clear(self) -> None:
        clear()

    def events(self) -> list[TraceEvent]:
        """Every handshake:* event, with who emitted it."""
        return trace_events()

    def completions(self) -> list[Completion]:
        text = (TRACING / "trace").read_text()
        submitted: dict[str, float] = {}
        out = []
        for line in text.splitlines():
            m = re.search(r"\s(\d+\.\d+): (handshake_\w+): .*?req=(\S+)", line)
            if not m:
                continue
            stamp, event, req = float(m.group(1)), m.group(2), m.group(3)
            if event == "handshake_submit":
                submitted[req] = stamp
            elif event == "handshake_complete":
                st = re.search(r"status=(-?\d+)", line)
                status = int(st.group(1)) if st else -1
                out.append(
                    Completion(req, status, stamp - submitted.get(req, stamp))
                )
        return out


@dataclass
class TraceEvent:
    comm: str
    pid: int
    stamp: float
    event: str
    req: str
    status: int | None
    sk: str = ""


def trace_events() -> list[TraceEvent]:
    """Every handshake:* event in the trace buffer, with who emitted it."""
    out = []
    for line in (TRACING / "trace").read_text().splitlines():
        m = re.match(r"\s*(.+)-(\d+)\s+\[\d+\]\s+\S+\s+(\d+\.\d+): "
                     r"(handshake_\w+): .*?req=(\S+)(.*)", line)
        if not m:
            continue
        st = re.search(r"(?:status|err)=(-?\d+)", m.group(6))
        sk = re.search(r"sk=(\S+)", m.group(6))
        out.append(TraceEvent(m.group(1).strip(), int(m.group(2)),
                              float(m.group(3)), m.group(4), m.group(5),
                              int(st.group(1)) if st else None,
                              sk.group(1) if sk else ""))
    return out


@dataclass
class Req:
    """One request from submit on: when each step happened."""

    req: str
    comm: str = ""
    submit: float | None = None
    accept: float | None = None
    done: float | None = None
    complete: float | None = None
    status: int | None = None


def read_requests() -> list[Req]:
    """Every request submitted since the last clear, in submit order."""
    reqs: dict[str, Req] = {}
    out: list[Req] = []
    for ev in trace_events():
        if ev.event == "handshake_submit":
            # A freed request's address is soon reused: a submit always
            # starts a new request.
            r = reqs[ev.req] = Req(ev.req, comm=ev.comm, submit=ev.stamp)
            out.append(r)
            continue
        r = reqs.get(ev.req)
        if r is None:  # submitted before the trace was cleared
            continue
        if ev.event == "handshake_cmd_accept":
            r.accept = ev.stamp
        elif ev.event == "handshake_cmd_done":
            r.done = ev.stamp
        elif ev.event == "handshake_complete":
            r.complete = ev.stamp
            r.status = -1 if ev.status is None else ev.status
    return out
