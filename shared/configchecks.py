"""Checks of the files a configuration names, for warnings and
--check-config: private keys others could read, paths tlshd.service
hides from the daemon, ktls-utils session tag files, x509.pq.certificate
files whose key is not ML-DSA; and the settings a namespace's file makes
in vain.  Reached as ``config.X``
(tlshd.shared.config re-exports them).
"""

from __future__ import annotations

import logging
import os

# typing.TYPE_CHECKING without importing typing before the daemon listens
# (docs/benchmarks.md, Start-up); mypy treats any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from tlshd.shared.config import Config

# The messages are the configuration's: log them as tlshd.shared.config.
log = logging.getLogger("tlshd.shared.config")

# Where ktls-utils reads its session tags (tls-session-tags(7)).
TAGS_DIR = "/etc/tlshd/tags.d"
# Read from the main file only (tlshd.conf(5)).
MAIN_FILE_ONLY = ("netns", "sandbox")
# What tlshd.service hides from the daemon: path prefix -> the setting.
SERVICE_HIDDEN = (
    ("/home", "ProtectHome=yes"),
    ("/root", "ProtectHome=yes"),
    ("/run/user", "ProtectHome=yes"),
    ("/tmp", "PrivateTmp=yes"),
    ("/var/tmp", "PrivateTmp=yes"),
)


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
        for path in (role.private_key, role.pq_private_key):
            if path is not None:
                problem = key_file_problem(path, owners)
                if problem is not None:
                    problems[path] = problem
    return problems


def pq_problems(cfg: Config) -> list[str]:
    """x509.pq.certificate files whose first certificate's key is not
    ML-DSA: the worker skips such a pair (as ktls-utils does), so its
    peers never get a post-quantum certificate.

    Only the certificate is read here (public data); that the private
    key matches it is checked by the worker that loads both.
    """
    found = []
    for section, role in (("authenticate.client", cfg.client),
                          ("authenticate.server", cfg.server)):
        path = role.pq_certificate
        if path is None:
            continue
        algorithm = _public_key_algorithm(path)
        if algorithm is not None and not algorithm.startswith("ML-DSA"):
            line = cfg.line(section, "x509.pq.certificate")
            found.append("%s:%s: [%s] x509.pq.certificate %s has a %s key, "
                         "not ML-DSA: tlshd ignores this pair"
                         % (cfg.path, line, section, path, algorithm))
    return found


def _public_key_algorithm(path: str) -> str | None:
    """"ML-DSA-65", "EC", "RSA"...: the key type of the first certificate
    in PEM file ``path``; None if it cannot be read (the worker that
    loads it reports why)."""
    # Imported here: the supervisor starts without cryptography.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import mldsa

    try:
        with open(path, "rb") as f:
            key = x509.load_pem_x509_certificates(f.read())[0].public_key()
    except (OSError, ValueError, IndexError, UnsupportedAlgorithm):
        return None
    for size, cls in ((44, mldsa.MLDSA44PublicKey),
                      (65, mldsa.MLDSA65PublicKey),
                      (87, mldsa.MLDSA87PublicKey)):
        if isinstance(key, cls):
            return "ML-DSA-%d" % size
    return type(key).__name__.removesuffix("PublicKey").lstrip("_")


def warn_key_files(cfg: Config, owners: set[int]) -> None:
    """Warn about private keys others could read, once per path."""
    for path, problem in key_problems(cfg, owners).items():
        if path not in _warned_keys:
            _warned_keys.add(path)
            log.warning("%s: %s", cfg.path, problem)
