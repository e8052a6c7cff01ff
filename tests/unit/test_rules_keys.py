"""Rules of tlshd.shared.keys that hold without a kernel: the keyctl ABI
numbers, how KEYCTL_READ / DESCRIBE answers are bounded and parsed, and
which /proc/keys lines and keyrings are believed.

test_keys.py runs the same code against the host kernel's keyrings; here
the keyctl syscall is a fake, so every refusal can be reached.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import sys

import pytest

from tlshd.shared import keys


class FakeKeyctl:
    """Stands in for keys._keyctl: READ and DESCRIBE from ``payloads``,
    with the kernel's calling convention (a buffer too small, or None,
    gets the size only)."""

    def __init__(self, payloads: dict[int, bytes],
                 grow: dict[int, bytes] | None = None) -> None:
        self.payloads = payloads
        self.grow = grow or {}  # the payload after the first call
        self.calls: list[tuple[int, int]] = []

    def __call__(self, op: int, serial: int, *args: object) -> int:
        self.calls.append((op, serial))
        assert op in (keys.KEYCTL_READ, keys.KEYCTL_DESCRIBE)
        if serial not in self.payloads:
            raise OSError(errno.ENOKEY, "no such key")
        data = self.payloads[serial]
        if serial in self.grow:
            self.payloads[serial] = self.grow.pop(serial)
        buf, size = args
        if buf is not None and len(data) <= int(size):  # type: ignore
            ctypes.memmove(buf, data, len(data))  # type: ignore
        return len(data)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeKeyctl:
    f = FakeKeyctl({})
    monkeypatch.setattr(keys, "_keyctl", f)
    return f


def test_abi_numbers() -> None:
    """<linux/keyctl.h> and the syscall tables: a wrong number is a
    different operation on the same key."""
    assert (keys.KEY_SPEC_THREAD_KEYRING, keys.KEY_SPEC_PROCESS_KEYRING,
            keys.KEY_SPEC_SESSION_KEYRING) == (-1, -2, -3)
    assert (keys.KEYCTL_GET_KEYRING_ID, keys.KEYCTL_JOIN_SESSION_KEYRING,
            keys.KEYCTL_SETPERM, keys.KEYCTL_DESCRIBE, keys.KEYCTL_LINK,
            keys.KEYCTL_UNLINK, keys.KEYCTL_SEARCH,
            keys.KEYCTL_READ) == (0, 1, 5, 6, 8, 9, 10, 11)
    assert keys._NR_KEYCTL == {"x86_64": 250, "aarch64": 219}
    assert keys._NR_ADD_KEY == {"x86_64": 248, "aarch64": 217}
    assert keys.WELL_KNOWN_KEYRINGS == (".nvme", ".nfs", ".nfsd")
    assert keys.MAX_SERIAL == 2**31 - 1


def test_unknown_architecture_is_enosys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys.platform, "machine", lambda: "riscv64")
    with pytest.raises(OSError) as e:
        keys.keyring_id(keys.KEY_SPEC_SESSION_KEYRING)
    assert e.value.errno == errno.ENOSYS


@pytest.mark.parametrize("text", ["a\0b", b"\0", b"user\0"])
def test_nul_in_type_or_description_is_refused(text: str | bytes) -> None:
    with pytest.raises(OSError) as e:
        keys.search(keys.KEY_SPEC_SESSION_KEYRING, "user", text)
    assert e.value.errno == errno.EINVAL
    assert keys._cstr("user") == b"user\0"


def test_read_payload_bounds(fake: FakeKeyctl) -> None:
    fake.payloads = {1: b"", 2: b"x" * keys.MAX_PAYLOAD,
                     3: b"x" * (keys.MAX_PAYLOAD + 1)}
    assert keys.read(1) == b""
    assert keys.read(2) == b"x" * keys.MAX_PAYLOAD
    with pytest.raises(OSError) as e:
        keys.read(3)
    assert e.value.errno == errno.EFBIG
    # The size is asked first, so the over-long payload is never copied.
    assert fake.calls[-1] == (keys.KEYCTL_READ, 3)
    assert fake.calls.count((keys.KEYCTL_READ, 3)) == 1


def test_read_a_key_that_grows_between_calls(fake: FakeKeyctl) -> None:
    fake.payloads = {1: b"abc", 2: b"abc"}
    fake.grow = {1: b"abcdefgh", 2: b"y" * (keys.MAX_PAYLOAD + 1)}
    assert keys.read(1) == b"abcdefgh"
    with pytest.raises(OSError, match="too large"):
        keys.read(2)  # and grown past the bound: refused too


def test_describe_parsing(fake: FakeKeyctl) -> None:
    fake.payloads = {
        1: b"keyring;0;0;3f010000;.nvme\0",
        2: b"user;1000;100;3f010000;a;b\nc\xff\0",  # any byte but NUL
        3: b"user;1000;100;3f010000;no-nul",
    }
    assert keys.describe(1) == keys.KeyInfo("keyring", 0, 0, 0x3F010000,
                                            b".nvme")
    assert keys.describe(2).description == b"a;b\nc\xff"
    assert keys.describe(3) == keys.KeyInfo("user", 1000, 100, 0x3F010000,
                                            b"no-nul")


def test_describe_says_what_is_wrong(fake: FakeKeyctl) -> None:
    fake.payloads = {7: b"keyring;0;0;3f010000\0"}
    with pytest.raises(OSError, match=r"key 7: b'keyring;0;0;3f010000' "
                       r"\(4 fields\)$"):
        keys.describe(7)


@pytest.mark.parametrize("raw", [
    b"keyring;0;0;3f010000\0",  # four fields
    b"keyring;root;0;3f010000;x\0",  # uid not a number
    b"keyring;0;0;perm;x\0",  # perm not hex
    b"k\xffeyring;0;0;3f010000;x\0",  # type not ASCII
    b"\0",
])
def test_describe_refuses_what_does_not_parse(fake: FakeKeyctl,
                                               raw: bytes) -> None:
    fake.payloads = {7: raw}
    with pytest.raises(OSError) as e:
        keys.describe(7)
    assert e.value.errno == errno.EINVAL


def test_keyring_members(fake: FakeKeyctl) -> None:
    serials = [0x11, 0x7FFFFFFF, 0x2487CC1F]
    raw = b"".join(s.to_bytes(4, sys.byteorder) for s in serials)
    fake.payloads = {1: raw, 2: raw + b"\1\2\3", 3: b"\1\2\3"}
    assert keys.keyring_members(1) == serials
    assert keys.keyring_members(2) == serials  # a torn tail is ignored
    assert keys.keyring_members(3) == []


LINE = b"%s I------     1 perm 1f1f0000     0     0 keyring   %s: empty"


@pytest.mark.parametrize("first,serial", [
    (b"00000001", 1),
    (b"7fffffff", 0x7FFFFFFF),
    (b"00000000", None),  # not a key
    (b"80000000", None),  # negative as key_serial_t
    (b"fffffffd", None),  # KEY_SPEC_SESSION_KEYRING
    (b"0000ABCD", None),  # the kernel prints lower case
    (b"0000abc", None),  # and eight digits
    (b" 0000abcd", None),
])
def test_proc_keys_serial_field(first: bytes, serial: int | None) -> None:
    listing = LINE % (first, b".nvme")
    expected = [] if serial is None else [serial]
    assert keys.proc_keys_candidates(listing, b".nvme") == expected


def test_proc_keys_candidates_once_each_in_order() -> None:
    listing = b"\n".join([
        LINE % (b"00000003", b".nvme"),
        LINE % (b"00000002", b".nfs"),
        LINE % (b"00000001", b"x .nvme"),
        b"00000003 forged line naming .nvme again",
    ])
    assert keys.proc_keys_candidates(listing, b".nvme") == [3, 1]


def test_find_keyrings_believes_describe_only(
        fake: FakeKeyctl, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Every candidate is described; the wrong ones are skipped, not the
    end of the search."""
    proc = tmp_path / "keys"
    proc.write_bytes(b"\n".join(LINE % (b"%08x" % s, b".nvme")
                                for s in range(1, 8)) + b"\n")
    fake.payloads = {
        # 1: gone (ENOKEY)
        2: b"user;0;0;3f010000;.nvme\0",  # not a keyring
        3: b"keyring;0;0;3f010000;.nvme-x\0",  # another description
        4: b"keyring;1000;0;3f010000;.nvme\0",  # squatted by a user
        5: b"keyring;0;0;3f010000;.nvme\0",
        6: b"keyring;0;0;3f010000;.nvme\0",
        7: b"keyring;0;0;3f010000;.nvm\0",  # a prefix of it
    }
    with caplog.at_level(logging.ERROR):
        assert keys.find_keyrings(".nvme", str(proc)) == [5, 6]
    assert "owned by uid 1000" in caplog.text
    assert [c[1] for c in fake.calls if c[0] == keys.KEYCTL_DESCRIBE] == [
        1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
