"""The few exception types tlshd raises across module boundaries."""

from __future__ import annotations


class TlshdError(Exception):
    """Base class for tlshd's own errors."""


class ProtocolError(TlshdError):
    """A peer broke a protocol: a malformed message, wrong fd count, ...

    The supervisor never tries to recover from a worker that sends one: it
    kills the worker and completes its requests with EIO.
    """


class PeerGone(TlshdError):
    """The other end of a channel closed it (EOF or EPIPE)."""


class ConfigError(TlshdError):
    """The configuration or a credential it names cannot be used."""
