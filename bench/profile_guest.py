#!/usr/bin/env python3
"""Where our per-handshake time goes, inside the VM.

    bench/run --profile            (boots the VM and runs this instead)

Three views, written to <out>/profile/:

1. ``engine``: the worker's TLS engine alone, both ends in this process
   (two threads over a TCP loopback pair, kTLS installed at the end), for
   tls and mtls; CPU per handshake pair against the crypto floor, and a
   pyinstrument profile of the loop (engine-*.txt).
2. ``daemon``: our tlshd serving NFS tls mounts and NVMe connects while
   py-spy samples the supervisor and the worker (py-spy-*.txt: collapsed
   stacks; summarised by bench/pyspy_summary.py), plus each process's own
   utime+stime over the loop.
3. ``start``: python -X importtime of the worker's and the supervisor's
   imports (importtime-*.txt).
4. ``floor``: bench/handshake_cost.py (tls, mtls, psk) in the same boot
   (handshake_cost.txt).

``--impls ours,base`` profiles the daemon of BENCH_BASE_VENV's checkout
too, in the same boot (before/after); ``--daemon-only`` skips 1 and 3.
bench/attribution.py turns profile/ into the per-part table.

py-spy and pyinstrument are profiling tools, not dependencies of tlshd:
``.venv/bin/pip install py-spy pyinstrument``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tlshd.worker import sslconf

sslconf.use_worker_config()

import guest  # noqa: E402
from guest import say, sh  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of one process, seconds."""
    f = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def titles(pids: list[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        try:
            cmd = Path("/proc/%d/cmdline" % pid).read_bytes()
        except OSError:
            continue
        out[pid] = cmd.split(b"\0")[0].decode(errors="replace")
    return out


# ---------------------------------------------------------------- engine


def engine_loop(conf: Path, mode: str, n: int, out: Path) -> dict:
    from pyinstrument import Profiler

    from tlshd.worker import ktls
    from tlshd.worker.main import load_engine

    engine = load_engine(str(conf))
    srv_listen = socket.create_server(("127.0.0.1", 0))

    def pair() -> tuple[socket.socket, socket.socket]:
        c = socket.create_connection(srv_listen.getsockname())
        s, _ = srv_listen.accept()
        return c, s

    def one() -> None:
        c, s = pair()
        deadline = time.monotonic() + 30
        res: dict[str, object] = {}

        def server() -> None:
            res["s"] = engine.server_handshake(s, deadline=deadline)

        t = threading.Thread(target=server)
        t.start()
        rc = engine.client_handshake(
            c, peername="127.0.0.1", use_certificate=mode == "mtls",
            deadline=deadline)
        t.join()
        rs = res["s"]
        assert rc.status == 0 and rs.status == 0, (rc, rs)  # type: ignore
        ktls.install(c, rc.tx, rc.rx)
        ktls.install(s, rs.tx, rs.rx)  # type: ignore[attr-defined]
        c.close()
        s.close()

    one()  # warm
    t0, c0 = time.monotonic(), time.process_time()
    for _ in range(n):
        one()
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    prof = Profiler(interval=0.001)
    prof.start()
    for _ in range(n):
        one()
    prof.stop()
    (out / ("engine-%s.txt" % mode)).write_text(
        prof.output_text(unicode=False, color=False, show_all=False))
    return {"mode": mode, "pairs": n, "cpu_ms_per_pair": cpu / n * 1000,
            "wall_ms_per_pair": wall / n * 1000}


# ---------------------------------------------------------------- daemon


SCENARIOS = ("nfs-tls", "nfs-mtls", "nvme-q1")


def daemon_profile(conf: Path, group: int, cycles: int, out: Path,
                   native: bool, impl: str = "ours",
                   only: tuple[str, ...] = SCENARIOS) -> dict:
    d = guest.Daemon(impl, conf, group)
    d.start("profile")
    say("%s ready after %.1f s" % (impl, d.start_seconds))
    result: dict = {"start_seconds": d.start_seconds, "loops": {}}
    # py-spy files: py-spy-<scenario>-<process>.txt for ours (as before),
    # py-spy-<impl>-<scenario>-<process>.txt for another impl.
    prefix = "" if impl == "ours" else impl + "-"
    try:
        guest.nfs_cycle("tls")
        guest.nvme_cycle(1)
        pids = titles(guest.cgroup_pids(d.cg))
        result["processes"] = {str(k): v for k, v in pids.items()}
        for name, fn in (("nfs-tls", lambda: guest.nfs_cycle("tls")),
                         ("nfs-mtls", lambda: guest.nfs_cycle("mtls")),
                         ("nvme-q1", lambda: guest.nvme_cycle(1))):
            if name not in only:
                continue
            # First without the profiler: per-process CPU.
            before = {p: proc_cpu(p) for p in pids}
            cg0 = guest.cpu_usec(d.cg)["usage_usec"]
            guest.clear_trace()
            for _ in range(cycles):
                fn()
            time.sleep(0.5)
            reqs = guest.read_trace()
            cg1 = guest.cpu_usec(d.cg)["usage_usec"]
            after = {p: proc_cpu(p) for p in pids}
            hs = len(reqs)
            lat = sorted(r.complete - r.submit for r in reqs if r.complete)
            agent = sorted(r.done - r.accept for r in reqs
                           if r.done and r.accept)
            result["loops"][name] = {
                "handshakes": hs,
                "cgroup_cpu_ms_per_hs": (cg1 - cg0) / 1000 / max(hs, 1),
                "cpu_ms_per_hs_by_process": {
                    pids[p]: (after[p] - before[p]) * 1000 / max(hs, 1)
                    for p in pids},
                "latency_p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
                "accept_done_p50_ms":
                    agent[len(agent) // 2] * 1000 if agent else None,
            }
            say("%s: %s" % (name, json.dumps(result["loops"][name])))
            # Then the same loop under py-spy.
            spies = []
            for pid, title in pids.items():
                if "template" in title:
                    continue
                tag = "supervisor" if "supervisor" in title else "worker"
                argv = [str(guest.VENV_BIN / "py-spy"), "record", "--pid",
                        str(pid), "--rate", "250", "--format", "raw",
                        "--output", str(out / ("py-spy-%s%s-%s.txt"
                                               % (prefix, name, tag))),
                        "--nonblocking"]
                if native:
                    argv.append("--native")
                spies.append(subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL,
                    stderr=open(out / ("py-spy-%s%s-%s.err"
                                       % (prefix, name, tag)), "w")))
            time.sleep(3)  # py-spy attaches
            for _ in range(cycles):
                fn()
            time.sleep(0.5)
            for sp in spies:
                sp.send_signal(2)  # SIGINT: py-spy writes its output
            for sp in spies:
                sp.wait(120)
    finally:
        d.stop()
    return result


def import_times(out: Path) -> None:
    py = str(guest.VENV_BIN / "python")
    for tag, mod in (("worker", "tlshd.worker.template"),
                     ("supervisor", "tlshd.supervisor.main")):
        env = dict(os.environ, OPENSSL_CONF=sslconf.openssl_conf_path())
        t = time.monotonic()
        r = subprocess.run([py, "-X", "importtime", "-c", "import " + mod],
                           capture_output=True, text=True, env=env,
                           check=False)
        (out / ("importtime-%s.txt" % tag)).write_text(r.stderr)
        say("import %s: %.1f s" % (mod, time.monotonic() - t))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--cycles", type=int, default=8)
    p.add_argument("--native", action="store_true")
    p.add_argument("--impls", default="ours",
                   help="comma-separated: ours, base (BENCH_BASE_VENV's "
                   "checkout); each is profiled in turn, in this order")
    p.add_argument("--daemon-only", action="store_true",
                   help="skip the engine loop and the import times")
    a = p.parse_args()
    out = Path(a.out) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    conf = guest.prepare()
    guest.setup_nvme()
    guest.ktls_throwaway()
    group = guest.handshake_group_id()
    results: dict = {"crypto": guest.crypto_cost(40)}
    say("crypto: %s" % results["crypto"])
    if not a.daemon_only:
        results["engine"] = [engine_loop(conf, m, a.pairs, out)
                             for m in ("tls", "mtls")]
        say("engine: %s" % results["engine"])
        import_times(out)
    impls = a.impls.split(",")
    # One daemon start per scenario and impl, the impls' order turned
    # round at each scenario (ABBA), so that a host whose load drifts
    # hits before and after alike.
    for i, name in enumerate(SCENARIOS):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            key = "daemon" if impl == "ours" else "daemon-" + impl
            r = daemon_profile(conf, group, a.cycles, out, a.native, impl,
                               only=(name,))
            results.setdefault(key, {"loops": {}})["loops"].update(
                r["loops"])
    # OpenSSL's own cost per handshake pair, for the attribution table.
    text = ""
    for extra in ([], ["--mtls"], ["--psk"]):
        r = subprocess.run(
            [sys.executable, str(guest.REPO / "bench" / "handshake_cost.py"),
             "--pairs", "20", *extra], capture_output=True, text=True,
            timeout=900, check=False)
        text += r.stdout + r.stderr
    (out / "handshake_cost.txt").write_text(text)
    say(text)
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    for impl in impls:
        sh("cp %s/%s.log %s/ 2>/dev/null; true" % (guest.WORK, impl, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
