"""Handshakes must not open files or import modules.

The worker builds its Engine, then locks itself down (seccomp, no
filesystem); a lazy import or file open inside a handshake would kill it.
Python's audit hooks see every Python-level open and every real import
(a module not yet in sys.modules), from any thread.
"""

from __future__ import annotations

import datetime
import socket
import sys
import threading
import time
from typing import Any

from tlshd.worker.tlsengine import Engine

DAY = datetime.timedelta(days=1)
_recording = threading.Event()
_events: list[tuple[str, str]] = []


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _recording.is_set() and event in ("open", "import"):
        _events.append((event, repr(args[0])[:120]))


sys.addaudithook(_hook)  # cannot be removed; it only records while set


def test_handshakes_neither_open_files_nor_import(
    engine: Engine, pki: Any, run_pair: Any
) -> None:
    der_server = pki.pki.leaf("sandbox-der", dns=("localhost",))
    expired = pki.pki.leaf(
        "sandbox-expired", not_before=-2 * DAY, not_after=-DAY
    )
    bad_engine = Engine(
        pki.client_settings(),
        pki.settings(
            certificate=str(expired.cert), private_key=str(expired.key)
        ),
    )
    _recording.set()
    try:
        outcomes = [
            run_pair(engine, engine, use_certificate=True),
            run_pair(engine, engine, peername="bücher.example"),
            run_pair(
                engine,
                engine,
                peername="127.0.0.1",
                use_certificate=True,
                x509=pki.client.der_pair,
                server_kw={"x509": der_server.der_pair},
            ),
            run_pair(bad_engine, bad_engine),
        ]
        a, b = socket.socketpair()
        with a, b:
            b.close()
            outcomes.append(
                engine.server_handshake(
                    a, x509=None, deadline=time.monotonic() + 5
                )
            )
    finally:
        _recording.clear()
    assert _events == []
    statuses = [getattr(o, "client", o).status for o in outcomes]
    assert statuses[0] == 0 and statuses[2] == 0
    assert all(s != 0 for s in (statuses[1], statuses[3], statuses[4]))
