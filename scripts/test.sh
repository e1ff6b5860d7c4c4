#!/usr/bin/env bash
# Run every test of the project on this machine, doing all set-up first (.ci/run calls it).
#   scripts/test.sh
# 1. Python environment (.venv: torch==2.11.*, pytest, ruff, maturin, ziglang) and the
#    extension, by scripts/setup_python.sh;
# 2. lint gates: cargo fmt --check, clippy with warnings as errors (default features and
#    `cuda`; unsafe blocks must say why they are sound), cargo doc with warnings as
#    errors, ruff check and ruff format --check;
# 3. Rust: the CPU reference suite (unit, integration, property and doc tests), every
#    target type-checks, and the API fuzz harness for a bounded time;
# 4. CUDA kernels: compiled by NVRTC for sm_80 and sm_90 (no GPU needed; NVRTC comes
#    from the PyTorch wheel); GPU-vs-CPU tests run when a device is present and print
#    "SKIPPED: no CUDA device" otherwise; then the same GPU-vs-CPU tests run the real
#    kernels and host code on the CPU emulator (emu/, built with g++ by
#    scripts/build_emu.sh) at reduced sizes, planted kernel bugs must each be caught, and
#    the Python CUDA path runs on the emulator;
# 5. pytest (CPU; CUDA cases skip loudly without a device);
# 6. the release shape (scripts/check_release.sh): cargo package, the manylinux abi3
#    wheel installed in a fresh venv with no Rust on PATH, the READMEs' quick starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

echo "== [1/6] python environment and extension (scripts/setup_python.sh)"
bash scripts/setup_python.sh
PY=.venv/bin/python

echo "== [2/6] lint gates"
cargo fmt --all -- --check
# The python crate needs an interpreter to configure PyO3: the venv's.
export PYO3_PYTHON="$PWD/$PY"
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --workspace --all-targets --features moe-router/cuda -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --features cuda -p moe-router
.venv/bin/ruff check python scripts
.venv/bin/ruff format --check python scripts

echo "== [3/6] cargo test (CPU reference), every target type-checks, API fuzz (bounded)"
cargo test --locked
# Time-bounded fuzz of the public Rust API in release mode (tests/fuzz_api.rs, docs/hardening.md).
MOE_ROUTER_FUZZ_SECONDS=60 cargo test --locked --release --test fuzz_api -- --nocapture
cargo check --locked --all-targets

echo "== [4/6] CUDA kernels: NVRTC compile for sm_80 / sm_90, GPU tests if a device is present"
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
NVLIB="$SP/nvidia/cu13/lib"
if [ -d "$NVLIB" ]; then
  export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # ptxas (same CUDA 13.0 as NVRTC) lets the compile test report registers and spills.
  if [ ! -x "$SP/nvidia/cu13/bin/ptxas" ]; then
    $PY -m pip install -q --disable-pip-version-check "nvidia-cuda-nvcc==13.0.88" \
      || echo "note: nvidia-cuda-nvcc not installable; registers/spills will not be reported"
  fi
  [ -x "$SP/nvidia/cu13/bin/ptxas" ] && export PATH="$SP/nvidia/cu13/bin:$PATH"
else
  echo "note: $NVLIB not found; the NVRTC compile test will report SKIPPED"
fi
cargo test --locked --features cuda --test nvrtc_compile --test gpu_vs_cpu -- --nocapture

echo "== [4b/6] CUDA kernels on the CPU emulator (emu/README.md): gpu_vs_cpu at reduced sizes"
bash scripts/build_emu.sh
LD_LIBRARY_PATH="$PWD/target/emu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" MOE_ROUTER_REQUIRE_DEVICE=1 \
  cargo test --locked --release --features cuda --test gpu_vs_cpu
# ... and that suite can fail: planted kernel bugs (a race, the tie order, an
# out-of-bounds write, a bad warp mask, an off-by-one capacity) must each be caught.
bash scripts/emu_mutants.sh
# The Python CUDA path (the native bindings' CUDA branch and the ops' CUDA branches) end to
# end on the emulator: CPU tensors through the CUDA path, compared with the CPU path.
MOE_ROUTER_EMU_TESTS=1 LD_LIBRARY_PATH="$PWD/target/emu:$NVLIB" $PY -m pytest -q -rs python/tests/test_cuda_emu.py

echo "== [5/6] pytest (test_cuda_emu.py ran in step 4b on the emulator; not counted again as skipped)"
$PY -m pytest -q -rs python/tests --ignore=python/tests/test_cuda_emu.py

echo "== [6/6] release shape (scripts/check_release.sh)"
bash scripts/check_release.sh
