"""The kernel features tlshd stands on, checked in the VM on real kernels.

- the ``handshake`` generic-netlink family: version, ops, ``tlshd`` group;
- kTLS (TLS 1.3 record layer in the kernel) for the three ciphers the
  agent installs, checked against an independent user-space record layer
  built on ``cryptography``: kTLS encrypts what user space can decrypt and
  decrypts what user space encrypts, with the nonce and AAD of RFC 8446.

These talk to the kernel with raw sockets and ``struct`` on purpose: they
must not share code, and thus bugs, with tlshd's own netlink and kTLS code.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest
from cryptography.hazmat.primitives.ciphers.aead import (
    AESGCM,
    ChaCha20Poly1305,
)

pytestmark = pytest.mark.kernel

# ------------------------------------------------------- generic netlink

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_LIST_MEMBERSHIPS = 9
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_VERSION = 3
CTRL_ATTR_OPS = 6
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_OP_ID = 1
CTRL_ATTR_OP_FLAGS = 2
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
GENL_ADMIN_PERM = 0x1

HANDSHAKE_CMD_ACCEPT = 2
HANDSHAKE_CMD_DONE = 3


def nlattr(kind: int, payload: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(payload), kind) + payload
    return attr + b"\0" * (-len(attr) % 4)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Top-level attributes of a netlink payload, by type."""
    attrs = {}
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        assert length >= 4, "malformed netlink attribute"
        attrs[kind & NLA_TYPE_MASK] = data[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return attrs


def genl_get_family(name: str) -> dict[int, bytes]:
    """CTRL_CMD_GETFAMILY: the controller's attributes for one family."""
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC
    ) as sock:
        sock.settimeout(10)
        body = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0) + nlattr(
            CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"
        )
        hdr = struct.pack(
            "=IHHII",
            16 + len(body),
            GENL_ID_CTRL,
            NLM_F_REQUEST | NLM_F_ACK,
            1,
            0,
        )
        sock.send(hdr + body)
        family: dict[int, bytes] = {}
        while True:
            data = sock.recv(65536)
            pos = 0
            while pos + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("=IHHII", data, pos)
                msg = data[pos + 16 : pos + length]
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", msg)
                    if err:
                        raise OSError(-err, os.strerror(-err), name)
                    return family
                if kind == GENL_ID_CTRL:
                    family = parse_attrs(msg[4:])  # after genlmsghdr
                pos += (length + 3) & ~3


def u32(data: bytes) -> int:
    return int(struct.unpack_from("=I", data)[0])


def mcast_groups(family: dict[int, bytes]) -> dict[str, int]:
    groups = {}
    for entry in parse_attrs(family[CTRL_ATTR_MCAST_GROUPS]).values():
        attrs = parse_attrs(entry)
        name = attrs[CTRL_ATTR_MCAST_GRP_NAME].rstrip(b"\0").decode()
        groups[name] = u32(attrs[CTRL_ATTR_MCAST_GRP_ID])
    return groups


def op_flags(family: dict[int, bytes]) -> dict[int, int]:
    ops = {}
    for entry in parse_attrs(family[CTRL_ATTR_OPS]).values():
        attrs = parse_attrs(entry)
        ops[u32(attrs[CTRL_ATTR_OP_ID])] = u32(attrs[CTRL_ATTR_OP_FLAGS])
    return ops


@pytest.fixture(scope="module")
def handshake_family() -> dict[int, bytes]:
    return genl_get_family("handshake")


def test_handshake_family_version_1(
    handshake_family: dict[int, bytes],
) -> None:
    assert u32(handshake_family[CTRL_ATTR_VERSION]) == 1
    family_id = struct.unpack("=H", handshake_family[CTRL_ATTR_FAMILY_ID])[0]
    assert family_id >= GENL_ID_CTRL  # dynamic ids start above the ctrl


def test_handshake_family_has_tlshd_group(
    handshake_family: dict[int, bytes],
) -> None:
    assert "tlshd" in mcast_groups(handshake_family)


def test_accept_and_done_need_cap_net_admin(
    handshake_family: dict[int, bytes],
) -> None:
    # Both carry GENL_ADMIN_PERM: the privileged supervisor must send
    # DONE as well as ACCEPT (docs/kernel.md, Privilege).
    ops = op_flags(handshake_family)
    assert ops[HANDSHAKE_CMD_ACCEPT] & GENL_ADMIN_PERM
    assert ops[HANDSHAKE_CMD_DONE] & GENL_ADMIN_PERM


def test_unknown_family_is_enoent() -> None:
    # The negative case proves the probe above can fail at all.  (Names
    # longer than GENL_NAMSIZ - 1 = 15 bytes get EINVAL from the policy.)
    with pytest.raises(OSError) as exc:
        genl_get_family("tlshd-nosuch")
    assert exc.value.errno == errno.ENOENT


def test_join_tlshd_group(handshake_family: dict[int, bytes]) -> None:
    group = mcast_groups(handshake_family)["tlshd"]
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC
    ) as sock:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        raw = sock.getsockopt(SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, 64)
        words = struct.unpack(f"={len(raw) // 4}I", raw)
        bit = group - 1
        assert words[bit // 32] & (1 << (bit % 32))


# ------------------------------------------------------------------ kTLS

TCP_ULP = 31
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TLS_1_3_VERSION = 0x0304
APPLICATION_DATA = 0x17
TAG_LEN = 16


class Aead(Protocol):
    def encrypt(
        self, nonce: bytes, data: bytes, associated_data: bytes | None
    ) -> bytes: ...

    def decrypt(
        self, nonce: bytes, data: bytes, associated_data: bytes | None
    ) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class Cipher:
    name: str
    cipher_type: int  # TLS_CIPHER_* in linux/tls.h
    key_len: int
    aead: Callable[[bytes], Aead]

    def crypto_info(self, key: bytes, iv12: bytes, seq: int) -> bytes:
        """struct tls12_crypto_info_* for TLS 1.3.

        AES-GCM splits the 12-byte static IV into salt (first 4 bytes)
        and iv (last 8); ChaCha20-Poly1305 takes all 12 as iv, no salt.
        """
        rec_seq = seq.to_bytes(8, "big")
        if self.cipher_type == 54:
            return struct.pack(
                "=HH12s32s8s", TLS_1_3_VERSION, 54, iv12, key, rec_seq
            )
        return struct.pack(
            f"=HH8s{self.key_len}s4s8s",
            TLS_1_3_VERSION,
            self.cipher_type,
            iv12[4:],
            key,
            iv12[:4],
            rec_seq,
        )


CIPHERS = [
    Cipher("AES-128-GCM", 51, 16, AESGCM),
    Cipher("AES-256-GCM", 52, 32, AESGCM),
    Cipher("CHACHA20-POLY1305", 54, 32, ChaCha20Poly1305),
]


@dataclasses.dataclass
class Direction:
    """Key material and the next record sequence number of one way."""

    cipher: Cipher
    key: bytes
    iv: bytes
    seq: int

    @classmethod
    def random(cls, cipher: Cipher, seq: int) -> Direction:
        return cls(cipher, os.urandom(cipher.key_len), os.urandom(12), seq)

    def crypto_info(self) -> bytes:
        return self.cipher.crypto_info(self.key, self.iv, self.seq)

    def next_nonce(self) -> bytes:
        """RFC 8446 5.3: static IV XOR the 64-bit sequence, left-padded."""
        seq = self.seq.to_bytes(12, "big")
        self.seq += 1
        return bytes(a ^ b for a, b in zip(self.iv, seq, strict=True))

    def seal(self, data: bytes) -> bytes:
        """One TLSCiphertext record carrying application data."""
        inner = data + bytes([APPLICATION_DATA])
        header = bytes([APPLICATION_DATA, 3, 3]) + struct.pack(
            "!H", len(inner) + TAG_LEN
        )
        aead = self.cipher.aead(self.key)
        return header + aead.encrypt(self.next_nonce(), inner, header)

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        """(content type, content) of one record."""
        aead = self.cipher.aead(self.key)
        inner = aead.decrypt(self.next_nonce(), body, header).rstrip(b"\0")
        return inner[-1], inner[:-1]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def recv_record(sock: socket.socket) -> tuple[bytes, bytes]:
    header = recv_exact(sock, 5)
    (length,) = struct.unpack("!H", header[3:])
    return header, recv_exact(sock, length)


def tls_stat() -> dict[str, int]:
    with open("/proc/net/tls_stat") as f:
        return {
            name: int(value)
            for name, value in (line.split() for line in f if line.strip())
        }


@pytest.fixture(scope="module", autouse=True)
def tls_module() -> None:
    subprocess.run(["modprobe", "tls"], check=True)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server) of a connected loopback TCP pair."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    server.settimeout(10)
    with client, server:
        yield client, server


def install_ktls(sock: socket.socket, tx: Direction, rx: Direction) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    sock.setsockopt(SOL_TLS, TLS_TX, tx.crypto_info())
    sock.setsockopt(SOL_TLS, TLS_RX, rx.crypto_info())


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_ktls_records_match_user_space(
    cipher: Cipher, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    ktls, plain = tcp_pair
    # Non-zero start sequences check that rec_seq is honoured.
    tx, rx = Direction.random(cipher, 7), Direction.random(cipher, 3)
    install_ktls(ktls, tx, rx)
    # The peer's user-space record layer: same keys and sequences.
    peer_rx = dataclasses.replace(tx)
    peer_tx = dataclasses.replace(rx)

    stat = tls_stat()
    assert stat["TlsCurrTxSw"] >= 1
    assert stat["TlsCurrRxSw"] >= 1

    for i in range(2):  # twice: the sequence number must advance
        msg = f"kTLS to user space, record {i}: ".encode() + os.urandom(32)
        ktls.sendall(msg)
        header, body = recv_record(plain)
        assert header[:3] == b"\x17\x03\x03"  # TLS 1.3 outer header
        assert peer_rx.open(header, body) == (APPLICATION_DATA, msg)

        msg = f"user space to kTLS, record {i}: ".encode() + os.urandom(32)
        plain.sendall(peer_tx.seal(msg))
        assert recv_exact(ktls, len(msg)) == msg


def test_ktls_rejects_a_forged_record(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    ktls, plain = tcp_pair
    cipher = CIPHERS[0]
    tx, rx = Direction.random(cipher, 0), Direction.random(cipher, 0)
    install_ktls(ktls, tx, rx)
    errors_before = tls_stat()["TlsDecryptError"]

    record = bytearray(dataclasses.replace(rx).seal(b"tampered"))
    record[-1] ^= 1  # break the tag
    plain.sendall(bytes(record))
    with pytest.raises(OSError) as exc:
        ktls.recv(64)
    assert exc.value.errno == errno.EBADMSG
    assert tls_stat()["TlsDecryptError"] == errors_before + 1
