"""A minimal TLS 1.3 record layer that stands in for kTLS in host tests.

It is built from the very ``tls12_crypto_info_*`` blob the engine would
hand the kernel (parsed here with the layouts from ``<linux/tls.h>``,
independently of ``tlshd.worker.ktls``), and reads and writes raw records
on the socket the handshake ran on. A record the peer's TLS stack accepts,
and a peer record that decrypts, prove key, IV and sequence number.

Record format (RFC 8446 section 5.2): header ``17 03 03 len``, which is
also the AAD; nonce = IV XOR the 64-bit sequence number, left-padded to 12
bytes; plaintext = content || inner content type || zero padding.
"""

from __future__ import annotations

import socket
import struct

from cryptography.hazmat.primitives.ciphers.aead import (
    AESCCM,
    AESGCM,
    ChaCha20Poly1305,
)

CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
TAG_LEN = 16

# cipher_type -> (struct layout, key length); AES layouts are
# version, cipher_type, iv[8], key, salt[4], rec_seq[8].
_LAYOUTS = {
    51: ("=HH8s16s4s8s", "gcm"),
    52: ("=HH8s32s4s8s", "gcm"),
    53: ("=HH8s16s4s8s", "ccm"),
    54: ("=HH12s32s8s", "chacha"),
}


class RecordLayer:
    """One direction of a TLS 1.3 connection, as kTLS would run it."""

    def __init__(self, crypto_info: bytes) -> None:
        version, cipher_type = struct.unpack_from("=HH", crypto_info)
        if version != 0x0304:
            raise ValueError(f"crypto_info version {version:#x}")
        fmt, kind = _LAYOUTS[cipher_type]
        if struct.calcsize(fmt) != len(crypto_info):
            raise ValueError("crypto_info has the wrong size")
        fields = struct.unpack(fmt, crypto_info)
        if kind == "chacha":
            _, _, iv, key, rec_seq = fields
            self.aead: AESGCM | AESCCM | ChaCha20Poly1305 = ChaCha20Poly1305(
                key
            )
            self.iv = iv
        else:
            _, _, iv, key, salt, rec_seq = fields
            self.aead = AESGCM(key) if kind == "gcm" else AESCCM(key)
            self.iv = salt + iv
        self.cipher_type = cipher_type
        self.seq = int.from_bytes(rec_seq, "big")

    def _nonce(self) -> bytes:
        pad = self.seq.to_bytes(12, "big")
        return bytes(a ^ b for a, b in zip(self.iv, pad, strict=True))

    def seal(
        self, data: bytes, content_type: int = CT_APPLICATION_DATA
    ) -> bytes:
        """Encrypt one record and advance the sequence number."""
        inner = data + bytes([content_type])
        header = bytes([CT_APPLICATION_DATA, 3, 3]) + struct.pack(
            "!H", len(inner) + TAG_LEN
        )
        body = self.aead.encrypt(self._nonce(), inner, header)
        self.seq += 1
        return header + body

    def open(self, record: bytes) -> tuple[int, bytes]:
        """Decrypt one record; return (inner content type, content)."""
        header, body = record[:5], record[5:]
        if header[0] != CT_APPLICATION_DATA:
            raise ValueError(f"unexpected outer content type {header[0]}")
        inner = self.aead.decrypt(self._nonce(), body, header).rstrip(b"\0")
        self.seq += 1
        return inner[-1], inner[:-1]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_record(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read one raw TLS record (header and body) from ``sock``."""
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        header = recv_exact(sock, 5)
        (length,) = struct.unpack("!H", header[3:])
        return header + recv_exact(sock, length)
    finally:
        sock.settimeout(old)


def send_app_data(
    layer: RecordLayer, sock: socket.socket, data: bytes
) -> None:
    sock.sendall(layer.seal(data))


def recv_app_data(layer: RecordLayer, sock: socket.socket) -> bytes:
    """Read records until application data arrives; return its content.

    Handshake records (session tickets) are consumed on the way, as kTLS
    would deliver them as control messages.
    """
    while True:
        content_type, content = layer.open(read_record(sock))
        if content_type == CT_APPLICATION_DATA:
            return content
        if content_type != CT_HANDSHAKE:
            raise ValueError(f"unexpected inner content type {content_type}")
