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


# ---- trust stores: what is loaded, what is refused ---------------------

def _context():
    from OpenSSL import SSL
    return SSL.Context(SSL.TLS_METHOD)


def test_trust_store_counts_its_certificates(pki, tmp_path):
    one = pki.ca.read_bytes()
    two = tmp_path / "two.pem"
    two.write_bytes(one + one)
    assert verify.load_trust(_context(), str(pki.ca)) == 1
    assert verify.load_trust(_context(), str(two)) == 2


@pytest.mark.parametrize("content,why", [
    (b"", "holds no PEM certificate"),
    (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
     "holds no PEM certificate"),
    # The marker is there, the certificate is not: OpenSSL's error,
    # as a CredentialError naming the file.
    (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
     "trust store .*bad.pem: "),
])
def test_refused_trust_stores(tmp_path, content, why):
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    with pytest.raises(verify.CredentialError, match=why):
        verify.load_trust(_context(), str(bad))


def test_missing_trust_store_file_is_refused(tmp_path):
    with pytest.raises(verify.CredentialError, match="cannot read"):
        verify.load_trust(_context(), str(tmp_path / "none.pem"))


def test_system_bundle_first_existing_file(monkeypatch, tmp_path, pki):
    missing = str(tmp_path / "missing.pem")
    folder = str(tmp_path)  # exists, but is not a file
    monkeypatch.setattr(verify, "SYSTEM_BUNDLES", (missing, folder))
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert verify.system_bundle() is None
    # No system bundle: an empty store, not a configuration error.
    assert verify.load_trust(_context(), None) == 0
    monkeypatch.setenv("SSL_CERT_FILE", missing)
    assert verify.system_bundle() is None
    monkeypatch.setattr(verify, "SYSTEM_BUNDLES", (missing, str(pki.ca)))
    assert verify.system_bundle() == str(pki.ca)
    assert verify.load_trust(_context(), None) == 1
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    monkeypatch.setattr(verify, "SYSTEM_BUNDLES", (missing,))
    assert verify.system_bundle() == str(pki.ca)
