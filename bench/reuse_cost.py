#!/usr/bin/env python3
"""CPU of one handshake pair (our client + our server engine), full vs
session reuse, on loopback TCP in one process (no kTLS, no VM needed).

    .venv/bin/python bench/reuse_cost.py [-n 200]

For tls (anonymous client) and mtls (client certificate): the engines
with ``session_reuse`` off (every handshake full) and on (steady state:
after one full handshake every one is reused).  Process CPU time
(user + system, both ends) per pair, median of 5 batches, so the host's
load from other processes matters less than for wall time.  Run on the
host or in the guest (bench/run's VM); only ratios compare.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from tlshd.worker import sslconf

sslconf.use_worker_config()

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from tlshd.shared.config import RoleConfig  # noqa: E402
from tlshd.worker.tlsengine import (  # noqa: E402
    Engine,
    ReuseSettings,
)


def credentials(d: Path) -> tuple[RoleConfig, RoleConfig]:
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("ca"))
          .issuer_name(name("ca")).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - day)
          .not_valid_after(now + day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out = []
    for leaf in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(leaf))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(2).not_valid_before(now - day)
                .not_valid_after(now + day)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost")]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (d / f"{leaf}.pem").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{leaf}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out.append(RoleConfig(truststore=str(d / "ca.pem"),
                                certificate=str(d / f"{leaf}.pem"),
                                private_key=str(d / f"{leaf}.key")))
    return out[1], out[0]


def pair(eng: Engine, listener: socket.socket, mtls: bool,
         server: Engine | None = None) -> bool:
    """One handshake pair; ``server``: a different engine for the server
    end (default: ``eng`` plays both)."""
    c = socket.create_connection(listener.getsockname())
    s, _ = listener.accept()
    res: dict[str, object] = {}
    srv = server or eng

    def serve() -> None:
        res["s"] = srv.server_handshake(s, deadline=time.monotonic() + 30)

    t = threading.Thread(target=serve)
    t.start()
    out = eng.client_handshake(c, peername="localhost",
                               use_certificate=mtls,
                               deadline=time.monotonic() + 30)
    t.join()
    c.close()
    s.close()
    assert out.status == 0, out.reason
    return out.resumed


def measure(eng: Engine, mtls: bool, n: int) -> tuple[float, int]:
    listener = socket.create_server(("127.0.0.1", 0))
    pair(eng, listener, mtls)  # warm-up (and the first, full, handshake)
    batches, reused = [], 0
    for _ in range(5):
        t = time.process_time()
        for _ in range(n):
            reused += pair(eng, listener, mtls)
        batches.append((time.process_time() - t) / n * 1000)
    listener.close()
    return statistics.median(batches), reused


def nonparticipating(client: RoleConfig, server: RoleConfig,
                     n: int) -> tuple[float, float, int]:
    """Our client with the switch off and on against a server that keeps
    no PSK (our engine with the switch off: it ignores the ALPN offer,
    like ktls-utils).  Batches interleaved off, on, off, on, ...; CPU ms
    per pair, medians, and how many of the "on" pairs were reused."""
    peer = Engine(client, server)
    ends = {False: Engine(client, server),
            True: Engine(client, server, reuse=ReuseSettings())}
    listener = socket.create_server(("127.0.0.1", 0))
    batches: dict[bool, list[float]] = {False: [], True: []}
    reused = 0
    for on in (False, True):
        pair(ends[on], listener, False, peer)  # warm-up
    for _ in range(5):
        for on in (False, True):
            t = time.process_time()
            for _ in range(n):
                if pair(ends[on], listener, False, peer):
                    reused += 1
            batches[on].append((time.process_time() - t) / n * 1000)
    listener.close()
    return (statistics.median(batches[False]),
            statistics.median(batches[True]), reused)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=200, help="pairs per batch")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        client, server = credentials(Path(tmp))
        print("CPU ms per handshake pair (both ends), median of 5 x %d;"
              " %s, pid %d" % (a.n, os.uname().release, os.getpid()))
        for mtls in (False, True):
            full, _ = measure(Engine(client, server), mtls, a.n)
            reuse_eng = Engine(client, server, reuse=ReuseSettings())
            reused_ms, reused = measure(reuse_eng, mtls, a.n)
            print("%-4s full %.3f ms, reused %.3f ms (%d/%d reused): "
                  "ratio %.2f" % ("mtls" if mtls else "tls", full,
                                  reused_ms, reused, 5 * a.n,
                                  reused_ms / full))
        off, on, reused = nonparticipating(client, server, a.n)
        print("tls  against a server that keeps no PSK: switch off %.3f ms,"
              " on %.3f ms (%d/%d reused): ratio %.2f"
              % (off, on, reused, 5 * a.n, on / off))
    return 0


if __name__ == "__main__":
    sys.exit(main())
