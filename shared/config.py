"""Read tlshd's configuration file (the ktls-utils format).

The file is a GLib key file: ``[section]`` headers, ``key=value`` lines,
``#`` comments, and ``;`` separating list items.  Every key ktls-utils
documents is accepted, so an existing /etc/tlshd/config works unchanged.
Keys this implementation does not use are logged and ignored.

Extensions (absent from ktls-utils, all optional):
  [authenticate] handshake_timeout = seconds for requests that carry no
      TIMEOUT attribute, both roles (NFS and NFSD send none; the NFS
      client gives up after 10 s, NFSD after 20 s).  Unset: 8 s for a
      client handshake, 15 s for a server handshake.
  [authenticate.client|server] x509.ciphersuites = OpenSSL TLS 1.3 suite
      list restricting what this end offers or accepts.
  [authenticate] session_reuse = true|false (default false): TLS 1.3
      session reuse between tlshd instances (tlshd.worker.resumption);
      session_lifetime = seconds a reuse PSK lives (default 3600, at most
      604800); session_cache_size = entries each end keeps (default 256).

Namespaces (top-level file only; see tlshd.conf(5)):
  [netns] default = configuration file for named namespaces (ip netns) that
      have no /etc/tlshd/netns/<name>/config of their own; unset: such
      namespaces are not served.
  [netns] unnamed = configuration file for namespaces that have no name
      (found through /proc/*/ns/net); unset: they are not served.
  [netns] unnamed_userns = true|false (default false): also serve unnamed
      namespaces owned by a user namespace other than the initial one
      (rootless and user-namespaced containers, whose root holds
      CAP_NET_ADMIN over them and can send to tlshd's netlink socket).
  [netns] max_namespaces = how many namespaces one supervisor serves at
      most, the initial one included (default 1024).
  [sandbox] user = the unprivileged user workers run as (default tlshd).

Parsing only: nothing here opens a certificate or a key.  The worker that
serves a namespace loads the files its own configuration names.
"""

from __future__ import annotations

import configparser
import logging
import os
from dataclasses import dataclass

from tlshd.shared.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/tlshd/config"
LEGACY_PATH = "/etc/tlshd.conf"
MAX_CONFIG_BYTES = 1 << 20
# Deadlines for requests without a TIMEOUT attribute (NFS and NFSD send
# none), under each consumer's own wait so that it hears ETIMEDOUT from
# us rather than cancelling: the NFS client waits 10 s (sunrpc's
# XS_TLS_HANDSHAKE_TO, measured on 6.12 and 7.3 by
# tests/kernel/test_nfs_faults.py), NFSD 20 s (SVC_HANDSHAKE_TO).  Our
# clock starts at ACCEPT, after the kernel's, hence the margins.
DEFAULT_HANDSHAKE_TIMEOUT = 15.0
DEFAULT_CLIENT_HANDSHAKE_TIMEOUT = 8.0
DEFAULT_SESSION_LIFETIME = 3600.0
MAX_SESSION_LIFETIME = 7 * 24 * 3600.0  # RFC 8446 4.6.1's ticket limit
DEFAULT_SESSION_CACHE_SIZE = 256
MAX_SESSION_CACHE_SIZE = 65536
DEFAULT_MAX_NAMESPACES = 1024
MAX_MAX_NAMESPACES = 65536

_ROLE_KEYS = {
    "x509.truststore": "truststore",
    "x509.crl": "crl",
    "x509.certificate": "certificate",
    "x509.private_key": "private_key",
    "x509.ciphersuites": "ciphersuites",
}
# Documented by ktls-utils, not acted upon here (yet).
_KNOWN_UNUSED = {
    "debug": {"tls", "nl", "delay_done"},
    "authenticate.client": {"x509.pq.certificate", "x509.pq.private_key"},
    "authenticate.server": {"x509.pq.certificate", "x509.pq.private_key",
                            "x509.client_auth", "x509.client_allowed_sans"},
}


@dataclass(frozen=True)
class RoleConfig:
    """Credentials for one end: ``[authenticate.client]`` or ``.server``."""

    truststore: str | None = None
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    ciphersuites: str | None = None


@dataclass(frozen=True)
class Config:
    path: str
    loglevel: int = 0
    keyrings: tuple[str, ...] = ()
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    client_handshake_timeout: float = DEFAULT_CLIENT_HANDSHAKE_TIMEOUT
    session_reuse: bool = False
    session_lifetime: float = DEFAULT_SESSION_LIFETIME
    session_cache_size: int = DEFAULT_SESSION_CACHE_SIZE
    client: RoleConfig = RoleConfig()
    server: RoleConfig = RoleConfig()
    netns_default: str | None = None
    netns_unnamed: str | None = None
    netns_unnamed_userns: bool = False
    netns_max: int = DEFAULT_MAX_NAMESPACES
    worker_user: str = "tlshd"

    def netns_config(self, name: str) -> str | None:
        """The configuration file for named namespace ``name``, if any."""
        own = os.path.join(os.path.dirname(self.path), "netns", name,
                           "config")
        if os.path.exists(own):
            return own
        return self.netns_default


def find_config(explicit: str | None) -> str:
    """Pick the configuration file the way ktls-utils does."""
    if explicit:
        return explicit
    if os.path.exists(LEGACY_PATH):
        log.warning("Please relocate %s to %s", LEGACY_PATH, DEFAULT_PATH)
        return LEGACY_PATH
    return DEFAULT_PATH


class _Parser(configparser.RawConfigParser):
    path = ""

    def optionxform(self, optionstr: str) -> str:
        return optionstr  # GLib key files are case-sensitive


def _int(parser: _Parser, section: str, key: str,
         default: int) -> int:
    raw = parser.get(section, key, fallback=None)
    if raw is None or raw == "":
        return default
    try:
        return int(raw, 0)
    except ValueError as e:
        raise ConfigError("[%s] %s: %r is not a number"
                          % (section, key, raw)) from e


def _bool(parser: _Parser, section: str, key: str, default: bool) -> bool:
    """A GLib key-file boolean: true/false (1/0 accepted, as GLib does)."""
    raw = parser.get(section, key, fallback=None)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise ConfigError("[%s] %s: %r is not true or false"
                      % (section, key, raw))


def _role(parser: _Parser, section: str) -> RoleConfig:
    if not parser.has_section(section):
        return RoleConfig()
    values: dict[str, str] = {}
    for key, raw in parser.items(section):
        if key in _ROLE_KEYS:
            if raw:
                values[_ROLE_KEYS[key]] = raw
        elif key not in _KNOWN_UNUSED.get(section, ()):
            log.warning("%s: unknown key [%s] %s ignored", parser.path,
                        section, key)
    return RoleConfig(**values)


def parse(text: str, path: str = "<string>") -> Config:
    """Parse configuration text; raises ConfigError on malformed input."""
    parser = _Parser(delimiters=("=",), comment_prefixes=("#",),
                     inline_comment_prefixes=None, strict=True,
                     empty_lines_in_values=False, interpolation=None)
    parser.path = path
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise ConfigError("%s: %s" % (path, e)) from e
    keyrings = tuple(
        k.strip()
        for k in parser.get("authenticate", "keyrings", fallback="").split(";")
        if k.strip()
    )
    timeout = parser.get("authenticate", "handshake_timeout", fallback="")
    try:
        handshake_timeout = (float(timeout) if timeout
                             else DEFAULT_HANDSHAKE_TIMEOUT)
        client_timeout = (float(timeout) if timeout
                          else DEFAULT_CLIENT_HANDSHAKE_TIMEOUT)
    except ValueError as e:
        raise ConfigError("%s: handshake_timeout %r is not a number"
                          % (path, timeout)) from e
    if not 0.1 <= handshake_timeout <= 600:
        raise ConfigError("%s: handshake_timeout out of range" % path)
    lifetime = parser.get("authenticate", "session_lifetime", fallback="")
    try:
        session_lifetime = (float(lifetime) if lifetime
                            else DEFAULT_SESSION_LIFETIME)
    except ValueError as e:
        raise ConfigError("%s: session_lifetime %r is not a number"
                          % (path, lifetime)) from e
    if not 1 <= session_lifetime <= MAX_SESSION_LIFETIME:
        raise ConfigError("%s: session_lifetime out of range (1 to %d)"
                          % (path, MAX_SESSION_LIFETIME))
    cache_size = _int(parser, "authenticate", "session_cache_size",
                      DEFAULT_SESSION_CACHE_SIZE)
    if not 1 <= cache_size <= MAX_SESSION_CACHE_SIZE:
        raise ConfigError("%s: session_cache_size out of range (1 to %d)"
                          % (path, MAX_SESSION_CACHE_SIZE))
    for key, _ in (parser.items("netns") if parser.has_section("netns")
                   else []):
        if key not in ("default", "unnamed", "unnamed_userns",
                       "max_namespaces"):
            log.warning("%s: unknown key [netns] %s ignored", path, key)
    netns_max = _int(parser, "netns", "max_namespaces",
                     DEFAULT_MAX_NAMESPACES)
    if not 1 <= netns_max <= MAX_MAX_NAMESPACES:
        raise ConfigError("%s: max_namespaces out of range (1 to %d)"
                          % (path, MAX_MAX_NAMESPACES))
    return Config(
        path=path,
        netns_default=parser.get("netns", "default", fallback="") or None,
        netns_unnamed=parser.get("netns", "unnamed", fallback="") or None,
        netns_unnamed_userns=_bool(parser, "netns", "unnamed_userns",
                                   False),
        netns_max=netns_max,
        worker_user=parser.get("sandbox", "user", fallback="") or "tlshd",
        loglevel=_int(parser, "debug", "loglevel", 0),
        keyrings=keyrings,
        handshake_timeout=handshake_timeout,
        client_handshake_timeout=client_timeout,
        session_reuse=_bool(parser, "authenticate", "session_reuse", False),
        session_lifetime=session_lifetime,
        session_cache_size=cache_size,
        client=_role(parser, "authenticate.client"),
        server=_role(parser, "authenticate.server"),
    )


def load(path: str) -> Config:
    """Read and parse ``path``; raises ConfigError if that fails, or if
    someone other than root could have written it."""
    try:
        with open(path, "rb") as f:
            check_owner(path, os.fstat(f.fileno()))
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError("Failed to read %s: %s" % (path, e.strerror)) from e
    return parse_bytes(raw, path)


def check_owner(path: str, st: os.stat_result) -> None:
    """Refuse a configuration file another user could have written.

    It names the keys and CAs a root process trusts, so it must be as
    safe as they are: owned by root (or by whoever runs us, so that a
    user can run the tests), writable by its owner only; OpenSSH checks
    its users' files the same way.  (Checked on the open file, so a
    rename in between cannot swap it.)
    """
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError("%s: bad owner: uid %d, must be root"
                          % (path, st.st_uid))
    if st.st_mode & 0o022:
        raise ConfigError("%s: bad permissions: mode %04o is group- or "
                          "world-writable" % (path, st.st_mode & 0o7777))


# Private keys already warned about, by path: once per process is enough.
_warned_keys: set[str] = set()


def key_file_problem(path: str, owners: set[int]) -> str | None:
    """Why private key ``path`` is not private, or None.

    A key should be readable by its owner alone, and owned by root or by
    the worker user (``owners``); other users could read it otherwise.
    Only a warning, as OpenSSH's "UNPROTECTED PRIVATE KEY FILE" would
    break existing set-ups (ktls-utils does not check).
    """
    try:
        st = os.stat(path)
    except OSError:
        return None  # loading it will report that
    if st.st_uid not in owners:
        return ("private key %s is owned by uid %d, not by root or the "
                "worker user" % (path, st.st_uid))
    if st.st_mode & 0o077:
        return ("private key %s is readable or writable by group or other "
                "(mode %04o); chmod 600 it" % (path, st.st_mode & 0o7777))
    return None


def key_problems(cfg: Config, owners: set[int]) -> dict[str, str]:
    """The private keys of ``cfg`` others could read: path -> why."""
    problems = {}
    for role in (cfg.client, cfg.server):
        if role.private_key is not None:
            problem = key_file_problem(role.private_key, owners)
            if problem is not None:
                problems[role.private_key] = problem
    return problems


def warn_key_files(cfg: Config, owners: set[int]) -> None:
    """Warn about private keys others could read, once per path."""
    for path, problem in key_problems(cfg, owners).items():
        if path not in _warned_keys:
            _warned_keys.add(path)
            log.warning("%s: %s", cfg.path, problem)


def parse_bytes(raw: bytes, path: str) -> Config:
    """Parse a file's contents; raises ConfigError on malformed input."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("%s is larger than %d bytes"
                          % (path, MAX_CONFIG_BYTES))
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise ConfigError("%s is not UTF-8 text" % path) from e
    return parse(text, path)
