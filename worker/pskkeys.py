"""PSK handshakes for kernel requests: the PSKs come from kernel keys.

Client (NVMe host): each PEER_IDENTITY serial is a key whose description
is the PSK identity and whose payload is the secret; keys we cannot read
are skipped (and reported), the others are offered in turn.

Server (NVMe target): the identity the client offers is looked up as a
``psk`` key, by ``keyctl search``, in

1. the keyring of the request (ACCEPT's KEYRING attribute, 6.17 and
   later: the nvmet port's keyring, ``.nvme`` by default), then
2. each keyring the supervisor linked into the daemon's session keyring
   at start-up (``.nvme``, ``.nfs``, ``.nfsd``, ``[authenticate]
   keyrings=``), i.e. what ktls-utils searches through its session keyring,
3. ``.nvme``, ``.nfs``, ``.nfsd`` wherever we possess them: a module
   loaded after tlshd started creates its keyring too late for step 2,
   but the consumer's ACCEPT links it into the supervisor's process
   keyring (also before 6.17, which does not name it in ACCEPT).

Not searched: the supervisor's process keyring (``_pid``), which only
makes the workers *possess* every request's keyring. Searching it would
find the keys other consumers passed, e.g. a host's ``keyring=`` on the
same machine, where the target must not look.

The worker has already entered the consumer's network namespace: ``psk``
keys are tagged with the namespace that created them.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys

from tlshd.shared import keys, protocol, uapi
from tlshd.worker.psk import Psk, PskLookup
from tlshd.worker.tlsengine import Engine
from tlshd.worker.tlsoutcome import Outcome, failed

log = logging.getLogger(__name__)

PROCESS_KEYRING_NAME = "_pid"


def client_psks(peerids: tuple[int, ...]) -> tuple[list[Psk], list[str]]:
    """Read the PSKs to offer; also return why the others were skipped."""
    psks, skipped = [], []
    for serial in peerids:
        try:
            _type, description = keys.describe(serial)
            secret = keys.read(serial)
        except OSError as e:
            skipped.append("key %08x: %s" % (serial & 0xFFFFFFFF,
                                             e.strerror))
            continue
        psks.append(Psk(serial, description.encode(), secret))
    return psks, skipped


def search_keyrings(request_keyring: int) -> list[int]:
    """The keyrings a server PSK lookup searches, in order."""
    rings = [request_keyring] if request_keyring else []
    try:
        raw = keys.read(keys.KEY_SPEC_SESSION_KEYRING)
    except OSError as e:
        log.error("Cannot list the session keyring: %s", e.strerror)
        return rings
    for i in range(0, len(raw) - 3, 4):
        serial = int.from_bytes(raw[i : i + 4], sys.byteorder, signed=True)
        try:
            key_type, description = keys.describe(serial)
        except OSError:
            continue
        if (key_type == "keyring" and description != PROCESS_KEYRING_NAME
                and serial not in rings):
            rings.append(serial)
    for name in keys.WELL_KNOWN_KEYRINGS:
        try:
            serial = keys.search(keys.KEY_SPEC_SESSION_KEYRING, "keyring",
                                 name)
        except OSError:
            continue
        if serial not in rings:
            rings.append(serial)
    return rings


def server_lookup(request_keyring: int,
                  key_type: str = keys.PSK_KEY_TYPE) -> PskLookup:
    """A lookup of offered identities in :func:`search_keyrings`."""
    rings = search_keyrings(request_keyring)

    def lookup(identity: bytes) -> Psk | None:
        if not identity or b"\0" in identity:
            return None
        for ring in rings:
            try:
                serial = keys.search(ring, key_type, identity)
                secret = keys.read(serial)
            except OSError as e:
                if e.errno not in (errno.ENOKEY, errno.EKEYREVOKED,
                                   errno.EKEYEXPIRED):
                    log.error("PSK lookup in keyring %08x: %s",
                              ring & 0xFFFFFFFF, e.strerror)
                continue
            return Psk(serial, identity, secret)
        return None

    return lookup


def psk_handshake(engine: Engine, request: protocol.HandshakeRequest,
                  sock: socket.socket, deadline: float) -> Outcome:
    """Run the PSK handshake a kernel request asks for."""
    if request.msg_type == uapi.MsgType.CLIENTHELLO:
        psks, skipped = client_psks(request.peerids)
        for why in skipped:
            log.error("Cannot use PSK %s", why)
        if not psks:
            return failed(errno.ENOKEY, "no usable PSK among %d offered"
                          % len(request.peerids))
        for psk in psks:
            log.info("Using PSK identity %s", psk.identity.decode(
                "ascii", "backslashreplace"))
        return engine.client_psk_handshake(sock, psks=psks,
                                           deadline=deadline)
    if request.msg_type == uapi.MsgType.SERVERHELLO:
        lookup = server_lookup(request.keyring)
        return engine.server_psk_handshake(sock, lookup=lookup,
                                           deadline=deadline)
    return failed(errno.EIO, "unknown message type %d" % request.msg_type)
