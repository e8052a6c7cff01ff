"""SIGHUP and SIGUSR1: configuration and certificates re-read, nothing in
flight lost."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1],
                         ids=["SIGHUP", "SIGUSR1"])
def test_reload_signal_during_mount_loop_drops_nothing(pki, tlshd, trace,
                                                       nfs, signum):
    tlshd.start(pki.config())
    results = []
    stop = threading.Event()

    def hup_storm():
        while not stop.is_set():
            tlshd.proc.send_signal(signum)
            stop.wait(3.0)

    storm = threading.Thread(target=hup_storm)
    storm.start()
    try:
        for _ in range(8):
            r = nfs.mount("", "tls")
            results.append(r)
            if r.ok:
                nfs.write_and_read_back(16 * 1024)
            nfs.umount()
    finally:
        stop.set()
        storm.join()
    done = trace.completions()
    reloads = tlshd.log().count("Reloading configuration")
    print("%s: mounts ok: %d/%d, reloads: %d, handshakes: %d, statuses: %s, "
          "max hs seconds %.2f" % (
              signal.Signals(signum).name,
              sum(r.ok for r in results), len(results), reloads, len(done),
              sorted({c.status for c in done}),
              max(c.seconds for c in done)))
    assert all(r.ok for r in results), [r.output for r in results]
    assert reloads >= 2
    assert tlshd.proc.poll() is None  # SIGUSR1 once killed it
    assert len(done) == 2 * len(results)
    assert all(c.status == 0 for c in done)


def test_replaced_certificate_used_after_sighup(pki, tlshd, trace, nfs,
                                                tmp_path):
    import shutil

    cert = tmp_path / "server.pem"
    key = tmp_path / "server.key"
    shutil.copy(pki.path("server.pem"), cert)
    shutil.copy(pki.path("server.key"), key)
    conf = pki.config().replace(pki.path("server.pem"), str(cert)).replace(
        pki.path("server.key"), str(key))
    tlshd.start(conf)
    mark = tlshd.mark()
    assert nfs.mount("", "tls").ok
    nfs.umount()
    assert "Peer certificate: CN=server" in tlshd.since(mark)
    # A renewed certificate (new key, new CN) replaces the files on disk.
    pki.leaf("renewed", pki.ca, ["localhost"], ["127.0.0.1", "::1"])
    shutil.copy(pki.path("renewed.pem"), cert)
    shutil.copy(pki.path("renewed.key"), key)
    mark = tlshd.mark()
    tlshd.proc.send_signal(signal.SIGHUP)
    tlshd.wait_for(r"Worker \d+ for netns init ready", 120, mark)
    time.sleep(0.5)
    mark = tlshd.mark()
    r = nfs.mount("", "tls")
    assert r.ok, r.output
    nfs.write_and_read_back()
    log = tlshd.since(mark)
    print(re.findall(r"Peer certificate: .*", log))
    assert "Peer certificate: CN=renewed" in log
    assert "Peer certificate: CN=server" not in log
