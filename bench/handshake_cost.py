#!/usr/bin/env python3
"""CPU cost of one TLS 1.3 handshake pair in OpenSSL alone, per group.

Both ends in one process over memory BIOs (no sockets, no threads, no
kTLS): what pyOpenSSL + OpenSSL cost for the handshake itself, with the
key-exchange group forced through an OpenSSL configuration file.

    .venv/bin/python bench/handshake_cost.py [--pairs N] [--mtls]

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

GROUPS = ("X25519MLKEM768", "X25519", "P-256")
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


def child(pairs: int, mtls: bool) -> dict[str, float]:
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

    def one() -> str:
        s = SSL.Connection(sctx, None)
        s.set_accept_state()
        c = SSL.Connection(cctx, None)
        c.set_connect_state()
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
    p.add_argument("--mtls", action="store_true")
    p.add_argument("--child", default="")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.pairs, a.mtls)))
        return 0
    out = []
    for groups in GROUPS:
        with tempfile.NamedTemporaryFile("w", suffix=".cnf",
                                         delete=False) as f:
            f.write(CNF.format(groups=groups))
        env = dict(os.environ, OPENSSL_CONF=f.name)
        argv = [sys.executable, __file__, "--child", groups, "--pairs",
                str(a.pairs)] + (["--mtls"] if a.mtls else [])
        r = subprocess.run(argv, env=env, capture_output=True, text=True,
                           check=False)
        os.unlink(f.name)
        if r.returncode != 0:
            print(groups, "failed:", r.stderr[-500:])
            continue
        res = json.loads(r.stdout)
        out.append(res)
        print("%-16s %s: %.2f ms CPU per handshake pair" % (
            groups, "mtls" if a.mtls else "tls", res["cpu_ms_per_pair"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
