"""Server PSK lookups through the supervisor (worker/psklookups.py): which
identities are asked for at all, how many per request, which answer a
handshake takes, and how long it waits for it."""

import logging
import threading
import time

import pytest

from tlshd.shared import protocol
from tlshd.worker import psklookups
from tlshd.worker.psklookups import SupervisorLookups

LATER = 60.0  # a deadline that does not pass during a test


def psk(identity, serial=7):
    return protocol.PskMaterial(serial=serial, identity=identity,
                                secret=b"s" * 32)


class Supervisor:
    """A fake supervisor end: records every PSK_LOOKUP and answers at
    once with the key ``keys`` maps the identity to (None if it has
    none), or never if it is ``silent``."""

    def __init__(self, keys=None, silent=False):
        self.keys = keys if keys is not None else {}
        self.silent = silent
        self.asked = []
        self.lookups = SupervisorLookups(self.send)

    def send(self, msg, req_id):
        assert isinstance(msg, protocol.PskLookup)
        self.asked.append((req_id, msg.identity))
        if not self.silent:
            self.lookups.answer(req_id, protocol.PskFound(
                psk=self.keys.get(msg.identity)))

    def lookup(self, req_id=3, within=LATER):
        return self.lookups.for_request(req_id, time.monotonic() + within)


def test_a_key_the_supervisor_finds_is_returned():
    sup = Supervisor({b"id": psk(b"id")})
    assert sup.lookup(req_id=9)(b"id") == psk(b"id")
    assert sup.asked == [(9, b"id")]


def test_not_found_is_none():
    sup = Supervisor()
    assert sup.lookup()(b"id") is None
    assert sup.asked == [(3, b"id")]


def test_an_answer_for_another_identity_is_not_taken():
    """A PSK_FOUND whose key has another identity than the one asked for
    (a confused or hostile answer) is no key for this identity."""
    sup = Supervisor({b"id": psk(b"other")})
    assert sup.lookup()(b"id") is None


@pytest.mark.parametrize("identity", [
    b"",
    b"a\0b",
    b"x" * (protocol.MAX_STR + 1),
], ids=["empty", "NUL", "over MAX_STR"])
def test_identities_no_kernel_key_can_have_are_not_asked_for(identity):
    sup = Supervisor({identity: psk(identity)})
    assert sup.lookup()(identity) is None
    assert sup.asked == []


def test_an_identity_of_max_str_bytes_is_asked_for():
    identity = b"x" * protocol.MAX_STR
    sup = Supervisor({identity: psk(identity)})
    assert sup.lookup()(identity) == psk(identity)


def test_at_most_max_lookups_per_request(caplog):
    """A client offering many identities makes the worker ask the
    supervisor MAX_LOOKUPS times, then no more (with a warning); another
    request has its own count."""
    sup = Supervisor()
    lookup = sup.lookup(req_id=3)
    with caplog.at_level(logging.WARNING, "tlshd.worker.psklookups"):
        for n in range(protocol.MAX_LOOKUPS + 2):
            assert lookup(b"id%d" % n) is None
    assert sup.asked == [(3, b"id%d" % n)
                         for n in range(protocol.MAX_LOOKUPS)]
    assert "offered more than %d" % protocol.MAX_LOOKUPS in caplog.text
    sup.keys[b"last"] = psk(b"last")
    assert lookup(b"last") is None  # still over the limit
    assert sup.lookup(req_id=4)(b"last") == psk(b"last")


def test_refused_identities_do_not_count_against_the_limit():
    sup = Supervisor({b"ok": psk(b"ok")})
    lookup = sup.lookup()
    for _ in range(protocol.MAX_LOOKUPS + 1):
        assert lookup(b"") is None
    assert lookup(b"ok") == psk(b"ok")


def test_a_passed_deadline_does_not_wait():
    """No answer and the deadline already passed: the handshake goes on
    at once without a key rather than waiting."""
    sup = Supervisor(silent=True)
    t0 = time.monotonic()
    assert sup.lookup(within=-5.0)(b"id") is None
    assert time.monotonic() - t0 < 0.5
    assert sup.asked == [(3, b"id")]


def test_no_answer_waits_until_the_deadline_only():
    sup = Supervisor(silent=True)
    t0 = time.monotonic()
    assert sup.lookup(within=0.3)(b"id") is None
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 5


def test_an_answer_from_another_thread_wakes_the_handshake():
    """The channel thread hands PSK_FOUND to the handshake thread that is
    waiting for that request's answer."""
    sup = Supervisor(silent=True)
    got = []
    thread = threading.Thread(
        target=lambda: got.append(sup.lookup(req_id=5)(b"id")))
    thread.start()
    t0 = time.monotonic()
    while not sup.asked and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    sup.lookups.answer(6, protocol.PskFound(psk=psk(b"id", serial=6)))
    sup.lookups.answer(5, protocol.PskFound(psk=psk(b"id", serial=5)))
    thread.join(10)
    assert got == [psk(b"id", serial=5)]


def test_a_late_answer_is_dropped(caplog):
    """An answer arriving after the handshake stopped waiting is logged
    and dropped: nobody waits for that request any more."""
    sup = Supervisor(silent=True)
    assert sup.lookup(req_id=5, within=-1.0)(b"id") is None
    with caplog.at_level(logging.DEBUG, "tlshd.worker.psklookups"):
        sup.lookups.answer(5, protocol.PskFound(psk=psk(b"id")))
    assert "Late PSK answer for request 5" in caplog.text


def test_a_failed_send_leaves_nobody_waiting(caplog):
    """The channel closing under a lookup: the error reaches the
    handshake, and a later answer for that request is dropped."""
    def send(msg, req_id):
        raise OSError("channel gone")

    lookups = SupervisorLookups(send)
    with pytest.raises(OSError):
        lookups.for_request(5, time.monotonic() + LATER)(b"id")
    with caplog.at_level(logging.DEBUG, "tlshd.worker.psklookups"):
        lookups.answer(5, protocol.PskFound(psk=psk(b"id")))
    assert "Late PSK answer" in caplog.text


@pytest.mark.parametrize("other", [b"a", b"idx", b"i"])
def test_no_answer_for_another_identity_is_taken(other):
    sup = Supervisor({b"id": psk(other)})
    assert sup.lookup()(b"id") is None


def test_the_deadline_decides_not_a_late_answer(monkeypatch):
    """An answer the wait did not see in time (it came just as the
    deadline passed, before the lookup gave up) is not used."""
    class LateEvent:
        def set(self):
            pass

        def wait(self, timeout):
            return False

    made = psklookups._Waiting

    def waiting():
        w = made()
        w.event = LateEvent()
        return w
    monkeypatch.setattr(psklookups, "_Waiting", waiting)
    sup = Supervisor({b"id": psk(b"id")})
    assert sup.lookup()(b"id") is None
    assert sup.asked == [(3, b"id")]
