#!/usr/bin/env python3
"""Tables from a benchmark's results.json (bench/guest.py writes it).

    bench/report.py results/bench-6.12-<stamp>/results.json

Samples of the same implementation are pooled over the rounds; the ratio
column is ours / reference (below 1 means ours is faster or smaller).
Stdlib only: runs on the host and in the guest.
"""

from __future__ import annotations

import json
import sys
from typing import Any

IMPLS = ("ours", "reference")
# Goals of issue 9, as ratios ours/reference from one run.
LATENCY_GOAL = ("nfs-tls", "nfs-mtls", "nvme-q1")
BURST_GOAL = ("nvme-q16", "nfs-nconnect16")


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation between closest ranks."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def median(values: list[float]) -> float | None:
    return pct(values, 50)


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def sample_line(s: dict[str, Any]) -> str:
    lat = s["latency"]
    parts = ["hs=%d" % s["handshakes"]]
    if s["failed"] or s["handshake_errors"] or s["incomplete"]:
        parts.append("FAILED=%d errors=%d %s incomplete=%d" % (
            s["failed"], s["handshake_errors"],
            s.get("error_statuses", ""), s["incomplete"]))
    parts.append("cycle=%.0fms" % (mean(s["cycle_seconds"]) * 1000))
    if lat:
        parts.append("p50=%.1f p99=%.1f ms" % (ms(pct(lat, 50)),
                                               ms(pct(lat, 99))))
    if s["bursts"]:
        parts.append("last-DONE=%.0fms" % ms(median(s["bursts"])))
    if s["handshakes"] and s["cpu_usec"]:
        parts.append("cpu/hs=%.1fms" % (s["cpu_usec"] / s["handshakes"]
                                         / 1000))
    return " ".join(parts)


def pooled(samples: list[dict[str, Any]], impl: str) -> dict[str, Any]:
    ss = [s for s in samples if s["impl"] == impl]
    if not ss:
        return {}
    lat = [x for s in ss for x in s["latency"]]
    agent = [x for s in ss for x in s["agent"]]
    bursts = [x for s in ss for x in s["bursts"]]
    burst_hs = sum(n for s in ss for n in s["burst_handshakes"])
    hs = sum(s["handshakes"] for s in ss)
    cpu = sum(s["cpu_usec"] for s in ss)
    return {
        "rounds": len(ss),
        "cycles": sum(s["cycles"] for s in ss),
        "failed": sum(s["failed"] for s in ss),
        "handshakes": hs,
        "errors": sum(s["handshake_errors"] + s["incomplete"] for s in ss),
        "cycle_ms": ms(mean([x for s in ss for x in s["cycle_seconds"]])),
        "base_cycle_ms": ms(mean([x for s in ss
                                  for x in s.get("base_cycle_seconds", [])])),
        "p50": ms(pct(lat, 50)), "p90": ms(pct(lat, 90)),
        "p99": ms(pct(lat, 99)), "max": ms(max(lat)) if lat else None,
        "agent_p50": ms(pct(agent, 50)), "agent_p99": ms(pct(agent, 99)),
        "last_done_ms": ms(median(bursts)),
        "hs_per_s": burst_hs / sum(bursts) if bursts else None,
        "burst_hs": burst_hs / len(bursts) if bursts else None,
        "cpu_ms_per_hs": cpu / hs / 1000 if hs and cpu else None,
        "round_p50": [ms(pct(s["latency"], 50)) for s in ss],
    }


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, sc in results["scenarios"].items():
        out[name] = {impl: pooled(sc["samples"], impl)
                     for impl in (*IMPLS, "none")}
    return out


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "%.*f" % (digits, x)
    return str(x)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return "%.2f" % (a / b)


def memory_rows(results: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    rows = []
    for when in ("idle", "after"):
        for key in ("pss_kib", "rss_kib"):
            vals = {}
            for impl in IMPLS:
                v = [m[when][key] for m in results["memory"]
                     if m["impl"] == impl]
                vals[impl] = (max(v) if when == "after" else median(v)) \
                    if v else None
            label = "%s %s MiB (%s)" % (
                key[:3].upper(), when,
                "median of starts" if when == "idle" else "max over rounds")
            rows.append((label, None if vals["ours"] is None
                         else vals["ours"] / 1024,
                         None if vals["reference"] is None
                         else vals["reference"] / 1024))
    return rows


def before_after(results: dict[str, Any]) -> dict[str, Any] | None:
    """A run of ours against "base" (BENCH_IMPLS=ours,base: another
    checkout of ours, BENCH_BASE_VENV) as a copy in which base takes the
    reference's column; None for an ordinary run."""
    impls = str(results.get("params", {}).get("impls", "")).split(",")
    if "base" not in impls:
        return None

    def swap(d: dict[str, Any]) -> dict[str, Any]:
        return dict(d, impl="reference") if d.get("impl") == "base" else d

    def keep(d: dict[str, Any]) -> bool:
        return d.get("impl") != "reference"  # the real one, if it ran

    out = dict(results)
    out["params"] = dict(results["params"], impls="ours,reference")
    out["scenarios"] = {
        name: dict(sc, samples=[swap(x) for x in sc["samples"] if keep(x)])
        for name, sc in results["scenarios"].items()}
    out["memory"] = [swap(x) for x in results.get("memory", [])
                     if keep(x)]
    out["starts"] = [swap(x) for x in results.get("starts", []) if keep(x)]
    out.pop("sessions", None)
    return out


def render(results: dict[str, Any]) -> str:
    swapped = before_after(results)
    impls = str(results.get("params", {}).get("impls", "")).split(",")
    if swapped is not None:
        text = ("BEFORE/AFTER: 'ours' = this checkout (after), "
                "'reference' column = BENCH_BASE_VENV (before); "
                "ratios are after/before, the goal lines do not apply.\n\n"
                + render(swapped))
        if "reference" not in impls:
            return text
        # All three ran: the ordinary table (ours against the reference),
        # then ours against base.
        plain = dict(results, params=dict(results["params"],
                                          impls="ours,reference"))
        return render(plain) + "\n\n" + text
    m = results["machine"]
    summ = summarize(results)
    lines = []
    lines.append("kernel %s, %s vCPU (%s); ours: %s; reference: %s" % (
        m["guest_kernel"], m["guest_cpus"], m["guest_cpu_model"],
        m["ours_version"], m["reference_version"]))
    lines.append("")
    lines.append("| scenario | metric | ours | reference | ours/ref |")
    lines.append("| --- | --- | ---: | ---: | ---: |")

    def row(sc: str, label: str, key: str, digits: int = 1) -> None:
        o = summ[sc].get("ours", {}).get(key)
        r = summ[sc].get("reference", {}).get(key)
        lines.append("| %s | %s | %s | %s | %s |" % (
            sc, label, fmt(o, digits), fmt(r, digits), ratio(o, r)))

    base = summ.get("nfs-none", {}).get("none", {})
    for sc in results["scenarios"]:
        if sc == "nfs-none":
            continue
        row(sc, "handshakes (errors)", "handshakes", 0)
        o = summ[sc].get("ours", {})
        r = summ[sc].get("reference", {})
        if o.get("errors") or r.get("errors") or o.get("failed") \
                or r.get("failed"):
            lines[-1] = "| %s | handshakes (errors, failed cycles) | " \
                "%s (%s, %s) | %s (%s, %s) | |" % (
                    sc, o.get("handshakes"), o.get("errors"),
                    o.get("failed"), r.get("handshakes"), r.get("errors"),
                    r.get("failed"))
        row(sc, "hs latency p50 ms", "p50")
        row(sc, "hs latency p90 ms", "p90")
        row(sc, "hs latency p99 ms", "p99")
        row(sc, "accept→done p50 ms", "agent_p50")
        if sc.startswith("nfs"):
            row(sc, "cycle ms (mean)", "cycle_ms", 0)
            if o.get("base_cycle_ms") is not None:
                # Each TLS cycle was paired with one without TLS.
                row(sc, "same cycle without TLS, ms (paired)",
                    "base_cycle_ms", 0)
                ov = o["cycle_ms"] - o["base_cycle_ms"]
                rv = None
                if r.get("base_cycle_ms") is not None:
                    rv = r["cycle_ms"] - r["base_cycle_ms"]
                lines.append("| %s | TLS overhead per cycle ms | %s | %s "
                             "| %s |" % (sc, fmt(ov, 0), fmt(rv, 0),
                                         ratio(ov, rv)))
            elif base.get("cycle_ms") is not None and sc in ("nfs-tls",
                                                             "nfs-mtls"):
                oc = o.get("cycle_ms")
                rc = r.get("cycle_ms")
                ov = None if oc is None else oc - base["cycle_ms"]
                rv = None if rc is None else rc - base["cycle_ms"]
                lines.append("| %s | TLS overhead per cycle ms (vs the "
                             "separate nfs-none loop) | %s | %s | %s |"
                             % (sc, fmt(ov, 0), fmt(rv, 0), ratio(ov, rv)))
        if (o.get("burst_hs") or 0) > 2.5:
            row(sc, "time to last DONE ms (median cycle)", "last_done_ms", 0)
            row(sc, "handshakes per burst", "burst_hs", 0)
            row(sc, "handshakes/s (in bursts)", "hs_per_s", 2)
        row(sc, "agent CPU ms / hs", "cpu_ms_per_hs", 2)
    if base:
        lines.append("| nfs-none | cycle ms (mean, no TLS, no agent) | %s "
                     "| | |" % fmt(base.get("cycle_ms"), 0))
    for label, o, r in memory_rows(results):
        lines.append("| memory | %s | %s | %s | %s |" % (
            label, fmt(o), fmt(r), ratio(o, r)))
    starts = {impl: [s["seconds"] for s in results.get("starts", [])
                     if s["impl"] == impl] for impl in IMPLS}
    if starts["ours"] and starts["reference"]:
        so, sr = median(starts["ours"]), median(starts["reference"])
        lines.append("| start-up | until ready, s (median) | %s | %s | %s |"
                     % (fmt(so, 1), fmt(sr, 2), ratio(so, sr)))
        first = {impl: [s["first_handshake_seconds"] * 1000
                        for s in results["starts"] if s["impl"] == impl
                        and s.get("first_handshake_seconds")]
                 for impl in IMPLS}
        if first["ours"] and first["reference"]:
            fo, fr = median(first["ours"]), median(first["reference"])
            lines.append("| start-up | first handshake after start, ms "
                         "(median) | %s | %s | %s |"
                         % (fmt(fo, 0), fmt(fr, 0), ratio(fo, fr)))
    crypto = results.get("crypto")
    if crypto:
        lines.append("")
        lines.append(
            "Crypto floor in this guest (cryptography/OpenSSL, CPU ms): "
            "X25519 keygen+exchange %.2f, P-256 sign %.2f, verify %.2f; "
            "X25519 + sign + verify = %.2f ms." % (
                crypto["x25519_ecdhe_ms"], crypto["p256_sign_ms"],
                crypto["p256_verify_ms"], crypto["reference_ms"]))
        rounds = [c["reference_ms"] for c in results.get("crypto_rounds", [])]
        if len(rounds) > 1:
            lines.append("(median of %d measurements, one per round and "
                         "one at the end: %s ms)" % (len(rounds), ", ".join(
                             "%.1f" % x for x in rounds)))
    sessions = results.get("sessions")
    if sessions:
        lines.append("")
        lines.append("Negotiated (session descriptions, count):")
        for impl in IMPLS:
            lines.append("- %s: %s" % (impl, "; ".join(
                "%s x%d" % (k, v) for k, v in sorted(
                    sessions.get(impl, {}).items()))))
    lines.append("")
    lines.extend(goals(results, summ))
    return "\n".join(lines)


def goals(results: dict[str, Any], summ: dict[str, Any]) -> list[str]:
    out = ["Goals (ours/reference from this run):"]

    def get(sc: str, impl: str, key: str) -> float | None:
        return summ.get(sc, {}).get(impl, {}).get(key)

    for sc in LATENCY_GOAL:
        for key in ("p50", "p99"):
            o, r = get(sc, "ours", key), get(sc, "reference", key)
            if o is None or r is None:
                continue
            out.append("- %s latency %s: %.2fx (goal <= 0.5x): %s" % (
                sc, key, o / r, "met" if o / r <= 0.5 else "NOT met"))
    for sc in BURST_GOAL:
        o, r = get(sc, "ours", "last_done_ms"), \
            get(sc, "reference", "last_done_ms")
        if o is None or r is None:
            continue
        out.append("- %s time to last DONE: %.2fx (goal <= 0.5x): %s" % (
            sc, o / r, "met" if o / r <= 0.5 else "NOT met"))
    crypto = results.get("crypto")
    if crypto:
        for sc in ("nfs-tls", "nfs-mtls", "nvme-q1"):
            c = get(sc, "ours", "cpu_ms_per_hs")
            if c is None:
                continue
            f = c / crypto["reference_ms"]
            r = get(sc, "reference", "cpu_ms_per_hs")
            ref = ("; the reference %.1f ms = %.1fx" % (
                r, r / crypto["reference_ms"]) if r else "")
            out.append("- %s agent CPU per handshake %.1f ms = %.1fx the "
                       "crypto floor %.1f ms (goal <= 2x): %s%s" % (
                           sc, c, f, crypto["reference_ms"],
                           "met" if f <= 2 else "NOT met", ref))
    return out


def main() -> int:
    with open(sys.argv[1]) as f:
        results = json.load(f)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
