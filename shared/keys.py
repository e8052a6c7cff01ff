"""Kernel keys (keyctl) through raw syscalls via ctypes.

No libkeyutils and no new dependency: the handful of keyctl operations
tlshd needs.  Possession matters: even root gets EACCES reading a key it
does not possess (through one of its keyrings) unless the key grants user
READ, and a process possesses whatever its session keyring reaches, also
after dropping to another uid.  Errors are raised as OSError with the
kernel's errno.

Who possesses what in tlshd: the supervisor joins a session keyring of its
own and links into it its process keyring (where the kernel links each
ACCEPT request's keyring) and the well-known keyrings.  Workers possess
nothing: a worker does not keep the session keyring it inherits from the
supervisor (that would give it every namespace's keys) but joins a new,
empty one before it drops privileges, and its seccomp filter then forbids
keyctl; the supervisor reads keys for it (tlshd.supervisor.keymaterial).

Key descriptions are attacker-controlled bytes: any local user can create a
keyring and make it visible to root, with any description but one starting
with '.' (the kernel reserves those to itself).  A description may contain
newlines and need not be UTF-8.  So descriptions are handled as bytes, and
/proc/keys is read only for candidate serials, each confirmed by
KEYCTL_DESCRIBE before use (see :func:`find_keyrings`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import sys
from dataclasses import dataclass

# keyctl / add_key syscall numbers per architecture.
_NR_KEYCTL = {"x86_64": 250, "aarch64": 219}
_NR_ADD_KEY = {"x86_64": 248, "aarch64": 217}

KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3

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

# Key serials are positive 32-bit ints (key_serial_t); negative ids are the
# KEY_SPEC_* specials, which must never come from parsed text.
MAX_SERIAL = 0x7FFFFFFF

log = logging.getLogger(__name__)

_SERIAL = re.compile(rb"([0-9a-f]{8}) ")

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


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What KEYCTL_DESCRIBE tells about a key.

    ``description`` stays bytes: its owner chose it, and it may hold any
    byte but NUL (newlines, ';', invalid UTF-8).  ``key_type`` is the name
    of a type the kernel registered, so it is plain text.
    """

    key_type: str
    uid: int
    gid: int
    perm: int
    description: bytes


def describe(serial: int) -> KeyInfo:
    """Describe key ``serial`` (VIEW permission); OSError if we cannot, or
    if the kernel's answer does not parse (it always should)."""
    raw = _read_buffer(KEYCTL_DESCRIBE, serial)
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    # "type;uid;gid;perm;description": the description may contain ';'.
    parts = raw.split(b";", 4)
    try:
        if len(parts) != 5:
            raise ValueError("%d fields" % len(parts))
        return KeyInfo(key_type=parts[0].decode("ascii"),
                       uid=int(parts[1]), gid=int(parts[2]),
                       perm=int(parts[3], 16), description=parts[4])
    except ValueError as e:  # UnicodeDecodeError included
        raise OSError(22, "unexpected description of key %d: %r (%s)"
                      % (serial, raw[:100], e)) from None


def keyring_members(serial: int) -> list[int]:
    """The serials linked directly in keyring ``serial`` (READ)."""
    raw = read(serial)
    return [int.from_bytes(raw[i : i + 4], sys.byteorder, signed=True)
            for i in range(0, len(raw) - 3, 4)]


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


def proc_keys_candidates(listing: bytes, name: bytes) -> list[int]:
    """Serials of the /proc/keys lines that mention ``name``: candidates
    for a key of that description, nothing more.

    Each key is one line, "serial flags usage expiry perm uid gid type
    description: summary", but a description may contain newlines, so a
    user can print lines of any content, naming any serial.  The kernel
    prints every key's own line starting with its real serial and whole
    description, so a real key is always among the candidates; forged
    lines only add candidates, and callers confirm each with describe().
    """
    found = []
    for line in listing.split(b"\n"):
        # The kernel prints the serial as "%08x"; anything else in the
        # first field is the tail of someone's description.
        first = _SERIAL.match(line)
        if first is None or name not in line:
            continue
        serial = int(first.group(1), 16)
        if 0 < serial <= MAX_SERIAL and serial not in found:
            found.append(serial)
    return found


def find_keyrings(name: str, proc_keys: str = "/proc/keys") -> list[int]:
    """The root-owned keyrings described exactly ``name`` that we may view.

    Like ktls-utils, the search is a scan of /proc/keys (request_key cannot
    find unpossessed keyrings), but here it only yields candidates; each is
    kept if KEYCTL_DESCRIBE says: type keyring, description ``name``, owner
    uid 0.  The owner check matters for names without a leading dot, which
    any user may give a keyring of their own ("squatting"); a non-root
    keyring of the name is refused with an error logged.  Raises OSError
    only if /proc/keys cannot be read.
    """
    wanted = name.encode()
    with open(proc_keys, "rb") as f:
        listing = f.read()
    found = []
    for serial in proc_keys_candidates(listing, wanted):
        try:
            info = describe(serial)
        except OSError:
            continue  # gone since, not viewable, or a forged serial
        if info.key_type != "keyring" or info.description != wanted:
            continue
        if info.uid != 0:
            log.error("Refusing keyring '%s' (serial %08x): owned by uid %d,"
                      " not root", name, serial, info.uid)
            continue
        found.append(serial)
    return found
