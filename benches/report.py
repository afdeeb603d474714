#!/usr/bin/env python3
"""Turns benches/results/ into tables (summary.md, warm_summary.csv) and plot.png.

Usage: python3 benches/report.py benches/results
"""
import csv
import glob
import json
import os
import statistics
import sys

RESULTS = sys.argv[1] if len(sys.argv) > 1 else "benches/results"
CONFIG_ORDER = ["direct", "binary", "nginx", "binary-log", "nginx-log", "vmproxy", "arp"]
LABEL = {
    "direct": "direct",
    "binary": "vmproxy binary",
    "nginx": "nginx",
    "binary-log": "vmproxy binary, access log",
    "nginx-log": "nginx, access log",
    "vmproxy": "VmProxyLayer in axum::serve",
    "arp": "axum-reverse-proxy",
}
out = []


def p(line=""):
    out.append(line)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------- machine
machine = os.path.join(RESULTS, "machine.txt")
if os.path.exists(machine):
    p("## Machine")
    p()
    p("```")
    p(open(machine).read().strip())
    p("```")
    p()

# ---------------------------------------------------------------------------- warm path
warm_rows = []
warm_path = os.path.join(RESULTS, "warm.jsonl")
if os.path.exists(warm_path):
    for line in open(warm_path):
        line = line.strip()
        if line:
            warm_rows.append(json.loads(line))

summary = {}
if warm_rows:
    groups = {}
    for d in warm_rows:
        r = d["result"]
        key = (d["body"], d["conns"], d["config"])
        g = groups.setdefault(key, {"rps": [], "p50": [], "p90": [], "p99": [], "p999": [], "err": 0, "runs": 0})
        g["rps"].append(r["requests"] / (r["duration_us"] / 1e6))
        g["p50"].append(r["p50_us"])
        g["p90"].append(r["p90_us"])
        g["p99"].append(r["p99_us"])
        g["p999"].append(r["p999_us"])
        g["err"] += r["errors"] + r["non2xx"]
        g["runs"] += 1
    for key, g in groups.items():
        summary[key] = {k: med(v) if isinstance(v, list) else v for k, v in g.items()}

    with open(os.path.join(RESULTS, "warm_summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["body", "conns", "config", "runs", "median_rps", "median_p50_us", "median_p90_us",
                    "median_p99_us", "median_p999_us", "errors_total"])
        for (body, conns, cfg), s in sorted(summary.items()):
            w.writerow([body, conns, cfg, s["runs"], round(s["rps"]), s["p50"], s["p90"], s["p99"], s["p999"], s["err"]])

    p("## Warm path (medians of %d runs)" % max(s["runs"] for s in summary.values()))
    p()
    for body in ["small", "big"]:
        conns_list = sorted({c for (b, c, _) in summary if b == body})
        if not conns_list:
            continue
        p("### %s bodies" % ("13-byte" if body == "small" else "1 MiB"))
        p()
        p("| conns | config | req/s | p50 µs | p99 µs | p50 added over direct µs | errors |")
        p("|---:|---|---:|---:|---:|---:|---:|")
        for c in conns_list:
            direct = summary.get((body, c, "direct"))
            for cfg in CONFIG_ORDER:
                s = summary.get((body, c, cfg))
                if not s:
                    continue
                added = "" if cfg == "direct" or not direct else "%+.0f" % (s["p50"] - direct["p50"])
                p("| %d | %s | %.0f | %.0f | %.0f | %s | %d |" % (c, LABEL[cfg], s["rps"], s["p50"], s["p99"], added, s["err"]))
        p()

    # The binary against nginx (and axum-reverse-proxy), at every point measured.
    p("### Warm-path targets: the vmproxy binary against nginx")
    p()
    p("Ratios of medians from the same run; p50/p99 in µs (binary vs nginx).")
    p()
    p("| body | conns | binary / nginx req/s | p50 binary vs nginx | p99 binary vs nginx | with access logs: binary / nginx req/s | binary / axum-reverse-proxy req/s |")
    p("|---|---:|---:|---:|---:|---:|---:|")
    for body in ["small", "big"]:
        for c in sorted({c for (b, c, _) in summary if b == body}):
            g = {x: summary.get((body, c, x)) for x in CONFIG_ORDER}
            if not (g["binary"] and g["nginx"]):
                continue
            logged = "%.2f" % (g["binary-log"]["rps"] / g["nginx-log"]["rps"]) if g["binary-log"] and g["nginx-log"] else ""
            arp = "%.2f" % (g["binary"]["rps"] / g["arp"]["rps"]) if g["arp"] else ""
            p("| %s | %d | %.2f | %.0f vs %.0f | %.0f vs %.0f | %s | %s |" % (
                body, c, g["binary"]["rps"] / g["nginx"]["rps"], g["binary"]["p50"], g["nginx"]["p50"],
                g["binary"]["p99"], g["nginx"]["p99"], logged, arp))
    p()

# ---------------------------------------------------------------------------- criterion
crit = sorted(glob.glob("target/criterion/*/*/new/estimates.json"))
if crit:
    p("## Criterion micro-benchmarks (median of the estimates)")
    p()
    p("| benchmark | median | 95% CI |")
    p("|---|---:|---:|")
    rows = {}
    for path in crit:
        parts = path.split(os.sep)
        name = parts[-4] + "/" + parts[-3]
        e = json.load(open(path))["median"]
        rows[name] = (e["point_estimate"], e["confidence_interval"]["lower_bound"], e["confidence_interval"]["upper_bound"])

    def fmt(ns):
        if ns >= 1e6:
            return "%.2f ms" % (ns / 1e6)
        if ns >= 1e3:
            return "%.2f µs" % (ns / 1e3)
        return "%.0f ns" % ns

    for name, (pt, lo, hi) in sorted(rows.items()):
        p("| %s | %s | %s – %s |" % (name, fmt(pt), fmt(lo), fmt(hi)))
    for grp in ["passthrough", "proxied"]:
        a, b = rows.get(grp + "/direct"), rows.get(grp + "/vmproxy")
        if a and b:
            p("| %s: vmproxy − direct | %s | |" % (grp, fmt(b[0] - a[0])))
    p()
    json.dump(rows, open(os.path.join(RESULTS, "criterion.json"), "w"), indent=1)

# ---------------------------------------------------------------------------- cold start
cold_path = os.path.join(RESULTS, "coldstart.json")
for cold_path in sorted(glob.glob(os.path.join(RESULTS, "coldstart*.json"))):
    c = json.load(open(cold_path))
    p("## Cold start: %d concurrent first requests, boot %d ms (%s), %d runs" % (c["n"], c["boot_ms"], c.get("client", ""), c["runs"]))
    p()
    p("| run | starts | 200s | peak parked | new backend conns | wake p50 ms | wake p99 ms | wake max ms | RSS growth per parked request |")
    p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(c["runs_detail"]):
        p("| %d | %s | %s | %s | %s | %.1f | %.1f | %.1f | %.0f B |" % (
            i + 1, r["starts"], r["ok"], r["peak_pending"], r.get("backend_connections", "?"), r["wake_p50_ms"],
            r["wake_p99_ms"], r["wake_max_ms"], r["bytes_per_parked_request"]))
    p("| **median** | | | | | %.1f | %.1f | %.1f | %.0f B |" % (
        c["median_wake_p50_ms"], c["median_wake_p99_ms"], c["median_wake_max_ms"], c["median_bytes_per_parked_request"]))
    p()

pm_path = os.path.join(RESULTS, "parked_mem.jsonl")
if os.path.exists(pm_path):
    vals = [json.loads(l)["bytes_per_parked_request"] for l in open(pm_path) if l.strip()]
    if vals:
        p("## Memory per parked request, in-process, no sockets")
        p()
        p("Runs (one process each): %s B; median **%.0f B**." % (", ".join("%.0f" % v for v in vals), med(vals)))
        p()

pb_path = os.path.join(RESULTS, "parked_bin.jsonl")
if os.path.exists(pb_path):
    rows = [json.loads(l) for l in open(pb_path) if l.strip()]
    if rows:
        p("## Memory per parked HTTP/1.1 connection, the vmproxy binary")
        p()
        p("| run | connections | RSS before | RSS parked | per connection |")
        p("|---:|---:|---:|---:|---:|")
        for i, r in enumerate(rows):
            p("| %d | %d | %d KiB | %d KiB | %.0f B |" % (i + 1, r["n"], r["base_rss_kib"], r["parked_rss_kib"], r["bytes_per_parked_connection"]))
        p("| **median** | | | | **%.0f B** |" % med([r["bytes_per_parked_connection"] for r in rows]))
        p()

as_path = os.path.join(RESULTS, "accept_storm.jsonl")
if os.path.exists(as_path):
    rows = [json.loads(l) for l in open(as_path) if l.strip()]
    if rows:
        p("## Accept storm: clients connecting at once to a cold route, the vmproxy binary")
        p()
        p("| listen_backlog | clients | 200s | failed | last connected | connected p99 | last answered |")
        p("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            p("| %s | %d | %d | %d | %.0f ms | %.0f ms | %.0f ms |" % (
                r["listen_backlog"], r["n"], r["ok"], r["failed"], r["connected_max_ms"], r["connected_p99_ms"], r["answered_max_ms"]))
        for b in sorted({r["listen_backlog"] for r in rows}):
            sel = [r for r in rows if r["listen_backlog"] == b]
            p("| **median, %s** | | | | **%.0f ms** | %.0f ms | %.0f ms |" % (
                b, med([r["connected_max_ms"] for r in sel]), med([r["connected_p99_ms"] for r in sel]), med([r["answered_max_ms"] for r in sel])))
        p()

# ---------------------------------------------------------------------------- readiness
rd_path = os.path.join(RESULTS, "readiness.json")
if os.path.exists(rd_path):
    r = json.load(open(rd_path))
    p("## Readiness lag: %d machines, boot times 1–20 s, %d runs" % (r["machines"], r["runs"]))
    p()
    p("| | p50 | p90 | max |")
    p("|---|---:|---:|---:|")
    p("| vmproxy (first proxied byte − machine healthy) | %.1f ms | %.1f ms | %.1f ms |" % (r["lag_p50_ms"], r["lag_p90_ms"], r["lag_max_ms"]))
    p("| original schedule on the same boot times | %.0f ms | %.0f ms | %.0f ms |" % (r["original_lag_p50_ms"], r["original_lag_p90_ms"], r["original_lag_max_ms"]))
    p()
    p("Non-200 answers: %d. First proxied byte − first 2xx probe answer: p50 %.1f ms, max %.1f ms." % (
        r["non_200"], r["lag_after_first_ok_p50_ms"], r["lag_after_first_ok_max_ms"]))
    p()

# ---------------------------------------------------------------------------- control plane
cp_path = os.path.join(RESULTS, "controlplane.json")
cp_txt = os.path.join(RESULTS, "controlplane.txt")
if os.path.exists(cp_path):
    cp = json.load(open(cp_path))
    p("## Control-plane calls per cold start (emulator)")
    p()
    p("| run | concurrent first requests | 200s | cold start s | Compute API calls | by method | original, same timings |")
    p("|---:|---:|---:|---:|---:|---|---|")
    for i, r in enumerate(cp["runs"]):
        p("| %d | %d | %d | %.2f | %d | %s | %d per first request (%s); %d for all %d |" % (
            i + 1, r["concurrent_first_requests"], r["ok"], r["cold_start_s"], r["compute_calls"],
            ", ".join("%s %d" % kv for kv in sorted(r["calls"].items())), r["original_compute_calls_one_request"],
            ", ".join("%s %d" % kv for kv in sorted(r["original_breakdown_one_request"].items())),
            r["original_compute_calls_all_requests"], r["concurrent_first_requests"]))
    p()
elif os.path.exists(cp_txt):
    p("## Control-plane calls per cold start (emulator)")
    p()
    p(open(cp_txt).read().strip())
    p()

open(os.path.join(RESULTS, "summary.md"), "w").write("\n".join(out) + "\n")
print("\n".join(out))

# ---------------------------------------------------------------------------- plot
if summary:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bodies = [b for b in ["small", "big"] if any(k[0] == b for k in summary)]
    conns_all = sorted({k[1] for k in summary})
    fig, axes = plt.subplots(len(bodies), len(conns_all), figsize=(4.2 * len(conns_all), 3.8 * len(bodies)), squeeze=False)
    pcts = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9")]
    colors = {"direct": "#777777", "binary": "#1f77b4", "nginx": "#2ca02c", "binary-log": "#9ecae1",
              "nginx-log": "#a1d99b", "vmproxy": "#9467bd", "arp": "#d62728"}
    for i, body in enumerate(bodies):
        for j, c in enumerate(conns_all):
            ax = axes[i][j]
            cfgs = [x for x in CONFIG_ORDER if (body, c, x) in summary]
            width = 0.8 / max(1, len(cfgs))
            for k, cfg in enumerate(cfgs):
                s = summary[(body, c, cfg)]
                xs = [x + k * width for x in range(len(pcts))]
                ax.bar(xs, [s[key] for key, _ in pcts], width, label="%s (%.0f req/s)" % (LABEL[cfg], s["rps"]), color=colors[cfg])
            ax.set_xticks([x + width * (len(cfgs) - 1) / 2 for x in range(len(pcts))])
            ax.set_xticklabels([lbl for _, lbl in pcts])
            ax.set_yscale("log")
            ax.set_ylabel("latency (µs, log)")
            ax.set_title("%s body, %d conn%s" % ("13 B" if body == "small" else "1 MiB", c, "" if c == 1 else "s"))
            ax.legend(fontsize=7)
            ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle("vmproxy warm path: latency percentiles per configuration (medians of runs; wrk, loopback)")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "plot.png"), dpi=110)
