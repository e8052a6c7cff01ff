"""What the running kernel's ``handshake`` netlink family offers.

Asked of the generic netlink controller (nlctrl) once, at start-up: the
family's id, its ``tlshd`` multicast group, the flags of its operations
(CTRL_CMD_GETFAMILY) and DONE's attribute policy (CTRL_CMD_GETPOLICY),
from which the re-key upcall is switched on (tlshd.supervisor.netlink_socket
uses the result).  Spoken directly with tlshd.supervisor.netlink_codec
rather than through pyroute2, whose import alone took 4.6 s of the
daemon's 6-7 s start under emulation (docs/benchmarks.md, Start-up).
FamilyInfo is a plain immutable value (tlshd.shared.frozen).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

from tlshd.shared import uapi
from tlshd.shared.errors import ConfigError, ProtocolError
from tlshd.shared.frozen import Frozen
from tlshd.supervisor import netlink_codec
from tlshd.supervisor.netlink_codec import iter_attrs

log = logging.getLogger(__name__)

GENL_ADMIN_PERM = 0x1
# enum netlink_attribute_type (<linux/netlink.h>): CTRL_CMD_GETPOLICY's
# NL_POLICY_TYPE_ATTR_TYPE values.
NL_ATTR_TYPE_U32 = 4
NL_ATTR_TYPE_STRING = 11
NL_ATTR_TYPE_NUL_STRING = 12

# <linux/genetlink.h>: the controller family and the attributes read here.
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_CMD_GETPOLICY = 10
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_OPS = 6
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_POLICY = 8
CTRL_ATTR_OP_POLICY = 9
CTRL_ATTR_OP_ID = 1
CTRL_ATTR_OP_FLAGS = 2
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
CTRL_ATTR_POLICY_DO = 1
NL_POLICY_TYPE_ATTR_TYPE = 1
NLM_F_DUMP = 0x300
CTRL_VERSION = 1
CTRL_TIMEOUT = 5.0  # seconds; the kernel answers within send()


class FamilyInfo(Frozen):
    """What the running kernel offers: ids, op flags, DONE's attributes."""

    __slots__ = ("done_attr_types", "done_attrs", "family_id", "group_id",
                 "op_flags")
    family_id: int
    group_id: int
    op_flags: dict[int, int]
    done_attrs: frozenset[int]
    # DONE's policy: attribute number -> NL_ATTR_TYPE_*, when known.
    done_attr_types: dict[int, int]

    def __init__(self, family_id: int, group_id: int,
                 op_flags: dict[int, int] | None = None,
                 done_attrs: frozenset[int] = frozenset(),
                 done_attr_types: dict[int, int] | None = None) -> None:
        self.family_id = family_id
        self.group_id = group_id
        self.op_flags = {} if op_flags is None else op_flags
        self.done_attrs = done_attrs
        self.done_attr_types = ({} if done_attr_types is None
                                else done_attr_types)

    @property
    def done_session_id_attr(self) -> int | None:
        """DONE's SESSION_ID attribute number, if this kernel has one.

        The proposed KeyUpdate series numbers it 4, a u32; the NFSD tree
        uses 4 for the string TAG.  Only a u32 at 4 counts.  ACCEPT's
        reply attributes are not in any policy, so this is also the test
        for the whole re-key upcall.
        """
        attr = uapi.HANDSHAKE_A_DONE_SESSION_ID
        if self.done_attr_types.get(attr) == NL_ATTR_TYPE_U32:
            return attr
        return None

    @property
    def rekey_upcall(self) -> bool:
        return self.done_session_id_attr is not None

    def rekey_status(self, ktls_rekey: bool) -> str:
        """The start-up line about the re-key upcall."""
        policy = ("DONE has a u32 SESSION_ID (attribute %d)"
                  % uapi.HANDSHAKE_A_DONE_SESSION_ID if self.rekey_upcall
                  else "DONE policy has no SESSION_ID")
        tx = ("kTLS can re-key" if ktls_rekey
              else "kTLS cannot re-key: no Tls*Rekey* counters")
        ok = self.rekey_upcall and ktls_rekey
        return "Kernel re-key upcall: %s (%s; %s)" % (
            "supported" if ok else "not supported", policy, tx)

    def describe(self) -> str:
        def perm(op: int) -> str:
            flags = self.op_flags.get(op)
            if flags is None:
                return "absent"
            return "admin" if flags & GENL_ADMIN_PERM else "any"

        return ("family id %d, group tlshd id %d, ACCEPT %s, DONE %s, "
                "DONE attributes %s"
                % (self.family_id, self.group_id,
                   perm(uapi.HANDSHAKE_CMD_ACCEPT),
                   perm(uapi.HANDSHAKE_CMD_DONE),
                   sorted(self.done_attrs) or "unknown"))

    def capabilities(self) -> str:
        """The tlshd-worded capability line, from the real policy."""
        def has(attr: int) -> str:
            return "supported" if attr in self.done_attrs else "unsupported"

        # DONE attribute 4 is "tag" in the NFSD development tree, but the
        # u32 session id of the proposed KeyUpdate series.
        tags = ("unsupported" if self.rekey_upcall
                else has(uapi.HANDSHAKE_A_DONE_TAG))
        return ("session_tags=%s remote_peerids=%s"
                % (tags, has(uapi.HANDSHAKE_A_DONE_REMOTE_AUTH)))


def _u32(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError("nlctrl: %d-byte u32" % len(payload))
    return int(struct.unpack("=I", payload)[0])


def _u16(payload: bytes) -> int:
    if len(payload) != 2:
        raise ProtocolError("nlctrl: %d-byte u16" % len(payload))
    return int(struct.unpack("=H", payload)[0])


def _string(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


def _done_policy_index(op_policy: bytes) -> int | None:
    """DONE's "do" policy index in one CTRL_ATTR_OP_POLICY."""
    for op, policy in iter_attrs(op_policy):
        if op == uapi.HANDSHAKE_CMD_DONE:
            for kind, value in iter_attrs(policy):
                if kind == CTRL_ATTR_POLICY_DO:
                    return _u32(value)
    return None


def _policy_types(policy: bytes,
                  policies: dict[int, dict[int, int]]) -> None:
    """Add one CTRL_ATTR_POLICY (index -> attribute -> its properties)."""
    for idx, attrs in iter_attrs(policy):
        for attr, props in iter_attrs(attrs):
            kind = dict(iter_attrs(props)).get(NL_POLICY_TYPE_ATTR_TYPE)
            policies.setdefault(idx, {})[attr] = (
                0 if kind is None else _u32(kind))


def _done_policy(replies: list[bytes]) -> dict[int, int]:
    """DONE's "do" policy: attribute number -> NL_ATTR_TYPE_* (0 if the
    kernel did not say), from the attributes of each GETPOLICY reply."""
    done_policy_idx = None
    policies: dict[int, dict[int, int]] = {}
    for reply in replies:
        for atype, payload in iter_attrs(reply):
            if atype == CTRL_ATTR_OP_POLICY:
                done_policy_idx = (_done_policy_index(payload)
                                   if done_policy_idx is None
                                   else done_policy_idx)
            elif atype == CTRL_ATTR_POLICY:
                _policy_types(payload, policies)
    if done_policy_idx is None:
        return {}
    return dict(policies.get(done_policy_idx, {}))


def _family(reply: bytes) -> tuple[int, int | None, dict[int, int]]:
    """(family id, tlshd group id or None, op flags) of a GETFAMILY reply."""
    top = dict(iter_attrs(reply))
    group = None
    for _, grp in iter_attrs(top.get(CTRL_ATTR_MCAST_GROUPS, b"")):
        g = dict(iter_attrs(grp))
        if _string(g.get(CTRL_ATTR_MCAST_GRP_NAME, b"")) == (
                uapi.HANDSHAKE_MCGRP_TLSHD):
            group = _u32(g[CTRL_ATTR_MCAST_GRP_ID])
    op_flags = {}
    for _, op in iter_attrs(top.get(CTRL_ATTR_OPS, b"")):
        o = dict(iter_attrs(op))
        op_flags[_u32(o[CTRL_ATTR_OP_ID])] = _u32(
            o.get(CTRL_ATTR_OP_FLAGS, bytes(4)))
    return _u16(top[CTRL_ATTR_FAMILY_ID]), group, op_flags


def _ctrl_request(cmd: int, name: str, flags: int, seq: int) -> bytes:
    attr = netlink_codec.encode_attr(CTRL_ATTR_FAMILY_NAME,
                                     name.encode() + b"\0")
    return netlink_codec.encode_request(
        GENL_ID_CTRL, cmd, attr, seq, netlink_codec.NLM_F_REQUEST | flags,
        version=CTRL_VERSION)


def ask_ctrl(cmd: int, name: str, dump: bool = False) -> list[bytes]:
    """Send one nlctrl request about family ``name``; return the
    attributes of each reply.  Raises OSError with the kernel's errno
    (ENOENT: no such family)."""
    seq = 1
    with socket.socket(socket.AF_NETLINK,
                       socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_GENERIC) as sock:
        sock.bind((0, 0))
        sock.settimeout(CTRL_TIMEOUT)
        sock.send(_ctrl_request(cmd, name, NLM_F_DUMP if dump else 0, seq))
        replies: list[bytes] = []
        while True:
            data, (port, _) = sock.recvfrom(65536)
            if port != 0:
                continue  # not the kernel's
            for msg in netlink_codec.split_messages(data):
                if msg.seq != seq:
                    continue
                if msg.type == netlink_codec.NLMSG_ERROR:
                    err = netlink_codec.netlink_error(msg)
                    if err:
                        raise OSError(err, os.strerror(err))
                    return replies
                if msg.type == netlink_codec.NLMSG_DONE:
                    return replies
                if msg.type == GENL_ID_CTRL:
                    replies.append(netlink_codec.genl_payload(msg)[1])
                    if not dump:
                        return replies


def unavailable_message(e: Exception) -> str:
    """Why the handshake family could not be resolved, for an admin."""
    code = getattr(e, "errno", None)
    if code == errno.ENOENT:
        why = ('this kernel has no "%s" netlink family'
               % uapi.HANDSHAKE_FAMILY_NAME)
    else:
        why = "cannot ask the kernel for it: %s" % (
            os.strerror(code) if isinstance(code, int) and code > 0 else e)
    tls = ("" if os.path.isdir("/sys/module/tls") else
           "; the tls module (CONFIG_TLS) is not loaded either, and kTLS "
           "needs it")
    return ("Kernel handshake service is not available: %s.  tlshd needs "
            "Linux 6.4 or later built with CONFIG_NET_HANDSHAKE=y%s"
            % (why, tls))


def probe_family(name: str = uapi.HANDSHAKE_FAMILY_NAME) -> FamilyInfo:
    """Resolve the handshake family in the current network namespace.

    Raises ConfigError when the kernel has no handshake family (too old, or
    CONFIG_NET_HANDSHAKE off).  ``name``: tests ask for one that is absent.
    """
    try:
        replies = ask_ctrl(CTRL_CMD_GETFAMILY, name)
        family_id, group, op_flags = _family(replies[0])
    except (OSError, ProtocolError, IndexError, KeyError) as e:
        raise ConfigError(unavailable_message(e)) from e
    if group is None:
        raise ConfigError("handshake family has no 'tlshd' group")
    try:
        done_types = _done_policy(ask_ctrl(CTRL_CMD_GETPOLICY, name,
                                           dump=True))
    except (OSError, ProtocolError) as e:
        # kernels before 5.10 have no GETPOLICY
        log.warning("Cannot read the handshake policy: %s", e)
        done_types = {}
    return FamilyInfo(family_id, group, op_flags, frozenset(done_types),
                      done_types)
