"""Kernel keys (keyctl) through raw syscalls via ctypes.

No libkeyutils and no new dependency: the handful of keyctl operations
tlshd needs.  Possession matters: even root gets EACCES reading a key it
does not possess (through one of its keyrings) unless the key grants user
READ, and the unprivileged worker depends on possession entirely.  Errors
are raised as OSError with the kernel's errno.

Who possesses what in tlshd: the supervisor joins a session keyring of its
own and links into it its process keyring (where the kernel links each
ACCEPT request's keyring) and the well-known keyrings; workers inherit that
session keyring, so they possess those keyrings and the keys inside them.
"""

from __future__ import annotations

import ctypes
import os
import platform

# keyctl / add_key syscall numbers per architecture.
_NR_KEYCTL = {"x86_64": 250, "aarch64": 219}
_NR_ADD_KEY = {"x86_64": 248, "aarch64": 217}

KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4

KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_SETPERM = 5
KEYCTL_DESCRIBE = 6
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11

# Keyrings ktls-utils links into its session keyring at start-up.
WELL_KNOWN_KEYRINGS = (".nvme", ".nfs", ".nfsd")
# The key type of NVMe/TCP PSKs (registered by the nvme-keyring module).
PSK_KEY_TYPE = "psk"

# Largest payload read: user keys hold at most 32767 bytes.
MAX_PAYLOAD = 65536

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_Arg = int | bytes | ctypes.Array[ctypes.c_char] | None


def _syscall(table: dict[str, int], *args: _Arg) -> int:
    nr = table.get(platform.machine())
    if nr is None:
        raise OSError(38, "keyctl: unsupported architecture")
    # Every integer goes as a C long: the syscalls' arguments are longs.
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ret = int(_libc.syscall(ctypes.c_long(nr), *cargs))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _keyctl(op: int, *args: _Arg) -> int:
    return _syscall(_NR_KEYCTL, op, *args)


def _cstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    if b"\0" in raw:
        raise OSError(22, "key type or description contains NUL")
    return raw + b"\0"


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
    """Return the payload of key ``serial`` (READ permission)."""
    return _read_buffer(KEYCTL_READ, serial)


def describe(serial: int) -> tuple[str, str]:
    """Return (type, description) of key ``serial`` (VIEW permission)."""
    raw = _read_buffer(KEYCTL_DESCRIBE, serial).rstrip(b"\0").decode()
    # "type;uid;gid;perm;description": the description may contain ';'.
    parts = raw.split(";", 4)
    if len(parts) != 5:
        raise OSError(22, "unexpected key description %r" % raw)
    return parts[0], parts[4]


def search(keyring: int, key_type: str, description: str | bytes) -> int:
    """Find a key by type and description under ``keyring`` (recursively).

    The keyring must be possessed or grant SEARCH, and so must the key.
    The ``psk`` type matches when the key's description is a prefix of
    ``description`` (drivers/nvme/common/keyring.c).
    """
    return _keyctl(KEYCTL_SEARCH, keyring, _cstr(key_type),
                   _cstr(description), 0)


def link(serial: int, keyring: int) -> None:
    _keyctl(KEYCTL_LINK, serial, keyring)


def unlink(serial: int, keyring: int) -> None:
    _keyctl(KEYCTL_UNLINK, serial, keyring)


def setperm(serial: int, perm: int) -> None:
    _keyctl(KEYCTL_SETPERM, serial, perm)


def keyring_id(spec: int, create: bool = False) -> int:
    """Resolve a KEY_SPEC_* id to a serial, creating the keyring if asked."""
    return _keyctl(KEYCTL_GET_KEYRING_ID, spec, int(create))


def join_session_keyring(name: str | None = None) -> int:
    """Join a new (anonymous when ``name`` is None) session keyring."""
    return _keyctl(KEYCTL_JOIN_SESSION_KEYRING,
                   None if name is None else _cstr(name))


def add(key_type: str, description: str | bytes, payload: bytes,
        keyring: int) -> int:
    """Create or update a key in ``keyring``; return its serial."""
    buf = ctypes.create_string_buffer(payload, len(payload))
    return _syscall(_NR_ADD_KEY, _cstr(key_type), _cstr(description),
                    buf, len(payload), keyring)


def parse_proc_keys(text: str, key_type: str, name: str) -> list[int]:
    """Serials of the keys of ``key_type`` described ``name`` in a
    /proc/keys listing (one key per line: serial, flags, usage, expiry,
    perm, uid, gid, type, "description: summary")."""
    found = []
    for line in text.splitlines():
        fields = line.split(None, 8)
        if len(fields) < 9 or fields[7] != key_type:
            continue
        description = fields[8].rpartition(": ")[0] or fields[8]
        if description == name:
            found.append(int(fields[0], 16))
    return found


def find_keyrings(name: str, proc_keys: str = "/proc/keys") -> list[int]:
    """Keyrings named ``name`` that we may view, as ktls-utils finds them
    (a scan of /proc/keys: request_key cannot find unpossessed keyrings)."""
    with open(proc_keys) as f:
        return parse_proc_keys(f.read(), "keyring", name)
