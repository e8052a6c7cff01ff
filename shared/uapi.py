"""Kernel uAPI constants for the ``handshake`` generic netlink family.

Mirrors include/uapi/linux/handshake.h (generated from
Documentation/netlink/specs/handshake.yaml), plus the two kTLS socket
option names (TCP_ULP, SOL_TLS) that the supervisor and worker share.
Names keep the kernel's spelling so that one grep finds both the C and
the Python side.
"""

from __future__ import annotations

import enum

HANDSHAKE_FAMILY_NAME = "handshake"
HANDSHAKE_FAMILY_VERSION = 1
HANDSHAKE_MCGRP_TLSHD = "tlshd"


class HandlerClass(enum.IntEnum):
    NONE = 0
    TLSHD = 1


class MsgType(enum.IntEnum):
    """HANDSHAKE_MSG_TYPE_*: what the kernel asks the agent to do."""

    UNSPEC = 0
    CLIENTHELLO = 1
    SERVERHELLO = 2
    # Proposed (KeyUpdate series, not merged): re-key an existing session.
    CLIENTKEYUPDATE = 3
    SERVERKEYUPDATE = 4


# The message types that re-key an existing session (no handshake).
KEY_UPDATE_MSGS = (MsgType.CLIENTKEYUPDATE, MsgType.SERVERKEYUPDATE)


class KeyUpdateType(enum.IntEnum):
    """HANDSHAKE_KEY_UPDATE_TYPE_* (proposed): what a re-key asks for."""

    UNSPEC = 0
    SEND = 1  # initiate: send a KeyUpdate, move TX on
    RECEIVED = 2  # the peer's KeyUpdate was read: move RX on
    RECEIVED_REQUEST_UPDATE = 3  # as RECEIVED, and answer with our own


class AuthMode(enum.IntEnum):
    """HANDSHAKE_AUTH_*: how this end authenticates."""

    UNSPEC = 0
    UNAUTH = 1
    PSK = 2
    X509 = 3


# Commands.
HANDSHAKE_CMD_READY = 1
HANDSHAKE_CMD_ACCEPT = 2
HANDSHAKE_CMD_DONE = 3

# Nested set "x509".
HANDSHAKE_A_X509_CERT = 1
HANDSHAKE_A_X509_PRIVKEY = 2

# Attribute set "accept".
HANDSHAKE_A_ACCEPT_SOCKFD = 1
HANDSHAKE_A_ACCEPT_HANDLER_CLASS = 2
HANDSHAKE_A_ACCEPT_MESSAGE_TYPE = 3
HANDSHAKE_A_ACCEPT_TIMEOUT = 4
HANDSHAKE_A_ACCEPT_AUTH_MODE = 5
HANDSHAKE_A_ACCEPT_PEER_IDENTITY = 6
HANDSHAKE_A_ACCEPT_CERTIFICATE = 7
HANDSHAKE_A_ACCEPT_PEERNAME = 8
HANDSHAKE_A_ACCEPT_KEYRING = 9
# Proposed by the KeyUpdate series; decoded only when the kernel's DONE
# policy shows the series is present (see supervisor/netlink_family.py).
HANDSHAKE_A_ACCEPT_KEY_UPDATE_REQUEST = 10
HANDSHAKE_A_ACCEPT_SESSION_ID = 11

# Attribute set "done".
HANDSHAKE_A_DONE_STATUS = 1
HANDSHAKE_A_DONE_SOCKFD = 2
HANDSHAKE_A_DONE_REMOTE_AUTH = 3
# DONE attribute 4 is "tag" (string) in the NFSD development tree and
# "session-id" (u32) in the proposed KeyUpdate series: the policy's
# attribute type tells which one a kernel has.
HANDSHAKE_A_DONE_TAG = 4
HANDSHAKE_A_DONE_SESSION_ID = 4

# The kernel keeps at most this many peer identities / remote auth ids.
HANDSHAKE_MAX_PEER_IDS = 5
# TLS_NO_PEERID: REMOTE_AUTH value meaning "none".
TLS_NO_PEERID = 0
# What ktls-utils reports for a verified x.509 client certificate: NFSD
# only needs a non-zero peer id to set XPT_PEER_AUTH (xprtsec=mtls), and
# the kernel must not parse client certificates (ktls-utils efeda80).
TLS_X509_PEERID = 0xFFFFFFFF

# setsockopt(IPPROTO_TCP, TCP_ULP, "tls") attaches kTLS to a TCP socket;
# getsockopt with the same names tells which upper-layer protocol it has.
TCP_ULP = 31
TLS_ULP_NAME = b"tls"
# <linux/socket.h>: the level of the kTLS socket options (TLS_TX, TLS_RX).
SOL_TLS = 282
