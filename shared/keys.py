"""Kernel keys (keyctl) through raw syscalls via ctypes.

No libkeyutils and no new dependency: the handful of keyctl operations
tlshd needs.  Possession matters: even root gets EACCES reading a key it
does not possess (through one of its keyrings) unless the key grants user
READ.  Errors are raised as OSError with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import os
import platform

# keyctl syscall numbers per architecture.
_NR_KEYCTL = {"x86_64": 250, "aarch64": 219}

KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4

KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_DESCRIBE = 6
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11

# Largest payload read: user keys hold at most 32767 bytes.
MAX_PAYLOAD = 65536

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _keyctl(op: int, *args: int | bytes | ctypes.Array[ctypes.c_char] | None
            ) -> int:
    nr = _NR_KEYCTL.get(platform.machine())
    if nr is None:
        raise OSError(38, "keyctl: unsupported architecture")
    cargs: list[object] = []
    for a in args:
        # Every integer goes as a C long: keyctl's arguments are longs.
        cargs.append(ctypes.c_long(a) if isinstance(a, int) else a)
    ret = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_long(op), *cargs))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, "keyctl(%d): %s" % (op, os.strerror(err)))
    return ret


def _read_buffer(op: int, serial: int) -> bytes:
    size = _keyctl(op, serial, None, 0)
    while True:
        if size > MAX_PAYLOAD:
            raise OSError(27, "key %d payload too large" % serial)
        buf = ctypes.create_string_buffer(max(size, 1))
        got = _keyctl(op, serial, buf, size)
        if got <= size:
            return buf.raw[:got]
        size = got  # the key grew between the two calls


def read(serial: int) -> bytes:
    """Return the payload of key ``serial``."""
    return _read_buffer(KEYCTL_READ, serial)


def describe(serial: int) -> tuple[str, str]:
    """Return (type, description) of key ``serial``."""
    raw = _read_buffer(KEYCTL_DESCRIBE, serial).rstrip(b"\0").decode()
    # "type;uid;gid;perm;description": the description may contain ';'.
    parts = raw.split(";", 4)
    if len(parts) != 5:
        raise OSError(22, "unexpected key description %r" % raw)
    return parts[0], parts[4]


def search(keyring: int, key_type: str, description: str) -> int:
    """Find a key by type and description under ``keyring``."""
    return _keyctl(KEYCTL_SEARCH, keyring, key_type.encode() + b"\0",
                   description.encode() + b"\0", 0)


def link(serial: int, keyring: int) -> None:
    _keyctl(KEYCTL_LINK, serial, keyring)


def unlink(serial: int, keyring: int) -> None:
    _keyctl(KEYCTL_UNLINK, serial, keyring)


def join_session_keyring(name: str | None = None) -> int:
    """Join a new (anonymous when ``name`` is None) session keyring."""
    return _keyctl(KEYCTL_JOIN_SESSION_KEYRING,
                   None if name is None else name.encode() + b"\0")
