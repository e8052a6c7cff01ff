"""kTLS key derivation and installation (tlshd.worker.ktls).

Layouts are checked against an independent computation with
cryptography's HKDF; expand_label against RFC 8448 section 3.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given
from hypothesis import strategies as st

from tlshd.worker import ktls
from tlshd.worker.ktls import TrafficKeys

# RFC 8448 section 3 (Simple 1-RTT Handshake), SHA-256.
HANDSHAKE_SECRET = bytes.fromhex(
    "1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac"
)
HELLO_HASH = bytes.fromhex(
    "860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8"
)
EMPTY_HASH = hashlib.sha256(b"").digest()
C_HS_TRAFFIC = bytes.fromhex(
    "b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21"
)
S_HS_TRAFFIC = bytes.fromhex(
    "b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38"
)
DERIVED_MASTER = bytes.fromhex(
    "43de77e0c77713859a944db9db2590b53190a65b3ee2e4f12dd7a0bb7ce254b4"
)
S_HS_KEY = bytes.fromhex("3fce516009c21727d0f2e4e86ee403bc")
S_HS_IV = bytes.fromhex("5d313eb2671276ee13000b30")

SUITE_HASH = {
    "TLS_AES_128_GCM_SHA256": (hashes.SHA256(), 16),
    "TLS_AES_256_GCM_SHA384": (hashes.SHA384(), 32),
    "TLS_CHACHA20_POLY1305_SHA256": (hashes.SHA256(), 32),
    "TLS_AES_128_CCM_SHA256": (hashes.SHA256(), 16),
}


def reference_label(
    secret: bytes,
    label: bytes,
    context: bytes,
    length: int,
    algo: hashes.HashAlgorithm,
) -> bytes:
    full = b"tls13 " + label
    info = (
        struct.pack("!HB", length, len(full))
        + full
        + bytes([len(context)])
        + context
    )
    return HKDFExpand(algo, length, info).derive(secret)


def test_expand_label_rfc8448_traffic_key_and_iv() -> None:
    key = ktls.expand_label(S_HS_TRAFFIC, b"key", b"", 16, "sha256")
    iv = ktls.expand_label(S_HS_TRAFFIC, "iv", b"", 12, "sha256")
    assert (key, iv) == (S_HS_KEY, S_HS_IV)
    assert ktls.traffic_key_iv("TLS_AES_128_GCM_SHA256", S_HS_TRAFFIC) == (
        S_HS_KEY,
        S_HS_IV,
    )


def test_expand_label_rfc8448_with_context() -> None:
    """Derive-Secret = Expand-Label with a transcript hash as context."""
    c_hs = ktls.expand_label(
        HANDSHAKE_SECRET, b"c hs traffic", HELLO_HASH, 32, "sha256"
    )
    s_hs = ktls.expand_label(
        HANDSHAKE_SECRET, b"s hs traffic", HELLO_HASH, 32, "sha256"
    )
    derived = ktls.expand_label(
        HANDSHAKE_SECRET, b"derived", EMPTY_HASH, 32, "sha256"
    )
    assert (c_hs, s_hs, derived) == (
        C_HS_TRAFFIC,
        S_HS_TRAFFIC,
        DERIVED_MASTER,
    )


@given(
    secret=st.binary(min_size=32, max_size=48),
    label=st.binary(min_size=0, max_size=40),
    context=st.binary(max_size=64),
    length=st.integers(min_value=1, max_value=200),
    sha384=st.booleans(),
)
def test_expand_label_matches_cryptography(
    secret: bytes, label: bytes, context: bytes, length: int, sha384: bool
) -> None:
    algo: hashes.HashAlgorithm = hashes.SHA384() if sha384 else hashes.SHA256()
    ours = ktls.expand_label(secret, label, context, length, algo.name)
    assert ours == reference_label(secret, label, context, length, algo)


def test_expand_label_rejects_oversized_arguments() -> None:
    with pytest.raises(ValueError):
        ktls.expand_label(b"s" * 32, b"x" * 250, b"", 16, "sha256")
    with pytest.raises(ValueError):
        ktls.expand_label(b"s" * 32, b"key", b"c" * 256, 16, "sha256")
    with pytest.raises(ValueError):
        ktls.expand_label(b"s" * 32, b"key", b"", 255 * 32 + 1, "sha256")


def independent_crypto_info(cipher: str, secret: bytes, seq: int) -> bytes:
    """Build the blob field by field at the offsets of <linux/tls.h>."""
    algo, key_len = SUITE_HASH[cipher]
    key = reference_label(secret, b"key", b"", key_len, algo)
    iv = reference_label(secret, b"iv", b"", 12, algo)
    rec_seq = seq.to_bytes(8, "big")
    cipher_type = {
        "TLS_AES_128_GCM_SHA256": 51,
        "TLS_AES_256_GCM_SHA384": 52,
        "TLS_AES_128_CCM_SHA256": 53,
        "TLS_CHACHA20_POLY1305_SHA256": 54,
    }[cipher]
    header = (0x0304).to_bytes(2, "little") + cipher_type.to_bytes(2, "little")
    if cipher_type == 54:
        # iv[12] at 4, key[32] at 16, no salt, rec_seq[8] at 48: 56 bytes.
        return header + iv + key + rec_seq
    # iv[8] at 4, key at 12, salt[4], rec_seq[8]: 40 or 56 bytes.
    return header + iv[4:] + key + iv[:4] + rec_seq


@pytest.mark.parametrize(
    ("cipher", "size", "cipher_type"),
    [
        ("TLS_AES_128_GCM_SHA256", 40, 51),
        ("TLS_AES_256_GCM_SHA384", 56, 52),
        ("TLS_CHACHA20_POLY1305_SHA256", 56, 54),
        ("TLS_AES_128_CCM_SHA256", 40, 53),
    ],
)
def test_crypto_info_layout(cipher: str, size: int, cipher_type: int) -> None:
    secret = bytes(range(48 if "SHA384" in cipher else 32))
    blob = ktls.derive_crypto_info(cipher, secret, 0x0102030405060708)
    assert len(blob) == size
    assert struct.unpack_from("=HH", blob) == (
        ktls.TLS_1_3_VERSION,
        cipher_type,
    )
    assert blob[-8:] == bytes.fromhex("0102030405060708")
    assert blob == independent_crypto_info(cipher, secret, 0x0102030405060708)
    keys = TrafficKeys(cipher, secret, 0x0102030405060708)
    assert keys.crypto_info() == blob


@given(
    cipher=st.sampled_from(sorted(SUITE_HASH)),
    seed=st.binary(min_size=48, max_size=48),
    seq=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_crypto_info_matches_independent_build(
    cipher: str, seed: bytes, seq: int
) -> None:
    secret = seed[: SUITE_HASH[cipher][0].digest_size]
    assert ktls.derive_crypto_info(
        cipher, secret, seq
    ) == independent_crypto_info(cipher, secret, seq)


def test_crypto_info_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="not kTLS-capable"):
        ktls.derive_crypto_info("TLS_AES_128_CCM_8_SHA256", b"s" * 32, 0)
    with pytest.raises(ValueError, match="not kTLS-capable"):
        ktls.derive_crypto_info("ECDHE-RSA-AES128-GCM-SHA256", b"s" * 32, 0)
    with pytest.raises(ValueError, match="48"):
        ktls.derive_crypto_info("TLS_AES_256_GCM_SHA384", b"s" * 32, 0)
    with pytest.raises(ValueError):
        ktls.derive_crypto_info("TLS_AES_128_GCM_SHA256", b"s" * 32, -1)
    with pytest.raises(ValueError):
        ktls.derive_crypto_info("TLS_AES_128_GCM_SHA256", b"s" * 32, 2**64)


@pytest.mark.parametrize("cipher", sorted(SUITE_HASH))
def test_next_secret(cipher: str) -> None:
    algo, _ = SUITE_HASH[cipher]
    secret = bytes(range(algo.digest_size))
    expected = reference_label(
        secret, b"traffic upd", b"", algo.digest_size, algo
    )
    assert ktls.next_secret(cipher, secret) == expected
    assert ktls.next_secret(cipher, expected) != expected


def test_traffic_keys_repr_hides_secret() -> None:
    keys = TrafficKeys("TLS_AES_128_GCM_SHA256", b"\xaa" * 32, 3)
    assert "aa" not in repr(keys).lower().replace("tls_aes", "")
    assert "seq=3" in repr(keys)


class RecordingSocket:
    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.fail_at = fail_at

    def setsockopt(self, level: int, name: int, value: bytes) -> None:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise OSError(errno.ENOENT, "no such ULP")
        self.calls.append((level, name, value))


def test_install_order_ulp_tx_rx() -> None:
    tx = TrafficKeys("TLS_AES_256_GCM_SHA384", b"t" * 48, 0)
    rx = TrafficKeys("TLS_AES_256_GCM_SHA384", b"r" * 48, 5)
    sock = RecordingSocket()
    ktls.install(sock, tx, rx)  # type: ignore[arg-type]
    assert sock.calls == [
        (socket.IPPROTO_TCP, 31, b"tls"),
        (282, 1, tx.crypto_info()),
        (282, 2, rx.crypto_info()),
    ]


def test_install_propagates_oserror() -> None:
    tx = TrafficKeys("TLS_AES_128_GCM_SHA256", b"t" * 32, 0)
    sock = RecordingSocket(fail_at=0)
    with pytest.raises(OSError):
        ktls.install(sock, tx, tx)  # type: ignore[arg-type]
    assert sock.calls == []


def test_install_checks_suite_before_touching_socket() -> None:
    good = TrafficKeys("TLS_AES_128_GCM_SHA256", b"t" * 32, 0)
    bad = TrafficKeys("TLS_SM4_GCM_SM3", b"t" * 32, 0)
    sock = RecordingSocket()
    with pytest.raises(ValueError):
        ktls.install(sock, good, bad)  # type: ignore[arg-type]
    assert sock.calls == []


def test_install_on_a_real_socket_raises_oserror_without_ktls() -> None:
    """On a host without the tls ULP the kernel says ENOENT; on a kTLS
    kernel an unconnected socket is refused (ENOTCONN). Either way an
    OSError reaches the caller, which reports EIO."""
    keys = TrafficKeys("TLS_AES_128_GCM_SHA256", b"t" * 32, 0)
    with socket.socket() as sock, pytest.raises(OSError):
        ktls.install(sock, keys, keys)


# -- the peer's record size limit (RFC 8449) --------------------------------


class CapRefusingSocket(RecordingSocket):
    """Refuses TLS_TX_MAX_PAYLOAD_LEN with ``err`` (6.12: ENOPROTOOPT)."""

    def __init__(self, err: int) -> None:
        super().__init__()
        self.err = err
        self.cap_attempts = 0

    def setsockopt(self, level: int, name: int, value: bytes) -> None:
        if (level, name) == (ktls.SOL_TLS, ktls.TLS_TX_MAX_PAYLOAD_LEN):
            self.cap_attempts += 1
            raise OSError(self.err, os.strerror(self.err))
        super().setsockopt(level, name, value)


@pytest.fixture
def cap_unknown() -> Iterator[None]:
    """Each test starts as a fresh worker: the kernel not yet asked."""
    ktls._max_payload_known = True
    yield
    ktls._max_payload_known = True


def limited_keys(limit: int | None) -> tuple[TrafficKeys, TrafficKeys]:
    tx = TrafficKeys("TLS_AES_128_GCM_SHA256", b"t" * 32, 0, limit)
    return tx, TrafficKeys("TLS_AES_128_GCM_SHA256", b"r" * 32, 0)


@pytest.mark.parametrize(("limit", "value"), [
    (64, 63), (512, 511), (16384, 16383)])
def test_install_caps_tx_records_between_tx_and_rx(
        cap_unknown: None, limit: int, value: int) -> None:
    """After TX, not before: the kernel takes 63 (a limit of 64) only
    once TX has set the TLS version."""
    tx, rx = limited_keys(limit)
    sock = RecordingSocket()
    ktls.install(sock, tx, rx)  # type: ignore[arg-type]
    assert sock.calls == [
        (socket.IPPROTO_TCP, 31, b"tls"),
        (282, 1, tx.crypto_info()),
        (282, 5, struct.pack("=H", value)),
        (282, 2, rx.crypto_info()),
    ]


@pytest.mark.parametrize("limit", [None, 16385, 65535])
def test_install_sets_no_cap_without_a_small_limit(
        cap_unknown: None, limit: int | None) -> None:
    tx, rx = limited_keys(limit)
    sock = RecordingSocket()
    ktls.install(sock, tx, rx)  # type: ignore[arg-type]
    assert [name for _, name, _ in sock.calls] == [31, 1, 2]


def test_kernel_without_the_cap_is_asked_once_and_logged(
        cap_unknown: None, caplog: pytest.LogCaptureFixture) -> None:
    """6.12: ENOPROTOOPT; the session goes on uncapped, and later
    sockets of the same worker are not asked again."""
    caplog.set_level(logging.WARNING, logger="tlshd.worker.ktls")
    tx, rx = limited_keys(512)
    attempts = []
    for _ in range(2):
        sock = CapRefusingSocket(errno.ENOPROTOOPT)
        ktls.install(sock, tx, rx)  # type: ignore[arg-type]
        assert [name for _, name, _ in sock.calls] == [31, 1, 2]
        attempts.append(sock.cap_attempts)
    assert attempts == [1, 0]
    assert caplog.text.count("cannot cap kTLS records") == 2
    assert "at most 512 bytes" in caplog.text


def test_other_cap_failures_propagate(cap_unknown: None) -> None:
    tx, rx = limited_keys(512)
    sock = CapRefusingSocket(errno.EINVAL)
    with pytest.raises(OSError):
        ktls.install(sock, tx, rx)  # type: ignore[arg-type]
    assert [name for _, name, _ in sock.calls] == [31, 1]
    assert ktls._max_payload_known


@pytest.mark.parametrize(("limit", "payload"), [
    (64, 63), (1000, 999), (16384, 16383), (16385, None), (65535, None)])
def test_tx_max_payload(limit: int, payload: int | None) -> None:
    assert ktls.tx_max_payload(limit) == payload
