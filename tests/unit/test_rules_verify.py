"""Peer name rules: what a kernel consumer's peer name may be, before
it becomes the name a server certificate is checked against."""

import pytest

from tlshd.worker import verify


@pytest.mark.parametrize("peername,dns,ip", [
    ("Server.Example", b"server.example", None),
    ("server.example.", b"server.example", None),
    ("a" * 253, b"a" * 253, None),
    ("b\u00fccher.example", b"xn--bcher-kva.example", None),
    ("192.0.2.1", None, bytes([192, 0, 2, 1])),
    ("[2001:db8::1]", None, bytes.fromhex("20010db8" + "0" * 23 + "1")),
])
def test_accepted_peer_names(peername, dns, ip):
    name = verify.parse_peername(peername)
    assert (name.dns, name.ip) == (dns, ip)
    assert name.text == peername


@pytest.mark.parametrize("peername", [
    "", ".", "a" * 254, "a" * 254 + ".", "host\x00evil.example",
    "xn--\u00fc.example",
])
def test_refused_peer_names(peername):
    with pytest.raises(ValueError):
        verify.parse_peername(peername)
