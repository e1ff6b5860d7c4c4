#!/usr/bin/env bash
# The moe_router demo: set up the Python environment (scripts/setup_python.sh: .venv with
# torch 2.11 and the extension built from this checkout), then train a small MoE on CPU
# (GPU if present and supported) and plot its expert load.
#
#   bash scripts/demo.sh                       # ~1 minute on 2 cores; writes ./demo_out/expert_load.png
#   bash scripts/demo.sh --steps 100 --out /tmp/moe_demo --no-baseline
#   SKIP_SETUP=1 bash scripts/demo.sh          # reuse the existing .venv as it is
#
# Every argument goes to python/demo.py (see `--help`). Environment: MOE_ROUTER_VENV
# (default <repo>/.venv), SKIP_SETUP=1 to skip the setup step.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MOE_ROUTER_VENV:-$root/.venv}

if [ "${SKIP_SETUP:-0}" != "1" ]; then
  echo "== setting up the Python environment (scripts/setup_python.sh)"
  bash "$root/scripts/setup_python.sh"
elif [ ! -x "$venv/bin/python" ]; then
  echo "demo.sh: SKIP_SETUP=1 but $venv/bin/python does not exist; run without SKIP_SETUP first" >&2
  exit 1
fi

echo "== running python/demo.py $*"
# Run from the repository root so the default output lands in ./demo_out.
cd "$root"
exec "$venv/bin/python" "$root/python/demo.py" "$@"
