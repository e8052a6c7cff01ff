"""Rules of the key-file reader the mutation run found unstated: what a
key URL looks like (ktls-utils' test: an ASCII letter, then ASCII
letters, digits or "+-." up to a colon), strict section headers, and
how long a quoted value may get in a message."""

import pytest

from tlshd.shared import keyfile, protocol
from tlshd.shared.errors import ConfigError


@pytest.mark.parametrize("value,url", [
    ("pkcs11:token=a", True),
    ("a+b-c.d:rest", True),
    ("/etc/tlshd/key.pem", False),
    ("relative/path:x", False),  # "/" ends the scheme: a path
    ("1abc:x", False),  # a scheme starts with a letter
    ("\u00e9x:x", False),  # ... an ASCII one ("é" is alphabetic)
    ("a\u00e9:x", False),  # and goes on in ASCII only
    ("abc", False),  # no colon: a file name
    ("", False),
])
def test_key_url_is_an_ascii_scheme_then_a_colon(value, url):
    assert keyfile.is_url(value) is url


@pytest.mark.parametrize("header", [
    "[a]b]", "[a[b]", "[]", "[abc", "[a\tb]",
])
def test_malformed_section_headers_are_refused(header):
    with pytest.raises(ConfigError, match="f:2: malformed section header"):
        keyfile.KeyFile("# c\n%s\nkey=1\n" % header, "f")


def test_messages_quote_values_up_to_the_limit_in_full():
    assert keyfile.show("x" * 60) == repr("x" * 60)
    assert keyfile.show("x" * 61) == repr("x" * 60 + "...")
    assert keyfile.show("abc", limit=3) == repr("abc")


def test_message_type_numbers_are_pinned():
    """The numbers are the wire format; changing one without bumping
    PROTOCOL_VERSION would let two builds misread each other silently.
    Change this table only together with PROTOCOL_VERSION."""
    assert protocol.PROTOCOL_VERSION == 6
    assert {m.name: int(m) for m in protocol.Msg} == {
        "HANDSHAKE_REQ": 2, "HELLO": 3, "HANDSHAKE_ANS": 5, "LOG": 7,
        "SPAWN_REQ": 8, "SPAWN_ANS": 9, "PSK_FOUND": 10, "PSK_LOOKUP": 11,
    }


def test_an_empty_path_setting_means_unset():
    """``key =`` with nothing after it is the default (no file), not a
    relative path to refuse."""
    kf = keyfile.KeyFile("[s]\nx509.truststore =\nx509.private_key=\n", "f")
    assert kf.path_value("s", "x509.truststore") is None
    assert kf.path_value("s", "x509.private_key") is None
    assert kf.path_value("s", "unset") is None
    assert kf.warnings == []


@pytest.mark.parametrize("key", ["x509.certificate", "x509.truststore",
                                 "x509.crl", "default"])
def test_only_the_private_key_may_be_a_url(key):
    """ktls-utils reads a key URL (a PKCS#11 token) for the private key
    alone: that one is a warning (no effect here); anywhere else a URL
    is just not an absolute path, an error."""
    kf = keyfile.KeyFile("[s]\nx509.private_key = pkcs11:a\n%s = pkcs11:b\n"
                         % key, "f")
    assert kf.path_value("s", "x509.private_key") is None
    assert len(kf.warnings) == 1
    with pytest.raises(ConfigError, match=r"f:3: .* is not an absolute"):
        kf.path_value("s", key)


def test_every_unknown_key_of_a_section_is_warned_about():
    """Known keys before and between them do not stop the check."""
    kf = keyfile.KeyFile("[s]\na = 1\nzz = 2\nb = 3\nyy = 4\n", "f")
    kf.check_names({"s": frozenset({"a", "b"})}, {})
    assert [w.split(" in ")[0] for w in kf.warnings] == [
        "f:3: unknown key zz", "f:5: unknown key yy"]


def test_values_are_immutable():
    kf = keyfile.KeyFile("[s]\nk = v\n", "f")
    with pytest.raises(AttributeError):
        kf.value("s", "k").text = "w"
