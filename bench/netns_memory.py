#!/usr/bin/env python3
"""Memory of one tlshd serving 1, 10 and 100 network namespaces.

Runs as root inside the VM (it creates namespaces and starts tlshd):

    tools/vm-run --kernel 6.12 --smp 2 --mem 8192 --timeout 3600 -- \\
        .venv/bin/python bench/netns_memory.py

For each count N: N-1 named namespaces (``ip netns add``) plus the initial
one, all served through ``[netns] default=`` with one set of throwaway
credentials; tlshd is started fresh, and once every namespace has a ready
(idle, sandboxed) worker, Rss and Pss are read from
/proc/<pid>/smaps_rollup of the supervisor, the worker template (when
there is one) and every worker.  Pss splits each shared page between the
processes mapping it, so the Pss column of a row adds up to the tree's
real footprint; Rss counts shared pages once per process.

Then (``--mounts``, default 4) the initial namespace's worker serves that
many NFS-over-TLS mounts (loopback nfsd, as the kernel tests; two
handshakes each, client and server end) and is measured again: Pss, USS
(Private_Clean + Private_Dirty, what its exit would free) and
Private_Dirty, idle and active, per count.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The lab package (tests/lab), shared with the kernel tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lab import nfs, pki
from lab.shell import REPO

TLSHD = REPO / ".venv" / "bin" / "tlshd"
CONTROL = "/run/tlshd/control.sock"
PREFIX = "bench"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


def credentials(root: Path) -> str:
    """A CA, a server and a client certificate; return the config text."""
    pki.write_credentials(root, "bench", [])
    return "\n".join(["[authenticate]", *pki.authenticate_lines(root)]) + "\n"


def status() -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(CONTROL)
        s.sendall(b"status-json\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows: list[dict[str, object]] = json.loads(data)
    return rows


def smaps_rollup(pid: int) -> dict[str, int]:
    """Every KiB field of /proc/<pid>/smaps_rollup."""
    out = {}
    for line in Path("/proc/%d/smaps_rollup" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        fields = value.split()
        if len(fields) == 2 and fields[1] == "kB":
            out[key] = int(fields[0])
    return out


def rollup(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in KiB from /proc/<pid>/smaps_rollup."""
    r = smaps_rollup(pid)
    return r["Rss"], r["Pss"]


def footprint(pid: int) -> tuple[int, int, int]:
    """(Pss, USS, Private_Dirty) in KiB; USS: the pages only this
    process maps (Private_Clean + Private_Dirty), what its exit frees."""
    r = smaps_rollup(pid)
    return (r["Pss"], r["Private_Clean"] + r["Private_Dirty"],
            r["Private_Dirty"])


def init_worker() -> int:
    """The pid of the initial namespace's worker."""
    for row in status():
        if row["netns"] == "init" and row["worker_pid"]:
            return int(str(row["worker_pid"]))
    raise SystemExit("no worker for netns init")


@functools.cache
def nfs_client() -> nfs.Nfs:
    """The loopback nfsd, started once for every count."""
    return nfs.Nfs(nfs.start_server())


def handshakes(mounts: int) -> None:
    """``mounts`` NFS-over-TLS mounts in the initial namespace: each is
    two handshakes (client and server end) by its worker."""
    client = nfs_client()
    for _ in range(mounts):
        r = client.mount("", "tls")
        if not r.ok:
            raise SystemExit("NFS mount failed: %s" % r.output)
        client.umount()


def children(pid: int) -> dict[int, str]:
    """pid -> process title of every child of ``pid``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "status").read_text()
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        ppid = next(int(line.split()[1]) for line in text.splitlines()
                    if line.startswith("PPid:"))
        if ppid == pid:
            out[int(entry.name)] = title.decode(errors="replace")
    return out


def active_worker(mounts: int) -> dict[str, int]:
    """The initial namespace's worker, idle and after ``mounts`` NFS
    mounts: Pss, USS and Private_Dirty in KiB."""
    pid = init_worker()
    idle = footprint(pid)
    handshakes(mounts)
    time.sleep(3.0)
    if init_worker() != pid:
        raise SystemExit("the initial namespace's worker changed")
    return dict(zip(("idle_pss", "idle_uss", "idle_dirty", "pss", "uss",
                     "dirty"), (*idle, *footprint(pid)), strict=True))


def print_active(rows: list[dict[str, float]], mounts: int) -> None:
    print("the initial namespace's worker, idle and then active "
          "(after %d NFS mounts, %d handshakes), MiB:" % (mounts, 2 * mounts))
    header = ("namespaces", "idle_PSS", "idle_USS", "idle_dirty",
              "active_PSS", "active_USS", "active_dirty")
    print(" ".join("%12s" % h for h in header))
    for m in rows:
        print(" ".join("%12s" % v for v in (
            m["namespaces"], *(mib(m["active_" + k]) for k in (
                "idle_pss", "idle_uss", "idle_dirty", "pss", "uss",
                "dirty")))))


def measure(count: int, workdir: Path, timeout: float,
            mounts: int = 0) -> dict[str, float]:
    names = ["%s%03d" % (PREFIX, i) for i in range(1, count)]
    for n in names:
        sh("ip", "netns", "add", n)
    log = open(workdir / ("tlshd-%d.log" % count), "wb")
    start = time.monotonic()
    proc = subprocess.Popen([str(TLSHD), "-s", "-c",
                             str(workdir / "tlshd.conf")],
                            stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit("tlshd exited with %s; see %s"
                                 % (proc.returncode, log.name))
            try:
                rows = status()
            except OSError:
                rows = []
            ready = sum(1 for r in rows if r["worker_ready"])
            if len(rows) == count and ready == count:
                break
            if time.monotonic() - start > timeout:
                raise SystemExit("only %d of %d workers ready after %d s"
                                 % (ready, count, timeout))
            time.sleep(1.0)
        ready_after = time.monotonic() - start
        time.sleep(3.0)  # let start-up garbage settle
        sup_rss, sup_pss = rollup(proc.pid)
        kids = children(proc.pid)
        tmpl_rss = tmpl_pss = w_rss = w_pss = 0
        workers = 0
        for pid, title in kids.items():
            rss, pss = rollup(pid)
            if title == "tlshd: worker template":
                tmpl_rss += rss
                tmpl_pss += pss
            elif title.startswith("tlshd: worker [netns"):
                w_rss += rss
                w_pss += pss
                workers += 1
        if workers != count:
            raise SystemExit("%d workers for %d namespaces: %r"
                             % (workers, count, kids))
        active = active_worker(mounts) if mounts else {}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], check=False)
    return {
        "namespaces": count, "ready_s": ready_after,
        "sup_rss": sup_rss, "sup_pss": sup_pss,
        "tmpl_rss": tmpl_rss, "tmpl_pss": tmpl_pss,
        "w_rss": w_rss, "w_pss": w_pss, "w_pss_each": w_pss / workers,
        "total_pss": sup_pss + tmpl_pss + w_pss,
        **{"active_" + k: v for k, v in active.items()}}


def mib(kib: float) -> str:
    return "%.1f" % (kib / 1024)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="1,10,100",
                   help="served namespaces per run, initial one included")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds to wait for every worker to be ready")
    p.add_argument("--mounts", type=int, default=4,
                   help="NFS mounts (two handshakes each) served by the "
                        "initial namespace's worker before it is measured "
                        "again as an active worker; 0: none")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root in the VM (see the docstring)")
    counts = [int(c) for c in args.counts.split(",")]
    try:
        pwd.getpwnam("tlshd")
    except KeyError:
        sh("useradd", "--system", "--no-create-home", "--shell",
           "/usr/sbin/nologin", "tlshd")
    sh("modprobe", "tls")
    workdir = Path(tempfile.mkdtemp(prefix="tlshd-bench-"))
    workdir.chmod(0o755)
    try:
        creds = workdir / "creds"
        creds.mkdir(mode=0o755)
        text = credentials(creds)
        (workdir / "default.conf").write_text(text)
        (workdir / "tlshd.conf").write_text(
            # A live worker in every namespace: what this measures.
            text + "[netns]\ndefault=%s\nworker_idle_timeout=0\n"
            % (workdir / "default.conf"))
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False).stdout.strip()
        print("netns-memory: kernel %s, %d CPU, python %s, commit %s; idle "
              "workers; MiB from /proc/<pid>/smaps_rollup"
              % (platform.release(), os.cpu_count() or 0,
                 platform.python_version(), commit or "?"))
        header = ("namespaces", "ready_s", "sup_RSS", "sup_PSS",
                  "template_RSS", "template_PSS", "workers_RSS",
                  "workers_PSS", "PSS/worker", "total_PSS")
        print(" ".join("%12s" % h for h in header))
        sys.stdout.flush()
        active = []
        for count in counts:
            m = measure(count, workdir, args.timeout, args.mounts)
            print(" ".join("%12s" % v for v in (
                m["namespaces"], "%.1f" % m["ready_s"], mib(m["sup_rss"]),
                mib(m["sup_pss"]), mib(m["tmpl_rss"]), mib(m["tmpl_pss"]),
                mib(m["w_rss"]), mib(m["w_pss"]), mib(m["w_pss_each"]),
                mib(m["total_pss"]))))
            sys.stdout.flush()
            if args.mounts:
                active.append(m)
        if active:
            print_active(active, args.mounts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
