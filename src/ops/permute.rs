//! Permute and unpermute: move hidden states between token order `[num_tokens, hidden]`
//! and the expert-major row buffer `[num_rows, hidden]` that a dispatch layout
//! describes, and back (weighted combine), with both backward passes.
//!
//! # The routing
//! A layout (from `dispatch`, expert-choice routing, or the caller) is described by two
//! `i32` index arrays:
//! - `row_to_token [num_rows]`: the token whose hidden state sits in buffer row `r`, or
//!   `-1` for a padding row (zeros on permute, ignored on combine);
//! - `row [num_tokens, k]`: the buffer row of assignment `(t, j)`, or `-1` where the
//!   assignment was dropped or not routed. `k` is any width: `topk` for token-choice
//!   routing, `num_experts` for expert-choice routing. Every buffer row holds at most
//!   one assignment (the entries `>= 0` of `row` are distinct).
//!
//! [`permute_row_to_token`] derives `row_to_token` from `row`.
//!
//! # Precision notes
//! Permute copies values bit for bit. Sums (the permute backward and the unpermute
//! combine) are accumulated in `f32` over `j = 0..k` in order, whatever the element
//! type, and rounded once on the store. `grad_weights` is an `f32` dot product. Per-token
//! work is independent, so results are bitwise the same for any number of threads.
//!
//! # Validation
//! Every function checks, before touching any output: buffer lengths against the sizes
//! ([`Error::Shape`]), `num_rows` and `num_tokens * k` fit the `i32` row index
//! ([`Error::Overflow`]), `row_to_token` entries in `[-1, num_tokens)` and `row` entries
//! in `[-1, num_rows)` and distinct ([`Error::InvalidArgument`]); the ndarray forms also
//! require standard (row-major, contiguous) layout ([`Error::Layout`]). Weights need not
//! be finite: NaN and infinities propagate as values (the weights of dropped
//! assignments are never read). `hidden = 0`, `num_tokens = 0`,
//! `num_rows = 0` and `k = 0` are valid (empty or zero outputs).

use crate::cpu;
use crate::dtype::RouterFloat;
use crate::error::{Error, Result};
use crate::ops::{as_rows, as_vec, check_len, checked_i32_product};
use ndarray::{Array2, ArrayView1, ArrayView2};

const OP_PERMUTE: &str = "permute";
const OP_PERMUTE_BACKWARD: &str = "permute_backward";
const OP_UNPERMUTE: &str = "unpermute";
const OP_UNPERMUTE_BACKWARD: &str = "unpermute_backward";
const OP_ROW_TO_TOKEN: &str = "permute_row_to_token";

/// `Err(Shape)` unless a flat buffer of `got` elements holds `[a, b]` (compared without
/// overflow).
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

/// `row_to_token` entries in `[-1, num_tokens)`.
fn check_row_to_token(op: &'static str, row_to_token: &[i32], num_tokens: usize) -> Result<()> {
    for (r, &t) in row_to_token.iter().enumerate() {
        if t < -1 || (t >= 0 && t as usize >= num_tokens) {
            return Err(Error::invalid(
                op,
                "row_to_token",
                format_args!("{t} at row {r}"),
                format!(
                    "token indices must be in [0, {num_tokens}) (num_tokens) or -1 (padding row)"
                ),
            ));
        }
    }
    Ok(())
}

/// `row [num_tokens, k]` entries in `[-1, num_rows)`, the non-negative ones distinct.
/// Uses one bitset of `max(row) + 1` bits.
fn check_row_entries(op: &'static str, row: &[i32], k: usize, num_rows: usize) -> Result<()> {
    let k = k.max(1);
    let mut max_row: i32 = -1;
    for (a, &r) in row.iter().enumerate() {
        if r < -1 || (r >= 0 && r as usize >= num_rows) {
            return Err(Error::invalid(
                op,
                "row",
                format_args!("{r} at token {}, choice {}", a / k, a % k),
                format!("buffer rows must be in [0, {num_rows}) (num_rows) or -1 (dropped / not routed)"),
            ));
        }
        max_row = max_row.max(r);
    }
    if max_row < 0 {
        return Ok(());
    }
    let mut seen = vec![0u64; (max_row as usize) / 64 + 1];
    for (a, &r) in row.iter().enumerate() {
        if r < 0 {
            continue;
        }
        let (word, bit) = ((r as usize) / 64, 1u64 << (r as usize % 64));
        let Some(w) = seen.get_mut(word) else {
            continue;
        };
        if *w & bit != 0 {
            // Error path only: find the assignment that took the row first.
            let first = row.iter().position(|&q| q == r).unwrap_or(a);
            return Err(Error::invalid(
                op,
                "row",
                format_args!("{r} at token {}, choice {}", a / k, a % k),
                format!(
                    "each buffer row holds at most one assignment, and row {r} is already used by token {}, choice {}",
                    first / k,
                    first % k
                ),
            ));
        }
        *w |= bit;
    }
    Ok(())
}

/// The sizes of a permute-family call: token order `[num_tokens, hidden]`, the
/// expert-major buffer `[num_rows, hidden]`, and `row [num_tokens, k]` (see the
/// [module docs](self)).
///
/// ```
/// use moe_router::{unpermute_into, PermuteSizes};
///
/// let sizes = PermuteSizes { num_tokens: 2, num_rows: 3, hidden: 1, k: 2 };
/// let y = [1.0f32, 10.0, 100.0];
/// let mut out = [0.0f32; 2];
/// unpermute_into(sizes, &y, &[2, 0, -1, 1], &[1.0, 0.5, 1.0, 2.0], &mut out).unwrap();
/// assert_eq!(out, [100.5, 20.0]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PermuteSizes {
    /// Tokens (rows of `x`, `grad_x`, `out`, `grad_out`, `row`).
    pub num_tokens: usize,
    /// Rows of the expert-major buffer (`buf`, `y`, `grad_buf`, `grad_y`,
    /// `row_to_token`).
    pub num_rows: usize,
    /// Hidden size (columns of the hidden states).
    pub hidden: usize,
    /// Assignments per token (columns of `row`, `weights`, `grad_weights`); unused by
    /// the permute forward.
    pub k: usize,
}

/// The size checks every function indexed by `row [num_tokens, k]` shares.
fn check_row_sizes(op: &'static str, s: &PermuteSizes, row_len: usize) -> Result<()> {
    checked_i32_product(op, "num_rows", s.num_rows, 1)?;
    checked_i32_product(op, "num_tokens * k", s.num_tokens, s.k)?;
    check_len2(op, "row", row_len, s.num_tokens, s.k, "num_tokens, k")
}

/// The single validation of the permute forward (every backend): `num_rows` fits the
/// `i32` row index, `x [num_tokens, hidden]`, `row_to_token [num_rows]`,
/// `out [num_rows, hidden]`. The entries of `row_to_token` are checked where the
/// host can read them ([`permute_into`]).
pub(crate) fn validate_permute(
    s: &PermuteSizes,
    x: usize,
    row_to_token: usize,
    out: usize,
) -> Result<()> {
    let op = OP_PERMUTE;
    checked_i32_product(op, "num_rows", s.num_rows, 1)?;
    let r = s.num_rows;
    check_len(
        op,
        "row_to_token",
        row_to_token,
        r,
        format_args!("[num_rows] = [{r}]"),
    )?;
    check_len2(op, "x", x, s.num_tokens, s.hidden, "num_tokens, hidden")?;
    check_len2(op, "out", out, s.num_rows, s.hidden, "num_rows, hidden")
}

/// The single validation of the permute backward (every backend): `num_rows` and
/// `num_tokens * k` fit the `i32` row index, `grad_buf [num_rows, hidden]`,
/// `row [num_tokens, k]`, `grad_x [num_tokens, hidden]`. The entries of `row` are
/// checked where the host can read them ([`permute_backward_into`]).
pub(crate) fn validate_permute_backward(
    s: &PermuteSizes,
    grad_buf: usize,
    row: usize,
    grad_x: usize,
) -> Result<()> {
    let op = OP_PERMUTE_BACKWARD;
    check_row_sizes(op, s, row)?;
    let (r, t, h) = (s.num_rows, s.num_tokens, s.hidden);
    check_len2(op, "grad_buf", grad_buf, r, h, "num_rows, hidden")?;
    check_len2(op, "grad_x", grad_x, t, h, "num_tokens, hidden")
}

/// The single validation of unpermute (every backend): as
/// [`validate_permute_backward`] for `y [num_rows, hidden]`, `row [num_tokens, k]`,
/// `out [num_tokens, hidden]`, plus `weights [num_tokens, k]`.
pub(crate) fn validate_unpermute(
    s: &PermuteSizes,
    y: usize,
    row: usize,
    weights: usize,
    out: usize,
) -> Result<()> {
    let op = OP_UNPERMUTE;
    check_row_sizes(op, s, row)?;
    let (r, t, h, k) = (s.num_rows, s.num_tokens, s.hidden, s.k);
    check_len2(op, "y", y, r, h, "num_rows, hidden")?;
    check_len2(op, "weights", weights, t, k, "num_tokens, k")?;
    check_len2(op, "out", out, t, h, "num_tokens, hidden")
}

/// The single validation of the unpermute backward (every backend): as
/// [`validate_unpermute`] for `grad_out [num_tokens, hidden]`, `y [num_rows, hidden]`,
/// `row`, `weights [num_tokens, k]`, `grad_y [num_rows, hidden]` and
/// `grad_weights [num_tokens, k]`.
pub(crate) fn validate_unpermute_backward(
    s: &PermuteSizes,
    grad_out: usize,
    y: usize,
    row: usize,
    weights: usize,
    grad_y: usize,
    grad_weights: usize,
) -> Result<()> {
    let op = OP_UNPERMUTE_BACKWARD;
    check_row_sizes(op, s, row)?;
    let (r, t, h, k) = (s.num_rows, s.num_tokens, s.hidden, s.k);
    check_len2(op, "grad_out", grad_out, t, h, "num_tokens, hidden")?;
    check_len2(op, "y", y, r, h, "num_rows, hidden")?;
    check_len2(op, "weights", weights, t, k, "num_tokens, k")?;
    check_len2(op, "grad_y", grad_y, r, h, "num_rows, hidden")?;
    check_len2(op, "grad_weights", grad_weights, t, k, "num_tokens, k")
}

/// The element count of an owned `[rows, cols]` output, or an error instead of
/// ndarray's panic when it does not fit `isize`.
fn out_len(op: &'static str, rows: usize, cols: usize) -> Result<usize> {
    let n = (rows as u128) * (cols as u128);
    if n > isize::MAX as u128 {
        return Err(Error::invalid(
            op,
            "hidden",
            cols,
            format!("the output [{rows}, {cols}] must have at most isize::MAX elements"),
        ));
    }
    Ok(n as usize)
}

/// An owned `[rows, cols]` array filled with `fill` (size checked by [`out_len`]).
fn alloc2<T: Clone>(op: &'static str, rows: usize, cols: usize, fill: T) -> Result<Array2<T>> {
    out_len(op, rows, cols)?;
    Ok(Array2::from_elem((rows, cols), fill))
}

/// The contiguous data of a freshly allocated output (standard layout by construction).
fn out_slice<'a, T>(
    op: &'static str,
    arg: &'static str,
    a: &'a mut Array2<T>,
) -> Result<&'a mut [T]> {
    a.as_slice_mut().ok_or(Error::Layout { op, arg })
}

/// Gather token rows into the expert-major buffer: `out[r] = x[row_to_token[r]]`, and
/// zeros where `row_to_token[r] = -1` (padding rows). Flat-slice form of [`permute`].
///
/// Shapes: `x [num_tokens, hidden]`, `row_to_token [num_rows]`,
/// `out [num_rows, hidden]` with `num_rows = row_to_token.len()`. Values are copied
/// bit for bit.
///
/// # Errors
/// [`Error::Shape`] if `x.len() != num_tokens * hidden` or
/// `out.len() != row_to_token.len() * hidden`; [`Error::Overflow`] if
/// `row_to_token.len()` exceeds `i32::MAX`; [`Error::InvalidArgument`] if an entry of
/// `row_to_token` is outside `[-1, num_tokens)`. `out` is untouched on error.
pub fn permute_into<T: RouterFloat>(
    x: &[T],
    num_tokens: usize,
    hidden: usize,
    row_to_token: &[i32],
    out: &mut [T],
) -> Result<()> {
    let num_rows = row_to_token.len();
    let s = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k: 0,
    };
    validate_permute(&s, x.len(), num_rows, out.len())?;
    check_row_to_token(OP_PERMUTE, row_to_token, num_tokens)?;
    cpu::permute::permute(x, hidden, row_to_token, out);
    Ok(())
}

/// Gather token rows into the expert-major buffer: `buf[r] = x[row_to_token[r]]`, with
/// zero rows where `row_to_token[r] = -1` (padding).
///
/// Shapes: `x [num_tokens, hidden]`, `row_to_token [num_rows]`; returns
/// `buf [num_rows, hidden]`. Values are copied bit for bit.
///
/// # Errors
/// [`Error::Layout`] if `x` or `row_to_token` is not contiguous in standard order;
/// [`Error::InvalidArgument`] if an entry of `row_to_token` is outside
/// `[-1, num_tokens)`; [`Error::Overflow`] if `num_rows` exceeds `i32::MAX`.
///
/// ```
/// use moe_router::permute;
/// use ndarray::array;
///
/// // 3 tokens, hidden 2; buffer rows: token 2, token 0, padding, token 0.
/// let x = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
/// let row_to_token = array![2, 0, -1, 0];
/// let buf = permute(x.view(), row_to_token.view()).unwrap();
/// assert_eq!(buf, array![[5.0, 6.0], [1.0, 2.0], [0.0, 0.0], [1.0, 2.0]]);
/// ```
pub fn permute<T: RouterFloat>(
    x: ArrayView2<T>,
    row_to_token: ArrayView1<i32>,
) -> Result<Array2<T>> {
    let op = OP_PERMUTE;
    let (num_tokens, hidden) = x.dim();
    let xs = as_rows(op, "x", &x)?;
    let rtt = as_vec(op, "row_to_token", &row_to_token)?;
    let num_rows = rtt.len();
    let s = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k: 0,
    };
    validate_permute(&s, xs.len(), num_rows, out_len(op, num_rows, hidden)?)?;
    check_row_to_token(op, rtt, num_tokens)?;
    let mut out = alloc2(op, rtt.len(), hidden, T::default())?;
    cpu::permute::permute(xs, hidden, rtt, out_slice(op, "out", &mut out)?);
    Ok(out)
}

/// Backward of [`permute`], flat-slice form:
/// `grad_x[t] = Σ_j grad_buf[row[t, j]]` over the `j` with `row[t, j] >= 0`, summed in
/// `f32` in `j` order and rounded once; a token with no kept assignment gets zeros.
///
/// Shapes ([`PermuteSizes`]): `grad_buf [num_rows, hidden]`, `row [num_tokens, k]`,
/// `grad_x [num_tokens, hidden]`.
///
/// # Errors
/// [`Error::Overflow`] if `num_rows` or `num_tokens * k` exceeds `i32::MAX`;
/// [`Error::Shape`] if a buffer length does not match its shape;
/// [`Error::InvalidArgument`] if an entry of `row` is outside `[-1, num_rows)` or a
/// row appears twice. `grad_x` is untouched on error.
pub fn permute_backward_into<T: RouterFloat>(
    sizes: PermuteSizes,
    grad_buf: &[T],
    row: &[i32],
    grad_x: &mut [T],
) -> Result<()> {
    validate_permute_backward(&sizes, grad_buf.len(), row.len(), grad_x.len())?;
    check_row_entries(OP_PERMUTE_BACKWARD, row, sizes.k, sizes.num_rows)?;
    cpu::permute::permute_backward(grad_buf, sizes.hidden, row, sizes.k, grad_x);
    Ok(())
}

/// Backward of [`permute`]: `grad_x[t] = Σ_j grad_buf[row[t, j]]` over the kept `j`
/// (`row[t, j] >= 0`), summed in `f32` in `j` order and rounded once.
///
/// Shapes: `grad_buf [num_rows, hidden]`, `row [num_tokens, k]`; returns
/// `grad_x [num_tokens, hidden]`.
///
/// # Errors
/// [`Error::Layout`] for a non-contiguous argument; [`Error::InvalidArgument`] if an
/// entry of `row` is outside `[-1, num_rows)` or repeated; [`Error::Overflow`] if
/// `num_rows` or `num_tokens * k` exceeds `i32::MAX`.
///
/// ```
/// use moe_router::permute_backward;
/// use ndarray::array;
///
/// let grad_buf = array![[1.0f32], [10.0], [100.0]];
/// let row = array![[2, 0], [-1, -1], [1, -1]];
/// let grad_x = permute_backward(grad_buf.view(), row.view()).unwrap();
/// assert_eq!(grad_x, array![[101.0], [0.0], [10.0]]);
/// ```
pub fn permute_backward<T: RouterFloat>(
    grad_buf: ArrayView2<T>,
    row: ArrayView2<i32>,
) -> Result<Array2<T>> {
    let op = OP_PERMUTE_BACKWARD;
    let (num_rows, hidden) = grad_buf.dim();
    let (num_tokens, k) = row.dim();
    let gb = as_rows(op, "grad_buf", &grad_buf)?;
    let rs = as_rows(op, "row", &row)?;
    let s = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k,
    };
    validate_permute_backward(&s, gb.len(), rs.len(), out_len(op, num_tokens, hidden)?)?;
    check_row_entries(op, rs, k, num_rows)?;
    let mut grad_x = alloc2(op, num_tokens, hidden, T::default())?;
    cpu::permute::permute_backward(gb, hidden, rs, k, out_slice(op, "grad_x", &mut grad_x)?);
    Ok(grad_x)
}

/// Weighted combine, flat-slice form of [`unpermute`]:
/// `out[t] = Σ_j weights[t, j] · y[row[t, j]]` over the `j` with `row[t, j] >= 0`,
/// accumulated in `f32` in `j` order and rounded once; a token with no kept assignment
/// gets zeros.
///
/// Shapes ([`PermuteSizes`]): `y [num_rows, hidden]`, `row [num_tokens, k]`,
/// `weights [num_tokens, k]`, `out [num_tokens, hidden]`.
///
/// # Errors
/// As [`permute_backward_into`] for `y`, `row` and `out`, plus [`Error::Shape`] if
/// `weights` is not `[num_tokens, k]`; `out` is untouched on error.
pub fn unpermute_into<T: RouterFloat>(
    sizes: PermuteSizes,
    y: &[T],
    row: &[i32],
    weights: &[f32],
    out: &mut [T],
) -> Result<()> {
    validate_unpermute(&sizes, y.len(), row.len(), weights.len(), out.len())?;
    check_row_entries(OP_UNPERMUTE, row, sizes.k, sizes.num_rows)?;
    cpu::permute::unpermute(y, sizes.hidden, row, weights, sizes.k, out);
    Ok(())
}

/// Weighted combine of the expert outputs back into token order:
/// `out[t] = Σ_j weights[t, j] · y[row[t, j]]` over the kept `j` (`row[t, j] >= 0`),
/// accumulated in `f32` in `j` order and rounded once. A token with no kept assignment
/// gets zeros (the caller adds the residual). Weights of dropped assignments are
/// ignored.
///
/// Shapes: `y [num_rows, hidden]`, `row [num_tokens, k]`, `weights [num_tokens, k]`;
/// returns `out [num_tokens, hidden]`.
///
/// # Errors
/// [`Error::Layout`] for a non-contiguous argument; [`Error::Shape`] if `weights` is
/// not the shape of `row`; [`Error::InvalidArgument`] if an entry of `row` is outside
/// `[-1, num_rows)` or repeated; [`Error::Overflow`] if `num_rows` or `num_tokens * k`
/// exceeds `i32::MAX`.
///
/// ```
/// use moe_router::unpermute;
/// use ndarray::array;
///
/// let y = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
/// let row = array![[1, 0], [-1, 2], [-1, -1]];
/// let weights = array![[0.5f32, 0.25], [9.0, 2.0], [1.0, 1.0]];
/// let out = unpermute(y.view(), row.view(), weights.view()).unwrap();
/// assert_eq!(out, array![[1.75, 2.5], [10.0, 12.0], [0.0, 0.0]]);
/// ```
pub fn unpermute<T: RouterFloat>(
    y: ArrayView2<T>,
    row: ArrayView2<i32>,
    weights: ArrayView2<f32>,
) -> Result<Array2<T>> {
    let op = OP_UNPERMUTE;
    let (num_rows, hidden) = y.dim();
    let (num_tokens, k) = row.dim();
    let ys = as_rows(op, "y", &y)?;
    let rs = as_rows(op, "row", &row)?;
    let ws = weights_rows(op, &weights, num_tokens, k)?;
    let s = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k,
    };
    let out_n = out_len(op, num_tokens, hidden)?;
    validate_unpermute(&s, ys.len(), rs.len(), ws.len(), out_n)?;
    check_row_entries(op, rs, k, num_rows)?;
    let mut out = alloc2(op, num_tokens, hidden, T::default())?;
    cpu::permute::unpermute(ys, hidden, rs, ws, k, out_slice(op, "out", &mut out)?);
    Ok(out)
}

/// `weights` as a slice, checking its 2-D shape equals `row`'s.
fn weights_rows<'a>(
    op: &'static str,
    weights: &ArrayView2<'a, f32>,
    num_tokens: usize,
    k: usize,
) -> Result<&'a [f32]> {
    if weights.dim() != (num_tokens, k) {
        let (a, b) = weights.dim();
        return Err(Error::shape(
            op,
            "weights",
            format!("[num_tokens, k] = [{num_tokens}, {k}] (the shape of `row`)"),
            format!("[{a}, {b}]"),
        ));
    }
    as_rows(op, "weights", weights)
}

/// Gradients of [`unpermute`].
#[derive(Debug, Clone, PartialEq)]
pub struct UnpermuteGrads<T> {
    /// `[num_rows, hidden]`: `grad_y[row[t, j]] = weights[t, j] · grad_out[t]`; zero rows
    /// where no assignment points.
    pub grad_y: Array2<T>,
    /// `[num_tokens, k]`: `<grad_out[t], y[row[t, j]]>` in `f32`; zero where
    /// `row[t, j] = -1`.
    pub grad_weights: Array2<f32>,
}

/// Caller-owned outputs of [`unpermute_backward_into`].
#[derive(Debug)]
pub struct UnpermuteBackwardBuffers<'a, T> {
    /// `[num_rows, hidden]`: `grad_y[row[t, j]] = weights[t, j] · grad_out[t]`; zero
    /// rows where no assignment points.
    pub grad_y: &'a mut [T],
    /// `[num_tokens, k]`: `<grad_out[t], y[row[t, j]]>` in `f32`; zero where
    /// `row[t, j] = -1`.
    pub grad_weights: &'a mut [f32],
}

/// Backward of [`unpermute`], flat-slice form: `grad_y[row[t, j]] = weights[t, j] ·
/// grad_out[t]` (computed in `f32`, rounded once; rows no assignment points to get
/// zeros) and `grad_weights[t, j] = <grad_out[t], y[row[t, j]]>` in `f32` (zero where
/// `row[t, j] = -1`).
///
/// Shapes ([`PermuteSizes`]): `grad_out [num_tokens, hidden]`, `y [num_rows, hidden]`,
/// `row [num_tokens, k]`, `weights [num_tokens, k]`, `out.grad_y [num_rows, hidden]`,
/// `out.grad_weights [num_tokens, k]`.
///
/// The dot product runs over `hidden` in 32 interleaved `f32` partial sums combined in a
/// fixed order (deterministic, independent of threads).
///
/// # Errors
/// As [`unpermute_into`], plus [`Error::Shape`] for `grad_out`, `out.grad_y` or
/// `out.grad_weights` of the wrong length; the outputs are untouched on error.
pub fn unpermute_backward_into<T: RouterFloat>(
    sizes: PermuteSizes,
    grad_out: &[T],
    y: &[T],
    row: &[i32],
    weights: &[f32],
    out: UnpermuteBackwardBuffers<'_, T>,
) -> Result<()> {
    validate_unpermute_backward(
        &sizes,
        grad_out.len(),
        y.len(),
        row.len(),
        weights.len(),
        out.grad_y.len(),
        out.grad_weights.len(),
    )?;
    check_row_entries(OP_UNPERMUTE_BACKWARD, row, sizes.k, sizes.num_rows)?;
    cpu::permute::unpermute_backward(grad_out, y, sizes.hidden, row, weights, sizes.k, out);
    Ok(())
}

/// Backward of [`unpermute`]: returns `grad_y [num_rows, hidden]` with
/// `grad_y[row[t, j]] = weights[t, j] · grad_out[t]` (zero rows where no assignment
/// points) and `grad_weights [num_tokens, k]` with
/// `grad_weights[t, j] = <grad_out[t], y[row[t, j]]>` in `f32` (zero where
/// `row[t, j] = -1`).
///
/// Shapes: `grad_out [num_tokens, hidden]`, `y [num_rows, hidden]`,
/// `row [num_tokens, k]`, `weights [num_tokens, k]`.
///
/// # Errors
/// As [`unpermute`], plus [`Error::Shape`] if `grad_out` is not
/// `[num_tokens, hidden]`.
///
/// ```
/// use moe_router::unpermute_backward;
/// use ndarray::array;
///
/// let y = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
/// let row = array![[1, 0], [-1, -1]];
/// let weights = array![[0.5f32, 2.0], [1.0, 1.0]];
/// let grad_out = array![[1.0f32, 1.0], [7.0, 7.0]];
/// let g = unpermute_backward(grad_out.view(), y.view(), row.view(), weights.view()).unwrap();
/// assert_eq!(g.grad_y, array![[2.0, 2.0], [0.5, 0.5], [0.0, 0.0]]);
/// assert_eq!(g.grad_weights, array![[7.0, 3.0], [0.0, 0.0]]);
/// ```
pub fn unpermute_backward<T: RouterFloat>(
    grad_out: ArrayView2<T>,
    y: ArrayView2<T>,
    row: ArrayView2<i32>,
    weights: ArrayView2<f32>,
) -> Result<UnpermuteGrads<T>> {
    let op = OP_UNPERMUTE_BACKWARD;
    let (num_rows, hidden) = y.dim();
    let (num_tokens, k) = row.dim();
    if grad_out.dim() != (num_tokens, hidden) {
        let (a, b) = grad_out.dim();
        return Err(Error::shape(
            op,
            "grad_out",
            format!(
                "[num_tokens, hidden] = [{num_tokens}, {hidden}] (rows of `row`, columns of `y`)"
            ),
            format!("[{a}, {b}]"),
        ));
    }
    let gos = as_rows(op, "grad_out", &grad_out)?;
    let ys = as_rows(op, "y", &y)?;
    let rs = as_rows(op, "row", &row)?;
    let ws = weights_rows(op, &weights, num_tokens, k)?;
    let s = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k,
    };
    validate_unpermute_backward(
        &s,
        gos.len(),
        ys.len(),
        rs.len(),
        ws.len(),
        ys.len(),
        ws.len(),
    )?;
    check_row_entries(op, rs, k, num_rows)?;
    let mut grad_y = alloc2(op, num_rows, hidden, T::default())?;
    let mut grad_weights = alloc2(op, num_tokens, k, 0.0f32)?;
    let out = UnpermuteBackwardBuffers {
        grad_y: out_slice(op, "grad_y", &mut grad_y)?,
        grad_weights: out_slice(op, "grad_weights", &mut grad_weights)?,
    };
    cpu::permute::unpermute_backward(gos, ys, hidden, rs, ws, k, out);
    Ok(UnpermuteGrads {
        grad_y,
        grad_weights,
    })
}

/// Check that `row_to_token [num_rows]` and `row [num_tokens, k]` describe the same
/// mapping (as [`crate::dispatch()`] produces them): every `row[t, j] >= 0` is a distinct row
/// `r` with `row_to_token[r] == t`, and every row with `row_to_token[r] >= 0` is one of
/// them. [`permute_into`] reads only `row_to_token` and its backward only `row`, so an
/// inconsistent pair would give a gradient that is not the forward's.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the first disagreement; the checks of
/// [`permute_backward_into`] for `row`.
///
/// ```
/// use moe_router::check_permute_maps;
///
/// let row = [3, 0, -1, 1]; // [num_tokens = 2, k = 2]
/// assert!(check_permute_maps(&[0, 1, -1, 0, -1], &row, 2, 2).is_ok());
/// assert!(check_permute_maps(&[0, 1, -1, 1, -1], &row, 2, 2).is_err());
/// ```
pub fn check_permute_maps(
    row_to_token: &[i32],
    row: &[i32],
    num_tokens: usize,
    k: usize,
) -> Result<()> {
    let op = OP_PERMUTE;
    let num_rows = row_to_token.len();
    let s = PermuteSizes {
        num_tokens,
        num_rows,
        hidden: 0,
        k,
    };
    check_row_sizes(op, &s, row.len())?;
    check_row_entries(op, row, k, num_rows)?;
    check_row_to_token(op, row_to_token, num_tokens)?;
    let mut referenced = 0usize;
    for (a, &r) in row.iter().enumerate() {
        if r >= 0 {
            referenced += 1;
            let t = a / k.max(1);
            let got = row_to_token[r as usize];
            if got != t as i32 {
                return Err(Error::invalid(
                    op,
                    "row",
                    format_args!("{r} at [{t}, {}]", a % k.max(1)),
                    format!(
                        "row_to_token[{r}] = {got}, not token {t}: `row` and `row_to_token` must \
                         come from the same dispatch"
                    ),
                ));
            }
        }
    }
    let used = row_to_token.iter().filter(|&&t| t >= 0).count();
    if used != referenced {
        return Err(Error::invalid(
            op,
            "row_to_token",
            format_args!("{used} rows holding a token"),
            format!(
                "`row` points to {referenced} rows: `row` and `row_to_token` must come from the \
                 same dispatch"
            ),
        ));
    }
    Ok(())
}

/// Derive `row_to_token [num_rows]` from `row [num_tokens, k]`: `row_to_token[r] = t`
/// where `row[t, j] = r`, `-1` for rows no assignment points to (padding).
///
/// # Errors
/// As [`permute_backward_into`] for `row` and `num_rows`.
///
/// ```
/// use moe_router::permute_row_to_token;
///
/// let row = [3, 0, -1, 1]; // [num_tokens = 2, k = 2]
/// assert_eq!(permute_row_to_token(&row, 2, 2, 5).unwrap(), vec![0, 1, -1, 0, -1]);
/// ```
pub fn permute_row_to_token(
    row: &[i32],
    num_tokens: usize,
    k: usize,
    num_rows: usize,
) -> Result<Vec<i32>> {
    let op = OP_ROW_TO_TOKEN;
    let s = PermuteSizes {
        num_tokens,
        num_rows,
        hidden: 0,
        k,
    };
    check_row_sizes(op, &s, row.len())?;
    check_row_entries(op, row, k, num_rows)?;
    let mut out = vec![-1i32; num_rows];
    if k == 0 {
        return Ok(out);
    }
    for (t, rr) in row.chunks(k).enumerate() {
        for &r in rr {
            if let Some(o) = usize::try_from(r).ok().and_then(|r| out.get_mut(r)) {
                // num_tokens * k fits i32 (checked), so t does.
                *o = t as i32;
            }
        }
    }
    Ok(out)
}
