"""PSK keys for kernel requests: the supervisor reads them, not the worker.

A worker possesses no kernel keys (see tlshd.supervisor.keymaterial):

- client (NVMe host): the request carries the PSKs of its PEER_IDENTITY
  serials, read by the supervisor; they are offered in turn;
- server (NVMe target): the worker parses the ClientHello and asks the
  supervisor for each offered identity (PSK_LOOKUP, at most
  ``protocol.MAX_LOOKUPS`` per request); the supervisor searches the
  keyrings this worker's namespace may use (scoped by the supervisor:
  ``.nvme`` is global) and answers with that one key or none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tlshd.shared import protocol
from tlshd.shared.protocol import PskMaterial
from tlshd.worker.pskhandshake import FindPsk, printable

log = logging.getLogger(__name__)

Send = Callable[[protocol.Message, int], None]


class _Waiting:
    """One handshake thread waiting for the supervisor's PSK_FOUND."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.answer: protocol.PskFound | None = None


class SupervisorLookups:
    """Server PSK lookups through the supervisor, by request id.

    Handshake threads send PSK_LOOKUP and wait; the thread reading the
    channel hands each PSK_FOUND to the thread waiting for it.  One lookup
    per request at a time: a request's lookups run in its one thread.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiting] = {}

    def for_request(self, req_id: int, deadline: float) -> FindPsk:
        """The lookup function of one server handshake."""
        asked = 0

        def lookup(identity: bytes) -> PskMaterial | None:
            nonlocal asked
            if (not identity or b"\0" in identity
                    or len(identity) > protocol.MAX_STR):
                return None  # no kernel key can have this description
            if asked >= protocol.MAX_LOOKUPS:
                log.warning("Not looking up PSK identity '%s': the client "
                            "offered more than %d", printable(identity),
                            protocol.MAX_LOOKUPS)
                return None
            asked += 1
            return self._ask(req_id, identity, deadline)

        return lookup

    def _ask(self, req_id: int, identity: bytes,
             deadline: float) -> PskMaterial | None:
        waiting = _Waiting()
        with self._lock:
            self._waiting[req_id] = waiting
        try:
            self._send(protocol.PskLookup(identity=identity), req_id)
            answered = waiting.event.wait(max(0.0,
                                              deadline - time.monotonic()))
        finally:
            with self._lock:
                del self._waiting[req_id]
        found = waiting.answer.psk if answered and waiting.answer else None
        if found is None or found.identity != identity:
            return None
        return found

    def answer(self, req_id: int, found: protocol.PskFound) -> None:
        """Hand the supervisor's answer to the thread that asked."""
        with self._lock:
            waiting = self._waiting.get(req_id)
        if waiting is None:
            # That handshake's deadline passed while the supervisor looked.
            log.debug("Late PSK answer for request %d", req_id)
            return
        waiting.answer = found
        waiting.event.set()
