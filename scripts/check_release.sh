#!/usr/bin/env bash
# The release shape, checked as a user would meet it:
#   1. `cargo package` of the core crate (packs and builds it from the packaged sources),
#      and the README's Rust quick start built as a new crate with moe-router as its only
#      dependency;
#   2. the PyPI wheel: a manylinux abi3 wheel built with maturin (manylinux2014 through
#      zig when `ziglang` is installed in the venv, as scripts/setup_python.sh does; the
#      host's own glibc tag otherwise);
#   3. that wheel installed into a fresh virtual environment, used from outside the source
#      tree with no Rust toolchain on PATH: import, the README's Python quick start, the
#      error path of a bad call.
#   bash scripts/check_release.sh        (after scripts/setup_python.sh; ~3 min)
# The fresh venv gets torch from the project venv through a .pth file (not a second 3 GB
# install); moe_router itself must come from the wheel, which the script checks.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
PY=${PY:-$root/.venv/bin/python}
out=$root/target/release-check
rm -rf "$out"
mkdir -p "$out"

echo "== cargo package (core crate)"
cargo package --locked --allow-dirty --target-dir "$root/target" 2>&1 | tail -n 3

echo "== the README's Rust quick start in a new crate whose only dependency is moe-router"
mkdir -p "$out/user-crate/src"
cat > "$out/user-crate/Cargo.toml" <<TOML
[package]
name = "user-crate"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
moe-router = { path = "$root" }
[workspace]
TOML
{
  echo 'fn main() -> Result<(), moe_router::Error> {'
  awk '/^```rust$/{f=1; next} /^```$/{if (f) exit} f' "$root/README.md" | grep -v '^# Ok::<'
  echo '    println!("README Rust quick start: ran");'
  echo '    Ok(())'
  echo '}'
} > "$out/user-crate/src/main.rs"
(cd "$out/user-crate" && CARGO_TARGET_DIR="$root/target/user-crate" cargo run --quiet --release)

echo "== maturin build (abi3 wheel)"
bin=$(dirname "$PY")
if "$PY" -c 'import ziglang' 2>/dev/null; then
  compat=(--zig --compatibility manylinux2014)
else
  echo "note: ziglang not installed; building for this machine's glibc"
  compat=()
fi
(cd python && PATH="$bin:$PATH" CARGO_TARGET_DIR="$root/target/wheel" \
  "$bin/maturin" build --release --locked "${compat[@]}" -o "$out/dist" 2>&1 | tail -n 2)
wheel=$(ls "$out"/dist/moe_router-*.whl)
echo "wheel: $(basename "$wheel")"
case "$(basename "$wheel")" in
  *-cp39-abi3-manylinux*) ;;
  *) echo "check_release: expected a cp39-abi3 manylinux wheel, got $(basename "$wheel")" >&2; exit 1 ;;
esac

echo "== fresh venv, wheel only"
"$PY" -m venv --without-pip "$out/venv"
site=$("$out/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -m pip --disable-pip-version-check -q install --no-deps --target "$site" "$wheel"
torch_site=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
# torch (and its dependencies) from the project venv, appended after the fresh site-packages.
echo "$torch_site" > "$site/zz_torch_from_project_venv.pth"
readme_py=$(awk '/^```python$/{f=1; next} /^```$/{if (f) exit} f' "$root/python/README.md")
cd "$out"
env -i HOME="$out" PATH=/usr/bin:/bin "$out/venv/bin/python" - "$site" <<PYEOF
import os, sys
site = sys.argv[1]
assert not any(os.access(os.path.join(d, "cargo"), os.X_OK) for d in os.environ["PATH"].split(":")), "cargo on PATH"
import moe_router, torch
assert moe_router.__file__.startswith(site), f"moe_router imported from {moe_router.__file__}, not the wheel"
print("moe_router", moe_router.__version__, "from the wheel; torch", torch.__version__)
ns = {}
exec(compile('''$readme_py''', "python/README.md", "exec"), ns)
print("README quick start: ran")
try:
    moe_router._native.permute((0x1000, 8), (0x2000, 2), (0x3000, 8))
except TypeError as e:
    print("bad native call:", e)
else:
    raise SystemExit("a raw address was accepted")
PYEOF
echo "check_release: OK"
