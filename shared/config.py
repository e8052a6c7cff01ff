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

import difflib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

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
                        "max_namespaces"}),
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
    "authenticate.client": {
        "x509.pq.certificate": "post-quantum (ML-DSA) certificates are "
                               "not supported",
        "x509.pq.private_key": "post-quantum (ML-DSA) certificates are "
                               "not supported",
    },
    "authenticate.server": {
        "x509.pq.certificate": "post-quantum (ML-DSA) certificates are "
                               "not supported",
        "x509.pq.private_key": "post-quantum (ML-DSA) certificates are "
                               "not supported",
        "x509.client_auth": "not supported (nor by released ktls-utils)",
        "x509.client_allowed_sans": "not supported (nor by released "
                                    "ktls-utils)",
    },
}
# Keys naming a file: absolute paths only.
_PATH_KEYS = {
    "authenticate.client": ("x509.truststore", "x509.crl",
                            "x509.certificate", "x509.private_key"),
    "authenticate.server": ("x509.truststore", "x509.crl",
                            "x509.certificate", "x509.private_key"),
    "netns": ("default", "unnamed"),
}
# Read from the main file only (tlshd.conf(5)).
MAIN_FILE_ONLY = ("netns", "sandbox")
# Where ktls-utils reads its session tags (tls-session-tags(7)).
TAGS_DIR = "/etc/tlshd/tags.d"
# What tlshd.service hides from the daemon: path prefix -> the setting.
SERVICE_HIDDEN = (
    ("/home", "ProtectHome=yes"),
    ("/root", "ProtectHome=yes"),
    ("/run/user", "ProtectHome=yes"),
    ("/tmp", "PrivateTmp=yes"),
    ("/var/tmp", "PrivateTmp=yes"),
)


@dataclass(frozen=True)
class RoleConfig:
    """Credentials for one end: ``[authenticate.client]`` or ``.server``."""

    truststore: str | None = None
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    ciphersuites: str | None = None


@dataclass(frozen=True)
class PathSetting:
    """A key naming a file, where it is set."""

    section: str
    key: str
    value: str
    line: int


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
    # Problems that do not make the file unusable, "path:line: what".
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # Line of each "section" and "section key" present in the file.
    where: dict[str, int] = field(default_factory=dict, compare=False)
    # Every file name the file sets (absolute paths only).
    paths: tuple[PathSetting, ...] = field(default=(), compare=False)

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


def _show(text: str, limit: int = 60) -> str:
    """``text`` quoted for a one-line message, shortened if long."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def _is_url(value: str) -> bool:
    """A URL scheme prefix, as ktls-utils tells key URLs from paths."""
    if not value[:1].isascii() or not value[:1].isalpha():
        return False
    for ch in value[1:]:
        if ch == ":":
            return True
        if not (ch.isascii() and (ch.isalnum() or ch in "+-.")):
            return False
    return False


def _fmt(number: float) -> str:
    return "%d" % number if number == int(number) else "%g" % number


def _hint(name: str, known: Iterable[str], fmt: str = "%s") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return " (did you mean %s?)" % (fmt % close[0]) if close else ""


@dataclass(frozen=True)
class _Value:
    text: str
    line: int


class _KeyFile:
    """A GLib key file, read into sections of key -> value and line."""

    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.sections: dict[str, dict[str, _Value]] = {}
        self.section_lines: dict[str, int] = {}
        self.warnings: list[str] = []
        current: str | None = None
        for number, raw in enumerate(text.split("\n"), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                name = line[1:-1]
                if (not line.endswith("]") or not name or "[" in name
                        or "]" in name or not name.isprintable()):
                    raise self.error(number, "malformed section header %s"
                                     % _show(line))
                current = name
                # Repeated headers continue the section, as in GLib.
                self.sections.setdefault(name, {})
                self.section_lines.setdefault(name, number)
                continue
            key, eq, value = line.partition("=")
            key = key.strip()
            if not eq or not key:
                raise self.error(number, "%s is not a [section] header, a "
                                 "key=value line or a # comment"
                                 % _show(line))
            if current is None:
                raise self.error(number, "%s= comes before any [section]"
                                 % key)
            old = self.sections[current].get(key)
            if old is not None:
                raise self.error(number, "[%s] %s is set twice (first on "
                                 "line %d)" % (current, key, old.line))
            self.sections[current][key] = _Value(value.strip(), number)

    def error(self, line: int, message: str) -> ConfigError:
        return ConfigError("%s:%d: %s" % (self.path, line, message))

    def warn(self, line: int, message: str) -> None:
        self.warnings.append("%s:%d: %s" % (self.path, line, message))

    def value(self, section: str, key: str) -> _Value | None:
        return self.sections.get(section, {}).get(key)

    def get(self, section: str, key: str) -> str:
        value = self.value(section, key)
        return "" if value is None else value.text

    def check_names(self) -> None:
        """Warn once about each unknown section and key."""
        for section, keys in self.sections.items():
            if section not in _KEYS:
                self.warn(self.section_lines[section],
                          "unknown section [%s] ignored%s"
                          % (section, _hint(section, _KEYS, "[%s]")))
                continue
            no_effect = _NO_EFFECT.get(section, {})
            for key, value in keys.items():
                if key in _KEYS[section]:
                    continue
                why = no_effect.get(key)
                if why is None:
                    self.warn(value.line, "unknown key %s in [%s] ignored%s"
                              % (key, section,
                                 _hint(key, [*_KEYS[section], *no_effect])))
                elif value.text not in ("", "0"):
                    self.warn(value.line, "[%s] %s has no effect in this "
                              "tlshd: %s" % (section, key, why))

    def number(self, section: str, key: str, default: float,
               low: float, high: float, integer: bool) -> float:
        value = self.value(section, key)
        if value is None or value.text == "":
            return default
        try:
            number = int(value.text, 10) if integer else float(value.text)
        except ValueError:
            raise self.error(value.line, "[%s] %s: %s is not a%s number"
                             % (section, key, _show(value.text),
                                " whole" if integer else "")) from None
        if not low <= number <= high:
            raise self.error(value.line, "[%s] %s: %s is out of range "
                             "(%s to %s)" % (section, key, value.text,
                                             _fmt(low), _fmt(high)))
        return number

    def boolean(self, section: str, key: str, default: bool) -> bool:
        """A GLib key-file boolean: true/false (1/0 accepted, as GLib
        does)."""
        value = self.value(section, key)
        if value is None or value.text == "":
            return default
        if value.text in ("true", "1"):
            return True
        if value.text in ("false", "0"):
            return False
        raise self.error(value.line, "[%s] %s: %s is not true or false"
                         % (section, key, _show(value.text)))

    def path_value(self, section: str, key: str) -> str | None:
        """A file name: absolute, or refused (relative to what? the
        service runs in /, a shell wherever it is)."""
        value = self.value(section, key)
        if value is None or value.text == "":
            return None
        if key == "x509.private_key" and _is_url(value.text):
            # Only the scheme: a PKCS#11 URL may carry a PIN.
            self.warn(value.line, "[%s] %s: %s URLs (PKCS#11 tokens and "
                      "the like) are not supported by this tlshd; the "
                      "setting has no effect"
                      % (section, key, value.text.split(":", 1)[0] + ":"))
            return None
        if not value.text.startswith("/"):
            raise self.error(value.line, "[%s] %s: %s is not an absolute "
                             "path (relative paths are refused)"
                             % (section, key, _show(value.text)))
        return value.text


def _role(kf: _KeyFile, section: str) -> RoleConfig:
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
    kf = _KeyFile(text, path)
    kf.check_names()
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


def namespace_warnings(cfg: Config) -> list[str]:
    """Settings of a namespace's file that only the main file's count."""
    found = []
    for section in MAIN_FILE_ONLY:
        line = cfg.line(section)
        if line is not None:
            found.append("%s:%d: [%s] has no effect in a namespace's file "
                         "(read from the main file only)"
                         % (cfg.path, line, section))
    line = cfg.line("debug", "loglevel")
    if line is not None and cfg.loglevel:
        found.append("%s:%d: [debug] loglevel has no effect in a "
                     "namespace's file (read from the main file only)"
                     % (cfg.path, line))
    return found


def hidden_by_service(path: str) -> str | None:
    """The tlshd.service setting that hides ``path`` from the daemon."""
    real = os.path.realpath(path)
    for candidate in dict.fromkeys((path, real)):
        for prefix, setting in SERVICE_HIDDEN:
            if candidate == prefix or candidate.startswith(prefix + "/"):
                shown = (path if candidate == path
                         else "%s (a link to %s)" % (path, real))
                return ("%s is under %s, which tlshd.service hides from "
                        "the daemon (%s)" % (shown, prefix, setting))
    return None


def service_warnings(cfg: Config) -> list[str]:
    """Files named by ``cfg`` that tlshd.service cannot see at all."""
    found = []
    for setting in cfg.paths:
        why = hidden_by_service(setting.value)
        if why is not None:
            found.append("%s:%d: [%s] %s: %s" % (cfg.path, setting.line,
                                                  setting.section,
                                                  setting.key, why))
    return found


def tags_files(cfg: Config) -> list[str]:
    """ktls-utils session tag files (tls-session-tags(7)) on this host."""
    found = []
    dirs = dict.fromkeys((os.path.join(os.path.dirname(cfg.path),
                                       "tags.d"), TAGS_DIR))
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        found += [os.path.join(directory, n) for n in names
                  if n.endswith((".yml", ".yaml"))]
    return found


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
