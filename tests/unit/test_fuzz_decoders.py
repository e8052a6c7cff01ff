"""Fuzzing every decoder of untrusted bytes with hypothesis.

The property (fuzzcases.py): on any input a decoder returns a valid object
or raises its one documented error (ProtocolError, ConfigError,
ValueError for DER credentials, CredentialError for PEM files), within
fuzzcases.SLOW seconds.  Inputs are valid messages built by hypothesis or
from seeds, then mutated; the same mutations run a million times per
decoder in tests/fuzz/run.py.  Derandomized, so CI sees the same inputs
every run.

The last section holds the crashes the fuzzers found, one test each.
"""

from __future__ import annotations

import base64
import dataclasses
import socket
import warnings

import fuzzcases as fc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from tlshd.shared import protocol
from tlshd.shared.channel import Channel, socketpair
from tlshd.shared.errors import PeerGone, ProtocolError
from tlshd.worker import pskhandshake, tlscreds, verify
from tlshd.worker.verify import CredentialError

FUZZ = settings(max_examples=400, derandomize=True, database=None,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW_FUZZ = settings(FUZZ, max_examples=150)  # credentials: ~1 ms each


@pytest.fixture(autouse=True)
def quiet_cryptography():
    # Mutated certificates with a zero serial number warn; not our concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def assert_contract(target: fc.Target, inp: fc.Input) -> str:
    kind, detail = fc.classify(target, inp)
    assert kind != "crash", (detail, inp)
    return kind


def mutants(target: fc.Target):
    """Seeds of ``target`` mutated by a hypothesis-driven Random."""
    seeds = target.seeds()
    return st.builds(lambda seed, rng: fc.mutate(target, seed, rng, seeds),
                     st.sampled_from(seeds),
                     st.randoms(use_true_random=False))


@pytest.mark.parametrize("name", list(fc.TARGETS))
def test_seeds_mostly_decode(name):
    """Most seeds are valid, so that mutations start from inside the
    format and the checks of a successful decode run; the rest are
    near misses (a key that does not match, a re-key attribute in the
    wrong message)."""
    target = fc.TARGETS[name]
    kinds = [assert_contract(target, seed) for seed in target.seeds()]
    assert kinds.count("ok") * 2 > len(kinds), kinds


# ---- mutated seeds, every decoder --------------------------------------


@FUZZ
@given(mutants(fc.ACCEPT))
def test_accept_mutants(inp):
    assert_contract(fc.ACCEPT, inp)


@FUZZ
@given(mutants(fc.PROTOCOL))
def test_protocol_mutants_over_channel(inp):
    assert_contract(fc.PROTOCOL, inp)


@FUZZ
@given(mutants(fc.CONFIG))
def test_config_mutants(inp):
    assert_contract(fc.CONFIG, inp)


@SLOW_FUZZ
@given(mutants(fc.DER))
def test_der_credential_mutants(inp):
    assert_contract(fc.DER, inp)


@SLOW_FUZZ
@given(mutants(fc.PEM))
def test_pem_credential_mutants(inp):
    assert_contract(fc.PEM, inp)


@FUZZ
@given(mutants(fc.HELLO))
def test_client_hello_mutants(inp):
    assert_contract(fc.HELLO, inp)


@FUZZ
@given(mutants(fc.RECORD_LIMIT))
def test_record_limit_mutants(inp):
    assert_contract(fc.RECORD_LIMIT, inp)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=10),
       st.integers(1, 16384), st.randoms(use_true_random=False))
def test_client_hello_identities_round_trip(ids, fragment, rng):
    """Any identities, in records of any size: read back exactly, and a
    prefix of the records is incomplete, never an error."""
    data = fc.hello_records(ids, rng, fragment=fragment)
    if len(data) > pskhandshake.MAX_PEEK:
        return
    assert pskhandshake.offered_identities(data) == ids
    cut = rng.randrange(len(data))
    with pytest.raises(pskhandshake.HelloIncomplete) as more:
        pskhandshake.offered_identities(data[:cut])
    assert cut < more.value.needed <= len(data)


def test_client_hello_in_tiny_records_is_refused():
    """A hello spread over records too small to fit one peek is refused
    at once, instead of waiting for the handshake deadline."""
    import random
    data = fc.hello_records([b"x" * 12000], random.Random(1), fragment=1)
    with pytest.raises(ValueError, match="too many records"):
        pskhandshake.offered_identities(data)


# ---- structure built by hypothesis -------------------------------------

_u32 = st.integers(0, 2**32 - 1)
_text = st.none() | st.text(max_size=40)
_psks = st.lists(st.builds(
    protocol.PskMaterial, serial=st.integers(1, 2**32 - 1),
    identity=st.binary(min_size=1, max_size=80),
    secret=st.binary(min_size=1, max_size=protocol.MAX_SECRET)),
    max_size=4).map(tuple)
_x509 = st.just((b"", b"")) | st.tuples(st.binary(min_size=1, max_size=200),
                                         st.binary(min_size=1, max_size=80))
requests = st.builds(
    lambda x509, **kw: protocol.HandshakeRequest(
        x509_cert=x509[0], x509_key=x509[1], **kw),
    _x509, msg_type=_u32, auth_mode=_u32, timeout_ms=_u32, peername=_text,
    psks=_psks, keep_secrets=st.booleans(),
    key_update=st.integers(0, protocol.KEY_UPDATE_MAX), session_id=_u32)
lookups = st.builds(protocol.PskLookup, identity=st.binary(
    min_size=1, max_size=100).filter(lambda b: b"\0" not in b))
found = st.builds(protocol.PskFound, psk=st.none() | _psks.filter(bool).map(
    lambda p: p[0]))
answers = st.builds(
    protocol.HandshakeAnswer, status=st.integers(0, 4095),
    remote_auth=st.lists(_u32, max_size=5).map(tuple),
    reason=st.text(max_size=60), session_id=st.just(0))
logs = st.builds(protocol.LogRecord,
                 level=st.sampled_from(sorted(protocol.LOG_LEVELS)),
                 text=st.text(max_size=100))
messages = st.one_of(requests, answers, logs, lookups, found)


@FUZZ
@given(messages, st.integers(0, 2**64 - 1), st.randoms(use_true_random=False))
def test_protocol_messages_then_mutated(msg, req_id, rng):
    if isinstance(msg, protocol.HandshakeRequest) and (
            msg.key_update and not msg.session_id):
        msg = dataclasses.replace(msg, session_id=1)
    inp = (protocol.encode(msg, req_id), bytes([msg.NFDS]))
    assert fc.classify(fc.PROTOCOL, inp) == ("ok", "")  # round trip
    assert_contract(fc.PROTOCOL, fc.mutate(fc.PROTOCOL, inp, rng, [inp]))


@FUZZ
@given(st.randoms(use_true_random=False))
def test_accept_attribute_runs(rng):
    """Random attribute runs (repeats, shuffles, unknown types, re-key
    attributes in either mode), then mutated."""
    inp = (fc.accept_reply(fc.random_accept_attrs(rng)),
           bytes([rng.randrange(2)]))
    assert_contract(fc.ACCEPT, inp)
    assert_contract(fc.ACCEPT, fc.mutate(fc.ACCEPT, inp, rng, [inp]))


_attr = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=24))


@FUZZ
@given(st.lists(st.one_of(
    _attr.map(lambda a: fc.nla(*a)),
    st.lists(_attr, max_size=4).map(  # nested garbage
        lambda inner: fc.nla(7 | 0x8000, b"".join(fc.nla(*a)
                                                 for a in inner)))),
    max_size=16), st.booleans())
def test_accept_any_well_framed_attributes(attrs, rekey):
    assert_contract(fc.ACCEPT, (fc.accept_reply(b"".join(attrs)),
                                bytes([rekey])))


@FUZZ
@given(st.randoms(use_true_random=False))
def test_config_grammar(rng):
    text = fc.random_config(rng)
    assert_contract(fc.CONFIG, (text,))
    assert_contract(fc.CONFIG, fc.mutate(fc.CONFIG, (text,), rng, [(text,)]))


@FUZZ
@given(st.binary(max_size=2048))
def test_config_any_bytes(raw):
    assert_contract(fc.CONFIG, (raw,))


# ---- regressions: crashes the fuzzers found ----------------------------


def test_empty_datagram_is_not_eof():
    """Channel.recv took a zero-length datagram for EOF (PeerGone), so the
    supervisor stopped reading a worker that was still alive."""
    a, b = socketpair()
    rx = Channel(b)
    a.send(b"")
    with pytest.raises(ProtocolError, match="empty"):
        rx.recv()
    a.close()
    with pytest.raises(PeerGone):  # real EOF still is EOF
        rx.recv()
    rx.close()


def test_own_shutdown_is_still_eof():
    """A retiring worker's channel: the supervisor shut it down itself."""
    a, b = socketpair()
    b.shutdown(socket.SHUT_RDWR)
    with pytest.raises(PeerGone):
        Channel(b).recv()
    a.close()
    b.close()


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1
    return data.replace(old, new, 1)


# id-ecPublicKey (1.2.840.10045.2.1) and the v3 version field, in DER
EC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")
V3 = bytes.fromhex("a003020102")


@pytest.mark.parametrize("old,new,what", [
    # UnsupportedAlgorithm from Certificate.public_key()
    (EC_KEY_OID, bytes.fromhex("06072a8648ce3d027f"), "unusable"),
    # x509.InvalidVersion (not a ValueError) from the parser
    (V3, bytes.fromhex("a003020142"), "not valid DER"),
])
def test_der_certificate_crashes(old, new, what):
    cert, key = fc.credentials().pairs[0]  # P-256
    with pytest.raises(ValueError, match=what):
        tlscreds.load_der_identity(_patched(cert, old, new), key)


def test_der_key_openssl_refuses():
    """An Ed25519 PKCS#8 key one byte short: cryptography's InternalError
    ("key setup failed")."""
    cert, key = fc.credentials().pairs[2]  # Ed25519: 30 2e ... 04 22 04 20
    short = (bytes.fromhex("302d") + key[2:12] + bytes.fromhex("0421041f")
             + key[16:-1])
    with pytest.raises(ValueError, match="not usable DER"):
        tlscreds.load_der_identity(cert, short)


def test_pem_identity_with_unknown_key_type(tmp_path):
    """UnsupportedAlgorithm escaped load_pem_identity."""
    cert_der, _ = fc.credentials().pairs[0]
    bad = _patched(cert_der, EC_KEY_OID, bytes.fromhex("06072a8648ce3d027f"))
    chain = _pem(bad, b"CERTIFICATE")
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_path.write_bytes(chain)
    key_path.write_bytes(fc.credentials().pem_pairs[0][1])
    with pytest.raises(CredentialError, match="unusable"):
        tlscreds.load_pem_identity(str(cert_path), str(key_path))


def _pem(der: bytes, label: bytes) -> bytes:
    return (b"-----BEGIN " + label + b"-----\n" + base64.encodebytes(der)
            + b"-----END " + label + b"-----\n")


# UTF8String "Fuzz CA" (the CA's CN, also the CRL's issuer) made invalid
CA_CN = b"\x0c\x07Fuzz CA"
BAD_CN = b"\x0c\x07Fuzz C\xff"


def test_certificate_openssl_refuses():
    """cryptography parses names lazily and took an invalid UTF8String;
    OpenSSL refused it only when the engine installed the certificate
    (crypto.Error, uncaught: the worker died at start-up)."""
    cert, key = fc.credentials().pairs[0]
    with pytest.raises(ValueError, match="OpenSSL refused"):
        tlscreds.load_der_identity(_patched(cert, CA_CN, BAD_CN), key)


@pytest.mark.parametrize("old,new", [
    (CA_CN, BAD_CN),  # crypto.Error from the store's add_crl
    (bytes.fromhex("020101"), bytes.fromhex("020105")),  # InvalidVersion
])
def test_crl_crashes(tmp_path, old, new):
    crl = x509.load_pem_x509_crl(fc.credentials().crl_pem)
    der = crl.public_bytes(serialization.Encoding.DER)
    path = tmp_path / "crl.pem"
    path.write_bytes(_pem(_patched(der, old, new), b"X509 CRL"))
    with pytest.raises(CredentialError, match="CRL file"):
        verify.load_crl(SSL.Context(SSL.TLS_METHOD), str(path))
