"""Key-scoping rules of the supervisor, against a fake key store: a
namespace other than the initial one never draws on a global keyring
(``.nvme``, ``.nfs``, ``.nfsd``) unless its configuration names it, and
PSKs and certificates are refused when empty or oversized.

The real-kernel versions of these scenarios are in test_keyring_trust.py
(userspace cannot create a keyring named ``.nvme``, hence the fake here).
"""

import errno

import pytest

from tlshd.shared import keys, protocol
from tlshd.supervisor import keymaterial

REQUEST_RING, NVME, NAMED = 100, 200, 300


class FakeKeys:
    """Keyrings and keys by serial; what keymaterial calls on ``keys``."""

    def __init__(self, monkeypatch):
        self.rings = {REQUEST_RING: (b"tlshd-req", {}),
                      NVME: (b".nvme", {}), NAMED: (b"shared", {}),
                      keys.KEY_SPEC_SESSION_KEYRING: (b"_ses", {})}
        self.payload = {}
        self.searched = []
        for name in ("describe", "keyring_members", "search", "read",
                     "link", "unlink", "find_keyrings"):
            monkeypatch.setattr(keys, name, getattr(self, name))

    def add(self, ring, serial, identity, payload):
        self.rings[ring][1][identity] = serial
        self.payload[serial] = payload

    def describe(self, serial):
        if serial in self.rings:
            return keys.KeyInfo(key_type="keyring", uid=0, gid=0, perm=0,
                                description=self.rings[serial][0])
        raise OSError(errno.ENOKEY, "no key")

    def keyring_members(self, serial):
        return list(self.rings[serial][1].values())

    def search(self, ring, key_type, identity):
        self.searched.append(ring)
        found = self.rings[ring][1].get(identity)
        if found is None:
            raise OSError(errno.ENOKEY, "not found")
        return found

    def read(self, serial):
        return self.payload[serial]

    def link(self, serial, ring):
        pass

    def unlink(self, serial, ring):
        pass

    def find_keyrings(self, name):
        return [s for s, (d, _) in self.rings.items() if d == name.encode()]


@pytest.fixture
def fake(monkeypatch):
    return FakeKeys(monkeypatch)


@pytest.mark.parametrize("name", [".nvme", ".nfs", ".nfsd"])
def test_global_keyring_of_the_request_is_not_the_namespace_s(fake, name):
    fake.rings[NVME] = (name.encode(), {})
    assert keymaterial.namespace_keyrings(NVME, ()) == []
    assert keymaterial.namespace_keyrings(REQUEST_RING, ()) == [REQUEST_RING]


def test_namespace_psk_lookup_skips_the_global_keyring(fake):
    fake.add(NVME, 11, b"id", b"s" * 32)
    assert keymaterial.find_psk(b"id", NVME, False, ()) is None
    assert NVME not in fake.searched
    # The initial namespace searches it, as ktls-utils does.
    found = keymaterial.find_psk(b"id", NVME, True, ())
    assert found == protocol.PskMaterial(serial=11, identity=b"id",
                                         secret=b"s" * 32)


def test_a_named_keyring_is_shared_with_the_namespace(fake):
    fake.add(NAMED, 12, b"id", b"t" * 32)
    assert keymaterial.namespace_keyrings(NVME, ("shared",)) == [NAMED]
    got = keymaterial.find_psk(b"id", NVME, False, ("shared",))
    assert got is not None and got.serial == 12


def test_namespace_lookup_searches_its_keyrings_in_order(fake):
    fake.add(REQUEST_RING, 13, b"id", b"a" * 32)
    fake.add(NAMED, 14, b"id", b"b" * 32)
    got = keymaterial.find_psk(b"id", REQUEST_RING, False, ("shared",))
    assert got is not None and got.serial == 13
    assert fake.searched == [REQUEST_RING]


def test_client_psks_from_a_global_keyring_are_refused(fake):
    fake.add(NVME, 15, b"id", b"s" * 32)
    fake.rings[15] = (b"id", {})  # describe() of the key itself
    scope = keymaterial.Scope(request_keyring=NVME, initial=False)
    psks, skipped = keymaterial.client_psks((15,), scope)
    assert psks == []
    assert len(skipped) == 1 and "none of the keyrings" in skipped[0]
    assert skipped[0].startswith("key 0000000f: ")


def test_x509_serials_from_a_global_keyring_are_refused(fake):
    fake.add(NVME, 16, b"cert", b"C")
    fake.add(NVME, 17, b"key", b"K")
    scope = keymaterial.Scope(request_keyring=NVME, initial=False)
    with pytest.raises(OSError) as exc:
        keymaterial.x509_from_keys(((16, 17),), scope)
    assert exc.value.errno == errno.EACCES
    fake.add(REQUEST_RING, 16, b"cert", b"C")
    with pytest.raises(OSError):  # the key alone is still outside
        keymaterial.x509_from_keys(((16, 17),), scope)
    fake.add(REQUEST_RING, 17, b"key", b"K")
    own = keymaterial.Scope(request_keyring=REQUEST_RING, initial=False)
    assert keymaterial.x509_from_keys(((16, 17),), own) == (b"C", b"K")


@pytest.mark.parametrize("payload", [b"", b"s" * (protocol.MAX_SECRET + 1)])
def test_psk_secret_empty_or_oversized_is_refused(fake, payload):
    fake.payload[18] = payload
    with pytest.raises(OSError) as exc:
        keymaterial.read_psk(18, b"id")
    assert exc.value.errno == errno.EKEYREJECTED


def test_psk_secret_at_the_limit_is_read(fake):
    fake.payload[18] = b"s" * protocol.MAX_SECRET
    assert keymaterial.read_psk(18, b"id").secret == fake.payload[18]
    fake.payload[18] = b"s"
    assert keymaterial.read_psk(18, b"id").secret == b"s"


@pytest.mark.parametrize("cert,key", [(b"", b"K"), (b"C", b"")])
def test_empty_certificate_or_key_is_refused(fake, cert, key):
    fake.payload.update({21: cert, 22: key})
    scope = keymaterial.Scope(request_keyring=0, initial=True)
    with pytest.raises(OSError) as exc:
        keymaterial.x509_from_keys(((21, 22),), scope)
    assert exc.value.errno == errno.EKEYREJECTED


def test_first_complete_certificate_pair_is_used(fake):
    fake.payload.update({21: b"C1", 22: b"K1", 23: b"C2", 24: b"K2"})
    scope = keymaterial.Scope(request_keyring=0, initial=True)
    assert keymaterial.x509_from_keys(((21, 0), (0, 22), (23, 24)),
                                      scope) == (b"C2", b"K2")
    assert keymaterial.x509_from_keys((), scope) == (b"", b"")


def test_client_psk_identity_limits(fake):
    for serial, ident in ((31, b""), (32, b"i" * (protocol.MAX_STR + 1)),
                          (33, b"i" * protocol.MAX_STR)):
        fake.rings[serial] = (ident, {})
        fake.payload[serial] = b"s" * 32
    scope = keymaterial.Scope(request_keyring=0, initial=True)
    psks, skipped = keymaterial.client_psks((31, 32, 33), scope)
    assert [p.serial for p in psks] == [33]
    assert len(skipped) == 2


def test_initial_namespace_search_order(fake, monkeypatch):
    """The request's keyring, then the keyrings in the session keyring
    (not our process keyring ``_pid``, not plain keys), then the
    well-known ones we possess; each once."""
    session = keys.KEY_SPEC_SESSION_KEYRING
    fake.rings[400] = (b"_pid", {})
    fake.rings[500] = (b"tlshd-extra", {})
    fake.rings[600] = (b".nfs", {})
    fake.rings[550] = (b"ABC-ring", {})
    fake.rings[session] = (b"_ses", {"e": 998, "a": 400, "b": 999,
                                     "c": 500, "f": 550,
                                     "d": REQUEST_RING})
    fake.payload[999] = b"x"
    original = fake.describe

    def describe(serial):
        if serial == 999:
            return keys.KeyInfo(key_type="asymmetric", uid=0, gid=0, perm=0,
                                description=b"keyring")
        return original(serial)
    monkeypatch.setattr(keys, "describe", describe)
    fake.rings[session][1].update({".nvme": NVME, ".nfs": 600})
    assert keymaterial.search_keyrings(REQUEST_RING) == [
        REQUEST_RING, 500, 550, NVME, 600]
    assert keymaterial.search_keyrings(0)[0] == 500


def test_one_unreadable_keyring_does_not_hide_the_others(fake, monkeypatch,
                                                         caplog):
    fake.add(NAMED, 41, b"cert", b"C")
    fake.add(NAMED, 42, b"key", b"K")
    members = fake.keyring_members

    def keyring_members(serial):
        if serial == REQUEST_RING:
            raise OSError(errno.EACCES, "denied")
        return members(serial)
    monkeypatch.setattr(keys, "keyring_members", keyring_members)

    def link(serial, ring):
        if serial == REQUEST_RING:
            raise OSError(errno.EACCES, "denied")
    monkeypatch.setattr(keys, "link", link)
    scope = keymaterial.Scope(request_keyring=REQUEST_RING, initial=False,
                              named=("shared",))
    assert keymaterial.x509_from_keys(((41, 42),), scope) == (b"C", b"K")
    assert "Cannot list keyring 00000064" in caplog.text
    assert "Cannot possess keyring 00000064" in caplog.text


def test_undescribable_request_keyring_is_left_out(fake, caplog):
    assert keymaterial.namespace_keyrings(777, ("shared",)) == [NAMED]
    assert "Cannot describe the request's keyring 00000309" in caplog.text


def test_unreadable_proc_keys_names_no_keyring(fake, monkeypatch, caplog):
    def find_keyrings(name):
        raise OSError(errno.EACCES, "denied")
    monkeypatch.setattr(keys, "find_keyrings", find_keyrings)
    assert keymaterial.namespace_keyrings(REQUEST_RING, ("shared",)) == [
        REQUEST_RING]
    assert "Cannot read /proc/keys" in caplog.text


def test_missing_key_is_not_an_error_but_a_failure_is(fake, monkeypatch,
                                                      caplog):
    assert keymaterial.lookup_psk([REQUEST_RING], b"nothing") is None
    assert "PSK lookup" not in caplog.text

    def search(ring, key_type, identity):
        raise OSError(errno.EACCES, "denied")
    monkeypatch.setattr(keys, "search", search)
    assert keymaterial.lookup_psk([REQUEST_RING], b"id") is None
    assert "PSK lookup in keyring 00000064" in caplog.text


def test_scope_is_immutable():
    import dataclasses
    scope = keymaterial.Scope(request_keyring=1, initial=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scope.initial = True


def test_well_known_keyrings_found_after_start_up(fake, monkeypatch):
    """A module loaded after tlshd started: its keyring is not in the
    session keyring, but a search finds it; a missing .nvme does not stop
    the search for .nfs."""
    session = keys.KEY_SPEC_SESSION_KEYRING
    fake.rings[600] = (b".nfs", {})
    fake.rings[session] = (b"_ses", {".nfs": 600})
    members = fake.keyring_members
    monkeypatch.setattr(keys, "keyring_members",
                        lambda s: [] if s == session else members(s))
    assert keymaterial.search_keyrings(REQUEST_RING) == [REQUEST_RING, 600]


def test_an_oversized_secret_is_reported_by_its_size(fake):
    """The skip reason names the size in one short line, however big
    the key (a user key may hold up to 1 MiB)."""
    fake.payload[18] = b"s" * 70000
    with pytest.raises(OSError) as exc:
        keymaterial.read_psk(18, b"id")
    assert exc.value.strerror == "a 70000-byte secret is no PSK"


def test_a_keyring_that_cannot_be_unlinked_does_not_fail_the_lookup(
        fake, monkeypatch, caplog):
    """Giving up a namespace's keyring after a lookup can fail (the
    keyring revoked meanwhile): that is logged, and the key found is
    still the answer."""
    fake.add(REQUEST_RING, 11, b"id", b"s" * 32)

    def unlink(serial, ring):
        raise OSError(errno.EKEYREVOKED, "revoked")
    monkeypatch.setattr(keys, "unlink", unlink)
    found = keymaterial.find_psk(b"id", REQUEST_RING, False, ())
    assert found is not None and found.serial == 11
    assert "Cannot unlink keyring 00000064: revoked" in caplog.text


def test_unreadable_proc_keys_is_reported_once(fake, monkeypatch, caplog):
    """/proc/keys unreadable: no named keyring is found, and that is one
    error, not one per name."""
    def find_keyrings(name):
        raise OSError(errno.EACCES, "denied")
    monkeypatch.setattr(keys, "find_keyrings", find_keyrings)
    assert keymaterial.namespace_keyrings(0, ("a", "b", "c")) == []
    assert caplog.text.count("Cannot read /proc/keys") == 1


def test_an_unlistable_session_keyring_leaves_the_request_s(fake,
                                                            monkeypatch,
                                                            caplog):
    """The initial namespace's search when our session keyring cannot be
    listed: the request's own keyring is still searched, and the failure
    is logged."""
    def keyring_members(serial):
        raise OSError(errno.EACCES, "denied")
    monkeypatch.setattr(keys, "keyring_members", keyring_members)
    assert keymaterial.search_keyrings(REQUEST_RING) == [REQUEST_RING]
    assert "Cannot list the session keyring: denied" in caplog.text
