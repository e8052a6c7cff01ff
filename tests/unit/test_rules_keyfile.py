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
    assert protocol.PROTOCOL_VERSION == 4
    assert {m.name: int(m) for m in protocol.Msg} == {
        "HANDSHAKE_REQ": 2, "HELLO": 3, "HANDSHAKE_ANS": 5, "LOG": 7,
        "SPAWN_REQ": 8, "SPAWN_ANS": 9, "PSK_FOUND": 10, "PSK_LOOKUP": 11,
    }
