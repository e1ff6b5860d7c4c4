//! The CUDA backend (feature `cuda`): kernel sources, NVRTC compilation with an
//! in-process and on-disk cache, device detection, and launch wrappers per op.
//!
//! | CPU reference                       | CUDA                                         |
//! |-------------------------------------|----------------------------------------------|
//! | `&[T]`, `&mut [T]`                  | [`CudaView<T>`], [`CudaViewMut<T>`]          |
//! | `crate::cpu::topk_gating::forward`  | [`topk_gating::topk_gating_cuda`]            |
//! | `crate::cpu::aux_loss`, `z_loss`    | [`losses::aux_loss_cuda`] (z-loss fused), ... |
//! | `crate::cpu::dropout`               | [`dropout::assignment_dropout_cuda`], ...    |
//! | `crate::cpu::router_stats`          | [`router_stats::router_stats_cuda`]          |
//! | `crate::cpu::bias_update`           | [`bias_update::update_expert_bias_cuda`]     |
//! | `crate::cpu::permute`               | [`permute::permute_cuda`], [`permute::unpermute_cuda`], ... |
//! | `crate::cpu::dispatch`              | [`dispatch::dispatch_cuda`]                  |
//! | `crate::cpu::expert_choice`         | [`expert_choice::expert_choice_cuda`], [`expert_choice::expert_choice_backward_cuda`] |
//! | validation in [`crate::ops`]        | the same validation, then a launch           |
//!
//! Nothing CUDA is linked at build time: `libcuda` and `libnvrtc` are loaded when
//! first used. Every entry point checks for them first ([`device_available`],
//! [`nvrtc_available`]) and returns [`Error::NoDevice`] rather than panicking.
//!
//! Kernels are compiled by NVRTC on first use, for the device's own architecture
//! (`-arch=sm_XY` from its compute capability), with `--fmad=false` so that the
//! kernels round like the CPU reference. The PTX is cached in the process and on
//! disk, keyed by a hash of the source, the architecture, the options and the NVRTC
//! version, in `$MOE_ROUTER_CACHE_DIR`, else `$XDG_CACHE_HOME/moe-router`, else
//! `~/.cache/moe-router`; failing to write the cache is not an error.
//!
//! Ops launch on the backend's stream (or, through the `unsafe` raw entry points,
//! on a stream the caller owns, such as PyTorch's current stream) and never
//! synchronise with the host.
//!
//! Every entry point validates with the op's validator of [`crate::ops`], the one the
//! CPU path runs: the safe wrappers on their views' lengths, the raw entries
//! (`*_raw`) on the element counts of the [`DevBuf`]s they are given, before any
//! launch (a buffer a pass does not use must be empty). What is left to a raw
//! entry's caller is that each address holds that many elements in the backend's
//! context and stays alive until the kernels have run.

pub mod bias_update;
pub mod dispatch;
pub mod dropout;
pub mod expert_choice;
pub mod kernels;
pub mod losses;
pub mod permute;
pub mod router_stats;
pub mod topk_gating;

pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut};
pub use kernels::{KernelModule, MODULES};

use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e.to_string())
    }
}

/// Whether `libnvrtc` can be loaded (needed to compile kernels; no GPU needed).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether `libcuda` can be loaded and reports at least one device. Never panics.
pub fn device_available() -> bool {
    device_count() > 0
}

/// Number of CUDA devices; 0 when the driver library is absent or fails.
pub fn device_count() -> usize {
    // SAFETY: only tries to dlopen the driver library by its candidate names.
    let lib = unsafe { cudarc::driver::sys::is_culib_present() };
    if !lib {
        return 0;
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => n as usize,
        _ => 0,
    }
}

/// NVRTC's `(major, minor)` version.
///
/// # Errors
/// [`Error::NoDevice`] when `libnvrtc` cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is present (checked above); both pointers are valid for
    // the duration of the call.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Driver(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

fn no_nvrtc() -> Error {
    Error::NoDevice(
        "libnvrtc (CUDA 13) could not be loaded: install it (the `nvidia-cuda-nvrtc` wheel \
         that PyTorch cu130 brings, or a CUDA toolkit) and put its lib directory on \
         LD_LIBRARY_PATH"
            .into(),
    )
}

/// NVRTC options every module is compiled with (part of the cache key).
const NVRTC_FLAGS: [&str; 2] = ["--fmad=false", "--std=c++17"];

/// Compile one module's source to PTX for `arch` (for example `"sm_90"`).
///
/// # Errors
/// [`Error::NoDevice`] without `libnvrtc`; [`Error::Compile`] with NVRTC's log when
/// compilation fails or an entry point listed for the module is missing.
pub fn compile_module(module: &KernelModule, arch: &str) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let mut options: Vec<String> = NVRTC_FLAGS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = CompileOptions {
        options,
        name: Some(format!("{}.cu", module.name)),
        ..Default::default()
    };
    let ptx =
        cudarc::nvrtc::compile_ptx_with_opts(module.source, opts).map_err(|e| Error::Compile {
            module: module.name,
            log: match e {
                CompileError::CompileError { log, options, .. } => {
                    format!("options {options:?}\n{}", log.to_string_lossy())
                }
                other => other.to_string(),
            },
        })?;
    check_entries(module, &ptx.to_src())?;
    Ok(ptx)
}

fn check_entries(module: &KernelModule, ptx: &str) -> Result<()> {
    for entry in module.entries {
        if !ptx_has_entry(ptx, entry) {
            return Err(Error::Compile {
                module: module.name,
                log: format!(
                    "entry point `{entry}` is listed on the `// @entries:` line but not in the PTX"
                ),
            });
        }
    }
    Ok(())
}

fn ptx_has_entry(ptx: &str, entry: &str) -> bool {
    ptx.lines().any(|l| {
        let l = l.trim_start();
        (l.starts_with(".visible .entry ") || l.starts_with(".entry "))
            && l.contains(&format!(".entry {entry}("))
    })
}

/// Resource use of one kernel as `ptxas -v` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxasKernel {
    /// Entry point name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
    /// Bytes of stack frame.
    pub stack_frame: u32,
}

/// What [`compile_all_kernels`] found for one module.
#[derive(Debug, Clone)]
pub struct KernelReport {
    /// Module name (`cuda/<name>.cu`).
    pub module: &'static str,
    /// Target architecture.
    pub arch: String,
    /// Size of the PTX in bytes.
    pub ptx_bytes: usize,
    /// Wall time of the NVRTC compile.
    pub compile_time: std::time::Duration,
    /// The module's entry points (all present in the PTX).
    pub entries: &'static [&'static str],
    /// Per-kernel registers and spills from `ptxas -v`, or why it was unavailable.
    pub ptxas: std::result::Result<Vec<PtxasKernel>, String>,
}

/// Compile every kernel module with NVRTC for `arch` (for example `"sm_80"`). Needs
/// only `libnvrtc`, no GPU. When `ptxas` is on `PATH`, also assembles the PTX and
/// reports registers and spills per kernel.
///
/// # Errors
/// [`Error::NoDevice`] without `libnvrtc`; [`Error::Compile`] for the first module
/// that fails.
pub fn compile_all_kernels(arch: &str) -> Result<Vec<KernelReport>> {
    let mut reports = Vec::with_capacity(MODULES.len());
    for m in MODULES {
        let t0 = std::time::Instant::now();
        let ptx = compile_module(m, arch)?;
        let compile_time = t0.elapsed();
        let src = ptx.to_src();
        reports.push(KernelReport {
            module: m.name,
            arch: arch.to_string(),
            ptx_bytes: src.len(),
            compile_time,
            entries: m.entries,
            ptxas: run_ptxas(m.name, arch, &src),
        });
    }
    Ok(reports)
}

fn run_ptxas(name: &str, arch: &str, ptx: &str) -> std::result::Result<Vec<PtxasKernel>, String> {
    use std::process::Command;
    if Command::new("ptxas").arg("--version").output().is_err() {
        return Err("ptxas not found on PATH".into());
    }
    let dir = std::env::temp_dir().join(format!("moe-router-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
    let file = dir.join(format!("{name}-{arch}.ptx"));
    std::fs::write(&file, ptx).map_err(|e| format!("write {}: {e}", file.display()))?;
    let out = Command::new("ptxas")
        .arg("-v")
        .arg(format!("-arch={arch}"))
        .arg(&file)
        .arg("-o")
        .arg(dir.join(format!("{name}-{arch}.cubin")))
        .output()
        .map_err(|e| format!("running ptxas: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("ptxas failed: {text}"));
    }
    Ok(parse_ptxas(&text))
}

/// Parse `ptxas -v` output into per-kernel resource use.
pub fn parse_ptxas(text: &str) -> Vec<PtxasKernel> {
    fn num_before(s: &str, unit: &str) -> Option<u32> {
        let i = s.find(unit)?;
        s[..i].split_whitespace().last()?.parse().ok()
    }
    let mut out: Vec<PtxasKernel> = Vec::new();
    let mut cur: Option<PtxasKernel> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(k) = cur.take() {
                out.push(k);
            }
            let name = rest.split('\'').next().unwrap_or("").to_string();
            cur = Some(PtxasKernel {
                name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack_frame: 0,
            });
        } else if let Some(k) = cur.as_mut() {
            if line.contains("spill stores") {
                k.stack_frame = num_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = num_before(line, "registers").unwrap_or(0);
            }
        }
    }
    if let Some(k) = cur.take() {
        out.push(k);
    }
    out
}

/// FNV-1a, 64 bit: a hash that is stable across Rust versions (the disk cache key).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The on-disk PTX cache directory (see the module docs).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MOE_ROUTER_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("moe-router"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("moe-router"))
}

/// PTX of `module` for `arch`, from the disk cache or freshly compiled (and then
/// written to the cache, ignoring failures).
pub fn cached_ptx(module: &KernelModule, arch: &str) -> Result<Ptx> {
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(&[
        module.source.as_bytes(),
        arch.as_bytes(),
        NVRTC_FLAGS.join(" ").as_bytes(),
        format!("nvrtc {major}.{minor}").as_bytes(),
    ]);
    let path = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.ptx", module.name)));
    if let Some(p) = &path {
        if let Ok(src) = std::fs::read_to_string(p) {
            if check_entries(module, &src).is_ok() {
                return Ok(Ptx::from_src(src));
            }
        }
    }
    let ptx = compile_module(module, arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            let written = std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(&tmp, ptx.to_src()))
                .and_then(|_| std::fs::rename(&tmp, p));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    Ok(ptx)
}

/// One CUDA device: its (primary) context, a stream, and the loaded kernel modules.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    modules: Arc<Mutex<HashMap<&'static str, Arc<CudaModule>>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

impl CudaBackend {
    /// The backend of device `ordinal` (its primary context, the one PyTorch uses),
    /// launching on that context's default stream.
    ///
    /// # Errors
    /// [`Error::NoDevice`] when the driver library is absent or the device does not
    /// exist; [`Error::Driver`] when the driver fails.
    pub fn new(ordinal: usize) -> Result<Self> {
        let n = device_count();
        if ordinal >= n {
            return Err(Error::NoDevice(if n == 0 {
                "libcuda could not be loaded or reports no device".into()
            } else {
                format!("device ordinal {ordinal} requested, but only {n} device(s) exist")
            }));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            modules: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The same device and loaded kernels, launching on a stream the caller owns
    /// (PyTorch's `torch.cuda.current_stream().cuda_stream`): what the `*_raw` entry
    /// points use.
    ///
    /// # Safety
    /// `stream` is a live CUDA stream of this backend's context and outlives the
    /// returned backend and every launch made through it.
    pub unsafe fn on_borrowed_stream(&self, stream: cudarc::driver::sys::CUstream) -> CudaBackend {
        // SAFETY: guaranteed by the caller; the wrapper does not own the stream.
        let stream = unsafe { self.ctx.wrap_borrowed_stream(stream) };
        CudaBackend {
            ctx: self.ctx.clone(),
            stream,
            arch: self.arch.clone(),
            modules: self.modules.clone(),
        }
    }

    /// The device's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream ops launch on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The architecture kernels are compiled for (`sm_90` on an H100).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Kernel `entry` of `module`, compiling and loading the module on first use.
    ///
    /// # Errors
    /// [`Error::Compile`], [`Error::NoDevice`] (no NVRTC) or [`Error::Driver`].
    pub fn function(&self, module: &'static str, entry: &str) -> Result<CudaFunction> {
        let m = {
            let mut cache = self
                .modules
                .lock()
                .map_err(|_| Error::Driver("kernel module cache lock poisoned".into()))?;
            match cache.get(module) {
                Some(m) => m.clone(),
                None => {
                    let km = MODULES.iter().find(|m| m.name == module).ok_or_else(|| {
                        Error::Driver(format!("no kernel module named `{module}`"))
                    })?;
                    let ptx = cached_ptx(km, &self.arch)?;
                    let loaded = self.ctx.load_module(ptx)?;
                    cache.insert(module, loaded.clone());
                    loaded
                }
            }
        };
        Ok(m.load_function(entry)?)
    }
}

/// The checks a raw entry point can make of a caller-supplied device pointer: a buffer
/// of `len > 0` elements is not at address 0 and is aligned to `align` bytes.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `op` and `arg`.
pub fn check_device_ptr(
    op: &'static str,
    arg: &'static str,
    ptr: u64,
    len: usize,
    align: usize,
) -> Result<()> {
    if len > 0 && ptr == 0 {
        return Err(Error::invalid(
            op,
            arg,
            "a null device pointer",
            format!(
                "`{arg}` holds {len} elements here: pass the address of a device buffer of \
                 that size"
            ),
        ));
    }
    if len > 0 && align > 1 && ptr % align as u64 != 0 {
        return Err(Error::invalid(
            op,
            arg,
            format_args!("device address {ptr:#x}"),
            format!("the address must be a multiple of {align} (the element size)"),
        ));
    }
    Ok(())
}

/// A caller-owned device buffer handed to a raw entry point (`*_raw`): its device
/// address and its element count, as a PyTorch tensor's `data_ptr()` and `numel()`.
///
/// The raw entries check every length against the sizes of the call with the op's
/// validator (the one the CPU path runs), so a buffer that is too short is an
/// [`Error::Shape`] naming it, not an out-of-bounds kernel access. What the caller
/// still guarantees (each entry's `# Safety`) is that `ptr` holds `len` elements of
/// the documented type in the backend's context and stays alive until the kernels
/// have finished. A buffer a pass does not use must be empty ([`DevBuf::NONE`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevBuf {
    /// Device address of the first element (not read when `len == 0`).
    pub ptr: u64,
    /// Number of elements (of the type the entry point documents for the buffer).
    pub len: usize,
}

impl DevBuf {
    /// No buffer: what a pass does not use, or an absent optional input.
    pub const NONE: DevBuf = DevBuf { ptr: 0, len: 0 };

    /// `len` elements at device address `ptr`.
    pub const fn new(ptr: u64, len: usize) -> Self {
        DevBuf { ptr, len }
    }

    /// The number of elements (`self.len`), as the ops' validators measure buffers.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Router logits `[num_tokens, num_experts]` on the device with the tokens' optional
/// `padding_mask [num_tokens]` (bytes, `true` = padding): the GPU form of
/// [`crate::ops::RouterLogits`], the input of [`router_stats::router_stats_cuda`] and
/// of the loss kernels ([`losses`]).
#[derive(Debug)]
pub struct RouterLogitsCuda<'a, T> {
    /// `[num_tokens, num_experts]`, row-major.
    pub logits: CudaView<'a, T>,
    /// Tokens (rows).
    pub num_tokens: usize,
    /// Experts (columns).
    pub num_experts: usize,
    /// `[num_tokens]`: `true` = padding, excluded; `None`: every token is valid.
    pub padding_mask: Option<CudaView<'a, bool>>,
}

impl<'a, T> RouterLogitsCuda<'a, T> {
    /// `logits [num_tokens, num_experts]` without a padding mask.
    pub fn new(logits: CudaView<'a, T>, num_tokens: usize, num_experts: usize) -> Self {
        RouterLogitsCuda {
            logits,
            num_tokens,
            num_experts,
            padding_mask: None,
        }
    }

    /// Set (or, with `None`, clear) the padding mask.
    pub fn padding_mask(mut self, padding_mask: Option<CudaView<'a, bool>>) -> Self {
        self.padding_mask = padding_mask;
        self
    }

    /// The element counts the validators check.
    pub(crate) fn lens(&self) -> crate::ops::LogitsLens {
        crate::ops::LogitsLens {
            num_tokens: self.num_tokens,
            num_experts: self.num_experts,
            logits: self.logits.len(),
            padding_mask: self.padding_mask.as_ref().map(CudaView::len),
        }
    }
}

/// `Err` unless `buf` is empty: a raw entry refuses a buffer its pass does not use
/// (a caller that fills one expects it to be read or written).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `op` and `arg`.
pub(crate) fn check_unused(op: &'static str, arg: &'static str, buf: DevBuf) -> Result<()> {
    if buf.len != 0 {
        return Err(Error::invalid(
            op,
            arg,
            format_args!("a buffer of {} elements", buf.len),
            format!("this pass does not use `{arg}`: pass DevBuf::NONE"),
        ));
    }
    Ok(())
}

/// [`check_device_ptr`] of a raw buffer of elements of `elem_size` bytes (for the
/// raw entries that launch on addresses without borrowing them).
///
/// # Errors
/// As [`check_device_ptr`].
pub(crate) fn check_buf(
    op: &'static str,
    arg: &'static str,
    buf: DevBuf,
    elem_size: usize,
) -> Result<()> {
    check_device_ptr(op, arg, buf.ptr, buf.len, elem_size)
}

/// The element count of an optional raw buffer (`None`: absent).
pub(crate) fn opt_len(buf: Option<DevBuf>) -> Option<usize> {
    buf.map(|b| b.len)
}

/// `BorrowedSlice::<T>::checked(stream, ptrs.field, op, "field")`, naming the buffer
/// after its field (or variable) in errors. It expands to an `unsafe` call: write it
/// inside `unsafe { }` under the raw entry's SAFETY argument.
macro_rules! borrow {
    ($t:ty, $s:expr, $ptrs:ident . $field:ident, $op:expr) => {
        $crate::cuda::BorrowedSlice::<$t>::checked($s, $ptrs.$field, $op, stringify!($field))
    };
    ($t:ty, $s:expr, $p:ident, $op:expr) => {
        $crate::cuda::BorrowedSlice::<$t>::checked($s, $p, $op, stringify!($p))
    };
}
pub(crate) use borrow;

/// A caller-owned device buffer (a PyTorch tensor's `data_ptr()`) seen as a
/// [`CudaSlice`] for the length of a raw call, so that the raw entry points run the
/// safe wrappers' checks and launches. Never freed: dropping it only lets go of the
/// handle.
pub struct BorrowedSlice<T> {
    inner: std::mem::ManuallyDrop<CudaSlice<T>>,
}

impl<T> std::fmt::Debug for BorrowedSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BorrowedSlice")
            .field("len", &self.inner.len())
            .finish()
    }
}

impl<T> BorrowedSlice<T> {
    /// Wrap `len` elements of `T` at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` is a device address in `stream`'s context, valid, aligned for `T` and
    /// holding `len` elements of `T` (any address when `len == 0`: it is never
    /// dereferenced), until every kernel launched on it has finished.
    pub unsafe fn new(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Self {
        // SAFETY: guaranteed by the caller; the slice is never freed (see Drop).
        let s = unsafe { stream.upgrade_device_ptr::<T>(ptr, len) };
        BorrowedSlice {
            inner: std::mem::ManuallyDrop::new(s),
        }
    }

    /// [`BorrowedSlice::new`] of `buf.len` elements at `buf.ptr`, after the checks a
    /// caller-supplied address can get on the host: a buffer of `len > 0` elements
    /// must not be at address 0 and must be aligned for `T`. `op` and `arg` name the
    /// raw entry point and the buffer in the error.
    ///
    /// # Safety
    /// As [`BorrowedSlice::new`] for `buf.ptr` and `buf.len` (the checks catch two
    /// violations of it, not all).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a null or misaligned non-empty buffer.
    pub unsafe fn checked(
        stream: &Arc<CudaStream>,
        buf: DevBuf,
        op: &'static str,
        arg: &'static str,
    ) -> Result<Self> {
        check_device_ptr(op, arg, buf.ptr, buf.len, std::mem::align_of::<T>())?;
        // SAFETY: guaranteed by the caller.
        Ok(unsafe { Self::new(stream, buf.ptr, buf.len) })
    }

    /// [`BorrowedSlice::checked`] of an optional input (`None`: absent).
    ///
    /// # Safety
    /// As [`BorrowedSlice::checked`] when `buf` is `Some`.
    ///
    /// # Errors
    /// As [`BorrowedSlice::checked`].
    pub unsafe fn optional(
        stream: &Arc<CudaStream>,
        buf: Option<DevBuf>,
        op: &'static str,
        arg: &'static str,
    ) -> Result<Option<Self>> {
        // SAFETY: guaranteed by the caller for a present buffer.
        buf.map(|b| unsafe { Self::checked(stream, b, op, arg) })
            .transpose()
    }

    /// The whole buffer, read-only.
    pub fn view(&self) -> CudaView<'_, T> {
        self.inner.as_view()
    }

    /// The whole buffer, writable.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.inner.as_view_mut()
    }
}

impl<T> Drop for BorrowedSlice<T> {
    fn drop(&mut self) {
        // SAFETY: `inner` is taken exactly once, here.
        let s = unsafe { std::mem::ManuallyDrop::take(&mut self.inner) };
        // The caller owns the memory: release the handle without freeing it.
        let _ = s.leak();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_output_parses() {
        let text = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k_f32' for 'sm_80'\n\
ptxas info    : Function properties for k_f32\n\
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 392 bytes cmem[0]\n";
        let k = parse_ptxas(text);
        assert_eq!(
            k,
            vec![PtxasKernel {
                name: "k_f32".into(),
                registers: 40,
                spill_stores: 8,
                spill_loads: 4,
                stack_frame: 16
            }]
        );
    }

    #[test]
    fn every_module_lists_entries_with_dtype_suffixes() {
        assert!(!MODULES.is_empty());
        for m in MODULES {
            assert!(!m.entries.is_empty(), "{} lists no entry point", m.name);
            // Every typed root comes in all three dtypes.
            for e in m.entries.iter().filter_map(|e| e.strip_suffix("_f32")) {
                for d in ["f16", "bf16"] {
                    let name = format!("{e}_{d}");
                    assert!(m.entries.contains(&name.as_str()), "{}: no {name}", m.name);
                }
            }
            assert!(m.source.contains("score_key"), "common.cuh inlined");
            assert!(!m.source.contains("#include"), "no includes left for NVRTC");
        }
    }

    #[test]
    fn no_device_is_an_error_not_a_panic() {
        if !device_available() {
            let err = CudaBackend::new(0).unwrap_err();
            assert!(matches!(err, Error::NoDevice(_)), "{err}");
        }
        // An ordinal past the device count is refused the same way.
        let err = CudaBackend::new(usize::MAX).unwrap_err();
        assert!(matches!(err, Error::NoDevice(_)), "{err}");
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        let a = fnv1a(&[b"src", b"sm_80"]);
        assert_ne!(a, fnv1a(&[b"src", b"sm_90"]));
        assert_ne!(a, fnv1a(&[b"srcsm_80"]));
        assert_eq!(a, fnv1a(&[b"src", b"sm_80"]));
    }
}
