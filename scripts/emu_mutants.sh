#!/usr/bin/env bash
# Shows that the GPU-vs-CPU suite, run on the CPU emulator (emu/), can fail: each
# mutant below plants one kind of kernel bug in a copy of cuda/, builds that copy into
# its own emulator, and runs the test that must catch it. Prints CAUGHT or MISSED per
# mutant; exits non-zero if any is missed. cuda/ itself is never modified.
#   bash scripts/emu_mutants.sh            (after scripts/setup_python.sh; ~1 min)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/emu_env.sh"
NVLIB=$(emu_nvrtc_lib)
WORK="$ROOT/target/emu-mutants"
rm -rf "$WORK"
mkdir -p "$WORK"
BIN=$(emu_test_bin)

# name | file | perl substitution (-0 mode: the whole file) | test filter | the bug
MUTANTS=(
  'race|losses.cu|s/(red2\[tid\] \+= red2\[tid \+ w\];\n\s*\}\n)\s*__syncthreads\(\);/$1/|losses_match|losses_reduce tree sum without its barrier (a shared-memory race)'
  'tie-order|common.cuh|s/\(u64\)\(0xffffffffu - index\)/(u64)index/|topk_gating_matches|equal scores ranked higher index first (docs/semantics.md §1.3: lower index first)'
  'oob-write|bias_update.cu|s/(const i128 total = \{red_hi\[0\], red_lo\[0\]\};)/$1 if (tid == 0) bias[num_experts] = 0.0f;/|router_stats_and_bias|a write one element past the end of bias, in-range values untouched'
  'warp-mask|common.cuh|s/(float warp_sum\(float v\) \{.*?)FULL_MASK/${1}0x0000ffffu/s|losses_match|a warp sum whose mask leaves out half of the calling lanes'
  'null-write|bias_update.cu|s/(const i128 total = \{red_hi\[0\], red_lo\[0\]\};)/$1 if (tid == 0) ((float*)((u64)bias >> 48))[0] = rate;/|router_stats_and_bias|a write through a null pointer (fails the launch, not the process)'
  'capacity|dispatch.cu|s/min\(cnt, P\.capacity\)/min(cnt, P.capacity + 1)/|dispatch_treats_out_of_range|one row over capacity kept per expert'
)

missed=0
printf '%-10s %-8s %s\n' mutant result "bug (test)"
for m in "${MUTANTS[@]}"; do
    IFS='|' read -r name file subst filter what <<< "$m"
    dir="$WORK/$name"
    mkdir -p "$dir"
    cp -r cuda "$dir/cuda"
    perl -0pi -e "$subst" "$dir/cuda/$file"
    if cmp -s "cuda/$file" "$dir/cuda/$file"; then
        echo "emu_mutants.sh: mutant $name did not change cuda/$file (pattern out of date)" >&2
        exit 2
    fi
    MOE_EMU_CUDA_DIR="$dir/cuda" bash scripts/build_emu.sh "$dir/lib" > "$dir/build.log" 2>&1
    if LD_LIBRARY_PATH="$dir/lib:$NVLIB" MOE_ROUTER_REQUIRE_DEVICE=1 "$BIN" "$filter" > "$dir/test.log" 2>&1; then
        result=MISSED
        missed=$((missed + 1))
    else
        result=CAUGHT
    fi
    printf '%-10s %-8s %s (%s)\n' "$name" "$result" "$what" "$filter"
done
echo "emu_mutants: $(( ${#MUTANTS[@]} - missed )) of ${#MUTANTS[@]} caught (logs in $WORK/<mutant>/test.log)"
[ "$missed" -eq 0 ]
