//! The kernel sources, embedded at build time by `build.rs` from `cuda/*.cu` (with
//! `cuda/common.cuh` inlined): one `&'static str` per module and [`MODULES`], the
//! table of every module with its entry points `{op}_{dtype}`.

/// One kernel module: a `.cu` file compiled as a unit by NVRTC.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    /// Module name: the `.cu` file's stem (`topk_gating`).
    pub name: &'static str,
    /// The NVRTC source (headers inlined; needs no include path).
    pub source: &'static str,
    /// Entry points, `{root}_{dtype}` for dtype in `f32`, `f16`, `bf16`.
    pub entries: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
