#!/usr/bin/env python3
"""CPU cost of one TLS 1.3 handshake pair in OpenSSL alone, per group.

Both ends in one process over memory BIOs (no sockets, no threads, no
kTLS): what pyOpenSSL + OpenSSL cost for the handshake itself, with the
key-exchange group forced through an OpenSSL configuration file.

    .venv/bin/python bench/handshake_cost.py [--pairs N] [--mtls | --psk]

``tls`` (default): a certificate on the server. ``--mtls``: one on each
end. ``--psk``: an external PSK as NVMe/TCP uses it, the floor for the
``nvme`` scenarios: psk_dhe_ke (so the group still matters), the one suite
matching a 32-byte SHA-256 PSK (TLS_AES_128_GCM_SHA256), an NVMe identity,
no certificates. pyOpenSSL has no PSK API, so that floor includes the two
Python PSK callbacks OpenSSL cannot do without, through the worker's own
binding (tlshd.worker.sslbind): the client's, which hands OpenSSL the PSK
to offer, and the server's, which looks up the offered identity; each is
one dict lookup. No mode checks a peer (``--mtls`` asks for the client's
certificate and accepts it in a verify callback that returns True):
signing and the key exchange are the point, not certificate checks.

Run it on the host (native) and in the guest (TCG) to see which part of
our per-handshake CPU is OpenSSL's own work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

GROUPS = ("X25519MLKEM768", "X25519", "P-256")
# The name SSL_get0_group_name gives for each, to check the key exchange
# used the group (a psk_ke handshake would use none).
NEGOTIATED = {"X25519MLKEM768": "X25519MLKEM768", "X25519": "x25519",
              "P-256": "secp256r1"}
CNF = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
NumTickets = 0
MinProtocol = TLSv1.3
Groups = {groups}
"""


# An NVMe/TCP retained PSK's identity ("NVMe0R01 <hostnqn> <subnqn>
# <digest>": SHA-256, so a 32-byte key and the SHA-256 suite) and key.
PSK_IDENTITY = (b"NVMe0R01 nqn.2014-08.org.nvmexpress:uuid:"
                b"8d4c1f0e-3b5a-4e0c-9d7a-2f6b1c3e5a90 "
                b"nqn.2014-08.org.example:bench-subsystem "
                b"Vs3k0c6lQ0zWqf1uR4xYbE8nTj2pHgA5dK7mLoC9iUw=")
PSK_KEY = bytes(range(32))
PSK_SUITE = (b"TLS_AES_128_GCM_SHA256", b"\x13\x01")


def x509_contexts(mtls: bool) -> tuple[Any, Any, None]:
    """Server and client contexts with certificates (server, or both)."""
    from OpenSSL import SSL

    from tlshd.worker import tlscreds

    server_id = tlscreds.ephemeral_identity()
    client_id = tlscreds.ephemeral_identity()

    def ctx(server: bool) -> SSL.Context:
        c = SSL.Context(SSL.TLS_SERVER_METHOD if server
                        else SSL.TLS_CLIENT_METHOD)
        c.set_tls13_ciphersuites(b"TLS_AES_256_GCM_SHA384")
        # Verification is not the point here; signing and the key
        # exchange are.
        c.set_verify(SSL.VERIFY_NONE)
        if server:
            server_id.use_in_context(c)
        elif mtls:
            client_id.use_in_context(c)
        return c

    sctx, cctx = ctx(True), ctx(False)
    if mtls:
        sctx.set_verify(SSL.VERIFY_PEER, lambda *a: True)
    return sctx, cctx, None


def psk_contexts(offers: dict[int, tuple[bytes, bytes, bytes]],
                 ) -> tuple[Any, Any, Any]:
    """Server and client contexts for an external PSK, no certificates.

    ``offers`` maps a client connection's SSL pointer to the PSK it
    offers, as the worker finds per-connection state. The third value,
    the callbacks, must stay alive while the contexts are used.
    """
    from OpenSSL import SSL

    from tlshd.worker import sslbind

    keys = {PSK_IDENTITY: (PSK_KEY, PSK_SUITE[1])}
    # One dict lookup each: the smallest a PSK callback can be.
    callbacks = sslbind.PskCallbacks(offers.get,
                                     lambda ssl, ident: keys.get(ident))

    def ctx(server: bool) -> SSL.Context:
        c = SSL.Context(SSL.TLS_SERVER_METHOD if server
                        else SSL.TLS_CLIENT_METHOD)
        c.set_tls13_ciphersuites(PSK_SUITE[0])
        c.set_verify(SSL.VERIFY_NONE)
        if server:
            callbacks.install_server(c)
        else:
            callbacks.install_client(c)
        return c

    return ctx(True), ctx(False), callbacks


def child(pairs: int, mode: str) -> dict[str, float | str]:
    from OpenSSL import SSL

    from tlshd.worker import sslbind

    psk = mode == "psk"
    offer = (PSK_IDENTITY, PSK_KEY, PSK_SUITE[1])
    offers: dict[int, tuple[bytes, bytes, bytes]] = {}
    if psk:
        sctx, cctx, callbacks = psk_contexts(offers)
    else:
        sctx, cctx, _ = x509_contexts(mode == "mtls")

    def one() -> str:
        s = SSL.Connection(sctx, None)
        s.set_accept_state()
        c = SSL.Connection(cctx, None)
        c.set_connect_state()
        if psk:
            offers[sslbind.ssl_pointer(c)] = offer
        done = set()
        for _ in range(16):
            for i, conn in enumerate((c, s)):
                if i not in done:
                    try:
                        conn.do_handshake()
                        done.add(i)
                    except SSL.WantReadError:
                        pass
            moved = 0
            for a, b in ((c, s), (s, c)):
                try:
                    data = a.bio_read(1 << 16)
                except SSL.WantReadError:
                    continue
                b.bio_write(data)
                moved += len(data)
            if len(done) == 2 and not moved:
                break
        if psk:
            ssl = sslbind.ssl_pointer(c)
            del offers[ssl]
            callbacks.forget(ssl)
            # A handshake that failed or went without the PSK would
            # measure something else.
            if len(done) != 2 or not (sslbind.session_reused(c)
                                      and sslbind.session_reused(s)):
                raise RuntimeError("the PSK was not used")
        return c.get_group_name() or ""

    one()
    t = time.process_time()
    for _ in range(pairs):
        group = one()
    cpu = (time.process_time() - t) / pairs * 1000
    return {"group": group, "cpu_ms_per_pair": cpu}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=20)
    m = p.add_mutually_exclusive_group()
    m.add_argument("--mtls", action="store_true")
    m.add_argument("--psk", action="store_true")
    p.add_argument("--child", default="")
    a = p.parse_args()
    mode = "mtls" if a.mtls else "psk" if a.psk else "tls"
    if a.child:
        print(json.dumps(child(a.pairs, mode)))
        return 0
    for groups in GROUPS:
        with tempfile.NamedTemporaryFile("w", suffix=".cnf",
                                         delete=False) as f:
            f.write(CNF.format(groups=groups))
        env = dict(os.environ, OPENSSL_CONF=f.name)
        argv = [sys.executable, __file__, "--child", groups, "--pairs",
                str(a.pairs)] + (["--" + mode] if mode != "tls" else [])
        r = subprocess.run(argv, env=env, capture_output=True, text=True,
                           check=False)
        os.unlink(f.name)
        if r.returncode != 0:
            print(groups, "failed:", r.stderr[-500:])
            continue
        res = json.loads(r.stdout)
        if res["group"] != NEGOTIATED[groups]:
            print(groups, "failed: negotiated", res["group"] or "no group")
            continue
        print("%-16s %s: %.2f ms CPU per handshake pair" % (
            groups, mode, res["cpu_ms_per_pair"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
