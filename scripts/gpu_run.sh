#!/usr/bin/env bash
# The one command to run ON the GPU machine (repo root, `.gpu/` carried along with the
# device run). The project's own packing script, scripts/pack_gpu.sh, builds `.gpu/`
# here first (test and bench executables with --features cuda, the wheel):
#
#     bash scripts/gpu_run.sh
#
# Steps (each continues on failure; the summary says which failed):
#   env      nvidia-smi, driver, torch / CUDA versions, compute-sanitizer version
#   tests    every .gpu/bin/test-* and lib-* binary            -> $OUT/tests.log
#   bench    .gpu/bin/bench-gpu --bench --save-baseline gpu    -> $OUT/bench.log,
#            criterion data in $OUT/criterion, table in $OUT/bench_table.md
#   pytest   the wheel from .gpu/wheels into /tmp/site, pytest -q -rs python/tests
#                                                               -> $OUT/pytest.log
#   memcheck, racecheck  compute-sanitizer on .gpu/bin/test-gpu_vs_cpu
#                                                               -> $OUT/sanitizer.log
# and writes $OUT/gpu-validation.md (date, GPU, what ran, pass/fail counts,
# sanitizer summaries, the bench table): commit it as docs/gpu-validation.md.
# Everything fits GPU_RUN_BUDGET seconds (default 520, under the 10-minute call):
# each step's `timeout` is cut to what is left.
#
# GPU_RUN_SUMMARY_ONLY=1 only rewrites the summary from the logs already in $OUT
# (a dry run on fake logs, on any machine).
set -u
OUT=${OUT:-/tmp/gpu_run_out}
mkdir -p "$OUT"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-520}
STEPS="$OUT/steps.tsv"

# Seconds for a step: at most $1, and never past the budget (20 s kept for the end).
cap() {
  local left=$((BUDGET - ($(date +%s) - START) - 20))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
# record NAME RC T0 NOTE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(($(date +%s) - $3))" "$4" >> "$STEPS"; }

if [ "${GPU_RUN_SUMMARY_ONLY:-0}" != 1 ]; then
  : > "$STEPS"
  # ---- env
  t0=$(date +%s)
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || cat .gpu/COMMIT 2>/dev/null || echo unknown)"
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    command -v nvcc >/dev/null && nvcc --version | tail -2
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
    ls -la .gpu/bin .gpu/wheels
  } > "$OUT/env.log" 2>&1
  record env $? "$t0" ""
  NV=$(python3 -c 'import os,torch;print(os.path.realpath(os.path.join(os.path.dirname(torch.__file__),"..","nvidia","cu13")))' 2>/dev/null)
  export LD_LIBRARY_PATH=${NV:+$NV/lib:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  export MOE_ROUTER_CACHE_DIR=/tmp/moe-router-ptx
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> "$OUT/env.log"
  cat "$OUT/env.log"

  # ---- tests: every test and lib binary, one after the other
  : > "$OUT/tests.log"
  ls .gpu/bin/test-* .gpu/bin/lib-* >/dev/null 2>&1 || record "tests (no .gpu/bin/test-* or lib-*: run scripts/pack_gpu.sh)" 127 "$(date +%s)" ""
  for t in .gpu/bin/test-* .gpu/bin/lib-*; do
    [ -x "$t" ] || continue
    t0=$(date +%s)
    echo "### BIN $(basename "$t")" >> "$OUT/tests.log"
    timeout "$(cap 150)" "$t" >> "$OUT/tests.log" 2>&1
    rc=$?
    echo "### RC $rc" >> "$OUT/tests.log"
    record "test $(basename "$t")" $rc "$t0" ""
    echo "== $(basename "$t"): rc=$rc"; grep -E '^test result:|^gpu_vs_cpu:|FAILED|panicked' "$OUT/tests.log" | tail -3
  done

  # ---- bench
  t0=$(date +%s)
  if [ -x .gpu/bin/bench-gpu ]; then
    CRITERION_HOME="$OUT/criterion" timeout "$(cap 190)" .gpu/bin/bench-gpu --bench --save-baseline gpu \
      > "$OUT/bench.log" 2>&1
    rc=$?
  else
    echo "no .gpu/bin/bench-gpu" > "$OUT/bench.log"; rc=127
  fi
  record bench $rc "$t0" ""
  python3 scripts/bench_table.py --dir "$OUT/criterion" --relative-to cuda_memcpy_d2d cuda_ \
    > "$OUT/bench_table.md" 2>> "$OUT/bench.log"
  tail -3 "$OUT/bench.log"

  # ---- pytest on the wheel
  t0=$(date +%s)
  rm -rf /tmp/site
  if python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl > "$OUT/pytest.log" 2>&1; then
    PYTHONPATH=/tmp/site timeout "$(cap 90)" python3 -m pytest -q -rs -p no:cacheprovider python/tests >> "$OUT/pytest.log" 2>&1
    rc=$?
  else
    rc=126
  fi
  record pytest $rc "$t0" ""
  tail -3 "$OUT/pytest.log"

  # ---- compute-sanitizer on the GPU-vs-CPU tests (a timeout still reports how far it got)
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    t0=$(date +%s)
    [ "$tool" = memcheck ] && lim=100 || lim=80
    echo "### TOOL $tool" >> "$OUT/sanitizer.log"
    timeout "$(cap $lim)" compute-sanitizer --tool "$tool" --print-limit 20 .gpu/bin/test-gpu_vs_cpu \
      >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    echo "### RC $rc" >> "$OUT/sanitizer.log"
    record "$tool" $rc "$t0" ""
    grep -E 'SUMMARY' "$OUT/sanitizer.log" | tail -1
  done
fi

# ---- summary: $OUT/gpu-validation.md
python3 - "$OUT" "$BUDGET" <<'EOF'
import pathlib, re, sys

out = pathlib.Path(sys.argv[1])
def read(name):
    p = out / name
    return p.read_text(errors="replace") if p.exists() else ""

env = read("env.log")
steps = [l.split("\t") for l in read("steps.tsv").splitlines() if l.count("\t") >= 3]
def status(rc):
    return {"0": "ok", "124": "TIMEOUT", "137": "KILLED (timeout)"}.get(rc, f"FAILED (rc {rc})")

# tests.log: "### BIN name" ... "### RC n" sections
tests = []
for m in re.finditer(r"### BIN (\S+)\n(.*?)### RC (\d+)", read("tests.log"), re.S):
    name, body, rc = m.groups()
    p = f = s = 0
    for r in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", body):
        p += int(r[1]); f += int(r[2]); s += int(r[3])
    for r in re.finditer(r"\w+: (\d+) passed, (\d+) failed, (\d+) skipped", body):
        p += int(r[1]); f += int(r[2]); s += int(r[3])
    failed_names = re.findall(r"^test (\S+) \.\.\. FAILED", body, re.M)
    tests.append((name, status(rc), p, f, s, failed_names))

def sanitizer():
    rows = []
    for m in re.finditer(r"### TOOL (\w+)\n(.*?)### RC (\d+)", read("sanitizer.log"), re.S):
        tool, body, rc = m.groups()
        summ = [l.strip("= ").strip() for l in body.splitlines() if "SUMMARY" in l and l.startswith("=")]
        ok = len(re.findall(r"^test \S+ \.\.\. ok", body, re.M))
        bad = len(re.findall(r"^test \S+ \.\.\. FAILED", body, re.M))
        errs = len(re.findall(r"^========= (Invalid|Race|Error|Program hit|Warning)", body, re.M))
        note = "; ".join(summ) if summ else f"no summary line (stopped early); {errs} error reports so far"
        rows.append((tool, status(rc), f"{ok} tests ok, {bad} failed under the tool", note))
    return rows

pyt = read("pytest.log")
pyline = next((l.strip("= ").strip() for l in reversed(pyt.splitlines())
               if re.search(r"\d+ (passed|failed|error|skipped)", l)), "no pytest result line")
pyskips = [l for l in pyt.splitlines() if l.startswith(("SKIPPED", "FAILED", "ERROR"))]

bench = read("bench.log")
bench_fail = [l for l in bench.splitlines() if l.startswith("FAILED")]
bench_line = next((l for l in reversed(bench.splitlines()) if l.startswith("gpu bench:") or l.startswith("SKIPPED")), "no closing line (timed out or crashed?)")
device = next((l for l in bench.splitlines() if l.startswith("device 0:")), "")

gpu = next((l for l in env.splitlines() if l.startswith("GPU 0:")), "unknown GPU")
date = next((l[6:] for l in env.splitlines() if l.startswith("date: ")), "unknown date")
commit = next((l[8:] for l in env.splitlines() if l.startswith("commit: ")), "unknown")
versions = [l for l in env.splitlines() if l.startswith("torch ") or "release" in l or "Version" in l]

L = [f"# GPU validation: {date}", "",
     f"- GPU: {gpu}", f"- commit: {commit}"]
L += [f"- {v.strip()}" for v in versions]
if device:
    L.append(f"- bench: {device}")
L += ["", "Produced by `bash scripts/gpu_run.sh` (logs: tests.log, bench.log, pytest.log, sanitizer.log).", "",
      "## Steps", "", "| step | status | seconds |", "|---|---|---|"]
L += [f"| {n} | {status(rc)} | {sec} |" for n, rc, sec, _ in steps]
tp = sum(t[2] for t in tests); tf = sum(t[3] for t in tests); ts = sum(t[4] for t in tests)
L += ["", f"## Tests: {tp} passed, {tf} failed, {ts} skipped/ignored", "",
      "| binary | status | passed | failed | skipped/ignored |", "|---|---|---|---|---|"]
L += [f"| {n} | {st} | {p} | {f} | {s} |" for n, st, p, f, s, _ in tests]
for n, *_, names in tests:
    if names:
        L.append(f"- failed in {n}: " + ", ".join(names[:20]))
L += ["", "## compute-sanitizer (test-gpu_vs_cpu)", "", "| tool | status | tests | summary |", "|---|---|---|---|"]
L += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in sanitizer()]
L += ["", f"## pytest: {pyline}", ""]
L += [f"- {l}" for l in pyskips[:20]]
L += ["", f"## Benchmarks: {bench_line}", ""]
L += [f"- {l}" for l in bench_fail]
L += ["", "Throughput = fewest bytes each op must move / median time; % of memcpy = against the",
      "measured 1 GiB device-to-device copy (bytes read + written) in the same run.", "",
      read("bench_table.md").strip() or "(no bench table)"]
(out / "gpu-validation.md").write_text("\n".join(L) + "\n")
EOF
echo "== $(($(date +%s) - START)) s; summary in $OUT/gpu-validation.md"
cat "$OUT/gpu-validation.md"
