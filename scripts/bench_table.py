#!/usr/bin/env python3
"""Print criterion results under target/criterion as a Markdown table.

    cargo bench --bench cpu && python3 scripts/bench_table.py [group-prefix]

Columns: benchmark id, median time per iteration (with criterion's 95% interval of
the median), and throughput computed from the median (elements/s or GB/s).
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
prefix = sys.argv[1] if len(sys.argv) > 1 else ""


def fmt_time(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


rows = []
for bench in sorted(root.glob("**/new/benchmark.json")):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    name = meta["full_id"]
    if not name.startswith(prefix):
        continue
    med = est["median"]["point_estimate"]
    lo = est["median"]["confidence_interval"]["lower_bound"]
    hi = est["median"]["confidence_interval"]["upper_bound"]
    thr = meta.get("throughput") or {}
    if "Bytes" in thr:
        t = f"{thr['Bytes'] / med:.2f} GB/s"
    elif "Elements" in thr:
        t = f"{thr['Elements'] / med * 1e3:.1f} M elem/s"
    else:
        t = ""
    rows.append((name, f"{fmt_time(med)} [{fmt_time(lo)}, {fmt_time(hi)}]", t))

print("| benchmark | median time [95% CI] | throughput |")
print("|---|---|---|")
for r in rows:
    print(f"| `{r[0]}` | {r[1]} | {r[2]} |")
