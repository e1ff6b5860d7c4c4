#!/usr/bin/env bash
# Create (or update) the project's Python environment in .venv at the repository root
# and install the moe_router extension into it.
#
#   bash scripts/setup_python.sh          # idempotent: safe to run again after any change
#   source .venv/bin/activate && pytest -q python/tests
#
# Installs torch 2.11 from PyPI (the default Linux wheel brings the CUDA 13 libraries,
# about 3 GB, including NVRTC, which the CUDA kernel checks use), numpy, pytest,
# matplotlib, tqdm and maturin, then builds and installs ./python (maturin, PEP 517;
# needs cargo). The native build is incremental: its target directory is python/target.
# Environment: PYTHON (default python3), MOE_ROUTER_VENV (default <repo>/.venv),
# TORCH_SPEC (default "torch==2.11.*").
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
venv=${MOE_ROUTER_VENV:-$root/.venv}
torch_spec=${TORCH_SPEC:-torch==2.11.*}

say() { printf '== %s\n' "$*"; }

command -v "$py" >/dev/null || { echo "setup_python.sh: $py not found; install Python >= 3.9" >&2; exit 1; }
command -v cargo >/dev/null || { echo "setup_python.sh: cargo not found; the extension is built from Rust source (install rustup)" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv ($("$py" --version 2>&1))"
  if ! "$py" -m venv "$venv"; then
    rm -rf "$venv"
    # Debian's system python ships venv/ensurepip separately (python3-venv).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "'$py -m venv' failed: installing python3-venv with apt-get"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
      "$py" -m venv "$venv" || { rm -rf "$venv"; echo "setup_python.sh: '$py -m venv' still fails" >&2; exit 1; }
    else
      echo "setup_python.sh: '$py -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
      exit 1
    fi
  fi
else
  say "reusing virtual environment $venv"
fi
vpy="$venv/bin/python"
pip=("$vpy" -m pip --disable-pip-version-check)

say "upgrading pip"
"${pip[@]}" install -q --upgrade pip

if "$vpy" - "$torch_spec" <<'PYEOF'
import sys
spec = sys.argv[1]
try:
    import torch
except Exception:
    sys.exit(1)
want = spec.split("==", 1)[1].rstrip("*").rstrip(".") if "==" in spec else ""
sys.exit(0 if torch.__version__.startswith(want) else 1)
PYEOF
then
  say "$("$vpy" -c 'import torch; print("torch", torch.__version__)') already installed ($torch_spec)"
else
  say "installing $torch_spec from PyPI (the default wheel pulls the CUDA libraries, ~3 GB)"
  "${pip[@]}" install "$torch_spec"
fi

say "installing numpy pytest matplotlib tqdm maturin ziglang ruff"
# ziglang: maturin links the release wheel for manylinux2014 through zig
# (scripts/check_release.sh); ruff: the Python lint gate.
"${pip[@]}" install -q numpy pytest matplotlib tqdm "maturin>=1.9,<2" "ziglang==0.15.2" "ruff==0.14.*"

say "building and installing ./python (moe_router, incremental Rust build in python/target)"
# --no-build-isolation: use the venv's maturin, so the build does not download it again;
# CARGO_TARGET_DIR keeps the build products between runs (rebuild is incremental).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/python/target}
"${pip[@]}" install --no-build-isolation --no-deps --force-reinstall "$root/python"

say "checking the install"
"$vpy" -c 'import torch, moe_router; print("moe_router", moe_router.__version__, "from", moe_router.__file__, "| torch", torch.__version__)'
say "done: source $venv/bin/activate && python -m pytest -q python/tests"
