#!/usr/bin/env bash
# Runs tests/gpu_vs_cpu.rs on the CPU emulator built with AddressSanitizer and
# UndefinedBehaviorSanitizer (emu/README.md, "Sanitizer mode"): out-of-bounds reads and
# writes, use after free and undefined behaviour in the kernels stop the run with a
# report that names the kernel.
#   scripts/emu_sanitize.sh [TEST-FILTER...]   (substrings of test names; none: all)
#
# 1. MOE_EMU_SANITIZE=1 scripts/build_emu.sh -> target/emu-asan/libcuda.so;
# 2. cargo builds the test binary (with a plain environment: cargo and rustc must not
#    run under the ASan runtime);
# 3. the test binary runs with the ASan runtime preloaded (it is not instrumented
#    itself, the emulator library is) and target/emu-asan first on LD_LIBRARY_PATH,
#    then NVRTC's lib directory (from .venv, as in scripts/test.sh; NVRTC_LIB
#    overrides). NVRTC dlopens libcuda.so.1 from there too.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export CARGO_TERM_COLOR=never

source "$ROOT/scripts/emu_env.sh"
NVRTC_LIB=$(emu_nvrtc_lib)

echo "== [1/3] emulator with -fsanitize=address,undefined: MOE_EMU_SANITIZE=1 scripts/build_emu.sh"
MOE_EMU_SANITIZE=1 bash scripts/build_emu.sh
EMU="$ROOT/target/emu-asan"
[[ -n "${CARGO_TARGET_DIR:-}" ]] || export CARGO_TARGET_DIR="$ROOT/target"

echo "== [2/3] test binary: cargo test --release --features cuda --test gpu_vs_cpu --no-run"
BIN=$(emu_test_bin)

ASAN_RT="$(${CXX:-g++} -print-file-name=libasan.so)"
if [[ ! -e "$ASAN_RT" ]]; then
    echo "emu_sanitize.sh: the ASan runtime ($ASAN_RT) was not found" >&2
    exit 2
fi
# detect_leaks=0: the Rust binary, NVRTC and cudarc keep allocations until exit.
# verify_asan_link_order=0: the runtime is preloaded into an uninstrumented binary.
ASAN="detect_leaks=0:verify_asan_link_order=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
UBSAN="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
LDP="$EMU:$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== [3/3] gpu_vs_cpu under the sanitizers, filter: ${*:-(none: every test)}"
echo "   LD_PRELOAD=$ASAN_RT"
echo "   LD_LIBRARY_PATH=$LDP"
echo "   ASAN_OPTIONS=$ASAN UBSAN_OPTIONS=$UBSAN"
echo "   $BIN $*"
start=$(date +%s)
status=0
LD_PRELOAD="$ASAN_RT" LD_LIBRARY_PATH="$LDP" ASAN_OPTIONS="$ASAN" UBSAN_OPTIONS="$UBSAN" \
    "$BIN" "$@" || status=$?
echo "emu_sanitize.sh: gpu_vs_cpu ${*:+[$*] }exited with status $status after $(( $(date +%s) - start )) s" \
     "(a sanitizer report above, if any, names the kernel)"
exit "$status"
