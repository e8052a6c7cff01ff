"""The channel decoders' rules, one table row per rule.

Every row is a message body built by hand (the encoders refuse most of
these) and the ProtocolError it must raise, next to the smallest change
that makes it valid: a decoder that lost a check fails its row, and one
that checks too much fails the valid twin.  The fuzzer
(test_fuzz_decoders.py) only checks that what decodes re-encodes the
same, which a missing check does not break.
"""

import struct

import pytest

from tlshd.shared import protocol
from tlshd.shared.errors import ProtocolError

MAX_STR = protocol.MAX_STR
MAX_SECRET = protocol.MAX_SECRET
MAX_LIST = protocol.MAX_LIST
MAX_REASON = protocol.MAX_REASON


def u8(v):
    return struct.pack("!B", v)


def u32(v):
    return struct.pack("!I", v)


def u64(v):
    return struct.pack("!Q", v)


def text(s):
    if s is None:
        return struct.pack("!H", 0xFFFF)
    raw = s if isinstance(s, bytes) else s.encode()
    return struct.pack("!H", len(raw)) + raw


NONE_TEXT = struct.pack("!H", 0xFFFF)


def blob(b):
    return u32(len(b)) + b


def psk(serial=7, identity=b"id", secret=b"k" * 32):
    return u32(serial) + blob(identity) + blob(secret)


def request(*, psks=(), cert=b"", key=b"", flags=0, key_update=0,
            session_id=0, peername="srv", npsks=None):
    return (u32(1) + u32(3) + u32(15000) + text(peername)
            + u8(len(psks) if npsks is None else npsks) + b"".join(psks)
            + blob(cert) + blob(key) + u8(flags) + u32(key_update)
            + u32(session_id))


def answer(status=0, remote_auth=(), reason="", session_id=0,
           nids=None, cert_kind=0, resumed=0):
    return (u32(status) + u8(len(remote_auth) if nids is None else nids)
            + b"".join(u32(v) for v in remote_auth)
            + (reason if isinstance(reason, bytes) else text(reason))
            + u32(session_id) + u8(cert_kind) + u8(resumed))


def frame(mtype, body, *, magic=protocol.MAGIC,
          version=protocol.PROTOCOL_VERSION, length=None, req_id=42):
    return protocol.HEADER.pack(magic, version, mtype,
                                len(body) if length is None else length,
                                req_id) + body


REQ, ANS = protocol.Msg.HANDSHAKE_REQ, protocol.Msg.HANDSHAKE_ANS
LOOKUP, FOUND = protocol.Msg.PSK_LOOKUP, protocol.Msg.PSK_FOUND
LOG, HELLO = protocol.Msg.LOG, protocol.Msg.HELLO
SPAWN_REQ, SPAWN_ANS = protocol.Msg.SPAWN_REQ, protocol.Msg.SPAWN_ANS
HELLO_BODY = u32(5) + u32(998) + u32(998) + u64(0) + u8(1) + u8(2)

# (name, type, body, nfds): each must be refused.
REFUSED = [
    # PSK material (a client's offered PSKs, a lookup's answer)
    ("psk: serial 0", REQ, request(psks=[psk(serial=0)]), 1),
    ("psk: empty identity", REQ, request(psks=[psk(identity=b"")]), 1),
    ("psk: empty secret", REQ, request(psks=[psk(secret=b"")]), 1),
    ("psk: secret over MAX_SECRET", REQ,
     request(psks=[psk(secret=b"k" * (MAX_SECRET + 1))]), 1),
    ("psk: identity over MAX_STR", REQ,
     request(psks=[psk(identity=b"i" * (MAX_STR + 1))]), 1),
    ("found: empty secret", FOUND, u8(1) + psk(secret=b""), 0),
    ("found: serial 0", FOUND, u8(1) + psk(serial=0), 0),
    ("found: flag 2", FOUND, u8(2) + psk(), 0),
    ("found: flag 0 with a key after it", FOUND, u8(0) + psk(), 0),
    # the handshake request
    ("request: more PSKs than MAX_LIST", REQ,
     request(psks=[psk()] * (MAX_LIST + 1)), 1),
    ("request: PSK count says more than there are", REQ,
     request(psks=[psk()], npsks=2), 1),
    ("request: certificate without its key", REQ,
     request(cert=b"\x30" * 10), 1),
    ("request: key without its certificate", REQ,
     request(key=b"\x30" * 10), 1),
    ("request: unknown flag", REQ, request(flags=2), 1),
    ("request: key update type 4", REQ,
     request(key_update=4, session_id=1), 1),
    ("request: key update without a session", REQ,
     request(key_update=1), 1),
    ("request: peer name over MAX_STR", REQ,
     request(peername="p" * (MAX_STR + 1)), 1),
    ("request: peer name not UTF-8", REQ, request(peername=b"\xff"), 1),
    ("request: trailing byte", REQ, request() + b"\0", 1),
    ("request: truncated", REQ, request()[:-1], 1),
    ("request: no fd", REQ, request(), 0),
    ("request: two fds", REQ, request(), 2),
    # a server's PSK lookup
    ("lookup: NUL in the identity", LOOKUP, blob(b"host\0subsys"), 0),
    ("lookup: NUL at the end", LOOKUP, blob(b"host\0"), 0),
    ("lookup: empty identity", LOOKUP, blob(b""), 0),
    ("lookup: identity over MAX_STR", LOOKUP, blob(b"i" * (MAX_STR + 1)),
     0),
    ("lookup: with an fd", LOOKUP, blob(b"id"), 1),
    # the answer
    ("answer: status over MAX_ERRNO", ANS, answer(status=4096), 0),
    ("answer: certificate kind 3", ANS, answer(cert_kind=3), 0),
    ("answer: session reuse flag 2", ANS, answer(resumed=2), 0),
    ("answer: session reuse in a failure", ANS,
     answer(status=13, resumed=1), 0),
    ("answer: certificate kind in a failure", ANS,
     answer(status=13, cert_kind=1), 0),
    ("answer: no reason (None)", ANS, answer(reason=NONE_TEXT), 0),
    ("answer: reason over MAX_REASON", ANS,
     answer(status=13, reason="r" * (MAX_REASON + 1)), 0),
    ("answer: session id in a failure", ANS,
     answer(status=13, session_id=5), 0),
    ("answer: more ids than MAX_LIST", ANS,
     answer(remote_auth=[1] * (MAX_LIST + 1)), 0),
    ("answer: id count says more than there are", ANS,
     answer(remote_auth=[1], nids=2), 0),
    # log, hello, spawn
    ("log: level 0", LOG, u8(0) + text("x"), 0),
    ("log: level 60", LOG, u8(60) + text("x"), 0),
    ("log: level 11", LOG, u8(11) + text("x"), 0),
    ("log: no text", LOG, u8(20) + NONE_TEXT, 0),
    ("hello: trailing byte", HELLO, HELLO_BODY + b"\0", 0),
    ("hello: truncated", HELLO, HELLO_BODY[:-1], 0),
    ("spawn: no label", SPAWN_REQ,
     NONE_TEXT + text("/c") + u32(1) + u32(1) + u8(0), 2),
    ("spawn: no config path", SPAWN_REQ,
     text("ns") + NONE_TEXT + u32(1) + u32(1) + u8(0), 2),
    ("spawn: debug 2", SPAWN_REQ,
     text("ns") + text("/c") + u32(1) + u32(1) + u8(2), 2),
    ("spawn: one fd", SPAWN_REQ,
     text("ns") + text("/c") + u32(1) + u32(1) + u8(0), 1),
    ("spawn answer: pid 0", SPAWN_ANS, u32(0), 0),
]

# The valid twins: the same bodies at the limit, which must decode.
ACCEPTED = [
    ("psk: secret of MAX_SECRET", REQ,
     request(psks=[psk(secret=b"k" * MAX_SECRET)]), 1),
    ("psk: identity of MAX_STR", REQ,
     request(psks=[psk(identity=b"i" * MAX_STR)]), 1),
    ("psk: one-byte identity and secret", REQ,
     request(psks=[psk(serial=1, identity=b"i", secret=b"k")]), 1),
    ("request: MAX_LIST PSKs", REQ, request(psks=[psk()] * MAX_LIST), 1),
    ("request: certificate with its key", REQ,
     request(cert=b"\x30", key=b"\x30"), 1),
    ("request: keep-secrets flag", REQ, request(flags=1), 1),
    ("request: key update type 3", REQ,
     request(key_update=3, session_id=1), 1),
    ("request: peer name of MAX_STR", REQ,
     request(peername="p" * MAX_STR), 1),
    ("request: no peer name", REQ, request(peername=None), 1),
    ("found: not found", FOUND, u8(0), 0),
    ("found: a key", FOUND, u8(1) + psk(), 0),
    ("lookup: identity of MAX_STR", LOOKUP, blob(b"i" * MAX_STR), 0),
    ("lookup: one byte", LOOKUP, blob(b"\xff"), 0),
    ("answer: status 4095", ANS, answer(status=4095), 0),
    ("answer: reason of MAX_REASON", ANS,
     answer(status=13, reason="r" * MAX_REASON), 0),
    ("answer: MAX_LIST ids", ANS, answer(remote_auth=[1] * MAX_LIST), 0),
    ("answer: session id in a success", ANS, answer(session_id=5), 0),
    ("answer: an ML-DSA certificate", ANS, answer(cert_kind=2), 0),
    ("answer: a reused session", ANS, answer(resumed=1), 0),
    ("log: level 10", LOG, u8(10) + text("x"), 0),
    ("log: level 50", LOG, u8(50) + text("x"), 0),
    ("hello", HELLO, HELLO_BODY, 0),
    ("spawn: debug 1", SPAWN_REQ,
     text("ns") + text("/c") + u32(1) + u32(1) + u8(1), 2),
    ("spawn answer: pid 1", SPAWN_ANS, u32(1), 0),
]


@pytest.mark.parametrize("mtype,body,nfds", [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_refused(mtype, body, nfds):
    with pytest.raises(ProtocolError):
        protocol.decode(frame(mtype, body), nfds)




@pytest.mark.parametrize("mtype,body,nfds", [r[1:] for r in ACCEPTED],
                         ids=[r[0] for r in ACCEPTED])
def test_accepted_and_reencoded(mtype, body, nfds):
    """The limit itself is allowed, and decoding keeps every field."""
    msg, req_id = protocol.decode(frame(mtype, body), nfds)
    assert req_id == 42
    assert msg.TYPE == mtype
    assert msg.encode() == body


def test_request_fields_survive_decoding():
    body = request(psks=[psk(serial=9, identity=b"a", secret=b"s")],
                   cert=b"C", key=b"K", flags=1, key_update=2,
                   session_id=77, peername="srv.example")
    msg, _ = protocol.decode(frame(REQ, body), 1)
    assert msg == protocol.HandshakeRequest(
        msg_type=1, auth_mode=3, timeout_ms=15000, peername="srv.example",
        psks=(protocol.PskMaterial(serial=9, identity=b"a", secret=b"s"),),
        x509_cert=b"C", x509_key=b"K", keep_secrets=True, key_update=2,
        session_id=77)


@pytest.mark.parametrize("name,data,nfds", [
    ("shorter than the header", frame(SPAWN_ANS, u32(1))[:15], 0),
    ("bad magic", frame(SPAWN_ANS, u32(1), magic=0x544D), 0),
    ("old version", frame(SPAWN_ANS, u32(1),
                          version=protocol.PROTOCOL_VERSION - 1), 0),
    ("newer version", frame(SPAWN_ANS, u32(1),
                            version=protocol.PROTOCOL_VERSION + 1), 0),
    ("length one short", frame(SPAWN_ANS, u32(1), length=3), 0),
    ("length one long", frame(SPAWN_ANS, u32(1), length=5), 0),
    ("unknown type 4", frame(4, u32(1)), 0),
    ("unknown type 12", frame(12, u32(1)), 0),
    ("over MAX_MSG", frame(LOG, u8(20) + text("x")) + b"\0"
     * protocol.MAX_MSG, 0),
])
def test_frame_refused(name, data, nfds):
    with pytest.raises(ProtocolError):
        protocol.decode(data, nfds)


def test_frame_of_max_msg_is_read():
    """A frame of exactly MAX_MSG bytes is allowed (the limit is
    inclusive on both sides of the channel)."""
    head = protocol.HEADER.size
    cert = b"\x30" * (protocol.MAX_MSG - head - len(request()) - 2)
    body = request(cert=cert[: len(cert) // 2],
                   key=cert[len(cert) // 2 :] + b"\x30\x30")
    data = frame(REQ, body)
    assert len(data) == protocol.MAX_MSG
    msg, _ = protocol.decode(data, 1)
    assert protocol.encode(msg, 42) == data
    with pytest.raises(ValueError):
        protocol.encode(protocol.HandshakeRequest(
            msg_type=1, auth_mode=3, timeout_ms=15000, peername="srv",
            x509_cert=msg.x509_cert + b"\x30", x509_key=msg.x509_key), 42)


@pytest.mark.parametrize("msg", [
    protocol.HandshakeRequest(msg_type=1, auth_mode=3, timeout_ms=1,
                              peername="p" * (MAX_STR + 1)),
    protocol.HandshakeRequest(msg_type=1, auth_mode=3, timeout_ms=1,
                              peername=None, psks=(protocol.PskMaterial(
                                  serial=1, identity=b"i",
                                  secret=b"k" * (MAX_SECRET + 1)),)),
    protocol.HandshakeRequest(msg_type=1, auth_mode=3, timeout_ms=1,
                              peername=None, psks=(protocol.PskMaterial(
                                  serial=1, identity=b"i",
                                  secret=b"k"),) * (MAX_LIST + 1)),
    protocol.HandshakeAnswer(status=0, remote_auth=(1,) * (MAX_LIST + 1)),
    protocol.PskLookup(identity=b"i" * (MAX_STR + 1)),
])
def test_encoder_refuses_what_does_not_fit(msg):
    with pytest.raises(ValueError):
        protocol.encode(msg)


def test_encoder_cuts_long_reason_and_log_text():
    """A worker's long failure reason or log line is cut, not refused:
    the request still gets its DONE."""
    ans = protocol.HandshakeAnswer(status=13, remote_auth=(),
                                   reason="r" * (MAX_REASON + 10))
    got, _ = protocol.decode(protocol.encode(ans), 0)
    assert got.reason == "r" * MAX_REASON
    rec = protocol.LogRecord(level=20, text="t" * (MAX_STR + 10))
    got, _ = protocol.decode(protocol.encode(rec), 0)
    assert got.text == "t" * MAX_STR


def test_messages_are_immutable_and_default_to_no_extras():
    """A decoded message is a value: nothing can change it on its way
    from the decoder to the check that uses it."""
    import dataclasses
    req = protocol.HandshakeRequest(msg_type=1, auth_mode=3, timeout_ms=1,
                                    peername=None)
    assert (req.keep_secrets, req.key_update, req.session_id) == (False,
                                                                  0, 0)
    assert (req.psks, req.x509_cert, req.x509_key) == ((), b"", b"")
    msgs = [req, protocol.PskMaterial(serial=1, identity=b"i", secret=b"k"),
            protocol.PskLookup(identity=b"i"), protocol.PskFound(psk=None),
            protocol.HandshakeAnswer(status=0, remote_auth=()),
            protocol.Hello(pid=1, uid=1, gid=1, cap_eff=0, no_new_privs=1,
                           seccomp=2),
            protocol.LogRecord(level=20, text="t"),
            protocol.SpawnRequest(label="l", config_path="/c", uid=1, gid=1,
                                  debug=0),
            protocol.SpawnAnswer(pid=1)]
    for msg in msgs:
        name = dataclasses.fields(msg)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, name, None)


def test_wire_limits_are_pinned():
    """The limits are part of the wire format: during an upgrade a
    running supervisor execs workers of the new build, and a limit
    changed without bumping PROTOCOL_VERSION would make one end refuse
    what the other sends.  Change these only with PROTOCOL_VERSION."""
    assert protocol.PROTOCOL_VERSION == 6
    assert {name: getattr(protocol, name) for name in (
        "MAX_MSG", "MAX_STR", "MAX_LIST", "MAX_SECRET", "MAX_REASON",
        "MAX_LOOKUPS")} == {
        "MAX_MSG": 65536, "MAX_STR": 4096, "MAX_LIST": 16,
        "MAX_SECRET": 64, "MAX_REASON": 512, "MAX_LOOKUPS": 8}


def test_length_errors_name_the_limit():
    """A hostile worker's over-long field is refused with a one-line
    reason for the supervisor's log, naming the limit."""
    from tlshd.shared.msgcodec import Reader
    with pytest.raises(ProtocolError) as err:
        Reader(struct.pack("!H", MAX_STR + 1)).text()
    assert str(err.value) == "string longer than %d bytes" % MAX_STR
    with pytest.raises(ProtocolError) as err:
        Reader(u8(MAX_LIST + 1)).u32_list()
    assert str(err.value) == "list longer than %d items" % MAX_LIST
    with pytest.raises(ProtocolError) as err:
        Reader(u32(MAX_SECRET + 1)).blob(MAX_SECRET)
    assert str(err.value) == "%d bytes, at most %d allowed" % (
        MAX_SECRET + 1, MAX_SECRET)


def test_secrets_stay_out_of_reprs():
    """A message in a log line or a traceback must not show a private
    key or a PSK secret."""
    msg = protocol.HandshakeRequest(
        msg_type=1, auth_mode=3, timeout_ms=1, peername=None,
        psks=(protocol.PskMaterial(serial=1, identity=b"id",
                                   secret=b"PSKSECRET"),),
        x509_cert=b"CERTIFICATE", x509_key=b"PRIVATEKEY")
    shown = repr(msg) + repr(protocol.PskFound(psk=msg.psks[0]))
    assert "PSKSECRET" not in shown
    assert "PRIVATEKEY" not in shown
    assert "CERTIFICATE" in shown and "id" in shown


@pytest.mark.parametrize("name,mtype,body,nfds,why", [
    ("status over MAX_ERRNO", ANS, answer(status=4096), 0,
     "status 4096 is not an errno"),
    ("unknown flags", REQ, request(flags=6), 1,
     "unknown request flags 0x6"),
    ("key update type", REQ, request(key_update=9, session_id=1), 1,
     "key update type 9 unknown"),
    ("PSK_FOUND flag", FOUND, u8(3) + psk(), 0, "bad PSK_FOUND flag 3"),
])
def test_refusals_say_why_in_one_line(name, mtype, body, nfds, why):
    """The reason a hostile worker's message is refused goes to the
    supervisor's log: one short line, whatever number the worker sent."""
    with pytest.raises(ProtocolError) as err:
        protocol.decode(frame(mtype, body), nfds)
    assert str(err.value) == why


@pytest.mark.parametrize("debug", [0, 1])
def test_spawn_request_debug_is_zero_or_one(debug):
    msg = protocol.SpawnRequest(label="n", config_path="/c", uid=1, gid=2,
                                debug=debug)
    assert protocol.decode(protocol.encode(msg, 3), 2) == (msg, 3)
    with pytest.raises(ProtocolError, match="bad spawn request"):
        protocol.decode(frame(SPAWN_REQ, text("n") + text("/c") + u32(1)
                              + u32(2) + u8(2)), 2)


@pytest.mark.parametrize("level", [10, 20, 30, 40, 50])
def test_every_logging_level_passes(level):
    """A worker's log records keep their level: DEBUG to CRITICAL."""
    msg = protocol.LogRecord(level=level, text="t")
    assert protocol.decode(protocol.encode(msg), 0) == (msg, 0)
    with pytest.raises(ProtocolError):
        protocol.decode(frame(LOG, u8(level + 1) + text("t")), 0)


def test_no_id_is_the_uid_no_account_can_have():
    """A SpawnRequest's "keep the template's uid and gid" must be a value
    no worker user can have, or a worker meant to drop to that user
    would keep root: (uid_t) -1, which the kernel reserves (setresuid
    reads it as "unchanged")."""
    assert protocol.NO_ID == 2 ** 32 - 1
