#!/usr/bin/env python3
"""The benchmark's guest half: our tlshd against the reference, one VM.

Runs as root inside the VM (bench/run boots it).  Everything is set up
once: certificates, nfsd (exportfs/rpc.mountd from the trixie chroot),
the nvmet target with a retained PSK, the worker user, tracing and two
cgroups.  Then, for R rounds, each implementation is started, warmed up
(one untimed tls mount, mtls mount and NVMe connect: the first handshake
after a start is slow) and runs every scenario; the order rotates
(ours, reference / reference, ours / ...; with three: ABC, BCA, CAB) so
that slow drift of the host and the position in a round hit all alike.
An NFS loop without TLS runs once per round.

Latencies come from the kernel, not from our clock: the handshake:*
tracepoints, paired by ``req=`` (submit -> complete: what the consumer
waits for; cmd_accept -> cmd_done: the agent's own share).  The trace
clock is ``mono``, the same clock as time.monotonic(), so events are
assigned to the cycle that submitted them.

Agent CPU is the cgroup's cpu.stat usage over a timed loop (the whole
process tree, including the reference's per-handshake children that
exit before anyone could read their /proc entries), divided by the
handshakes of that loop.  Memory is Pss and Rss from smaps_rollup,
summed over the cgroup's processes.

Writes <out>/results.json and prints the table (bench/report.py).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The lab package (tests/lab) is shared with the kernel tests; bench/
# itself is on sys.path already, as the running script's folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import report
from lab import nfs, nvme, pki, trace
from lab.procs import group_listeners
from lab.shell import REPO, TRIXIE, VENV_BIN, ensure_worker_user, sh

CGROUP = Path("/sys/fs/cgroup")
WORK = Path("/tmp/tlshd-bench")  # bind-mounted into the chroot as /tmp
EXPORT = "/srv/nfs"
PAYLOAD = b"tlshd benchmark payload\n" * 64
LOOPBACKS = ["127.0.0.%d" % i for i in range(1, 17)]

T0 = time.monotonic()


def say(msg: str) -> None:
    print("[%7.1f] %s" % (time.monotonic() - T0, msg), flush=True)


# ---------------------------------------------------------------- setup


def make_credentials(d: Path) -> None:
    """A P-256 CA, a server and a client certificate (PEM files) for
    every loopback address the NFS scenarios mount from."""
    pki.write_credentials(d, "bench", LOOPBACKS[1:])


def write_config(d: Path) -> Path:
    conf = d / "tlshd.conf"
    lines = ["[debug]", "loglevel=0", "tls=0", "nl=0", "[authenticate]",
             *pki.authenticate_lines(d)]
    conf.write_text("\n".join(lines) + "\n")
    return conf


# Implementation name -> extra [authenticate] lines.  "ours-reuse" is our
# tlshd with TLS session reuse on (docs/session-reuse.md).
OURS_VARIANTS = {"ours": "", "ours-reuse": "session_reuse=true\n"}


def config_for(impl: str, conf: Path) -> Path:
    """The configuration file ``impl`` runs with."""
    extra = OURS_VARIANTS.get(impl, "")
    if not extra:
        return conf
    variant = conf.with_name("tlshd-%s.conf" % impl)
    variant.write_text(conf.read_text().replace(
        "[authenticate]\n", "[authenticate]\n" + extra, 1))
    return variant


def prepare() -> Path:
    """What every guest script needs before a daemon starts: credentials
    and the daemons' configuration in WORK (returned), the worker's user,
    tracing, the cgroups and nfsd.  NVMe and the kTLS warm-up are each
    script's choice."""
    WORK.mkdir(parents=True, exist_ok=True)
    WORK.chmod(0o755)
    make_credentials(WORK)
    conf = write_config(WORK)
    ensure_worker_user()
    setup_tracing()
    setup_cgroups()
    setup_nfs()
    return conf


def setup_tracing() -> None:
    if not (trace.TRACING / "trace").exists():
        sh("mount -t tracefs nodev %s" % trace.TRACING)
    trace.enable(buffer_kib=16384)


def setup_cgroups() -> None:
    if not (CGROUP / "cgroup.procs").exists():
        sh("mount -t cgroup2 none %s" % CGROUP)


def setup_nfs() -> None:
    """One tmpfs export at EXPORT for 127.0.0.0/8, with and without TLS."""
    nfs.prepare_chroot()
    sh("mountpoint -q {t}/tmp || mount --bind /tmp {t}/tmp".format(t=TRIXIE))
    sh("mkdir -p {r} && mount -t tmpfs -o size=16m tmpfs {r} && "
       "mkdir -p {t}{r} && mount --rbind {r} {t}{r}"
       .format(r=EXPORT, t=TRIXIE))
    Path(EXPORT, "hello").write_bytes(PAYLOAD)
    opts = nfs.OPTS + ",fsid=0"
    Path("/proc/fs/nfsd/nfsv4leasetime").write_text("10")
    # 32 nfsd threads: each server-side handshake holds a thread while it
    # waits, and nconnect=16 must not queue behind a small pool.
    nfs.start_daemons("%s 127.0.0.0/8(%s,xprtsec=none:tls:mtls)\n"
                      % (EXPORT, opts), threads=32)
    for i in range(1, 17):
        os.makedirs("/mnt/b%d" % i, exist_ok=True)


def setup_nvme() -> int:
    """nvmet with one TLS port; a retained PSK in .nvme; its serial."""
    nvme.Target().setup()
    return nvme.PskKeys().add(nvme.identity("01"), os.urandom(32))


def ktls_throwaway() -> None:
    """One kTLS install per AEAD, so that neither daemon's first
    handshake pays for loading the kernel's crypto modules (6.12 loads
    gcm/ghash on the first install: ~0.8 s).  BENCH_COLD=1 skips it."""
    import struct

    from tlshd.worker import ktls

    for suite in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                  "TLS_CHACHA20_POLY1305_SHA256"):
        info = ktls.SUITES[suite]
        srv = socket.create_server(("127.0.0.1", 0))
        cli = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
        try:
            cli.setsockopt(ktls.SOL_TCP, ktls.TCP_ULP, ktls.TLS_ULP_NAME)
            blob = bytearray(info.layout.size)
            struct.pack_into("=HH", blob, 0, ktls.TLS_1_3_VERSION,
                             info.cipher_type)
            cli.setsockopt(ktls.SOL_TLS, ktls.TLS_TX, bytes(blob))
        finally:
            for x in (cli, peer, srv):
                x.close()


def handshake_group_id() -> int:
    from tlshd.supervisor import netlink_family

    return netlink_family.probe_family().group_id


# ---------------------------------------------------------------- daemons


def cgroup_pids(cg: Path) -> list[int]:
    return [int(p) for p in (cg / "cgroup.procs").read_text().split()]


def cpu_usec(cg: Path) -> dict[str, int]:
    out = {}
    for line in (cg / "cpu.stat").read_text().splitlines():
        k, v = line.split()
        out[k] = int(v)
    return out


def memory(cg: Path) -> dict[str, Any]:
    """Pss and Rss (KiB) summed over the cgroup's processes."""
    pss = rss = 0
    procs = []
    for pid in cgroup_pids(cg):
        try:
            text = Path("/proc/%d/smaps_rollup" % pid).read_text()
            comm = Path("/proc/%d/cmdline" % pid).read_bytes()
        except OSError:
            continue
        p = int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1))
        r = int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1))
        pss += p
        rss += r
        title = comm.split(b"\0")[0].decode(errors="replace")
        procs.append({"pid": pid, "title": title, "pss_kib": p,
                      "rss_kib": r})
    return {"pss_kib": pss, "rss_kib": rss, "processes": procs}


class Daemon:
    """One implementation, started in a cgroup of its own."""

    def __init__(self, impl: str, conf: Path, group_id: int) -> None:
        self.impl = impl
        self.conf = conf
        self.group_id = group_id
        self.proc: subprocess.Popen[bytes] | None = None
        self.cg = CGROUP
        self.log = WORK / ("%s.log" % impl)
        self.start_seconds = 0.0

    def argv(self) -> list[str]:
        if self.impl == "ours" and os.environ.get("BENCH_OURS_NO_WARM_AEADS"):
            # Before/after runs of the start-up kTLS warm-up only.
            code = ("import sys; from tlshd.supervisor import ktlswarm, main;"
                    " ktlswarm.warm_aeads = lambda: None;"
                    " sys.exit(main.main())")
            return [str(VENV_BIN / "python"), "-c", code, "-s", "-c",
                    str(self.conf)]
        if self.impl in OURS_VARIANTS:
            return [str(VENV_BIN / "tlshd"), "-s", "-c", str(self.conf)]
        if self.impl == "base":
            # Before/after runs of our own changes: another checkout's
            # venv (BENCH_BASE_VENV), compared in the reference's column.
            base = Path(os.environ["BENCH_BASE_VENV"])
            return [str(base / "bin" / "tlshd"), "-s", "-c", str(self.conf)]
        return ["chroot", str(TRIXIE), "/usr/sbin/tlshd", "-s", "-c",
                str(self.conf)]

    def start(self, label: str) -> None:
        if group_listeners(self.group_id):
            raise RuntimeError("a tlshd group listener is still there")
        self.cg = CGROUP / ("bench-%s-%s" % (self.impl, label))
        self.cg.mkdir()
        procs = str(self.cg / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write("0")

        mark = self.log.stat().st_size if self.log.exists() else 0
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=enter)
        end = started + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited (%s):\n%s" % (
                    self.impl, self.proc.returncode, self.log_since(mark)))
            if self.ready(mark):
                break
            if time.monotonic() > end:
                raise RuntimeError("%s not ready:\n%s"
                                   % (self.impl, self.log_since(mark)))
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - started

    def log_since(self, mark: int, limit: int | None = 4000) -> str:
        with open(self.log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return text if limit is None else text[-limit:]

    def ready(self, mark: int) -> bool:
        if self.impl in (*OURS_VARIANTS, "base"):
            # Listening in the initial namespace, as for the reference:
            # workers start on demand (the warm-up's first handshake
            # starts ours), or, in older versions, right after.
            return bool(re.search(r"Listening for handshake requests in "
                                  r"netns init\b", self.log_since(mark)))
        return group_listeners(self.group_id) > 0

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        (self.cg / "cgroup.kill").write_text("1")
        end = time.monotonic() + 30
        while cgroup_pids(self.cg) or group_listeners(self.group_id):
            if time.monotonic() > end:
                raise RuntimeError("%s left processes or listeners"
                                   % self.impl)
            time.sleep(0.05)
        self.cg.rmdir()
        self.proc = None


# ---------------------------------------------------------------- tracing

Req = trace.Req
read_trace = trace.read_requests
clear_trace = trace.clear


# ---------------------------------------------------------------- actions


def nfs_mount(host: str, target: str, xprtsec: str | None,
              extra: str = "") -> None:
    opts = "vers=4.2" + (",xprtsec=%s" % xprtsec if xprtsec else "") + extra
    r = subprocess.run(["mount", "-t", "nfs", "-o", opts, "%s:/" % host,
                        target], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError("mount %s %s: %s" % (opts, host, r.stderr))


def nfs_umount(target: str) -> None:
    r = subprocess.run(["umount", target], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError("umount %s: %s" % (target, r.stderr))


def nfs_cycle(xprtsec: str | None, mounts: int = 1, extra: str = "") -> None:
    """Mount ``mounts`` servers at once (127.0.0.1.., each its own NFS
    client and transport), read a file through each, unmount all."""
    targets = ["/mnt/b%d" % (i + 1) for i in range(mounts)]
    parallel([lambda i=i: nfs_mount(LOOPBACKS[i], targets[i], xprtsec,
                                    extra) for i in range(mounts)])
    for t in targets:
        if Path(t, "hello").read_bytes() != PAYLOAD:
            raise RuntimeError("wrong content through %s" % t)
    parallel([lambda t=t: nfs_umount(t) for t in targets])


def parallel(fns: list) -> None:
    if len(fns) == 1:
        fns[0]()
        return
    errors: list[BaseException] = []

    def run(fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def nvme_queue_split(queues: int, cpus: int) -> list[str]:
    return nvme.queue_split(queues, cpus)


def nvme_connect(queue_opt: str, duplicate: bool) -> int:
    c = nvme.connect_with(queue_opt + (",duplicate_connect"
                                       if duplicate else ""))
    if not c.ok or c.instance is None:
        raise RuntimeError("nvme connect %s: %s" % (
            queue_opt, errno.errorcode.get(c.errno, c.errno)))
    return c.instance


def nvme_cycle(queues: int) -> None:
    split = nvme_queue_split(queues, os.cpu_count() or 1)
    instances: list[int] = []
    lock = threading.Lock()

    def one(opt: str) -> None:
        inst = nvme_connect(opt, len(split) > 1)
        with lock:
            instances.append(inst)

    try:
        parallel([lambda o=o: one(o) for o in split])
        for inst in instances:
            state = Path("/sys/class/nvme/nvme%d/state" % inst).read_text()
            if state.strip() != "live":
                raise RuntimeError("nvme%d %s" % (inst, state.strip()))
    finally:
        for inst in instances:
            Path("/sys/class/nvme/nvme%d/delete_controller" % inst
                 ).write_text("1")
        # Deletion is asynchronous; wait so the next cycle starts clean.
        end = time.monotonic() + 60
        while any(Path("/sys/class/nvme/nvme%d" % i).exists()
                  for i in instances) and time.monotonic() < end:
            time.sleep(0.02)


# ---------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    kind: str  # "nfs" or "nvme"
    cycles: int
    xprtsec: str | None = None
    mounts: int = 1
    extra: str = ""
    queues: int = 1
    needs_daemon: bool = True
    # Before each cycle, one untimed-for-latency cycle without TLS, so
    # that the TLS overhead per cycle compares cycles minutes apart at
    # most (the host's load drifts).
    paired_baseline: bool = False

    def run_cycle(self) -> None:
        if self.kind == "nfs":
            nfs_cycle(self.xprtsec, self.mounts, self.extra)
        else:
            nvme_cycle(self.queues)

    def describe(self) -> str:
        if self.kind == "nvme":
            split = nvme_queue_split(self.queues, os.cpu_count() or 1)
            return "NVMe/TCP PSK connect, %d I/O queue(s) (%s)" % (
                self.queues, " + ".join(split))
        what = "NFS mount/read/umount, xprtsec=%s" % (self.xprtsec or "none")
        if self.mounts > 1:
            what += ", %d mounts in parallel" % self.mounts
        if self.extra:
            what += ", " + self.extra.strip(",")
        return what


@dataclass
class Sample:
    """One timed loop of one scenario under one implementation."""

    impl: str
    round: int
    cycles: int = 0
    failed: int = 0
    error: str = ""
    cycle_seconds: list[float] = field(default_factory=list)
    base_cycle_seconds: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)  # submit->complete
    agent: list[float] = field(default_factory=list)  # accept->done
    bursts: list[float] = field(default_factory=list)  # first submit ->
    # last done, per cycle
    burst_handshakes: list[int] = field(default_factory=list)
    handshakes: int = 0
    handshake_errors: int = 0
    error_statuses: dict[str, int] = field(default_factory=dict)
    incomplete: int = 0
    # Handshake ends our tlshd logged as authenticated by a session-reuse
    # PSK during the loop (client and server ends count one each).
    reused: int = 0
    described: int = 0
    cpu_usec: int = 0
    user_usec: int = 0
    system_usec: int = 0
    wall: float = 0.0


def timed_loop(sc: Scenario, impl: str, rnd: int,
               daemon: Daemon | None) -> Sample:
    s = Sample(impl, rnd)
    time.sleep(0.2)
    clear_trace()
    windows: list[tuple[float, float]] = []
    cpu0 = cpu_usec(daemon.cg) if daemon else None
    log0 = daemon.log.stat().st_size if daemon and daemon.log.exists() else 0
    start = time.monotonic()
    for _ in range(sc.cycles):
        if sc.paired_baseline:
            b0 = time.monotonic()
            try:
                nfs_cycle(None, sc.mounts)
                s.base_cycle_seconds.append(time.monotonic() - b0)
            except Exception as e:
                say("  baseline cycle failed: %s" % e)
        c0 = time.monotonic()
        try:
            sc.run_cycle()
        except Exception as e:
            s.failed += 1
            s.error = str(e)[:500]
            say("  cycle failed: %s" % s.error)
        c1 = time.monotonic()
        s.cycles += 1
        s.cycle_seconds.append(c1 - c0)
        windows.append((c0, c1))
    s.wall = time.monotonic() - start
    time.sleep(0.5)  # stragglers (the far end's DONE) land in the trace
    if daemon and cpu0:
        cpu1 = cpu_usec(daemon.cg)
        s.cpu_usec = cpu1["usage_usec"] - cpu0["usage_usec"]
        s.user_usec = cpu1["user_usec"] - cpu0["user_usec"]
        s.system_usec = cpu1["system_usec"] - cpu0["system_usec"]
    if daemon and daemon.impl in OURS_VARIANTS:
        text = daemon.log_since(log0, limit=None)
        # The info line every handshake end logs, at any loglevel.
        s.described = len(re.findall(r"\) succeeded", text))
        s.reused = len(re.findall(r"\) succeeded \(session reuse\)", text))
    reqs = read_trace()
    per_cycle: list[list[Req]] = [[] for _ in windows]
    for r in reqs:
        s.handshakes += 1
        if r.complete is None:
            s.incomplete += 1
            continue
        if r.status != 0:
            s.handshake_errors += 1
            name = errno.errorcode.get(abs(r.status or 0), str(r.status))
            s.error_statuses[name] = s.error_statuses.get(name, 0) + 1
        s.latency.append(r.complete - r.submit)
        if r.accept is not None and r.done is not None:
            s.agent.append(r.done - r.accept)
        for i, (a, b) in enumerate(windows):
            if a <= r.submit <= b:
                per_cycle[i].append(r)
                break
    for group in per_cycle:
        if not group:
            continue
        first = min(r.submit for r in group)
        last = max(r.done or r.complete for r in group)
        s.bursts.append(last - first)
        s.burst_handshakes.append(len(group))
    return s


def scenarios(a: argparse.Namespace) -> list[Scenario]:
    out = [
        Scenario("nfs-tls", "nfs", a.nfs_cycles, "tls",
                 paired_baseline=True),
        Scenario("nfs-mtls", "nfs", a.nfs_cycles, "mtls",
                 paired_baseline=True),
        Scenario("nfs-nconnect16", "nfs", a.burst_cycles, "tls",
                 extra=",nconnect=16"),
        Scenario("nfs-parallel%d" % a.parallel_mounts, "nfs",
                 a.burst_cycles, "tls", mounts=a.parallel_mounts),
        Scenario("nvme-q1", "nvme", a.nvme_cycles, queues=1),
        Scenario("nvme-q16", "nvme", a.burst_cycles, queues=16),
    ]
    if a.only:
        keep = set(a.only.split(","))
        out = [s for s in out if s.name in keep]
    return out


BASELINE = "nfs-none"


def warm_up(a: argparse.Namespace) -> None:
    """The first handshakes after a start load and touch everything."""
    nfs_cycle("tls")
    nfs_cycle("mtls")
    if not a.only or "nvme" in a.only:
        nvme_cycle(1)


# ---------------------------------------------------------------- crypto


def crypto_cost(n: int) -> dict[str, float]:
    """CPU ms of the handshake's public-key operations, in this guest,
    through the same OpenSSL (the cryptography wheel's)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, x25519

    def cpu(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        t = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t) / n * 1000

    peer = x25519.X25519PrivateKey.generate().public_key()
    key = ec.generate_private_key(ec.SECP256R1())
    msg = os.urandom(130)
    sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
    pub = key.public_key()
    out = {
        "x25519_keygen_ms": cpu(x25519.X25519PrivateKey.generate),
        "x25519_exchange_ms": cpu(
            lambda: x25519.X25519PrivateKey.generate().exchange(peer)),
        "p256_sign_ms": cpu(lambda: key.sign(msg, ec.ECDSA(hashes.SHA256()))),
        "p256_verify_ms": cpu(
            lambda: pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))),
    }
    # exchange_ms includes a keygen; one ECDHE = keygen + exchange.
    out["x25519_ecdhe_ms"] = out["x25519_exchange_ms"]
    out["reference_ms"] = (out["x25519_ecdhe_ms"] + out["p256_sign_ms"]
                           + out["p256_verify_ms"])
    return out


def describe_sessions(conf: Path, group: int, a: argparse.Namespace,
                      impls: list[str]) -> dict[str, dict[str, int]]:
    """Session descriptions per implementation.  Both log them only at
    loglevel 1, so each gets one short untimed pass with that setting."""
    verbose = WORK / "tlshd-describe.conf"
    verbose.write_text(conf.read_text().replace("loglevel=0", "loglevel=1"))
    out: dict[str, dict[str, int]] = {}
    for impl in impls:
        d = Daemon(impl, verbose, group)
        d.log = WORK / ("%s-describe.log" % impl)
        d.start("describe")
        try:
            warm_up(a)
        finally:
            d.stop()
        counts: dict[str, int] = {}
        for m in re.finditer(r"Session description: (\S+)",
                             d.log.read_text(errors="replace")):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        out[impl] = counts
    return out


# ---------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ref = sh("chroot %s /usr/sbin/tlshd -v 2>&1; true" % TRIXIE,
             check=False).stdout.strip()
    ours = sh("%s/tlshd --version" % VENV_BIN, check=False).stdout.strip()
    import cryptography
    import OpenSSL

    return {"guest_kernel": platform.release(),
            "guest_cpus": os.cpu_count(), "guest_cpu_model": cpu,
            "python": platform.python_version(),
            "pyopenssl": OpenSSL.__version__,
            "cryptography": cryptography.__version__,
            "reference_version": ref, "ours_version": ours}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--rounds", type=int,
                   default=int(os.environ.get("BENCH_ROUNDS", 3)))
    p.add_argument("--nfs-cycles", type=int,
                   default=int(os.environ.get("BENCH_NFS_CYCLES", 6)))
    p.add_argument("--base-cycles", type=int,
                   default=int(os.environ.get("BENCH_BASE_CYCLES", 0)),
                   help="cycles of a separate NFS loop without TLS and "
                        "without a daemon per round (the tls and mtls "
                        "loops pair each cycle with one without TLS)")
    p.add_argument("--nvme-cycles", type=int,
                   default=int(os.environ.get("BENCH_NVME_CYCLES", 8)))
    p.add_argument("--burst-cycles", type=int,
                   default=int(os.environ.get("BENCH_BURST_CYCLES", 2)))
    p.add_argument("--parallel-mounts", type=int,
                   default=int(os.environ.get("BENCH_PARALLEL_MOUNTS", 4)))
    p.add_argument("--impls", default=os.environ.get("BENCH_IMPLS",
                                                     "ours,reference"))
    p.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                   help="comma-separated scenario names")
    p.add_argument("--crypto-iterations", type=int, default=40)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    say("setup: kernel %s, %d CPUs" % (platform.release(), os.cpu_count()))
    conf = prepare()
    psk = setup_nvme()
    if os.environ.get("BENCH_COLD") != "1":
        t = time.monotonic()
        ktls_throwaway()
        say("throw-away kTLS installs: %.0f ms" % ((time.monotonic() - t)
                                                   * 1000))
    group = handshake_group_id()
    say("setup done: PSK key %08x, tlshd group %d" % (psk, group))

    results: dict[str, Any] = {
        "machine": machine(),
        "params": {k: v for k, v in vars(a).items() if k != "out"},
        "scenarios": {}, "memory": [], "starts": [],
    }
    scs = scenarios(a)
    base = Scenario(BASELINE, "nfs", a.base_cycles, None,
                    needs_daemon=False)
    if a.base_cycles:
        results["scenarios"][BASELINE] = {"describe": base.describe(),
                                          "samples": []}
    for sc in scs:
        results["scenarios"][sc.name] = {"describe": sc.describe(),
                                         "samples": []}
    impls = a.impls.split(",")

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))

    # Warm the NFS client and server paths once, without TLS.
    nfs_cycle(None)
    crypto_rounds: list[dict[str, float]] = []
    for rnd in range(1, a.rounds + 1):
        # Rotate (ABC, BCA, CAB, ...): every implementation takes every
        # position equally often over len(impls) rounds; with two this
        # is AB, BA.  (Alternating ABC, CBA kept B in the middle always,
        # and the middle position was measurably favoured.)
        k = (rnd - 1) % len(impls)
        order = impls[k:] + impls[:k]
        # The crypto floor once per round: a single measurement at the
        # end drifted with the host's load (a loaded host inflates the
        # guest's CPU accounting, for the floor as for the daemons).
        crypto_rounds.append(crypto_cost(a.crypto_iterations))
        if a.base_cycles:
            say("round %d: baseline without TLS" % rnd)
            s = timed_loop(base, "none", rnd, None)
            results["scenarios"][BASELINE]["samples"].append(vars(s))
        for impl in order:
            d = Daemon(impl, config_for(impl, conf), group)
            d.start("r%d" % rnd)
            say("round %d: %s ready after %.1f s" % (rnd, impl,
                                                     d.start_seconds))
            results["starts"].append({"impl": impl, "round": rnd,
                                      "seconds": d.start_seconds})
            idle = memory(d.cg)
            try:
                clear_trace()
                t = time.monotonic()
                warm_up(a)
                first = read_trace()
                results["starts"][-1].update({
                    "warm_up_seconds": time.monotonic() - t,
                    "first_handshake_seconds":
                        first[0].complete - first[0].submit
                        if first and first[0].complete else None})
                for sc in scs:
                    s = timed_loop(sc, impl, rnd, d)
                    results["scenarios"][sc.name]["samples"].append(vars(s))
                    say("round %d: %-8s %-15s %s" % (
                        rnd, impl, sc.name, report.sample_line(vars(s))))
                after = memory(d.cg)
            finally:
                d.stop()
            results["memory"].append({"impl": impl, "round": rnd,
                                      "idle": idle, "after": after})
            save()
    described = [i for i in ("ours", "reference") if i in impls]
    if described:
        say("what each negotiates (loglevel=1, untimed)")
        results["sessions"] = describe_sessions(conf, group, a, described)
    say("crypto cost")
    crypto_rounds.append(crypto_cost(a.crypto_iterations))
    results["crypto_rounds"] = crypto_rounds
    results["crypto"] = {k: report.median([c[k] for c in crypto_rounds])
                         for k in crypto_rounds[0]}
    save()
    if os.environ.get("BENCH_GROUP_COST") == "1":
        # OpenSSL's own share, per key-exchange group, in this guest
        # (bench/handshake_cost.py: memory BIOs, no daemon, no Python
        # around the handshake beyond pyOpenSSL's calls).
        say("handshake cost per group")
        text = ""
        for extra in ([], ["--mtls"], ["--psk"]):
            r = subprocess.run(
                [sys.executable, str(REPO / "bench" / "handshake_cost.py"),
                 "--pairs", "20", *extra], capture_output=True, text=True,
                timeout=900, check=False)
            text += r.stdout + r.stderr
        (out / "handshake_cost.txt").write_text(text)
        print(text, flush=True)
    sh("cp %s/*.log %s/ 2>/dev/null; true" % (WORK, out))
    print()
    print(report.render(results))
    if any(i not in report.IMPLS for i in impls):
        import reuse_report

        print()
        print(reuse_report.render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
