"""What the running kernel's ``handshake`` netlink family offers.

This is the only module that imports pyroute2, and only at start-up: to
resolve the family's id, its ``tlshd`` multicast group, the flags of its
operations and DONE's attribute policy (CTRL_CMD_GETPOLICY), from which
the re-key upcall is switched on (tlshd.supervisor.netlink_socket uses the
result).
pyroute2 stays behind ``probe_family``: FamilyInfo is a plain dataclass.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from tlshd.shared import uapi
from tlshd.shared.errors import ConfigError

log = logging.getLogger(__name__)

GENL_ADMIN_PERM = 0x1
# enum netlink_attribute_type (<linux/netlink.h>): CTRL_CMD_GETPOLICY's
# NL_POLICY_TYPE_ATTR_TYPE values.
NL_ATTR_TYPE_U32 = 4
NL_ATTR_TYPE_STRING = 11
NL_ATTR_TYPE_NUL_STRING = 12


@dataclass(frozen=True)
class FamilyInfo:
    """What the running kernel offers: ids, op flags, DONE's attributes."""

    family_id: int
    group_id: int
    op_flags: dict[int, int] = field(default_factory=dict)
    done_attrs: frozenset[int] = frozenset()
    # DONE's policy: attribute number -> NL_ATTR_TYPE_*, when known.
    done_attr_types: dict[int, int] = field(default_factory=dict)

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


def _get(msg: Any, name: str, default: Any = None) -> Any:
    return msg.get_attr(name, default)


def _done_policy(replies: tuple[Any, ...]) -> dict[int, int]:
    """DONE's "do" policy: attribute number -> NL_ATTR_TYPE_* (0 if the
    kernel did not say)."""
    done_policy_idx = None
    policies: dict[int, dict[int, int]] = {}
    for msg in replies:
        oppol = _get(msg, "CTRL_ATTR_OP_POLICY")
        if oppol is not None:
            for name, value in oppol["attrs"]:
                if name == "OP(%d)" % uapi.HANDSHAKE_CMD_DONE:
                    done_policy_idx = value.get_attr("CTRL_ATTR_POLICY_DO")
        pol = _get(msg, "CTRL_ATTR_POLICY")
        if pol is not None:
            for pname, pvalue in pol["attrs"]:
                idx = int(pname[len("POLICY("):-1])
                for aname, avalue in pvalue["attrs"]:
                    kind = avalue.get_attr("NL_POLICY_TYPE_ATTR_TYPE")
                    policies.setdefault(idx, {})[
                        int(aname[len("ATTR("):-1])] = int(kind or 0)
    if done_policy_idx is None:
        return {}
    return dict(policies.get(done_policy_idx, {}))


def unavailable_message(e: Exception) -> str:
    """Why the handshake family could not be resolved, for an admin."""
    code = getattr(e, "code", None)
    if not isinstance(code, int):
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


def probe_family() -> FamilyInfo:
    """Resolve the handshake family in the current network namespace.

    Raises ConfigError when the kernel has no handshake family (too old, or
    CONFIG_NET_HANDSHAKE off).
    """
    from pyroute2.netlink import genlmsg
    from pyroute2.netlink.generic import GenericNetlinkSocket

    nl = GenericNetlinkSocket()
    try:
        try:
            # bind() registers the nlctrl decoder, then resolves the family.
            nl.bind(uapi.HANDSHAKE_FAMILY_NAME, genlmsg)
            fam = nl.discovery(uapi.HANDSHAKE_FAMILY_NAME)
        except Exception as e:
            raise ConfigError(unavailable_message(e)) from e
        family_id = int(_get(fam, "CTRL_ATTR_FAMILY_ID"))
        groups = {
            g.get_attr("CTRL_ATTR_MCAST_GRP_NAME"):
                g.get_attr("CTRL_ATTR_MCAST_GRP_ID")
            for g in _get(fam, "CTRL_ATTR_MCAST_GROUPS", [])
        }
        if uapi.HANDSHAKE_MCGRP_TLSHD not in groups:
            raise ConfigError("handshake family has no 'tlshd' group")
        op_flags = {
            int(op.get_attr("CTRL_ATTR_OP_ID")):
                int(op.get_attr("CTRL_ATTR_OP_FLAGS"))
            for op in _get(fam, "CTRL_ATTR_OPS", [])
        }
        try:
            done_types = _done_policy(nl.policy(uapi.HANDSHAKE_FAMILY_NAME))
        except Exception as e:  # kernels before 5.10 have no GETPOLICY
            log.warning("Cannot read the handshake policy: %s", e)
            done_types = {}
        return FamilyInfo(family_id, int(groups[uapi.HANDSHAKE_MCGRP_TLSHD]),
                          op_flags, frozenset(done_types), done_types)
    finally:
        nl.close()
