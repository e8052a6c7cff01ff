"""Read tlshd's configuration file (the ktls-utils format).

The file is a GLib key file: ``[section]`` headers, ``key=value`` lines,
``#`` comments, and ``;`` separating list items.  Every key ktls-utils
documents is accepted, so an existing /etc/tlshd/config works unchanged.
Unknown sections and keys, and ktls-utils keys set to something that has
no effect here, are warned about (file and line) and ignored.  Values
that cannot be used, and relative file names, make the file invalid; the
error names the file, line, section and key.

Extensions (absent from ktls-utils, all optional):
  [authenticate] handshake_timeout = seconds for requests that carry no
      TIMEOUT attribute, both roles (NFS and NFSD send none; the NFS
      client gives up after 10 s, NFSD after 20 s).  Unset: 8 s for a
      client handshake, 15 s for a server handshake.
  [authenticate.client|server] x509.ciphersuites = OpenSSL TLS 1.3 suite
      list restricting what this end offers or accepts.

ktls-utils 1.3's x509.pq.certificate / x509.pq.private_key (an ML-DSA pair
next to the classical one) are read into RoleConfig.pq_*.
  [authenticate] session_reuse = true|false (default false): TLS 1.3
      session reuse between tlshd instances (tlshd.worker.sessionreuse);
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
  [netns] worker_idle_timeout = seconds a namespace's worker may sit with
      nothing in flight before it exits (default 60; 0: keep every
      namespace's worker for ever, started with the namespace).  A
      namespace without a worker starts one at its next request.
  [sandbox] user = the unprivileged user workers run as (default tlshd).

Parsing only: nothing here opens a certificate or a key.  The key-file
syntax is tlshd.shared.keyfile; the checks of the files a configuration
names (private key modes, paths tlshd.service hides, ktls-utils tag
files) are tlshd.shared.configchecks.  The worker that
serves a namespace loads the files its own configuration names.
"""

from __future__ import annotations

import logging
import os

# Re-exported: the checks of what a configuration names, and ConfigError,
# are reached as config.X.
from tlshd.shared.configchecks import MAIN_FILE_ONLY as MAIN_FILE_ONLY
from tlshd.shared.configchecks import hidden_by_service as hidden_by_service
from tlshd.shared.configchecks import key_problems as key_problems
from tlshd.shared.configchecks import (
    namespace_warnings as namespace_warnings,
)
from tlshd.shared.configchecks import pq_problems as pq_problems
from tlshd.shared.configchecks import service_warnings as service_warnings
from tlshd.shared.configchecks import tags_files as tags_files
from tlshd.shared.configchecks import warn_key_files as warn_key_files
from tlshd.shared.errors import ConfigError as ConfigError
from tlshd.shared.frozen import Frozen
from tlshd.shared.keyfile import KeyFile

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
# An idle worker costs about 8 MiB; a new one from the template costs a
# fraction of a second, and bursts (nconnect, NVMe queues, mount retries)
# come within seconds: a minute keeps a burst on one worker.
DEFAULT_WORKER_IDLE_TIMEOUT = 60.0
MAX_WORKER_IDLE_TIMEOUT = 7 * 24 * 3600.0

_ROLE_KEYS = {
    "x509.truststore": "truststore",
    "x509.crl": "crl",
    "x509.certificate": "certificate",
    "x509.private_key": "private_key",
    "x509.ciphersuites": "ciphersuites",
    "x509.pq.certificate": "pq_certificate",
    "x509.pq.private_key": "pq_private_key",
}
_ROLE_SECTIONS = ("authenticate.client", "authenticate.server")
# Every key read here, by section.
_KEYS: dict[str, frozenset[str]] = {
    "debug": frozenset({"loglevel"}),
    "authenticate": frozenset({"keyrings", "handshake_timeout",
                               "session_reuse", "session_lifetime",
                               "session_cache_size"}),
    "authenticate.client": frozenset(_ROLE_KEYS),
    "authenticate.server": frozenset(_ROLE_KEYS),
    "netns": frozenset({"default", "unnamed", "unnamed_userns",
                        "max_namespaces", "worker_idle_timeout"}),
    "sandbox": frozenset({"user"}),
}
# Keys ktls-utils knows that have no effect here: a warning when set
# (to anything but the value that does nothing there either).
_NO_EFFECT: dict[str, dict[str, str]] = {
    "debug": {
        "tls": "ktls-utils' GnuTLS debug level",
        "nl": "ktls-utils' libnl debug level",
        "delay_done": "ktls-utils' testing aid",
    },
    "authenticate.server": {
        "x509.client_auth": "not supported (nor by released ktls-utils)",
        "x509.client_allowed_sans": "not supported (nor by released "
                                    "ktls-utils)",
    },
}
# Keys naming a file: absolute paths only.
_PATH_KEYS = {
    "authenticate.client": ("x509.truststore", "x509.crl",
                            "x509.certificate", "x509.private_key",
                            "x509.pq.certificate", "x509.pq.private_key"),
    "authenticate.server": ("x509.truststore", "x509.crl",
                            "x509.certificate", "x509.private_key",
                            "x509.pq.certificate", "x509.pq.private_key"),
    "netns": ("default", "unnamed"),
}


class RoleConfig(Frozen):
    """Credentials for one end: ``[authenticate.client]`` or ``.server``.

    ``pq_certificate``, ``pq_private_key``: the ML-DSA pair presented to
    peers that can verify it (tlshd.worker.tlscreds).
    """

    __slots__ = ("certificate", "ciphersuites", "crl", "pq_certificate",
                 "pq_private_key", "private_key", "truststore")

    def __init__(self, truststore: str | None = None, crl: str | None = None,
                 certificate: str | None = None,
                 private_key: str | None = None,
                 ciphersuites: str | None = None,
                 pq_certificate: str | None = None,
                 pq_private_key: str | None = None) -> None:
        self.truststore = truststore
        self.crl = crl
        self.certificate = certificate
        self.private_key = private_key
        self.ciphersuites = ciphersuites
        self.pq_certificate = pq_certificate
        self.pq_private_key = pq_private_key


class PathSetting(Frozen):
    """A key naming a file, where it is set."""

    __slots__ = ("key", "line", "section", "value")

    def __init__(self, section: str, key: str, value: str,
                 line: int) -> None:
        self.section = section
        self.key = key
        self.value = value
        self.line = line


_NO_ROLE = RoleConfig()


class Config(Frozen):
    """One configuration file's settings (see parse)."""

    __slots__ = ("client", "client_handshake_timeout", "handshake_timeout",
                 "keyrings", "loglevel", "netns_default", "netns_max",
                 "netns_unnamed", "netns_unnamed_userns", "path", "paths",
                 "server", "session_cache_size", "session_lifetime",
                 "session_reuse", "warnings", "where", "worker_idle_timeout",
                 "worker_user")
    UNCOMPARED = frozenset({"warnings", "where", "paths"})

    def __init__(
            self, path: str, *, loglevel: int = 0,
            keyrings: tuple[str, ...] = (),
            handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
            client_handshake_timeout: float = (
                DEFAULT_CLIENT_HANDSHAKE_TIMEOUT),
            session_reuse: bool = False,
            session_lifetime: float = DEFAULT_SESSION_LIFETIME,
            session_cache_size: int = DEFAULT_SESSION_CACHE_SIZE,
            client: RoleConfig = _NO_ROLE, server: RoleConfig = _NO_ROLE,
            netns_default: str | None = None,
            netns_unnamed: str | None = None,
            netns_unnamed_userns: bool = False,
            netns_max: int = DEFAULT_MAX_NAMESPACES,
            worker_idle_timeout: float = DEFAULT_WORKER_IDLE_TIMEOUT,
            worker_user: str = "tlshd", warnings: tuple[str, ...] = (),
            where: dict[str, int] | None = None,
            paths: tuple[PathSetting, ...] = ()) -> None:
        self.path = path
        self.loglevel = loglevel
        self.keyrings = keyrings
        self.handshake_timeout = handshake_timeout
        self.client_handshake_timeout = client_handshake_timeout
        self.session_reuse = session_reuse
        self.session_lifetime = session_lifetime
        self.session_cache_size = session_cache_size
        self.client = client
        self.server = server
        self.netns_default = netns_default
        self.netns_unnamed = netns_unnamed
        self.netns_unnamed_userns = netns_unnamed_userns
        self.netns_max = netns_max
        self.worker_idle_timeout = worker_idle_timeout
        self.worker_user = worker_user
        # Problems that do not make the file unusable, "path:line: what".
        self.warnings = warnings
        # Line of each "section" and "section key" present in the file.
        self.where = {} if where is None else where
        # Every file name the file sets (absolute paths only).
        self.paths = paths

    def line(self, section: str, key: str | None = None) -> int | None:
        """Where ``[section]`` (or its ``key``) is set, if it is."""
        return self.where.get(section if key is None
                              else "%s %s" % (section, key))

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


def _role(kf: KeyFile, section: str) -> RoleConfig:
    values: dict[str, str] = {}
    for key, field_name in _ROLE_KEYS.items():
        if key in _PATH_KEYS[section]:
            text = kf.path_value(section, key)
        else:
            text = kf.get(section, key) or None
        if text is not None:
            values[field_name] = text
    return RoleConfig(**values)


def parse(text: str, path: str = "<string>") -> Config:
    """Parse configuration text; raises ConfigError on malformed input.

    Problems that do not make the file unusable (unknown sections and
    keys, ktls-utils settings without effect here) are returned in the
    Config's ``warnings``, each naming the file and line.
    """
    kf = KeyFile(text, path)
    kf.check_names(_KEYS, _NO_EFFECT)
    keyrings = tuple(k.strip() for k in kf.get("authenticate",
                                               "keyrings").split(";")
                     if k.strip())
    timeout = kf.number("authenticate", "handshake_timeout", 0, 0.1, 600,
                        integer=False)
    session_lifetime = kf.number("authenticate", "session_lifetime",
                                 DEFAULT_SESSION_LIFETIME, 1,
                                 MAX_SESSION_LIFETIME, integer=False)
    cache_size = int(kf.number("authenticate", "session_cache_size",
                               DEFAULT_SESSION_CACHE_SIZE, 1,
                               MAX_SESSION_CACHE_SIZE, integer=True))
    netns_max = int(kf.number("netns", "max_namespaces",
                              DEFAULT_MAX_NAMESPACES, 1, MAX_MAX_NAMESPACES,
                              integer=True))
    idle_timeout = kf.number("netns", "worker_idle_timeout",
                             DEFAULT_WORKER_IDLE_TIMEOUT, 0,
                             MAX_WORKER_IDLE_TIMEOUT, integer=False)
    loglevel = int(kf.number("debug", "loglevel", 0, 0, 2 ** 31 - 1,
                             integer=True))
    client = _role(kf, "authenticate.client")
    server = _role(kf, "authenticate.server")
    where: dict[str, int] = dict(kf.section_lines)
    paths = []
    for section, keys in kf.sections.items():
        for key, value in keys.items():
            where["%s %s" % (section, key)] = value.line
            if (key in _PATH_KEYS.get(section, ())
                    and value.text.startswith("/")):
                paths.append(PathSetting(section, key, value.text,
                                         value.line))
    return Config(
        path=path,
        netns_default=kf.path_value("netns", "default"),
        netns_unnamed=kf.path_value("netns", "unnamed"),
        netns_unnamed_userns=kf.boolean("netns", "unnamed_userns", False),
        netns_max=netns_max,
        worker_idle_timeout=idle_timeout,
        worker_user=kf.get("sandbox", "user") or "tlshd",
        loglevel=loglevel,
        keyrings=keyrings,
        handshake_timeout=timeout or DEFAULT_HANDSHAKE_TIMEOUT,
        client_handshake_timeout=timeout or DEFAULT_CLIENT_HANDSHAKE_TIMEOUT,
        session_reuse=kf.boolean("authenticate", "session_reuse", False),
        session_lifetime=session_lifetime,
        session_cache_size=cache_size,
        client=client,
        server=server,
        warnings=tuple(kf.warnings),
        where=where,
        paths=tuple(paths),
    )


# Warnings already logged, by text (file and line included): once per
# process, although the supervisor reads a file again for each namespace
# that uses it and on every reload.
_warned: set[str] = set()


def log_warnings(cfg: Config) -> None:
    """Log ``cfg``'s warnings, each once per process."""
    for warning in cfg.warnings:
        if warning not in _warned:
            _warned.add(warning)
            log.warning("%s", warning)


def load(path: str, warn: bool = True) -> Config:
    """Read and parse ``path``; raises ConfigError if that fails, or if
    someone other than root could have written it.

    ``warn``: log the file's warnings (once per process).  Workers and
    --check-config pass False: the supervisor has logged them already,
    and the check prints them itself."""
    try:
        with open(path, "rb") as f:
            check_owner(path, os.fstat(f.fileno()))
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError("Failed to read %s: %s" % (path, e.strerror)) from e
    cfg = parse_bytes(raw, path)
    if warn:
        log_warnings(cfg)
    return cfg


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
