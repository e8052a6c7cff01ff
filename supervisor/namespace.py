"""One served network namespace: its netlink socket, its configuration,
its workers and its counters.

namespaces.Discovery decides which namespaces are served and makes these;
the request table, the worker pool, the monitor and the control socket
work on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlshd.shared import config
from tlshd.supervisor import netlink_socket, netns
from tlshd.supervisor.backoff import Backoff
from tlshd.supervisor.workers import Worker


@dataclass(eq=False)
class Namespace:
    """One served network namespace."""

    label: str
    config_path: str
    nlsock: netlink_socket.HandshakeSocket
    cfg: config.Config
    key: netns.Key | None = None
    nsfd: int | None = None  # keeps the namespace open; workers enter it
    backoff: Backoff = field(default_factory=Backoff)
    worker: Worker | None = None
    # After a reload: the worker with the new configuration, starting up.
    # The current worker keeps serving until the successor is ready, so a
    # burst of reloads cannot starve requests.
    successor: Worker | None = None
    retiring: list[Worker] = field(default_factory=list)
    # When to start a worker; None: none is wanted now (on-demand workers
    # start at the namespace's first request, see workerpool).
    restart_at: float | None = None
    # The back-off after a worker's death: none starts before this.
    not_before: float = 0.0
    held: bool = False  # a configuration error: wait for SIGHUP
    removed: bool = False
    # Not listened to until then (a flood; see arbiter.FLOOD_PAUSE).
    paused_until: float | None = None
    # The supervisor's own (initial) namespace: the only one whose server
    # PSK lookups search the global keyrings (see keymaterial).
    initial: bool = False
    # How it came to be served ("ip netns", "/proc", "registered ...").
    source: str = ""
    registered: bool = False
    # For status reports (by_certificate: successes by CERT_KINDS).
    succeeded: int = 0
    failed: int = 0
    by_certificate: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    last_failure: str = ""

    def workers(self) -> list[Worker]:
        """Every live worker of this namespace."""
        current = [w for w in (self.worker, self.successor) if w is not None]
        return current + self.retiring
