"""Locate the worker's OpenSSL configuration file (``openssl.cnf``).

OpenSSL reads ``OPENSSL_CONF`` exactly once, when cryptography initialises
it on first import. This module imports neither, so a process entry point
can call :func:`use_worker_config` (or set the variable from
:func:`openssl_conf_path`) before anything loads OpenSSL.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

CONF_NAME = "openssl.cnf"
ENV_VAR = "OPENSSL_CONF"
# The extension module whose import initialises OpenSSL.
_OPENSSL_MODULE = "cryptography.hazmat.bindings._rust"


def openssl_conf_path() -> str:
    """Return the absolute path of the packaged ``openssl.cnf``."""
    packaged = resources.files(__package__ or "tlshd.worker") / CONF_NAME
    if isinstance(packaged, Path) and packaged.is_file():
        return str(packaged)
    # A strict editable install links only the files that package-data
    # lists; fall back to the file next to this module's real source.
    beside = Path(__file__).resolve().parent / CONF_NAME
    if beside.is_file():
        return str(beside)
    raise FileNotFoundError(f"{CONF_NAME} is missing from tlshd.worker")


def openssl_initialised() -> bool:
    """Return True if OpenSSL has already been loaded in this process."""
    return _OPENSSL_MODULE in sys.modules


def use_worker_config() -> str:
    """Point ``OPENSSL_CONF`` at the worker's file; return the path.

    Raises RuntimeError if OpenSSL was already initialised with some other
    configuration, because the setting would silently have no effect.
    """
    path = openssl_conf_path()
    if openssl_initialised() and os.environ.get(ENV_VAR) != path:
        raise RuntimeError(
            f"OpenSSL was initialised before {ENV_VAR} was set to {path}"
        )
    os.environ[ENV_VAR] = path
    return path
