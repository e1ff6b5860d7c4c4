//! Permute / unpermute and their backward passes on the GPU (`cuda/permute.cu`), the
//! same arithmetic in the same order as `src/cpu/permute.rs`: permute copies bit
//! for bit, the sums over a token's assignments run in `f32` in `j` order with one
//! rounding, and `grad_weights` uses the CPU's fixed 32-partial dot-product order, so
//! results equal the CPU's bits (NaN payloads aside: the GPU's arithmetic returns the
//! canonical NaN).
//!
//! Memory access is coalesced; rows move in 16-byte chunks when
//! `hidden * size_of::<T>()` is a multiple of 16 and every buffer of the launch is
//! 16-byte aligned, element by element otherwise. No float atomics: the same input
//! gives bitwise the same output.
//!
//! What cannot be checked without reading device memory (a host-device sync) is not
//! checked: the entries of `row_to_token` and `row`. The kernels bounds-check every
//! index they read, so no value makes them access memory out of range: a token
//! index outside `[0, num_tokens)` gives a zero (padding) row, a row outside
//! `[0, num_rows)` counts as a dropped assignment. A row that several assignments
//! point to (invalid input) is summed once per assignment in the forward passes and
//! owned by the first such assignment (lowest `t * k + j`) in `grad_y`, as on the CPU.
//! Validate on the host with [`crate::ops::permute()`] when the indices are untrusted.

use super::{check_buf, check_unused, CudaBackend, CudaStream, CudaView, CudaViewMut, DevBuf};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::checked_i32_product;
use crate::ops::permute::{
    validate_permute, validate_permute_backward, validate_unpermute, validate_unpermute_backward,
};
use crate::RouterFloat;
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

pub use crate::ops::PermuteSizes;

const MODULE: &str = "permute";
const OP_PERMUTE: &str = "permute";
const OP_PERMUTE_BACKWARD: &str = "permute_backward";
const OP_UNPERMUTE: &str = "unpermute";
const OP_UNPERMUTE_BACKWARD: &str = "unpermute_backward";

const THREADS: u32 = super::kernels::abi::permute::PERMUTE_THREADS;
/// Grid-stride loops: at most this many blocks per launch.
const MAX_BLOCKS: u64 = 1 << 16;
/// Warps (assignments in flight) per block of the `grad_weights` kernel.
const GRAD_W_WARPS: u64 = super::kernels::abi::permute::GRAD_W_WARPS;

/// The sizes as kernel arguments.
#[derive(Debug, Clone, Copy)]
struct Dims {
    num_tokens: i32,
    num_rows: i32,
    k: i32,
    hidden: i64,
    assignments: u64,
}

/// The kernels' own limits on sizes the op's validator accepted: `num_tokens` is an
/// `int` kernel argument, element offsets (`row * hidden`) are 64-bit.
fn dims(op: &'static str, s: &PermuteSizes, uses_k: bool) -> Result<Dims> {
    checked_i32_product(op, "num_tokens", s.num_tokens, 1)?;
    let hidden = i64::try_from(s.hidden).map_err(|_| Error::Overflow {
        op,
        what: "hidden",
        value: s.hidden as u128,
        max: i64::MAX,
    })?;
    let big = s.num_rows.max(s.num_tokens) as u128 * s.hidden as u128;
    if big > i64::MAX as u128 {
        return Err(Error::Overflow {
            op,
            what: "max(num_rows, num_tokens) * hidden",
            value: big,
            max: i64::MAX,
        });
    }
    // num_rows and num_tokens * k fit i32: checked by the op's validator.
    let k = if uses_k { s.k } else { 0 };
    Ok(Dims {
        num_tokens: s.num_tokens as i32,
        num_rows: s.num_rows as i32,
        k: k.min(i32::MAX as usize) as i32,
        hidden,
        assignments: (s.num_tokens * k) as u64,
    })
}

/// Whether rows of `hidden` elements of `dtype` at these device addresses move in
/// 16-byte chunks (the vector path) rather than element by element.
pub fn permute_vector_path(dtype: DType, hidden: usize, ptrs: &[u64]) -> bool {
    let bytes = hidden as u128 * dtype.size_in_bytes() as u128;
    bytes % 16 == 0 && ptrs.iter().all(|p| p % 16 == 0)
}

/// Elements per work item on the chosen path.
fn per_item(dtype: DType, vec: bool) -> u64 {
    if vec {
        16 / dtype.size_in_bytes() as u64
    } else {
        1
    }
}

fn flat_grid(items: u64, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            items.div_ceil(threads as u64).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Device buffers a permute-family launch touches ([`DevBuf::NONE`] where the pass
/// does not use it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PermuteRawPtrs {
    /// Permute: `x [num_tokens, hidden]` (input).
    pub x: DevBuf,
    /// Permute: `row_to_token [num_rows]` i32 (input).
    pub row_to_token: DevBuf,
    /// Permute: `out [num_rows, hidden]` (output).
    pub buf: DevBuf,
    /// Permute backward: `grad_buf [num_rows, hidden]` (input).
    pub grad_buf: DevBuf,
    /// Permute backward: `grad_x [num_tokens, hidden]` (output).
    pub grad_x: DevBuf,
    /// The backward passes and unpermute: `row [num_tokens, k]` i32 (input).
    pub row: DevBuf,
    /// Unpermute and its backward: `weights [num_tokens, k]` f32 (input).
    pub weights: DevBuf,
    /// Unpermute and its backward: `y [num_rows, hidden]` (input).
    pub y: DevBuf,
    /// Unpermute: `out [num_tokens, hidden]` (output).
    pub out: DevBuf,
    /// Unpermute backward: `grad_out [num_tokens, hidden]` (input).
    pub grad_out: DevBuf,
    /// Unpermute backward: `grad_y [num_rows, hidden]` (output).
    pub grad_y: DevBuf,
    /// Unpermute backward: `grad_weights [num_tokens, k]` f32 (output).
    pub grad_weights: DevBuf,
    /// Unpermute backward: workspace of
    /// [`unpermute_backward_workspace_len`]`(num_rows)` i32 (scratch).
    pub workspace: DevBuf,
}

/// Which kernels [`permute_raw`] launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermutePass {
    /// `x`, `row_to_token` → `buf`.
    Permute,
    /// `grad_buf`, `row` → `grad_x`.
    PermuteBackward,
    /// `y`, `row`, `weights` → `out`.
    Unpermute,
    /// `grad_out`, `y`, `row`, `weights` → `grad_y`, `grad_weights` (uses `workspace`).
    UnpermuteBackward,
}

/// i32 elements of the workspace [`unpermute_backward_cuda`] needs: one owner per
/// buffer row.
pub fn unpermute_backward_workspace_len(num_rows: usize) -> usize {
    num_rows
}

fn op_name(pass: PermutePass) -> &'static str {
    match pass {
        PermutePass::Permute => OP_PERMUTE,
        PermutePass::PermuteBackward => OP_PERMUTE_BACKWARD,
        PermutePass::Unpermute => OP_UNPERMUTE,
        PermutePass::UnpermuteBackward => OP_UNPERMUTE_BACKWARD,
    }
}

/// Every host check of a permute-family launch, shared by the safe and the raw entry
/// points: the op's validator on the buffers' lengths, the buffers the pass does not
/// use empty, the kernels' size limits, and the addresses (non-null, aligned) of the
/// buffers it uses.
fn check(pass: PermutePass, dtype: DType, s: &PermuteSizes, p: &PermuteRawPtrs) -> Result<Dims> {
    let op = op_name(pass);
    let used: &[(&'static str, DevBuf, usize)] = match pass {
        PermutePass::Permute => {
            validate_permute(s, p.x.len, p.row_to_token.len, p.buf.len)?;
            &[
                ("x", p.x, 0),
                ("row_to_token", p.row_to_token, 4),
                ("buf", p.buf, 0),
            ]
        }
        PermutePass::PermuteBackward => {
            validate_permute_backward(s, p.grad_buf.len, p.row.len, p.grad_x.len)?;
            &[
                ("grad_buf", p.grad_buf, 0),
                ("row", p.row, 4),
                ("grad_x", p.grad_x, 0),
            ]
        }
        PermutePass::Unpermute => {
            validate_unpermute(s, p.y.len, p.row.len, p.weights.len, p.out.len)?;
            &[
                ("y", p.y, 0),
                ("row", p.row, 4),
                ("weights", p.weights, 4),
                ("out", p.out, 0),
            ]
        }
        PermutePass::UnpermuteBackward => {
            let (go, gy, gw) = (p.grad_out.len, p.grad_y.len, p.grad_weights.len);
            validate_unpermute_backward(s, go, p.y.len, p.row.len, p.weights.len, gy, gw)?;
            let ws = unpermute_backward_workspace_len(s.num_rows);
            if p.workspace.len != ws {
                return Err(Error::shape(
                    op,
                    "workspace",
                    format!("[unpermute_backward_workspace_len(num_rows)] = [{ws}]"),
                    format!("{} elements", p.workspace.len),
                ));
            }
            &[
                ("grad_out", p.grad_out, 0),
                ("y", p.y, 0),
                ("row", p.row, 4),
                ("weights", p.weights, 4),
                ("grad_y", p.grad_y, 0),
                ("grad_weights", p.grad_weights, 4),
                ("workspace", p.workspace, 4),
            ]
        }
    };
    let all: [(&'static str, DevBuf); 13] = [
        ("x", p.x),
        ("row_to_token", p.row_to_token),
        ("buf", p.buf),
        ("grad_buf", p.grad_buf),
        ("grad_x", p.grad_x),
        ("row", p.row),
        ("weights", p.weights),
        ("y", p.y),
        ("out", p.out),
        ("grad_out", p.grad_out),
        ("grad_y", p.grad_y),
        ("grad_weights", p.grad_weights),
        ("workspace", p.workspace),
    ];
    for (name, buf) in all {
        if !used.iter().any(|u| u.0 == name) {
            check_unused(op, name, buf)?;
        }
    }
    let d = dims(op, s, pass != PermutePass::Permute)?;
    for &(name, buf, size) in used {
        // Size 0: the hidden-state element type.
        let size = if size == 0 {
            dtype.size_in_bytes()
        } else {
            size
        };
        check_buf(op, name, buf, size)?;
    }
    Ok(d)
}

/// Launch `pass` on `stream` after [`check`] (the shared core of the safe and the raw
/// entry points).
///
/// # Safety
/// Every buffer `pass` uses holds its `len` elements at its address on `stream`'s
/// context, until the kernels have finished; outputs overlap no other buffer.
unsafe fn launch(
    backend: &CudaBackend,
    stream: &CudaStream,
    pass: PermutePass,
    dtype: DType,
    sizes: &PermuteSizes,
    ptrs: &PermuteRawPtrs,
) -> Result<()> {
    let d = check(pass, dtype, sizes, ptrs)?;
    let p = ptrs;
    let h = d.hidden as u64;
    let name = |root: &str| format!("{root}_{}", dtype.as_str());
    match pass {
        PermutePass::Permute => {
            let vec = permute_vector_path(dtype, d.hidden as usize, &[p.x.ptr, p.buf.ptr]);
            let items = d.num_rows as u64 * (h / per_item(dtype, vec));
            if items == 0 {
                return Ok(());
            }
            let f = backend.function(MODULE, &name("permute_fwd"))?;
            let v = i32::from(vec);
            let mut b = stream.launch_builder(&f);
            b.arg(&p.x.ptr)
                .arg(&p.row_to_token.ptr)
                .arg(&p.buf.ptr)
                .arg(&d.num_tokens)
                .arg(&d.num_rows)
                .arg(&d.hidden)
                .arg(&v);
            // SAFETY: matches `permute_fwd_{dtype}(const T* x, const int* row_to_token,
            // T* out, int num_tokens, int num_rows, long long hidden, int vec)`; the
            // caller guarantees the buffers.
            unsafe { b.launch(flat_grid(items, THREADS)) }?;
        }
        PermutePass::PermuteBackward | PermutePass::Unpermute => {
            let (src, out, weights) = if pass == PermutePass::Unpermute {
                (p.y.ptr, p.out.ptr, p.weights.ptr)
            } else {
                (p.grad_buf.ptr, p.grad_x.ptr, 0u64) // null weights: all ones
            };
            let vec = permute_vector_path(dtype, d.hidden as usize, &[src, out]);
            let items = d.num_tokens as u64 * (h / per_item(dtype, vec));
            if items == 0 {
                return Ok(());
            }
            let f = backend.function(MODULE, &name("gather_sum"))?;
            let v = i32::from(vec);
            let mut b = stream.launch_builder(&f);
            b.arg(&src)
                .arg(&p.row.ptr)
                .arg(&weights)
                .arg(&out)
                .arg(&d.num_tokens)
                .arg(&d.k)
                .arg(&d.num_rows)
                .arg(&d.hidden)
                .arg(&v);
            // SAFETY: matches `gather_sum_{dtype}(const T* src, const int* row, const
            // float* weights (null: all ones), T* out, int num_tokens, int k, int
            // num_rows, long long hidden, int vec)`; the caller guarantees the buffers.
            unsafe { b.launch(flat_grid(items, THREADS)) }?;
        }
        PermutePass::UnpermuteBackward => {
            if d.num_rows > 0 {
                let rows = d.num_rows as u64;
                let init = backend.function(MODULE, "inverse_rows_init")?;
                let mut b = stream.launch_builder(&init);
                b.arg(&p.workspace.ptr).arg(&d.num_rows);
                // SAFETY: `inverse_rows_init(int* owner, int num_rows)`; the workspace
                // holds num_rows i32.
                unsafe { b.launch(flat_grid(rows, THREADS)) }?;
                if d.assignments > 0 {
                    let scatter = backend.function(MODULE, "inverse_rows_scatter")?;
                    let na = d.assignments as i64;
                    let mut b = stream.launch_builder(&scatter);
                    b.arg(&p.row.ptr)
                        .arg(&p.workspace.ptr)
                        .arg(&na)
                        .arg(&d.num_rows);
                    // SAFETY: `inverse_rows_scatter(const int* row, int* owner, long
                    // long num_assignments, int num_rows)`; row holds num_assignments
                    // i32, entries are bounds-checked in the kernel.
                    unsafe { b.launch(flat_grid(d.assignments, THREADS)) }?;
                }
                let vec =
                    permute_vector_path(dtype, d.hidden as usize, &[p.grad_out.ptr, p.grad_y.ptr]);
                let items = rows * (h / per_item(dtype, vec));
                if items > 0 {
                    let f = backend.function(MODULE, &name("unpermute_bwd_grad_y"))?;
                    let v = i32::from(vec);
                    let mut b = stream.launch_builder(&f);
                    b.arg(&p.grad_out.ptr)
                        .arg(&p.workspace.ptr)
                        .arg(&p.weights.ptr)
                        .arg(&p.grad_y.ptr)
                        .arg(&d.num_tokens)
                        .arg(&d.k)
                        .arg(&d.num_rows)
                        .arg(&d.hidden)
                        .arg(&v);
                    // SAFETY: matches `unpermute_bwd_grad_y_{dtype}(const T* grad_out,
                    // const int* owner, const float* weights, T* grad_y, int
                    // num_tokens, int k, int num_rows, long long hidden, int vec)`.
                    unsafe { b.launch(flat_grid(items, THREADS)) }?;
                }
            }
            if d.assignments > 0 {
                let vec = permute_vector_path(dtype, d.hidden as usize, &[p.grad_out.ptr, p.y.ptr]);
                let f = backend.function(MODULE, &name("unpermute_bwd_grad_w"))?;
                let v = i32::from(vec);
                let mut b = stream.launch_builder(&f);
                b.arg(&p.grad_out.ptr)
                    .arg(&p.y.ptr)
                    .arg(&p.row.ptr)
                    .arg(&p.grad_weights.ptr)
                    .arg(&d.num_tokens)
                    .arg(&d.k)
                    .arg(&d.num_rows)
                    .arg(&d.hidden)
                    .arg(&v);
                let lc = LaunchConfig {
                    grid_dim: (
                        d.assignments.div_ceil(GRAD_W_WARPS).clamp(1, MAX_BLOCKS) as u32,
                        1,
                        1,
                    ),
                    block_dim: (32 * GRAD_W_WARPS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches `unpermute_bwd_grad_w_{dtype}(const T* grad_out, const
                // T* y, const int* row, float* grad_weights, int num_tokens, int k, int
                // num_rows, long long hidden, int vec)`.
                unsafe { b.launch(lc) }?;
            }
        }
    }
    Ok(())
}

/// `buf[r] = x[row_to_token[r]]` (zeros for padding rows) on the GPU, launched on
/// `backend.stream()` without synchronising; the GPU form of
/// [`crate::ops::permute_into`] (`num_rows = row_to_token.len()`).
///
/// # Errors
/// [`Error::Shape`] if `x` is not `[num_tokens, hidden]` or `buf` not
/// `[num_rows, hidden]`; [`Error::Overflow`] if `num_rows` or `num_tokens` exceeds
/// `i32::MAX`; [`Error::Compile`] / [`Error::Driver`]. Entries of `row_to_token`
/// are not checked (see the module docs).
pub fn permute_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: &CudaView<'_, T>,
    num_tokens: usize,
    hidden: usize,
    row_to_token: &CudaView<'_, i32>,
    buf: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let s = PermuteSizes {
        num_tokens,
        num_rows: row_to_token.len(),
        hidden,
        k: 0,
    };
    let stream = backend.stream();
    let (xp, _gx) = x.device_ptr(stream);
    let (rp, _gr) = row_to_token.device_ptr(stream);
    let buf_len = buf.len();
    let (bp, _gb) = buf.device_ptr_mut(stream);
    let p = PermuteRawPtrs {
        x: DevBuf::new(xp, x.len()),
        row_to_token: DevBuf::new(rp, row_to_token.len()),
        buf: DevBuf::new(bp, buf_len),
        ..Default::default()
    };
    // SAFETY: every buffer is a live device allocation of `backend`'s context, of the
    // length given, kept alive (and ordered on `stream`) by the borrows above.
    unsafe { launch(backend, stream, PermutePass::Permute, T::DTYPE, &s, &p) }
}

/// `grad_x[t] = Σ_j grad_buf[row[t, j]]` over the kept `j` on the GPU, launched
/// without synchronising; the GPU form of [`crate::ops::permute_backward_into`].
///
/// # Errors
/// [`Error::Shape`] for a buffer whose length is not its shape's
/// (`grad_buf [num_rows, hidden]`, `row [num_tokens, k]`, `grad_x [num_tokens,
/// hidden]`); [`Error::Overflow`] if `num_rows` or `num_tokens * k` exceeds
/// `i32::MAX`; [`Error::Compile`] / [`Error::Driver`].
pub fn permute_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    sizes: PermuteSizes,
    grad_buf: &CudaView<'_, T>,
    row: &CudaView<'_, i32>,
    grad_x: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let stream = backend.stream();
    let (gb, _g1) = grad_buf.device_ptr(stream);
    let (rp, _g2) = row.device_ptr(stream);
    let gx_len = grad_x.len();
    let (gx, _g3) = grad_x.device_ptr_mut(stream);
    let p = PermuteRawPtrs {
        grad_buf: DevBuf::new(gb, grad_buf.len()),
        row: DevBuf::new(rp, row.len()),
        grad_x: DevBuf::new(gx, gx_len),
        ..Default::default()
    };
    let pass = PermutePass::PermuteBackward;
    // SAFETY: live device buffers of this context of the lengths given, kept alive by
    // the borrows above.
    unsafe { launch(backend, stream, pass, T::DTYPE, &sizes, &p) }
}

/// `out[t] = Σ_j weights[t, j] · y[row[t, j]]` over the kept `j` on the GPU (`f32`
/// accumulation in `j` order, one rounding), launched without synchronising; the
/// GPU form of [`crate::ops::unpermute_into`].
///
/// # Errors
/// As [`permute_backward_cuda`] for `y [num_rows, hidden]`, `row`,
/// `out [num_tokens, hidden]`, plus [`Error::Shape`] if `weights` is not
/// `[num_tokens, k]`.
pub fn unpermute_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    sizes: PermuteSizes,
    y: &CudaView<'_, T>,
    row: &CudaView<'_, i32>,
    weights: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let stream = backend.stream();
    let (yp, _g1) = y.device_ptr(stream);
    let (rp, _g2) = row.device_ptr(stream);
    let (wp, _g3) = weights.device_ptr(stream);
    let out_len = out.len();
    let (op, _g4) = out.device_ptr_mut(stream);
    let p = PermuteRawPtrs {
        y: DevBuf::new(yp, y.len()),
        row: DevBuf::new(rp, row.len()),
        weights: DevBuf::new(wp, weights.len()),
        out: DevBuf::new(op, out_len),
        ..Default::default()
    };
    let pass = PermutePass::Unpermute;
    // SAFETY: live device buffers of this context of the lengths given, kept alive by
    // the borrows above.
    unsafe { launch(backend, stream, pass, T::DTYPE, &sizes, &p) }
}

/// Outputs (and scratch) of [`unpermute_backward_cuda`].
#[derive(Debug)]
pub struct UnpermuteBackwardCudaBuffers<'a, T> {
    /// `grad_y [num_rows, hidden]`: every row written (zeros where no assignment
    /// points).
    pub grad_y: CudaViewMut<'a, T>,
    /// `grad_weights [num_tokens, k]` f32.
    pub grad_weights: CudaViewMut<'a, f32>,
    /// Scratch of [`unpermute_backward_workspace_len`]`(num_rows)` i32.
    pub workspace: CudaViewMut<'a, i32>,
}

/// Backward of [`unpermute_cuda`] on the GPU, launched without synchronising:
/// `grad_y[row[t, j]] = weights[t, j] · grad_out[t]` (every row of `grad_y` written
/// exactly once, zeros where no assignment points) and
/// `grad_weights[t, j] = <grad_out[t], y[row[t, j]]>` in the CPU's dot-product order
/// (zero where the row is out of range); the GPU form of
/// [`crate::ops::unpermute_backward_into`].
///
/// # Errors
/// As [`unpermute_cuda`], plus [`Error::Shape`] for `grad_out [num_tokens, hidden]`,
/// `grad_y [num_rows, hidden]`, `grad_weights [num_tokens, k]` or a workspace of
/// the wrong length.
pub fn unpermute_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    sizes: PermuteSizes,
    grad_out: &CudaView<'_, T>,
    y: &CudaView<'_, T>,
    row: &CudaView<'_, i32>,
    weights: &CudaView<'_, f32>,
    bufs: &mut UnpermuteBackwardCudaBuffers<'_, T>,
) -> Result<()> {
    let stream = backend.stream();
    let (go, _g1) = grad_out.device_ptr(stream);
    let (yp, _g2) = y.device_ptr(stream);
    let (rp, _g3) = row.device_ptr(stream);
    let (wp, _g4) = weights.device_ptr(stream);
    let lens = (
        bufs.grad_y.len(),
        bufs.grad_weights.len(),
        bufs.workspace.len(),
    );
    let (gy, _g5) = bufs.grad_y.device_ptr_mut(stream);
    let (gw, _g6) = bufs.grad_weights.device_ptr_mut(stream);
    let (ws, _g7) = bufs.workspace.device_ptr_mut(stream);
    let p = PermuteRawPtrs {
        grad_out: DevBuf::new(go, grad_out.len()),
        y: DevBuf::new(yp, y.len()),
        row: DevBuf::new(rp, row.len()),
        weights: DevBuf::new(wp, weights.len()),
        grad_y: DevBuf::new(gy, lens.0),
        grad_weights: DevBuf::new(gw, lens.1),
        workspace: DevBuf::new(ws, lens.2),
        ..Default::default()
    };
    let pass = PermutePass::UnpermuteBackward;
    // SAFETY: live device buffers of this context of the lengths given, kept alive by
    // the borrows above.
    unsafe { launch(backend, stream, pass, T::DTYPE, &sizes, &p) }
}

/// Launch a permute-family pass on raw device buffers and a caller-owned stream
/// (PyTorch's `torch.cuda.current_stream().cuda_stream`), without synchronising:
/// the checks of the safe functions (the op's validator on the buffers' lengths; the
/// buffers the pass does not use must be empty) before anything is launched. Index
/// entries are bounds-checked in the kernels (see the module docs).
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context (the primary context of
///    its device, the one PyTorch uses), kept alive during the call.
/// 2. Every buffer the `pass` uses (see [`PermutePass`] and [`PermuteRawPtrs`]) holds
///    `len` elements of its documented type (`dtype` for hidden-state buffers, `i32`
///    for indices and the workspace, `f32` for weights) at `ptr` in that context,
///    contiguous and row-major, and stays valid until the kernels have finished on
///    `stream`.
/// 3. Output buffers (and the workspace) do not overlap any other buffer of the call.
///
/// # Errors
/// As the safe functions; [`Error::InvalidArgument`] for a non-empty buffer the pass
/// does not use, or a null / misaligned one it uses; [`Error::Compile`],
/// [`Error::Driver`].
pub unsafe fn permute_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    pass: PermutePass,
    dtype: DType,
    sizes: PermuteSizes,
    ptrs: PermuteRawPtrs,
) -> Result<()> {
    // SAFETY: the caller guarantees (1); the wrapper does not own the stream.
    let s = unsafe { backend.context().wrap_borrowed_stream(stream) };
    // SAFETY: the caller guarantees (2) and (3) for every buffer the pass uses;
    // `launch` checks every length before it launches anything.
    unsafe { launch(backend, &s, pass, dtype, &sizes, &ptrs) }
}
