#!/usr/bin/env bash
# Build here (a Rust toolchain, no GPU needed) everything `scripts/gpu_run.sh` runs on the
# GPU machine, which has CUDA, Python and PyTorch but no Rust toolchain and no network.
# The result goes to .gpu/ at the repository root (git-ignored); carry it to the device
# run (carry [".gpu"]) and run `bash scripts/gpu_run.sh` there.
#
#   .gpu/bin/test-<name>     the crate's integration tests (`tests/<name>.rs`), built by
#                            `cargo test --no-run --features cuda` (gpu_vs_cpu among them)
#   .gpu/bin/lib-moe_router  the crate's unit tests, same build
#   .gpu/bin/bench-gpu       the GPU benches (`benches/gpu.rs`; gpu_run.sh passes --bench)
#   .gpu/wheels/*.whl        the Python extension (maturin, abi3; its `cuda` feature is on
#                            by default), installed with pip --target on the device
#   .gpu/COMMIT              the commit the artifacts were built from
#
# The CPU emulator of emu/ is not packed: the GPU machine has the real libcuda. Nothing
# CUDA is linked at build time either (cudarc loads libcuda / libnvrtc when first used).
#
# Usage (from anywhere in the checkout):
#   bash scripts/pack_gpu.sh              # every integration test
#   bash scripts/pack_gpu.sh gpu_vs_cpu   # only these integration tests (unit tests and
#                                         # the GPU bench are always built)
# Environment:
#   PACK_SKIP_WHEEL=1   do not build the wheel (gpu_run.sh's pytest step then fails)
#   PACK_ZIG=1          link against glibc 2.17 with cargo-zigbuild and `maturin --zig`
#                       (both must be installed already), for a GPU image whose glibc is
#                       older than this machine's; the default is a native build
#   MATURIN             the maturin to use (default: on PATH, else .venv/bin/maturin)
#
# The carried folder must stay under 64 MiB: binaries are stripped, and the script fails
# when .gpu/ is larger (then pack fewer tests).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '== %s\n' "$*"; }

out=.gpu
rm -rf "$out"
mkdir -p "$out/bin" "$out/wheels"
git rev-parse HEAD > "$out/COMMIT" 2>/dev/null || echo unknown > "$out/COMMIT"

# ---- Rust test and bench executables (feature cuda, release)
select=(--lib --bench gpu)
if [ $# -eq 0 ]; then
  select+=(--tests)
else
  for t in "$@"; do select+=(--test "$t"); done
fi
if [ "${PACK_ZIG:-0}" = 1 ]; then
  command -v cargo-zigbuild >/dev/null || { echo "pack_gpu.sh: PACK_ZIG=1 needs cargo-zigbuild (cargo install cargo-zigbuild) and zig" >&2; exit 1; }
  # `cargo build --tests` builds the same test executables as `cargo test --no-run`.
  build=(cargo zigbuild --target x86_64-unknown-linux-gnu.2.17)
else
  build=(cargo test --no-run)
fi
say "building ${select[*]} with --features cuda (release): ${build[*]}"
list=$(mktemp)
trap 'rm -f "$list"' EXIT
"${build[@]}" --locked --release -p moe-router --features cuda "${select[@]}" \
  --message-format=json > "$list"
# Every compiled test-mode executable: lib-<name>, test-<name>, bench-<name>.
python3 - "$list" "$out/bin" <<'EOF'
import json, os, shutil, sys
listing, dest = sys.argv[1], sys.argv[2]
n = 0
for line in open(listing):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m["profile"].get("test"):
        continue
    kind = m["target"]["kind"][0]  # lib, test or bench
    dst = os.path.join(dest, f"{kind}-{m['target']['name']}")
    shutil.copy2(m["executable"], dst)
    print("  ", dst)
    n += 1
if n == 0:
    sys.exit("pack_gpu.sh: cargo reported no test executable")
EOF
for b in bench-gpu lib-moe_router; do
  [ -x "$out/bin/$b" ] || { echo "pack_gpu.sh: $out/bin/$b was not built" >&2; exit 1; }
done

# ---- the Python wheel
if [ "${PACK_SKIP_WHEEL:-0}" != 1 ]; then
  maturin=${MATURIN:-$(command -v maturin || echo "$root/.venv/bin/maturin")}
  [ -x "$maturin" ] || { echo "pack_gpu.sh: maturin not found (bash scripts/setup_python.sh installs it into .venv, or set MATURIN)" >&2; exit 1; }
  zig=()
  [ "${PACK_ZIG:-0}" = 1 ] && zig=(--zig --compatibility manylinux2014)
  say "building the wheel with $maturin"
  (cd python && "$maturin" build --release --locked ${zig[@]+"${zig[@]}"} -o "$root/$out/wheels")
  ls "$out"/wheels/*.whl >/dev/null
fi

# ---- strip, report, check the size
strip "$out"/bin/* 2>/dev/null || true
say "glibc each binary needs (the GPU machine's must be at least as new):"
for f in "$out"/bin/*; do
  printf '   %-32s %s\n' "$(basename "$f")" \
    "$(objdump -T "$f" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -1)"
done
ls -la "$out/bin" "$out/wheels"
bytes=$(du -sb "$out" | cut -f1)
say "$out: $((bytes / 1024 / 1024)) MiB (commit $(cat "$out/COMMIT"))"
if [ "$bytes" -ge $((64 * 1024 * 1024)) ]; then
  echo "pack_gpu.sh: $out is over the 64 MiB a device run carries; pack fewer tests (bash scripts/pack_gpu.sh gpu_vs_cpu ...)" >&2
  exit 1
fi
say "next: a device run of 'bash scripts/gpu_run.sh' with carry [\".gpu\"]"
