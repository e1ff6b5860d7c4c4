//! Every CUDA kernel module compiles with NVRTC for sm_80 (A100) and sm_90 (H100),
//! and every entry point listed on its `// @entries:` line is in the PTX. Needs only
//! `libnvrtc` (no GPU): CI puts the one from the `nvidia-cuda-nvrtc` wheel on
//! `LD_LIBRARY_PATH`. Without it the test says SKIPPED loudly and returns.
#![cfg(feature = "cuda")]

use moe_router::cuda::{compile_all_kernels, nvrtc_available, nvrtc_version, MODULES};
use std::io::Write as _;

fn nvrtc_or_skip() -> bool {
    if nvrtc_available() {
        return true;
    }
    // Straight to the stderr handle: not swallowed by the test harness's capture.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: libnvrtc not found (LD_LIBRARY_PATH={:?}); install nvidia-cuda-nvrtc==13.0.* and add its nvidia/cu13/lib to LD_LIBRARY_PATH",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    );
    false
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    for name in ["dispatch", "expert_choice", "permute", "topk_gating"] {
        assert!(
            MODULES.iter().any(|m| m.name == name),
            "kernel module {name} missing"
        );
    }
    let (major, minor) = nvrtc_version().expect("nvrtcVersion");
    eprintln!("NVRTC {major}.{minor}");
    for arch in ["sm_80", "sm_90"] {
        let reports = compile_all_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(reports.len(), MODULES.len());
        for r in &reports {
            assert!(r.ptx_bytes > 0);
            eprintln!(
                "{} {}: {} bytes of PTX, {} entries, {:.0} ms",
                r.arch,
                r.module,
                r.ptx_bytes,
                r.entries.len(),
                r.compile_time.as_secs_f64() * 1e3
            );
            match &r.ptxas {
                Ok(kernels) => {
                    for k in kernels {
                        eprintln!(
                            "  {:<40} {:>3} registers, {} B spill stores, {} B spill loads, {} B stack",
                            k.name, k.registers, k.spill_stores, k.spill_loads, k.stack_frame
                        );
                    }
                    for e in r.entries {
                        assert!(
                            kernels.iter().any(|k| k.name == *e),
                            "ptxas did not list {e}"
                        );
                    }
                }
                Err(why) => eprintln!("  ptxas unavailable: {why}"),
            }
        }
    }
}

#[test]
fn a_broken_source_is_a_compile_error_with_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = moe_router::cuda::KernelModule {
        name: "broken",
        source: "extern \"C\" __global__ void broken_f32() { undefined_thing(); }",
        entries: &["broken_f32"],
    };
    let err = moe_router::cuda::compile_module(&broken, "sm_80").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("broken"), "{msg}");
    assert!(msg.contains("undefined_thing"), "{msg}");
    let missing = moe_router::cuda::KernelModule {
        name: "missing",
        source: "extern \"C\" __global__ void other_f32() { }",
        entries: &["missing_f32"],
    };
    let err = moe_router::cuda::compile_module(&missing, "sm_80").unwrap_err();
    assert!(err.to_string().contains("missing_f32"), "{err}");
}

#[test]
fn ptx_is_cached_on_disk_and_reused() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("moe-router-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The only test in this binary that reads the variable.
    std::env::set_var("MOE_ROUTER_CACHE_DIR", &dir);
    let m = &MODULES[0];
    let first = moe_router::cuda::cached_ptx(m, "sm_80")
        .expect("compile")
        .to_src();
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("cache dir written")
        .collect();
    assert_eq!(files.len(), 1, "one cached PTX file");
    let t0 = std::time::Instant::now();
    let second = moe_router::cuda::cached_ptx(m, "sm_80")
        .expect("cached")
        .to_src();
    assert_eq!(first, second);
    eprintln!("cache hit in {:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
