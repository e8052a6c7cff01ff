#!/usr/bin/env python3
"""Where the agent's CPU per handshake goes, part by part.

    bench/attribution.py results/profile-<kernel>-<stamp>/profile

Reads what ``bench/run --profile`` wrote (profile.json: each process's
utime+stime per handshake over a loop without the profiler; py-spy's
collapsed stacks of the same loop run again under py-spy) and splits
each process's CPU per handshake into parts by the share of its py-spy
samples: a sample belongs to the part of the first frame, from the leaf
up, that a rule below names.  Ms per handshake = the process's CPU per
handshake x the part's share of the process's samples.  Under TCG the
sample counts are small (a few hundred per process): read the parts as
a ranking with a few ms of noise, the process totals as measured.

The floor column is OpenSSL's own cost of one end (handshake_cost.txt:
the pair's cost with X25519MLKEM768, halved).
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

# (substring of a frame "function (dir/file.py)", part); first match
# from the leaf up wins, so callbacks inside do_handshake are their own.
WORKER_RULES = [
    ("logging/", "logging"),
    ("_trampoline (", "OpenSSL message callback"),
    ("_on_message (", "OpenSSL message callback"),
    ("_on_keylog (", "keylog callback"),
    ("set_keylog_callback.<locals>", "keylog callback"),
    ("_on_verify (", "verify callback"),
    ("_VerifyHelper", "verify callback"),
    ("psklookups.py", "PSK lookups (supervisor round trip)"),
    ("pskhandshake.py", "PSK set-up and callbacks"),
    ("sslbind.py", "PSK set-up and callbacks"),
    ("do_handshake (OpenSSL/SSL.py)", "OpenSSL handshake (C)"),
    ("drive (worker/handshakeio.py)", "poll wait (should be idle)"),
    ("(worker/ktls.py)", "kTLS: key derivation + setsockopt"),
    ("(worker/tlsoutcome.py)", "success(): checks, description"),
    ("(worker/recordlimit.py)", "success(): checks, description"),
    ("(shared/channel.py)", "channel (SCM_RIGHTS, encode/decode)"),
    ("(shared/msgcodec.py)", "channel (SCM_RIGHTS, encode/decode)"),
    ("(shared/protocol.py)", "channel (SCM_RIGHTS, encode/decode)"),
    ("(shared/messages.py)", "channel (SCM_RIGHTS, encode/decode)"),
    ("Connection.__init__", "SSL object and socket set-up"),
    ("(worker/tlsengine.py)", "SSL object and socket set-up"),
    ("(worker/handshakeio.py)", "SSL object and socket set-up"),
    ("(worker/verify.py)", "SSL object and socket set-up"),
    ("(worker/dispatch.py)", "SSL object and socket set-up"),
    ("threading.py", "thread pool and queue"),
    ("queue.py", "thread pool and queue"),
    ("(worker/serve.py)", "thread pool and queue"),
]
SUPERVISOR_RULES = [
    ("logging/", "logging"),
    ("HandshakeSocket.done", "DONE"),
    ("send_done", "DONE"),
    ("HandshakeSocket.accept", "ACCEPT (+ fd checks)"),
    ("lowest_free_fd", "ACCEPT (+ fd checks)"),
    ("check_sockfd", "ACCEPT (+ fd checks)"),
    ("HandshakeSocket.drain", "READY notifications"),
    ("Requests.dispatch", "dispatch (keys, channel send)"),
    ("(shared/channel.py)", "answer (channel read, checks)"),
    ("Monitor.", "answer (channel read, checks)"),
    ("(supervisor/namespaces.py)", "discovery"),
    ("(supervisor/netns.py)", "discovery"),
    ("(supervisor/requests.py)", "request table"),
    ("select", "loop: wait, timers"),
    ("(supervisor/arbiter.py)", "loop: wait, timers"),
]


def frame_name(frame: str) -> str:
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    return "%s (%s)" % (m.group(1), "/".join(m.group(2).split("/")[-2:]))


def shares(path: Path, rules: list[tuple[str, str]]
           ) -> tuple[dict[str, float], int]:
    """Each part's share of the samples in one py-spy file."""
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [frame_name(f) for f in stack.split(";")
                  if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        n = int(count)
        total += n
        part = "other"
        for frame in reversed(frames):
            hit = next((p for s, p in rules if s in frame), None)
            if hit is not None:
                part = hit
                break
        parts[part] += n
    return {k: v / total for k, v in parts.items()} if total else {}, total


def floors(text: str) -> dict[str, float]:
    """Per-end floor by mode, from handshake_cost.txt."""
    out = {}
    for m in re.finditer(r"X25519MLKEM768\s+(\w+): ([\d.]+) ms", text):
        out[m.group(1)] = float(m.group(2)) / 2
    return out


def table(d: Path, impl: str, loops: dict, floor: dict[str, float]) -> None:
    prefix = "" if impl == "ours" else impl + "-"
    for scenario, loop in loops.items():
        mode = "psk" if scenario.startswith("nvme") else (
            "mtls" if "mtls" in scenario else "tls")
        print("\n### %s, %s: %.1f ms of agent CPU per handshake (cgroup),"
              " OpenSSL's own per end %s" % (
                  impl, scenario, loop["cgroup_cpu_ms_per_hs"],
                  "%.1f ms" % floor[mode] if mode in floor else "?"))
        print("| process / part | ms per handshake | share of its samples |")
        print("| --- | ---: | ---: |")
        for title, ms in loop["cpu_ms_per_hs_by_process"].items():
            if "template" in title:
                continue
            tag = "supervisor" if "supervisor" in title else "worker"
            rules = SUPERVISOR_RULES if tag == "supervisor" else WORKER_RULES
            path = d / ("py-spy-%s%s-%s.txt" % (prefix, scenario, tag))
            part_shares, n = shares(path, rules) if path.exists() else ({}, 0)
            print("| **%s** (%d samples) | **%.1f** | |" % (tag, n, ms))
            for part, share in sorted(part_shares.items(),
                                      key=lambda kv: -kv[1]):
                print("| %s | %.1f | %.0f%% |" % (part, ms * share,
                                                   100 * share))


def main() -> int:
    d = Path(sys.argv[1])
    results = json.loads((d / "profile.json").read_text())
    cost = d / "handshake_cost.txt"
    floor = floors(cost.read_text()) if cost.exists() else {}
    for key, res in results.items():
        if key == "daemon" or key.startswith("daemon-"):
            impl = "ours" if key == "daemon" else key[len("daemon-"):]
            table(d, impl, res["loops"], floor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
