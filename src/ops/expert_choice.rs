//! Expert-choice routing (Zhou et al., 2022): each expert picks its `capacity` best
//! tokens, so every expert is exactly full and a token may get 0..E experts.

use crate::dtype::RouterFloat;
use crate::error::{Error, Result};
use crate::ops::{as_rows, check_len, checked_i32_product, lens_struct, MAX_I32_INDEX};
use ndarray::{Array1, Array2, ArrayView2};

const OP: &str = "expert_choice";

/// Outputs of [`expert_choice`]. The row layout is pad-to-capacity: expert `e`
/// owns rows `e * capacity .. (e + 1) * capacity`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertChoiceOutput {
    /// `[num_tokens, num_experts]`: `p = softmax(z)[t, e]` if expert `e` chose token
    /// `t`, else 0.
    pub weights: Array2<f32>,
    /// `[num_tokens, num_experts]`: row of `(t, e)` in the expert-major buffer, or
    /// `-1` if `e` did not choose `t`.
    pub row: Array2<i32>,
    /// `[num_experts * capacity]`: token of each row; `-1` for the unused rows of an
    /// expert when `num_tokens < capacity`.
    pub row_to_token: Array1<i32>,
    /// `[num_experts * capacity]`: `p` of each row's `(token, expert)`, 0 if unused.
    pub row_weights: Array1<f32>,
    /// `[num_experts]`: tokens each expert took, `min(capacity, num_tokens)`.
    pub tokens_per_expert: Array1<i32>,
    /// `[num_experts + 1]`: `e * capacity`.
    pub expert_offsets: Array1<i32>,
}

/// Caller-owned outputs of [`expert_choice_into`] (flat, row-major); shapes as in
/// [`ExpertChoiceOutput`].
#[derive(Debug)]
pub struct ExpertChoiceBuffers<'a> {
    /// `[num_tokens, num_experts]`.
    pub weights: &'a mut [f32],
    /// `[num_tokens, num_experts]`.
    pub row: &'a mut [i32],
    /// `[num_experts * capacity]`.
    pub row_to_token: &'a mut [i32],
    /// `[num_experts * capacity]`.
    pub row_weights: &'a mut [f32],
    /// `[num_experts]`.
    pub tokens_per_expert: &'a mut [i32],
    /// `[num_experts + 1]`.
    pub expert_offsets: &'a mut [i32],
}

/// Sizes shared by forward and backward: `E >= 1`, `T <= i32::MAX`, `T * E` fits
/// `usize`; returns `T * E`.
fn validate_sizes(num_tokens: usize, num_experts: usize) -> Result<usize> {
    if num_experts == 0 || num_experts > MAX_I32_INDEX {
        return Err(Error::invalid(
            OP,
            "num_experts",
            num_experts,
            format!("the number of experts must be in [1, {MAX_I32_INDEX}]"),
        ));
    }
    if num_tokens > MAX_I32_INDEX {
        return Err(Error::Overflow {
            op: OP,
            what: "num_tokens",
            value: num_tokens as u128,
            max: i32::MAX as i64,
        });
    }
    num_tokens.checked_mul(num_experts).ok_or(Error::Overflow {
        op: OP,
        what: "num_tokens * num_experts",
        value: num_tokens as u128 * num_experts as u128,
        max: i64::MAX,
    })
}

lens_struct!(
    /// Element counts of the buffers of an expert-choice forward (every backend).
    ExpertChoiceLens: logits weights row row_to_token row_weights tokens_per_expert expert_offsets
);

/// The [`ExpertChoiceLens`] of `logits` and the outputs in `out` (a struct with the
/// fields of [`ExpertChoiceBuffers`]: host slices or device views).
macro_rules! expert_choice_lens {
    ($logits:expr, $out:expr) => {
        $crate::ops::lens_of!($crate::ops::expert_choice::ExpertChoiceLens { logits: $logits }; $out => weights row row_to_token row_weights tokens_per_expert expert_offsets)
    };
}
#[cfg_attr(not(feature = "cuda"), allow(unused_imports))] // used by the CUDA wrappers
pub(crate) use expert_choice_lens;

/// The single validation of the expert-choice forward (every backend): the sizes and
/// every buffer's length. Returns `(T * E, E * capacity)`.
pub(crate) fn validate_expert_choice(
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
    lens: ExpertChoiceLens,
) -> Result<(usize, usize)> {
    let te = validate_sizes(num_tokens, num_experts)?;
    let rows = checked_i32_product(OP, "num_experts * capacity", num_experts, capacity)?;
    let shape = format!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]");
    check_len(OP, "logits", lens.logits, te, &shape)?;
    check_len(OP, "weights", lens.weights, te, &shape)?;
    check_len(OP, "row", lens.row, te, &shape)?;
    let rshape = format!("[num_experts * capacity] = [{rows}]");
    check_len(OP, "row_to_token", lens.row_to_token, rows, &rshape)?;
    check_len(OP, "row_weights", lens.row_weights, rows, &rshape)?;
    check_len(
        OP,
        "tokens_per_expert",
        lens.tokens_per_expert,
        num_experts,
        format_args!("[num_experts] = [{num_experts}]"),
    )?;
    check_len(
        OP,
        "expert_offsets",
        lens.expert_offsets,
        num_experts + 1,
        format_args!("[num_experts + 1] = [{}]", num_experts + 1),
    )?;
    Ok((te, rows))
}

lens_struct!(
    /// Element counts of the buffers of an expert-choice backward (every backend).
    ExpertChoiceBackwardLens: logits row grad_weights grad_logits
);

/// The [`ExpertChoiceBackwardLens`] of the backward's buffers (host slices or device
/// views).
macro_rules! expert_choice_backward_lens {
    ($logits:expr, $row:expr, $grad_weights:expr, $grad_logits:expr) => {
        $crate::ops::lens_of!($crate::ops::expert_choice::ExpertChoiceBackwardLens {
            logits: $logits,
            row: $row,
            grad_weights: $grad_weights,
            grad_logits: $grad_logits
        })
    };
}
#[cfg_attr(not(feature = "cuda"), allow(unused_imports))] // used by the CUDA wrappers
pub(crate) use expert_choice_backward_lens;

/// The single validation of the expert-choice backward (every backend): the sizes
/// and every buffer `[num_tokens, num_experts]`; returns `T * E`. The values of
/// `row` (`>= -1`) are checked where the host can read them
/// ([`expert_choice_backward_into`]).
pub(crate) fn validate_expert_choice_backward(
    num_tokens: usize,
    num_experts: usize,
    lens: ExpertChoiceBackwardLens,
) -> Result<usize> {
    let te = validate_sizes(num_tokens, num_experts)?;
    let shape = format!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]");
    check_len(OP, "logits", lens.logits, te, &shape)?;
    check_len(OP, "row", lens.row, te, &shape)?;
    check_len(OP, "grad_weights", lens.grad_weights, te, &shape)?;
    check_len(OP, "grad_logits", lens.grad_logits, te, &shape)?;
    Ok(te)
}

/// The number of rows `num_experts * capacity` of [`expert_choice`]'s row buffers
/// (`row_to_token`, `row_weights`), after every check of the sizes: call it before
/// allocating the buffers of [`expert_choice_into`], so that bad sizes are an error
/// rather than a large allocation first.
///
/// The rows are `E * capacity` even when `capacity > num_tokens` (an expert then
/// takes every token and its other rows are unused): the layout is pad-to-capacity,
/// fixed by the arguments, not by the data. Pass `min(capacity, num_tokens)` when
/// fixed shapes are not needed.
///
/// # Errors
/// As [`expert_choice`]: [`Error::InvalidArgument`] if `num_experts` is 0 or above
/// `i32::MAX`; [`Error::Overflow`] if `num_tokens` or `num_experts * capacity` exceed
/// `i32::MAX`.
///
/// ```
/// use moe_router::expert_choice_num_rows;
///
/// assert_eq!(expert_choice_num_rows(4, 8, 3).unwrap(), 24);
/// assert!(expert_choice_num_rows(4, 8, 1 << 28).is_err()); // 2^31 rows: nothing allocated
/// ```
pub fn expert_choice_num_rows(
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
) -> Result<usize> {
    validate_sizes(num_tokens, num_experts)?;
    checked_i32_product(OP, "num_experts * capacity", num_experts, capacity)
}

/// [`expert_choice`] over flat row-major slices into caller-owned buffers.
///
/// `logits` is `[num_tokens, num_experts]`; every buffer of `out` must have exactly
/// the length [`ExpertChoiceBuffers`] gives.
///
/// # Errors
/// As [`expert_choice`], plus [`Error::Shape`] for any slice of the wrong length.
pub fn expert_choice_into<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
    out: ExpertChoiceBuffers<'_>,
) -> Result<()> {
    let lens = expert_choice_lens!(logits, out);
    validate_expert_choice(num_tokens, num_experts, capacity, lens)?;
    crate::cpu::expert_choice::expert_choice(logits, num_tokens, num_experts, capacity, out);
    Ok(())
}

/// Expert-choice routing: every expert takes its `capacity` best tokens.
///
/// `p = softmax(z)` over the `E` experts of each token (in `f32`). Expert `e` takes
/// the `capacity` tokens with the largest `p[t, e]`, ties to the lower token index
/// (key `(-p, t)`; a NaN `p` ranks last), and stores them in token order in its rows
/// `e * capacity ..`. A token may be taken by 0..E experts. `capacity = 0` is valid
/// (no rows); with `capacity > num_tokens` each expert takes every token and its
/// remaining rows are unused (`row_to_token = -1`, `row_weights = 0`).
///
/// Memory: the outputs (`2 * T * E + 2 * E * capacity` words, the row buffers sized
/// by `capacity` even beyond `num_tokens`, see [`expert_choice_num_rows`]) plus
/// `O(T)` working memory per thread; no `[E, capacity]`-sized scratch.
///
/// # Errors
/// - [`Error::InvalidArgument`]: `num_experts == 0`;
/// - [`Error::Layout`]: non-contiguous `logits`;
/// - [`Error::Overflow`]: `num_experts * capacity` rows or `num_tokens` exceed
///   `i32::MAX`.
///
/// # Examples
/// ```
/// use moe_router::expert_choice;
/// use ndarray::array;
///
/// // 3 tokens, 2 experts, each expert takes 1 token.
/// let logits = array![[2.0f32, 0.0], [0.0, 1.0], [0.0, 3.0]];
/// let out = expert_choice(logits.view(), 1).unwrap();
/// assert_eq!(out.row_to_token.to_vec(), vec![0, 2]);
/// assert_eq!(out.row.column(0).to_vec(), vec![0, -1, -1]);
/// assert_eq!(out.row.column(1).to_vec(), vec![-1, -1, 1]);
/// assert_eq!(out.weights[[1, 0]], 0.0); // token 1 was not chosen
/// ```
pub fn expert_choice<T: RouterFloat>(
    logits: ArrayView2<T>,
    capacity: usize,
) -> Result<ExpertChoiceOutput> {
    let (num_tokens, num_experts) = logits.dim();
    // Every check before the outputs are allocated (the row buffers are sized by
    // `capacity`, not by the input).
    let rows = expert_choice_num_rows(num_tokens, num_experts, capacity)?;
    let z = as_rows(OP, "logits", &logits)?;
    let mut out = ExpertChoiceOutput {
        weights: Array2::zeros((num_tokens, num_experts)),
        row: Array2::zeros((num_tokens, num_experts)),
        row_to_token: Array1::zeros(rows),
        row_weights: Array1::zeros(rows),
        tokens_per_expert: Array1::zeros(num_experts),
        expert_offsets: Array1::zeros(num_experts + 1),
    };
    expert_choice_into(
        z,
        num_tokens,
        num_experts,
        capacity,
        ExpertChoiceBuffers {
            weights: out.weights.as_slice_mut().unwrap_or_default(),
            row: out.row.as_slice_mut().unwrap_or_default(),
            row_to_token: out.row_to_token.as_slice_mut().unwrap_or_default(),
            row_weights: out.row_weights.as_slice_mut().unwrap_or_default(),
            tokens_per_expert: out.tokens_per_expert.as_slice_mut().unwrap_or_default(),
            expert_offsets: out.expert_offsets.as_slice_mut().unwrap_or_default(),
        },
    )?;
    Ok(out)
}

/// [`expert_choice_backward`] over flat row-major slices.
///
/// `logits`, `row`, `grad_weights` and `grad_logits` are all
/// `[num_tokens, num_experts]`.
///
/// # Errors
/// As [`expert_choice_backward`], plus [`Error::Shape`] for any slice of the wrong
/// length.
pub fn expert_choice_backward_into<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    row: &[i32],
    grad_weights: &[f32],
    grad_logits: &mut [T],
) -> Result<()> {
    let lens = expert_choice_backward_lens!(logits, row, grad_weights, grad_logits);
    validate_expert_choice_backward(num_tokens, num_experts, lens)?;
    if let Some((i, &r)) = row.iter().enumerate().find(|(_, &r)| r < -1) {
        return Err(Error::invalid(
            OP,
            "row",
            format_args!(
                "{r} at token {}, expert {}",
                i / num_experts,
                i % num_experts
            ),
            "rows must be -1 (not chosen) or a row index >= 0, as returned by expert_choice",
        ));
    }
    crate::cpu::expert_choice::expert_choice_backward(
        logits,
        num_tokens,
        num_experts,
        row,
        grad_weights,
        grad_logits,
    );
    Ok(())
}

/// Gradient of [`expert_choice`]'s `weights` with respect to the logits.
///
/// Only chosen `(t, e)` (`row >= 0`) carry gradient: with `g = grad_weights` masked
/// by `row >= 0` and `p_t = softmax(z_t)`,
/// `grad_logits[t] = p_t ⊙ (g_t − <g_t, p_t>)` (in `f32`, cast on store). Selection
/// has no gradient.
///
/// `logits`, `row` (from the forward) and `grad_weights` are
/// `[num_tokens, num_experts]`.
///
/// # Errors
/// - [`Error::InvalidArgument`]: `num_experts == 0`, a `row` entry below `-1`;
/// - [`Error::Shape`]: `row` or `grad_weights` not of the shape of `logits`;
/// - [`Error::Layout`]: a non-contiguous input.
///
/// # Examples
/// ```
/// use moe_router::{expert_choice, expert_choice_backward};
/// use ndarray::{array, Array2};
///
/// let logits = array![[0.0f32, 0.0], [0.0, 0.0]];
/// let out = expert_choice(logits.view(), 1).unwrap(); // both experts take token 0
/// let g = Array2::<f32>::ones((2, 2));
/// let gz = expert_choice_backward(logits.view(), out.row.view(), g.view()).unwrap();
/// // token 0: p = [0.5, 0.5], g = [1, 1]: p * (g - <g, p>) = 0; token 1 unchosen.
/// assert_eq!(gz, Array2::<f32>::zeros((2, 2)));
/// ```
pub fn expert_choice_backward<T: RouterFloat>(
    logits: ArrayView2<T>,
    row: ArrayView2<i32>,
    grad_weights: ArrayView2<f32>,
) -> Result<Array2<T>> {
    let (num_tokens, num_experts) = logits.dim();
    validate_sizes(num_tokens, num_experts)?;
    let expected = format!(
        "[num_tokens, num_experts] = [{num_tokens}, {num_experts}] (the shape of `logits`)"
    );
    if row.dim() != logits.dim() {
        return Err(Error::shape(
            OP,
            "row",
            expected,
            format!("{:?}", row.shape()),
        ));
    }
    if grad_weights.dim() != logits.dim() {
        return Err(Error::shape(
            OP,
            "grad_weights",
            expected,
            format!("{:?}", grad_weights.shape()),
        ));
    }
    let z = as_rows(OP, "logits", &logits)?;
    let r = as_rows(OP, "row", &row)?;
    let g = as_rows(OP, "grad_weights", &grad_weights)?;
    let mut grad = Array2::<T>::default((num_tokens, num_experts));
    expert_choice_backward_into(
        z,
        num_tokens,
        num_experts,
        r,
        g,
        grad.as_slice_mut().unwrap_or_default(),
    )?;
    Ok(grad)
}
