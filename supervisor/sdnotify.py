"""Readiness notification to systemd (the sd_notify(3) datagram), no library.

tlshd.service is Type=notify.  systemd starts what is ordered after tlshd
(remote-fs-pre.target, nfs-server, NVMe autoconnect) only once the
supervisor says READY=1, which it does after it has joined the handshake
family's group in the initial namespace.  Until then the kernel fails every
handshake at once with ESRCH, and Python needs a while to start; with
Type=simple an NFS mount early at boot could lose that race.

The address is taken out of the environment at start-up, before anything is
forked, so that no worker inherits a way to talk to systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def take_address() -> str | bytes | None:
    """Remove $NOTIFY_SOCKET from the environment; return its address.

    A leading "@" names an abstract socket.  Other forms systemd knows
    (vsock) are not for a system service on the host and are ignored.
    """
    value = os.environ.pop(ENV, "")
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value:
        log.warning("Ignoring %s=%r: not a unix socket path", ENV, value)
    return None


def notify(address: str | bytes | None, state: str) -> bool:
    """Send one state message ("READY=1", "STOPPING=1"); False if not sent.

    Failing to notify is logged but not fatal: the handshakes do not depend
    on it, and systemd reports a start that never became ready itself.
    """
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX,
                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), address)
    except OSError as e:
        log.warning("Cannot notify systemd (%s): %s", state, e)
        return False
    return True
