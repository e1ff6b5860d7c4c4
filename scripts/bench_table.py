#!/usr/bin/env python3
"""Print criterion results under target/criterion as a Markdown table.

    cargo bench --bench cpu && python3 scripts/bench_table.py [group-prefix]
    python3 scripts/bench_table.py --dir $OUT/criterion --relative-to cuda_memcpy_d2d cuda_

Columns: benchmark id, median time per iteration (with criterion's 95% interval of
the median), and throughput computed from the median (elements/s or GB/s).
`--dir` reads another criterion directory (default: target/criterion of this
checkout); `--relative-to PREFIX` adds a column with each byte throughput as a
percentage of the first benchmark whose id starts with PREFIX (the memcpy baseline).
"""

import argparse
import json
import pathlib

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("prefix", nargs="?", default="", help="only ids starting with this")
ap.add_argument(
    "--dir",
    type=pathlib.Path,
    default=pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion",
    help="criterion output directory (default: target/criterion)",
)
ap.add_argument("--relative-to", default="", help="id prefix of the bandwidth baseline")
args = ap.parse_args()
root = args.dir
prefix = args.prefix


def fmt_time(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


rows = []
base_gbs = None
for bench in sorted(root.glob("**/new/benchmark.json")):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    name = meta["full_id"]
    med = est["median"]["point_estimate"]
    thr = meta.get("throughput") or {}
    gbs = thr["Bytes"] / med if "Bytes" in thr else None
    if args.relative_to and base_gbs is None and name.startswith(args.relative_to):
        base_gbs = gbs
    if not name.startswith(prefix):
        continue
    lo = est["median"]["confidence_interval"]["lower_bound"]
    hi = est["median"]["confidence_interval"]["upper_bound"]
    if gbs is not None:
        t = f"{gbs:.2f} GB/s"
    elif "Elements" in thr:
        t = f"{thr['Elements'] / med * 1e3:.1f} M elem/s"
    else:
        t = ""
    rows.append([name, f"{fmt_time(med)} [{fmt_time(lo)}, {fmt_time(hi)}]", t, gbs])

if args.relative_to:
    print("| benchmark | median time [95% CI] | throughput | % of memcpy |")
    print("|---|---|---|---|")
else:
    print("| benchmark | median time [95% CI] | throughput |")
    print("|---|---|---|")
for name, time, t, gbs in rows:
    line = f"| `{name}` | {time} | {t} |"
    if args.relative_to:
        pct = f"{100 * gbs / base_gbs:.0f}%" if gbs is not None and base_gbs else ""
        line += f" {pct} |"
    print(line)
