"""What a worker may send, and when: one table, as OpenSSH's mon_table.

A worker parses peer data, so every message from it is checked before it
is acted on.  ``MON_TABLE`` has one row per message type a worker may
send: the state in which it is permitted and the function that answers
it.  A message of any other type, or one not permitted in the worker's
state, kills the worker ("unpermitted <message>"); its exit then fails
the requests it held (workerpool.on_exit), each with one DONE.

- LogRecord: at any time (workerlog sanitises and rate-limits it);
- Hello: once, before the worker is ready;
- HandshakeAnswer: only for a request this worker holds, or held when
  the request's deadline passed here (a slow worker, not a hostile one:
  that late answer is ignored);
- PskLookup: only for a server PSK request this worker holds, at most
  protocol.MAX_LOOKUPS times per request (a late one is ignored).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tlshd.shared import protocol, uapi
from tlshd.shared.errors import PeerGone, ProtocolError
from tlshd.supervisor import keymaterial, workercheck, workerlog
from tlshd.supervisor.namespace import Namespace
from tlshd.supervisor.requests import Request, Requests
from tlshd.supervisor.workerpool import WorkerPool
from tlshd.supervisor.workers import Worker

log = logging.getLogger(__name__)


def ktls_attached(sockfd: int) -> bool:
    """Whether kTLS is attached to the TCP socket ``sockfd`` (its ULP)."""
    sock = socket.socket(fileno=sockfd)
    try:
        ulp = sock.getsockopt(socket.IPPROTO_TCP, uapi.TCP_ULP, 16)
    except OSError:
        return False
    finally:
        sock.detach()
    return ulp.rstrip(b"\0") == uapi.TLS_ULP_NAME


def completion_line(req: Request, status: int, resumed: bool) -> str:
    """ktls-utils' "Handshake with '<peer>' (<address>) <outcome>"; the
    address was read from the socket at ACCEPT (netlink_socket)."""
    if status:
        outcome = "failed: %s" % errno.errorcode.get(status, str(status))
    else:
        outcome = "succeeded (session reuse)" if resumed else "succeeded"
    addr = req.request.peer_address or "unknown"
    name = workerlog.sanitize(req.request.peername or addr)
    return "Handshake with '%s' (%s) %s" % (name, addr, outcome)


class Monitor:
    """Reads what workers send and answers what the table permits."""

    def __init__(self, requests: Requests, pool: WorkerPool) -> None:
        self.requests = requests
        self.pool = pool

    def on_channel(self, ns: Namespace, worker: Worker) -> None:
        """``worker``'s channel is readable: one message, checked."""
        if worker.returncode is not None:
            # Its exit came first in this batch of events: on_exit has
            # reaped it and closed the channel.
            return
        try:
            msg, req_id = worker.channel.recv_answer()
        except PeerGone:
            self.pool.unwatch_channel(worker)  # the pidfd reports the exit
            return
        except (ProtocolError, OSError) as e:
            log.error("Worker %d (netns %s) broke the protocol: %s; "
                      "killing it", worker.pid, worker.label, e)
            self.pool.kill(worker)
            return
        rule = MON_TABLE.get(type(msg))
        if rule is None or not rule.permitted(self, ns, worker, req_id,
                                              msg):
            log.error("Worker %d (netns %s) sent an unpermitted %s (request "
                      "%d); killing it", worker.pid, worker.label,
                      type(msg).__name__, req_id)
            self.pool.kill(worker)
            return
        rule.answer(self, ns, worker, req_id, msg)

    # ---- permitted when -------------------------------------------------

    def _always(self, ns: Namespace, worker: Worker, req_id: int,
                msg: Any) -> bool:
        return True

    def _before_ready(self, ns: Namespace, worker: Worker, req_id: int,
                      msg: Any) -> bool:
        return not worker.ready

    def _holds_or_late(self, ns: Namespace, worker: Worker, req_id: int,
                       msg: Any) -> bool:
        return (self.requests.held(worker, req_id) is not None
                or self.requests.is_late(worker, req_id))

    def _may_look_up(self, ns: Namespace, worker: Worker, req_id: int,
                     msg: Any) -> bool:
        """Only a server PSK handshake looks up keys, a bounded number of
        times; any other lookup is a worker gone wrong."""
        req = self.requests.held(worker, req_id)
        if req is None:
            return self.requests.is_late(worker, req_id)
        return (req.request.auth_mode == uapi.AuthMode.PSK
                and req.request.msg_type == uapi.MsgType.SERVERHELLO
                and req.lookups < protocol.MAX_LOOKUPS)

    # ---- answers --------------------------------------------------------

    def answer_log(self, ns: Namespace, worker: Worker, req_id: int,
                   msg: protocol.LogRecord) -> None:
        worker.logs.emit(msg.level, msg.text)

    def answer_hello(self, ns: Namespace, worker: Worker, req_id: int,
                     hello: protocol.Hello) -> None:
        wrong = workercheck.verify_hello(worker.pid, hello,
                                         self.pool.worker_ids)
        if wrong:
            # Lying about its sandbox, or not sandboxed as told: a worker
            # not to be trusted with a request.
            log.error("Worker %d (netns %s) is not what it claims or must "
                      "be: %s; killing it", worker.pid, worker.label,
                      "; ".join(wrong))
            self.pool.kill(worker)
            return
        log.info("Worker %d for netns %s ready: uid %d gid %d CapEff %016x "
                 "NoNewPrivs %d Seccomp %d", worker.pid, worker.label,
                 hello.uid, hello.gid, hello.cap_eff, hello.no_new_privs,
                 hello.seccomp)
        self.pool.ready(ns, worker)

    def answer_handshake(self, ns: Namespace, worker: Worker, req_id: int,
                         msg: protocol.HandshakeAnswer) -> None:
        """A worker's result: checked, then sent to the kernel as DONE."""
        req = self.requests.held(worker, req_id)
        if req is None:
            # Its deadline passed here first: a slow worker (a loaded
            # machine), not a hostile one.  Its other requests stay
            # with it.
            self.requests.answered_late(req_id)
            log.info("Worker %d (netns %s) answered request %d after its "
                     "deadline; ignored", worker.pid, worker.label, req_id)
            return
        why = bad_answer(req, msg)
        if why is not None:
            log.error("Worker %d (netns %s) answered request %d with %s; "
                      "killing it", worker.pid, worker.label, req_id, why)
            worker.kill()
            self.requests.complete(req, errno.EIO, (),
                                   "worker's answer refused")
            return
        status, reason = msg.status, msg.reason
        if status == 0 and not ktls_attached(req.sockfd):
            log.error("Worker %d (netns %s) reported success for request "
                      "%d but the socket has no kTLS", worker.pid,
                      worker.label, req_id)
            status, reason = errno.EIO, "no kTLS on the socket"
        if req.request.msg_type not in uapi.KEY_UPDATE_MSGS:
            # A re-key has its own line (the worker's); a handshake's
            # completion line is written here, as the worker wrote it.
            log.info("%s [netns %s]",
                     completion_line(req, status, msg.resumed), ns.label)
        self.requests.complete(req, status,
                               msg.remote_auth if status == 0 else (),
                               reason, msg.session_id,
                               msg.cert_kind if status == 0 else "")
        self.pool.close_if_idle(worker)

    def answer_lookup(self, ns: Namespace, worker: Worker, req_id: int,
                      msg: protocol.PskLookup) -> None:
        """Find the PSK a server worker's client offered, in the keyrings
        its namespace may use, and send it (or "not found") back."""
        req = self.requests.held(worker, req_id)
        if req is None:
            return  # late: the worker's own deadline has passed too
        req.lookups += 1
        psk = keymaterial.find_psk(
            msg.identity, req.request.keyring or 0,
            initial=req.ns.initial, named=req.ns.cfg.keyrings)
        if psk is not None:
            req.handed.add(psk.serial)
        log.debug("PSK lookup for request %d in netns %s: %s", req_id,
                  req.ns.label, "key %08x" % psk.serial if psk else
                  "not found")
        try:
            worker.channel.send(protocol.PskFound(psk=psk), req_id,
                                wait=False)
        except BlockingIOError:
            # It asks and does not read the answers: never wait on it.
            log.error("Worker %d for netns %s does not read the answers to "
                      "its PSK lookups; killing it", worker.pid, ns.label)
            self.pool.kill(worker)
        except (PeerGone, OSError) as e:
            # Its exit (pidfd) answers the request.
            log.error("Cannot answer worker %d's PSK lookup: %s",
                      worker.pid, e)


def bad_answer(req: Request, msg: protocol.HandshakeAnswer) -> str | None:
    """Why a worker's answer cannot be true (None: it may be).

    The peer identities a DONE carries authorise the peer to the consumer
    (NFSD's mtls exports, NVMe's key): a worker may name only keys it was
    handed for this request, or the marker of a verified certificate when
    it was asked to verify one.
    """
    allowed = set(req.handed) | {uapi.TLS_NO_PEERID}
    if req.request.auth_mode == uapi.AuthMode.X509:
        allowed.add(uapi.TLS_X509_PEERID)
    for peerid in msg.remote_auth:
        if peerid not in allowed:
            return "peer identity %08x it was not given" % peerid
    return None


@dataclass(frozen=True)
class Rule:
    """When a message type is permitted, and what answers it."""

    permitted: Callable[[Monitor, Namespace, Worker, int, Any], bool]
    answer: Callable[[Monitor, Namespace, Worker, int, Any], None]


# What a worker may send (odd message types; the even ones are what the
# supervisor sends, and recv_answer refuses them before this table).
MON_TABLE: dict[type[protocol.Message], Rule] = {
    protocol.LogRecord: Rule(Monitor._always, Monitor.answer_log),
    protocol.Hello: Rule(Monitor._before_ready, Monitor.answer_hello),
    protocol.HandshakeAnswer: Rule(Monitor._holds_or_late,
                                   Monitor.answer_handshake),
    protocol.PskLookup: Rule(Monitor._may_look_up, Monitor.answer_lookup),
}
