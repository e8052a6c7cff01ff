"""The daemon's session keyring, set up once at start-up.

The supervisor reads every kernel key its workers need (they possess
none: see tlshd.supervisor.keymaterial), and can read a key only if it
possesses it, i.e. reaches it from its own keyrings.  So this module gives
the daemon a session keyring of its own (links never touch the caller's)
and links into it:

- the supervisor's process keyring: at ACCEPT the kernel links the
  consumer's keyring (NVMe: ``.nvme`` or the connect's ``keyring=``) into
  the process keyring of the process sending ACCEPT.  Reachable from the
  session keyring, also on kernels whose ACCEPT reply does not name it
  (before 6.17) and even when the nvme modules were loaded after tlshd
  started (docs/vm-harness.md, pitfall 13);
- ``.nvme``, ``.nfs``, ``.nfsd`` when they exist, and the keyrings named in
  ``[authenticate] keyrings=``, as ktls-utils does, but only keyrings
  owned by root and confirmed by KEYCTL_DESCRIBE (tlshd.shared.keys.
  find_keyrings): /proc/keys alone can be forged by any user, and a name
  without a leading dot can be taken by any user's keyring.

What a server PSK lookup *searches* is a separate, explicit list: see
tlshd.supervisor.keymaterial.search_keyrings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tlshd.shared import keys

log = logging.getLogger(__name__)


def setup_session_keyring(configured: Iterable[str]) -> None:
    """Join a new session keyring and link the daemon's keyrings into it.

    Failures are logged, never fatal: x.509 handshakes need no keyring.
    """
    try:
        keys.join_session_keyring(None)
        process = keys.keyring_id(keys.KEY_SPEC_PROCESS_KEYRING, create=True)
        keys.link(process, keys.KEY_SPEC_SESSION_KEYRING)
    except OSError as e:
        log.error("Cannot set up the daemon's session keyring: %s", e)
        return
    for name in dict.fromkeys((*keys.WELL_KNOWN_KEYRINGS, *configured)):
        link_keyring(name)


def link_keyring(name: str) -> bool:
    """Link every keyring named ``name`` into our session keyring."""
    try:
        serials = keys.find_keyrings(name)
    except OSError as e:
        log.error("Cannot read /proc/keys: %s", e)
        return False
    if not serials:
        # .nfs/.nfsd do not exist on 6.12, .nvme only with nvme-keyring.
        log.info("Keyring '%s' not found", name)
        return False
    for serial in serials:
        try:
            keys.link(serial, keys.KEY_SPEC_SESSION_KEYRING)
        except OSError as e:
            log.error("Cannot link keyring '%s' (%08x): %s", name, serial,
                      e)
            return False
        log.info("Keyring '%s' (%08x) linked into our session keyring.",
                 name, serial)
    return True
