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
//! Validate on the host with [`crate::ops::permute`] when the indices are untrusted.

use super::{CudaBackend, CudaStream, CudaView, CudaViewMut};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::checked_i32_product;
use crate::RouterFloat;
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

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

/// `Err(Shape)` unless `got == a * b` (compared without overflow).
fn check_len2(
    op: &'static str,
    arg: &'static str,
    got: usize,
    a: usize,
    b: usize,
    dims: &str,
) -> Result<()> {
    let expected = (a as u128) * (b as u128);
    if got as u128 != expected {
        return Err(Error::shape(
            op,
            arg,
            format!("[{dims}] = [{a}, {b}] ({expected} elements)"),
            format!("{got} elements"),
        ));
    }
    Ok(())
}

/// Sizes of a permute-family launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermuteSizes {
    /// Tokens (rows of `x`, `grad_x`, `out`, `grad_out`).
    pub num_tokens: usize,
    /// Rows of the expert-major buffer (`buf`, `y`, `grad_y`, `row_to_token`).
    pub num_rows: usize,
    /// Hidden size (columns).
    pub hidden: usize,
    /// Assignments per token (columns of `row`, `weights`, `grad_weights`); unused by
    /// the permute forward.
    pub k: usize,
}

/// The sizes as kernel arguments, checked against the `i32` row index.
#[derive(Debug, Clone, Copy)]
struct Dims {
    num_tokens: i32,
    num_rows: i32,
    k: i32,
    hidden: i64,
    assignments: u64,
}

impl PermuteSizes {
    fn dims(&self, op: &'static str, uses_k: bool) -> Result<Dims> {
        checked_i32_product(op, "num_rows", self.num_rows, 1)?;
        checked_i32_product(op, "num_tokens", self.num_tokens, 1)?;
        let k = if uses_k { self.k } else { 0 };
        checked_i32_product(op, "num_tokens * k", self.num_tokens, k)?;
        let hidden = i64::try_from(self.hidden).map_err(|_| Error::Overflow {
            op,
            what: "hidden",
            value: self.hidden as u128,
            max: i64::MAX,
        })?;
        // Element offsets (row * hidden) are 64-bit in the kernels.
        let big = self.num_rows.max(self.num_tokens) as u128 * self.hidden as u128;
        if big > i64::MAX as u128 {
            return Err(Error::Overflow {
                op,
                what: "max(num_rows, num_tokens) * hidden",
                value: big,
                max: i64::MAX,
            });
        }
        Ok(Dims {
            num_tokens: self.num_tokens as i32,
            num_rows: self.num_rows as i32,
            k: k.min(i32::MAX as usize) as i32,
            hidden,
            assignments: (self.num_tokens * k) as u64,
        })
    }
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

/// Device addresses of the buffers a permute-family launch touches (`0` where the
/// pass does not use it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PermuteRawPtrs {
    /// Permute: `x [num_tokens, hidden]` (input).
    pub x: u64,
    /// Permute: `row_to_token [num_rows]` i32 (input).
    pub row_to_token: u64,
    /// Permute: `out [num_rows, hidden]` (output).
    pub buf: u64,
    /// Permute backward: `grad_buf [num_rows, hidden]` (input).
    pub grad_buf: u64,
    /// Permute backward: `grad_x [num_tokens, hidden]` (output).
    pub grad_x: u64,
    /// The backward passes and unpermute: `row [num_tokens, k]` i32 (input).
    pub row: u64,
    /// Unpermute and its backward: `weights [num_tokens, k]` f32 (input).
    pub weights: u64,
    /// Unpermute and its backward: `y [num_rows, hidden]` (input).
    pub y: u64,
    /// Unpermute: `out [num_tokens, hidden]` (output).
    pub out: u64,
    /// Unpermute backward: `grad_out [num_tokens, hidden]` (input).
    pub grad_out: u64,
    /// Unpermute backward: `grad_y [num_rows, hidden]` (output).
    pub grad_y: u64,
    /// Unpermute backward: `grad_weights [num_tokens, k]` f32 (output).
    pub grad_weights: u64,
    /// Unpermute backward: workspace of
    /// [`unpermute_backward_workspace_len`]`(num_rows)` i32 (scratch).
    pub workspace: u64,
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

/// Launch `pass` on `stream` with validated `dims` (the shared core of the safe and
/// the raw entry points).
///
/// # Safety
/// Every address `pass` uses is valid on `stream`'s context for the sizes in `d`.
unsafe fn launch(
    backend: &CudaBackend,
    stream: &CudaStream,
    pass: PermutePass,
    dtype: DType,
    d: Dims,
    p: &PermuteRawPtrs,
) -> Result<()> {
    let h = d.hidden as u64;
    let name = |root: &str| format!("{root}_{}", dtype.as_str());
    match pass {
        PermutePass::Permute => {
            let vec = permute_vector_path(dtype, d.hidden as usize, &[p.x, p.buf]);
            let items = d.num_rows as u64 * (h / per_item(dtype, vec));
            if items == 0 {
                return Ok(());
            }
            let f = backend.function(MODULE, &name("permute_fwd"))?;
            let v = i32::from(vec);
            let mut b = stream.launch_builder(&f);
            b.arg(&p.x)
                .arg(&p.row_to_token)
                .arg(&p.buf)
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
                (p.y, p.out, p.weights)
            } else {
                (p.grad_buf, p.grad_x, 0u64)
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
                .arg(&p.row)
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
                b.arg(&p.workspace).arg(&d.num_rows);
                // SAFETY: `inverse_rows_init(int* owner, int num_rows)`; the workspace
                // holds num_rows i32.
                unsafe { b.launch(flat_grid(rows, THREADS)) }?;
                if d.assignments > 0 {
                    let scatter = backend.function(MODULE, "inverse_rows_scatter")?;
                    let na = d.assignments as i64;
                    let mut b = stream.launch_builder(&scatter);
                    b.arg(&p.row).arg(&p.workspace).arg(&na).arg(&d.num_rows);
                    // SAFETY: `inverse_rows_scatter(const int* row, int* owner, long
                    // long num_assignments, int num_rows)`; row holds num_assignments
                    // i32, entries are bounds-checked in the kernel.
                    unsafe { b.launch(flat_grid(d.assignments, THREADS)) }?;
                }
                let vec = permute_vector_path(dtype, d.hidden as usize, &[p.grad_out, p.grad_y]);
                let items = rows * (h / per_item(dtype, vec));
                if items > 0 {
                    let f = backend.function(MODULE, &name("unpermute_bwd_grad_y"))?;
                    let v = i32::from(vec);
                    let mut b = stream.launch_builder(&f);
                    b.arg(&p.grad_out)
                        .arg(&p.workspace)
                        .arg(&p.weights)
                        .arg(&p.grad_y)
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
                let vec = permute_vector_path(dtype, d.hidden as usize, &[p.grad_out, p.y]);
                let f = backend.function(MODULE, &name("unpermute_bwd_grad_w"))?;
                let v = i32::from(vec);
                let mut b = stream.launch_builder(&f);
                b.arg(&p.grad_out)
                    .arg(&p.y)
                    .arg(&p.row)
                    .arg(&p.grad_weights)
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
    let op = OP_PERMUTE;
    let num_rows = row_to_token.len();
    let s = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k: 0,
    };
    let d = s.dims(op, false)?;
    check_len2(op, "x", x.len(), num_tokens, hidden, "num_tokens, hidden")?;
    check_len2(op, "out", buf.len(), num_rows, hidden, "num_rows, hidden")?;
    let stream = backend.stream();
    let (xp, _gx) = x.device_ptr(stream);
    let (rp, _gr) = row_to_token.device_ptr(stream);
    let (bp, _gb) = buf.device_ptr_mut(stream);
    let p = PermuteRawPtrs {
        x: xp,
        row_to_token: rp,
        buf: bp,
        ..Default::default()
    };
    // SAFETY: every buffer is a live device allocation of `backend`'s context whose
    // length was checked above for these sizes.
    unsafe { launch(backend, stream, PermutePass::Permute, T::DTYPE, d, &p) }
}

/// `grad_x[t] = Σ_j grad_buf[row[t, j]]` over the kept `j` on the GPU, launched
/// without synchronising; the GPU form of [`crate::ops::permute_backward_into`].
///
/// # Errors
/// [`Error::Shape`] for a buffer whose length is not its shape's
/// (`grad_buf [num_rows, hidden]`, `row [num_tokens, k]`, `grad_x [num_tokens,
/// hidden]`); [`Error::Overflow`] if `num_rows` or `num_tokens * k` exceeds
/// `i32::MAX`; [`Error::Compile`] / [`Error::Driver`].
#[allow(clippy::too_many_arguments)]
pub fn permute_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    grad_buf: &CudaView<'_, T>,
    num_rows: usize,
    hidden: usize,
    row: &CudaView<'_, i32>,
    num_tokens: usize,
    k: usize,
    grad_x: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let op = OP_PERMUTE_BACKWARD;
    let d = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k,
    }
    .dims(op, true)?;
    check_len2(op, "row", row.len(), num_tokens, k, "num_tokens, k")?;
    check_len2(
        op,
        "grad_buf",
        grad_buf.len(),
        num_rows,
        hidden,
        "num_rows, hidden",
    )?;
    check_len2(
        op,
        "grad_x",
        grad_x.len(),
        num_tokens,
        hidden,
        "num_tokens, hidden",
    )?;
    let stream = backend.stream();
    let (gb, _g1) = grad_buf.device_ptr(stream);
    let (rp, _g2) = row.device_ptr(stream);
    let (gx, _g3) = grad_x.device_ptr_mut(stream);
    let p = PermuteRawPtrs {
        grad_buf: gb,
        row: rp,
        grad_x: gx,
        ..Default::default()
    };
    // SAFETY: live device buffers of this context, lengths checked above.
    unsafe {
        launch(
            backend,
            stream,
            PermutePass::PermuteBackward,
            T::DTYPE,
            d,
            &p,
        )
    }
}

/// `out[t] = Σ_j weights[t, j] · y[row[t, j]]` over the kept `j` on the GPU (`f32`
/// accumulation in `j` order, one rounding), launched without synchronising; the
/// GPU form of [`crate::ops::unpermute_into`].
///
/// # Errors
/// As [`permute_backward_cuda`] for `y [num_rows, hidden]`, `row`,
/// `out [num_tokens, hidden]`, plus [`Error::Shape`] if `weights` is not
/// `[num_tokens, k]`.
#[allow(clippy::too_many_arguments)]
pub fn unpermute_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    y: &CudaView<'_, T>,
    num_rows: usize,
    hidden: usize,
    row: &CudaView<'_, i32>,
    weights: &CudaView<'_, f32>,
    num_tokens: usize,
    k: usize,
    out: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let op = OP_UNPERMUTE;
    let d = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k,
    }
    .dims(op, true)?;
    check_len2(op, "row", row.len(), num_tokens, k, "num_tokens, k")?;
    check_len2(op, "y", y.len(), num_rows, hidden, "num_rows, hidden")?;
    check_len2(op, "weights", weights.len(), num_tokens, k, "num_tokens, k")?;
    check_len2(
        op,
        "out",
        out.len(),
        num_tokens,
        hidden,
        "num_tokens, hidden",
    )?;
    let stream = backend.stream();
    let (yp, _g1) = y.device_ptr(stream);
    let (rp, _g2) = row.device_ptr(stream);
    let (wp, _g3) = weights.device_ptr(stream);
    let (op_, _g4) = out.device_ptr_mut(stream);
    let p = PermuteRawPtrs {
        y: yp,
        row: rp,
        weights: wp,
        out: op_,
        ..Default::default()
    };
    // SAFETY: live device buffers of this context, lengths checked above.
    unsafe { launch(backend, stream, PermutePass::Unpermute, T::DTYPE, d, &p) }
}

/// Inputs and outputs of [`unpermute_backward_cuda`].
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
#[allow(clippy::too_many_arguments)]
pub fn unpermute_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    grad_out: &CudaView<'_, T>,
    y: &CudaView<'_, T>,
    num_rows: usize,
    hidden: usize,
    row: &CudaView<'_, i32>,
    weights: &CudaView<'_, f32>,
    num_tokens: usize,
    k: usize,
    bufs: &mut UnpermuteBackwardCudaBuffers<'_, T>,
) -> Result<()> {
    let op = OP_UNPERMUTE_BACKWARD;
    let d = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k,
    }
    .dims(op, true)?;
    check_len2(op, "row", row.len(), num_tokens, k, "num_tokens, k")?;
    check_len2(
        op,
        "grad_out",
        grad_out.len(),
        num_tokens,
        hidden,
        "num_tokens, hidden",
    )?;
    check_len2(op, "y", y.len(), num_rows, hidden, "num_rows, hidden")?;
    check_len2(op, "weights", weights.len(), num_tokens, k, "num_tokens, k")?;
    check_len2(
        op,
        "grad_y",
        bufs.grad_y.len(),
        num_rows,
        hidden,
        "num_rows, hidden",
    )?;
    check_len2(
        op,
        "grad_weights",
        bufs.grad_weights.len(),
        num_tokens,
        k,
        "num_tokens, k",
    )?;
    check_len2(
        op,
        "workspace",
        bufs.workspace.len(),
        unpermute_backward_workspace_len(num_rows),
        1,
        "unpermute_backward_workspace_len(num_rows), 1",
    )?;
    let stream = backend.stream();
    let (go, _g1) = grad_out.device_ptr(stream);
    let (yp, _g2) = y.device_ptr(stream);
    let (rp, _g3) = row.device_ptr(stream);
    let (wp, _g4) = weights.device_ptr(stream);
    let (gy, _g5) = bufs.grad_y.device_ptr_mut(stream);
    let (gw, _g6) = bufs.grad_weights.device_ptr_mut(stream);
    let (ws, _g7) = bufs.workspace.device_ptr_mut(stream);
    let p = PermuteRawPtrs {
        grad_out: go,
        y: yp,
        row: rp,
        weights: wp,
        grad_y: gy,
        grad_weights: gw,
        workspace: ws,
        ..Default::default()
    };
    // SAFETY: live device buffers of this context, lengths checked above.
    unsafe {
        launch(
            backend,
            stream,
            PermutePass::UnpermuteBackward,
            T::DTYPE,
            d,
            &p,
        )
    }
}

/// Launch a permute-family pass on raw device pointers and a caller-owned stream
/// (PyTorch's `torch.cuda.current_stream().cuda_stream`), without synchronising.
/// Sizes are checked against the `i32` row index; index entries are bounds-checked
/// in the kernels (see the module docs).
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context (the primary context of
///    its device, the one PyTorch uses), kept alive during the call.
/// 2. Every pointer the `pass` uses (see [`PermutePass`] and [`PermuteRawPtrs`]) is a
///    device address in that context, valid for the documented shape (`dtype` for
///    hidden-state buffers, `i32` for indices and the workspace, `f32` for weights),
///    contiguous and row-major, and stays valid until the kernels have finished on
///    `stream`.
/// 3. Output buffers (and the workspace) do not overlap any other buffer of the call.
///
/// # Errors
/// [`Error::Overflow`] for sizes beyond the `i32` row index; [`Error::Compile`],
/// [`Error::Driver`].
pub unsafe fn permute_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    pass: PermutePass,
    dtype: DType,
    sizes: PermuteSizes,
    ptrs: PermuteRawPtrs,
) -> Result<()> {
    let op = match pass {
        PermutePass::Permute => OP_PERMUTE,
        PermutePass::PermuteBackward => OP_PERMUTE_BACKWARD,
        PermutePass::Unpermute => OP_UNPERMUTE,
        PermutePass::UnpermuteBackward => OP_UNPERMUTE_BACKWARD,
    };
    let d = sizes.dims(op, pass != PermutePass::Permute)?;
    {
        use super::check_device_ptr as check;
        let z = dtype.size_in_bytes();
        let (t, r) = (d.num_tokens as usize, d.num_rows as usize);
        let (th, rh) = (t * d.hidden as usize, r * d.hidden as usize);
        let a = d.assignments as usize;
        let p = &ptrs;
        match pass {
            PermutePass::Permute => {
                check(op, "x", p.x, th, z)?;
                check(op, "row_to_token", p.row_to_token, r, 4)?;
                check(op, "buf", p.buf, rh, z)?;
            }
            PermutePass::PermuteBackward => {
                check(op, "grad_buf", p.grad_buf, rh, z)?;
                check(op, "row", p.row, a, 4)?;
                check(op, "grad_x", p.grad_x, th, z)?;
            }
            PermutePass::Unpermute => {
                check(op, "y", p.y, rh, z)?;
                check(op, "row", p.row, a, 4)?;
                if p.weights != 0 {
                    check(op, "weights", p.weights, a, 4)?; // optional: null means all ones
                }
                check(op, "out", p.out, th, z)?;
            }
            PermutePass::UnpermuteBackward => {
                check(op, "grad_out", p.grad_out, th, z)?;
                check(op, "y", p.y, rh, z)?;
                check(op, "row", p.row, a, 4)?;
                check(op, "grad_y", p.grad_y, rh, z)?;
                check(op, "grad_weights", p.grad_weights, a, 4)?;
                check(op, "workspace", p.workspace, r, 4)?;
            }
        }
    }
    // SAFETY: the caller guarantees (1); the wrapper does not own the stream.
    let s = unsafe { backend.context().wrap_borrowed_stream(stream) };
    // SAFETY: the caller guarantees (2) and (3) for every pointer the pass uses.
    unsafe { launch(backend, &s, pass, dtype, d, &ptrs) }
}
