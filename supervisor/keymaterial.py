"""Kernel key material for one request, read by the supervisor.

Workers possess no kernel keys at all (they join an empty session keyring
and their seccomp filter forbids keyctl), so that one namespace's worker
cannot read another namespace's keys, whatever their permissions say.  The
supervisor reads what a request needs and passes the bytes on the channel:

- x.509 by key serial (the CERTIFICATE nest): the DER certificate and
  private key;
- client PSKs (NVMe host): each PEER_IDENTITY serial is a key whose
  description is the PSK identity and whose payload is the secret; keys we
  cannot read are skipped (and reported);
- server PSKs (NVMe target): the worker parses the ClientHello (the
  supervisor never touches peer data) and asks for each offered identity
  (PSK_LOOKUP); :func:`find_psk` searches the keyrings the request's
  namespace may use (below).

``.nvme``, ``.nfs`` and ``.nfsd`` are global: one keyring for every
namespace, and a search finds a ``psk`` key whatever namespace created it
(measured on 6.12 and 7.3: from namespace a, a search of ``.nvme`` finds
b's key).  And the supervisor possesses every consumer's keyring (the
kernel links each into its process keyring at ACCEPT) besides the global
ones.  So what a request may draw on is scoped by us, by its namespace:

- the initial namespace uses what ktls-utils does: a server PSK lookup
  searches :func:`search_keyrings`, and key serials the request names
  are read with everything the supervisor possesses;
- any other namespace uses only keyrings that are its own
  (:func:`namespace_keyrings`): the request's keyring unless it is a
  global one, and the keyrings its own configuration names
  (``[authenticate] keyrings=``; listing ``.nvme`` there is how an
  administrator shares it with that namespace).  A server PSK lookup
  searches only those, and a key serial the request names (x.509
  certificate and key, client PSKs) is read only if it is linked directly
  in one of them; any other serial is refused with EACCES, as the kernel
  refuses a key its caller can see but does not possess.

So a compromised worker, or a consumer in another namespace naming
serials, obtains only its namespace's keys.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tlshd.shared import keys, protocol

log = logging.getLogger(__name__)

PROCESS_KEYRING_NAME = b"_pid"
GLOBAL_KEYRINGS = tuple(name.encode() for name in keys.WELL_KNOWN_KEYRINGS)


def _hex(serial: int) -> str:
    return "%08x" % (serial & 0xFFFFFFFF)


def read_psk(serial: int, identity: bytes) -> protocol.PskMaterial:
    """The secret of key ``serial``; OSError if unreadable or oversized."""
    secret = keys.read(serial)
    if not secret or len(secret) > protocol.MAX_SECRET:
        raise OSError(errno.EKEYREJECTED,
                      "a %d-byte secret is no PSK" % len(secret))
    return protocol.PskMaterial(serial=serial, identity=identity,
                                secret=secret)


@dataclass(frozen=True, slots=True)
class Scope:
    """Where the key serials a request names may come from: see the
    module docstring.  ``named``: the keyrings its namespace's
    configuration names."""

    request_keyring: int
    initial: bool
    named: tuple[str, ...] = ()


@contextmanager
def _allowed(scope: Scope) -> Iterator[set[int] | None]:
    """The serials ``scope`` may name (None: any we can read), with the
    namespace's keyrings possessed meanwhile, so their keys are readable."""
    if scope.initial:
        yield None
        return
    rings = namespace_keyrings(scope.request_keyring, scope.named)
    with _possessing(rings):
        allowed: set[int] = set()
        for ring in rings:
            try:
                allowed.update(keys.keyring_members(ring))
            except OSError as e:
                log.error("Cannot list keyring %s: %s", _hex(ring),
                          e.strerror or str(e))
        yield allowed


def _check(serial: int, allowed: set[int] | None) -> None:
    if allowed is not None and serial not in allowed:
        raise OSError(errno.EACCES, "key %s is in none of the keyrings its "
                      "namespace may use" % _hex(serial))


def client_psks(peerids: tuple[int, ...], scope: Scope
                ) -> tuple[list[protocol.PskMaterial], list[str]]:
    """Read the PSKs a client offers; also return why others were skipped."""
    psks: list[protocol.PskMaterial] = []
    skipped: list[str] = []
    if not peerids:
        return psks, skipped
    with _allowed(scope) as allowed:
        for serial in peerids:
            try:
                _check(serial, allowed)
                identity = keys.describe(serial).description
                if not identity or len(identity) > protocol.MAX_STR:
                    raise OSError(errno.EKEYREJECTED,
                                  "identity of %d bytes" % len(identity))
                psks.append(read_psk(serial, identity))
            except OSError as e:
                skipped.append("key %s: %s" % (_hex(serial),
                                               e.strerror or str(e)))
    return psks, skipped


def x509_from_keys(certs: tuple[tuple[int, int], ...], scope: Scope
                   ) -> tuple[bytes, bytes]:
    """The first (certificate, private key) pair passed by serial, as DER
    bytes; empty bytes when the request names none.  Raises OSError."""
    for cert_serial, key_serial in certs:
        if cert_serial and key_serial:
            with _allowed(scope) as allowed:
                _check(cert_serial, allowed)
                _check(key_serial, allowed)
                cert, key = keys.read(cert_serial), keys.read(key_serial)
            if not cert or not key:
                raise OSError(errno.EKEYREJECTED, "empty certificate or "
                              "private key")
            return cert, key
    return b"", b""


def find_psk(identity: bytes, request_keyring: int, initial: bool,
             named: tuple[str, ...], key_type: str = keys.PSK_KEY_TYPE
             ) -> protocol.PskMaterial | None:
    """A server's PSK for ``identity``, searched where its namespace may.

    ``initial``: the request comes from the initial network namespace;
    ``named``: the keyrings its namespace's configuration names.
    """
    if initial:
        rings = search_keyrings(request_keyring)
        log.debug("PSK lookup in keyrings %s",
                  ", ".join(_hex(r) for r in rings) or "(none)")
        return lookup_psk(rings, identity, key_type)
    rings = namespace_keyrings(request_keyring, named)
    with _possessing(rings):
        return lookup_psk(rings, identity, key_type)


@contextmanager
def _possessing(rings: list[int]) -> Iterator[None]:
    """Possess ``rings`` meanwhile (searching and reading need it).

    A namespace's keyrings are possessed through our thread keyring only
    for the while, so that they never show among the initial namespace's
    keyrings (the session keyring's).
    """
    linked = []
    for ring in rings:
        try:
            keys.link(ring, keys.KEY_SPEC_THREAD_KEYRING)
            linked.append(ring)
        except OSError as e:
            log.error("Cannot possess keyring %s: %s", _hex(ring),
                      e.strerror or str(e))
    try:
        yield
    finally:
        for ring in linked:
            try:
                keys.unlink(ring, keys.KEY_SPEC_THREAD_KEYRING)
            except OSError as e:
                log.error("Cannot unlink keyring %s: %s", _hex(ring),
                          e.strerror or str(e))


def search_keyrings(request_keyring: int) -> list[int]:
    """The keyrings a server PSK lookup from the initial namespace
    searches, in order: the request's keyring, then what ktls-utils
    searches: every keyring linked into the daemon's session keyring at
    start-up (``.nvme``, ``.nfs``, ``.nfsd``, ``[authenticate]
    keyrings=``), then the well-known keyrings wherever we possess them (a
    module loaded after tlshd started creates its keyring too late to be
    linked, but the consumer's ACCEPT links it into our process keyring).

    Never searched as such: our process keyring (``_pid``), which collects
    the keyrings every consumer passed, e.g. a host's ``keyring=`` on the
    same machine, where a target must not look.
    """
    rings = [request_keyring] if request_keyring else []
    try:
        members = keys.keyring_members(keys.KEY_SPEC_SESSION_KEYRING)
    except OSError as e:
        log.error("Cannot list the session keyring: %s", e.strerror)
        return rings
    for serial in members:
        try:
            info = keys.describe(serial)
        except OSError:
            continue
        if (info.key_type == "keyring"
                and info.description != PROCESS_KEYRING_NAME
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


def namespace_keyrings(request_keyring: int,
                       named: tuple[str, ...]) -> list[int]:
    """The keyrings of a namespace other than the initial one: the
    request's unless it is a global one, then those ``named``."""
    rings = []
    if request_keyring:
        try:
            info = keys.describe(request_keyring)
        except OSError as e:
            log.error("Cannot describe the request's keyring %s: %s",
                      _hex(request_keyring), e.strerror or str(e))
        else:
            # Dot names are the kernel's: no user can forge a global one.
            if info.description not in GLOBAL_KEYRINGS:
                rings.append(request_keyring)
    for name in named:
        try:
            found = keys.find_keyrings(name)
        except OSError as e:
            log.error("Cannot read /proc/keys: %s", e)
            break
        rings += [serial for serial in found if serial not in rings]
    return rings


def lookup_psk(rings: list[int], identity: bytes,
               key_type: str = keys.PSK_KEY_TYPE
               ) -> protocol.PskMaterial | None:
    """Search ``rings`` in order for a key named ``identity``."""
    for ring in rings:
        try:
            serial = keys.search(ring, key_type, identity)
            return read_psk(serial, identity)
        except OSError as e:
            if e.errno not in (errno.ENOKEY, errno.EKEYREVOKED,
                               errno.EKEYEXPIRED):
                log.error("PSK lookup in keyring %s: %s", _hex(ring),
                          e.strerror or str(e))
    return None
