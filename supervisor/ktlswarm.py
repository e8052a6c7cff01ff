"""A throw-away kTLS install per AEAD at start-up.

The first TLS_TX with a given cipher makes the kernel allocate its AEAD
(``gcm(aes)``, ``rfc7539(chacha20,poly1305)``), and on Debian's 6.12 that
loads ``gcm``, ``ghash_clmulni_intel``, ``cryptd`` and friends on demand:
about 0.8 s under emulation (docs/kernel.md, kTLS), paid by whichever handshake
comes first.  Doing it here, before the daemon listens, moves that cost to
start-up.  The socket pair lives on loopback for a few milliseconds and
carries no data; the key is all zeroes.
"""

from __future__ import annotations

import logging
import socket
import struct
import time

from tlshd.shared.uapi import SOL_TLS, TCP_ULP

log = logging.getLogger(__name__)

# <linux/tls.h>
TLS_TX = 1
TLS_1_3_VERSION = 0x0304
# cipher type -> sizeof(struct tls12_crypto_info_*)
AEADS = {
    51: 40,  # TLS_CIPHER_AES_GCM_128
    52: 56,  # TLS_CIPHER_AES_GCM_256
    54: 56,  # TLS_CIPHER_CHACHA20_POLY1305
}


class NoKtls(Exception):
    """The "tls" ULP cannot be attached: nothing to warm up."""


def _install(listener: socket.socket, cipher: int, size: int) -> None:
    client = socket.create_connection(listener.getsockname()[:2], timeout=5)
    peer, _ = listener.accept()
    try:
        try:
            client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        except OSError as e:
            raise NoKtls(str(e)) from None
        info = bytearray(size)
        struct.pack_into("=HH", info, 0, TLS_1_3_VERSION, cipher)
        client.setsockopt(SOL_TLS, TLS_TX, bytes(info))
    finally:
        client.close()
        peer.close()


def warm_aeads() -> None:
    """Install kTLS once per cipher on a loopback pair; never raises."""
    start = time.monotonic()
    for host in ("127.0.0.1", "::1"):
        try:
            listener = socket.create_server((host, 0))
        except OSError:
            continue
        try:
            for cipher, size in AEADS.items():
                try:
                    _install(listener, cipher, size)
                except NoKtls as e:
                    log.debug("kTLS warm-up skipped: %s", e)
                    return
                except OSError as e:
                    log.debug("kTLS warm-up for cipher %d: %s", cipher, e)
        finally:
            listener.close()
        log.debug("kTLS ciphers warmed up in %.0f ms",
                  (time.monotonic() - start) * 1000)
        return
    log.debug("kTLS warm-up skipped: no loopback address")
