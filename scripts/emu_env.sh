# Sourced by scripts/emu_mutants.sh and scripts/emu_sanitize.sh: what both need to run
# tests/gpu_vs_cpu.rs on an emulator build without going through `cargo test` (which
# would put their LD_LIBRARY_PATH / LD_PRELOAD on cargo and rustc too).
#   emu_nvrtc_lib  -> prints NVRTC's lib dir: $NVRTC_LIB, else nvidia/cu13/lib of this
#                     checkout's .venv, else of the main worktree's (git worktrees)
#   emu_test_bin   -> builds the gpu_vs_cpu test (release, feature cuda), prints its path

emu_nvrtc_lib() {
    if [[ -n "${NVRTC_LIB:-}" && -d "$NVRTC_LIB" ]]; then
        echo "$NVRTC_LIB"
        return 0
    fi
    local dir py sp
    for dir in "$ROOT" "$(git -C "$ROOT" worktree list --porcelain 2>/dev/null | sed -n '1s/^worktree //p')"; do
        py="$dir/.venv/bin/python"
        [[ -n "$dir" && -x "$py" ]] || continue
        sp=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        if [[ -d "$sp/nvidia/cu13/lib" ]]; then
            echo "$sp/nvidia/cu13/lib"
            return 0
        fi
    done
    echo "NVRTC not found (no .venv with nvidia/cu13/lib: run scripts/setup_python.sh or set NVRTC_LIB)" >&2
    return 2
}

emu_test_bin() {
    local bin
    bin=$(cd "$ROOT" && cargo test --locked --release --features cuda --test gpu_vs_cpu --no-run \
        --message-format=json | sed -n 's/.*"executable":"\([^"]*gpu_vs_cpu[^"]*\)".*/\1/p' | tail -n 1)
    if [[ -z "$bin" || ! -x "$bin" ]]; then
        echo "cargo did not report the gpu_vs_cpu test executable" >&2
        return 1
    fi
    echo "$bin"
}
