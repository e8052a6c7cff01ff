#!/usr/bin/env python3
"""Which layer of the worker's handshake path costs what (guest or host).

Builds the worker's Engine from a throwaway configuration and runs one
TLS 1.3 handshake pair (client + server, ECDSA P-256, verification on)
several ways, interleaved round by round so that a noisy host hits each
variant alike; prints the median CPU ms per pair of each:

- ``bare``:    plain pyOpenSSL contexts with the same certificates, trust
               anchors and verification (OpenSSL's own, no Python
               callbacks), both ends over memory BIOs in one thread: the
               floor for our credentials;
- ``memory``:  the Engine's own SSL contexts, both ends over memory BIOs
               in one thread (OpenSSL + pyOpenSSL + our callbacks);
- ``sockets``: the same contexts over a TCP loopback pair, both ends
               stepped non-blocking from one thread;
- ``threads``: the ``sockets`` handshake with each end in a thread of
               its own (started per pair), stepped by the worker's poll
               loop (handshakeio.drive): what two threads cost;
- ``pool``:    ``threads`` with two long-lived threads fed by queues, as
               the worker's pool runs handshakes (no thread start);
- ``engine-pool``: Engine.client_handshake / server_handshake in those
               two long-lived threads: what Engine.run adds to ``pool``
               (socket options, states, success(): description, keys);
- ``engine``:  Engine.client_handshake / server_handshake in two threads
               over TCP loopback, the server's started per pair
               (includes success(): description, peer subject);
- ``engine+ktls``: the same plus ktls.install on both sockets (guest
               only: the host kernel may have no kTLS);
- ``engine-nocache``: ``engine`` with the per-certificate log-text cache
               of tlsoutcome switched off (when that cache exists).

    .venv/bin/python bench/engine_ab.py [--rounds 5] [--pairs 10] [--mtls]
"""

from __future__ import annotations

import argparse
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tlshd.worker import sslconf

sslconf.use_worker_config()

import guest  # noqa: E402
from OpenSSL import SSL  # noqa: E402

from tlshd.worker import handshakeio, ktls, tlsoutcome, verify  # noqa: E402
from tlshd.worker.main import load_engine  # noqa: E402


def ktls_available() -> bool:
    a, b = socket.socketpair()
    a.close()
    b.close()
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    try:
        c.setsockopt(ktls.SOL_TCP, ktls.TCP_ULP, ktls.TLS_ULP_NAME)
        return True
    except OSError:
        return False
    finally:
        for x in (c, s, srv):
            x.close()


class Bench:
    def __init__(self, conf: Path, mtls: bool) -> None:
        self.engine = load_engine(str(conf))
        self.mtls = mtls
        e = self.engine
        self.cctx = e._client_x509 if mtls else e._client_anon
        self.sctx = e._server_x509
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.name = verify.parse_peername("127.0.0.1")
        self.bare_sctx = self.bare_context(conf.parent, True)
        self.bare_cctx = self.bare_context(conf.parent, False)

    def bare_context(self, d: Path, server: bool) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server
                          else SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_tls13_ciphersuites(b"TLS_AES_256_GCM_SHA384")
        ctx.load_verify_locations(str(d / "ca.pem"))
        role = "server" if server else "client"
        if server or self.mtls:
            ctx.use_certificate_chain_file(str(d / ("%s.pem" % role)))
            ctx.use_privatekey_file(str(d / ("%s.key" % role)))
        mode = SSL.VERIFY_PEER
        if server:
            mode |= SSL.VERIFY_CLIENT_ONCE
        ctx.set_verify(mode, None)
        return ctx

    def tcp_pair(self) -> tuple[socket.socket, socket.socket]:
        c = socket.create_connection(self.listener.getsockname())
        s, _ = self.listener.accept()
        return c, s

    def conns(self, cs: socket.socket | None, ss: socket.socket | None,
              bare: bool = False) -> tuple[SSL.Connection, SSL.Connection]:
        c = SSL.Connection(self.bare_cctx if bare else self.cctx, cs)
        c.set_connect_state()
        verify.set_expected_name(c, self.name)
        s = SSL.Connection(self.bare_sctx if bare else self.sctx, ss)
        s.set_accept_state()
        return c, s

    def memory(self, bare: bool = False) -> None:
        c, s = self.conns(None, None, bare)
        done: set[int] = set()
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
                return
        raise RuntimeError("memory handshake did not finish")

    def sockets(self) -> None:
        cs, ss = self.tcp_pair()
        cs.setblocking(False)
        ss.setblocking(False)
        c, s = self.conns(cs, ss)
        done: set[int] = set()
        try:
            for _ in range(10000):
                for i, conn in enumerate((c, s)):
                    if i not in done:
                        try:
                            conn.do_handshake()
                            done.add(i)
                        except (SSL.WantReadError, SSL.WantWriteError):
                            pass
                if len(done) == 2:
                    return
            raise RuntimeError("socket handshake did not finish")
        finally:
            cs.close()
            ss.close()

    def driven_pair(self) -> tuple[Callable[[], None], Callable[[], None],
                                   Callable[[], None]]:
        """A fresh TCP pair's two ends, each as the worker's poll loop
        would step it, and what closes the pair."""
        cs, ss = self.tcp_pair()
        deadline = time.monotonic() + 60
        for x in (cs, ss):
            x.setblocking(False)
        c, s = self.conns(cs, ss)

        def close() -> None:
            cs.close()
            ss.close()

        return (lambda: handshakeio.drive(c, cs, deadline),
                lambda: handshakeio.drive(s, ss, deadline), close)

    def threads(self) -> None:
        client, server, close = self.driven_pair()
        t = threading.Thread(target=server)
        t.start()
        client()
        t.join()
        close()

    def start_pool(self) -> None:
        self.jobs: list[queue.Queue[Callable[[], object] | None]] = [
            queue.Queue(), queue.Queue()]
        self.results: queue.Queue[object] = queue.Queue()

        def run(q: queue.Queue[Callable[[], object] | None]) -> None:
            while (job := q.get()) is not None:
                self.results.put(job())

        for q in self.jobs:
            threading.Thread(target=run, args=(q,), daemon=True).start()

    def in_pool(self, client: Callable[[], object],
                server: Callable[[], object]) -> None:
        self.jobs[1].put(server)
        self.jobs[0].put(client)
        for _ in range(2):
            self.results.get()

    def pool(self) -> None:
        client, server, close = self.driven_pair()
        self.in_pool(client, server)
        close()

    def engine_pool(self) -> None:
        cs, ss = self.tcp_pair()
        deadline = time.monotonic() + 60
        out: list[object] = []
        self.in_pool(
            lambda: out.append(self.engine.client_handshake(
                cs, peername="127.0.0.1", use_certificate=self.mtls,
                deadline=deadline)),
            lambda: out.append(self.engine.server_handshake(
                ss, deadline=deadline)))
        if any(o.status for o in out):  # type: ignore[attr-defined]
            raise RuntimeError(out)
        cs.close()
        ss.close()

    def engine_pair(self, install: bool) -> None:
        cs, ss = self.tcp_pair()
        deadline = time.monotonic() + 60
        res: dict[str, object] = {}

        def server() -> None:
            res["s"] = self.engine.server_handshake(ss, deadline=deadline)

        t = threading.Thread(target=server)
        t.start()
        rc = self.engine.client_handshake(
            cs, peername="127.0.0.1", use_certificate=self.mtls,
            deadline=deadline)
        t.join()
        rs = res["s"]
        if rc.status or rs.status:  # type: ignore[attr-defined]
            raise RuntimeError((rc, rs))
        if install:
            ktls.install(cs, rc.tx, rc.rx)
            ktls.install(ss, rs.tx, rs.rx)  # type: ignore[attr-defined]
        cs.close()
        ss.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--mtls", action="store_true")
    a = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="engine-ab-"))
    guest.make_credentials(d)
    b = Bench(guest.write_config(d), a.mtls)
    b.start_pool()
    variants = {"bare": lambda: b.memory(True), "memory": b.memory,
                "sockets": b.sockets, "threads": b.threads, "pool": b.pool,
                "engine-pool": b.engine_pool,
                "engine": lambda: b.engine_pair(False)}
    if ktls_available():
        variants["engine+ktls"] = lambda: b.engine_pair(True)
    if hasattr(tlsoutcome, "CERT_TEXT_CACHE_SIZE"):
        size = tlsoutcome.CERT_TEXT_CACHE_SIZE

        def uncached() -> None:
            tlsoutcome.CERT_TEXT_CACHE_SIZE = 0
            tlsoutcome._cert_texts.clear()
            try:
                b.engine_pair(False)
            finally:
                tlsoutcome.CERT_TEXT_CACHE_SIZE = size

        variants["engine-nocache"] = uncached
    for fn in variants.values():
        fn()  # warm
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, fn in variants.items():
            t, c = time.monotonic(), time.process_time()
            for _ in range(a.pairs):
                fn()
            cpu[name].append((time.process_time() - c) / a.pairs * 1000)
            wall[name].append((time.monotonic() - t) / a.pairs * 1000)
    floor = guest.crypto_cost(20)
    print("%s, %d rounds x %d pairs; crypto floor (X25519 + sign + verify)"
          " %.2f ms" % ("mtls" if a.mtls else "tls", a.rounds, a.pairs,
                        floor["reference_ms"]))
    for name in variants:
        print("%-12s CPU ms/pair median %7.2f min %7.2f   wall median "
              "%7.2f" % (name, statistics.median(cpu[name]), min(cpu[name]),
                         statistics.median(wall[name])))
    shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
