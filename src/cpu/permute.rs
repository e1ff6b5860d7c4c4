//! CPU reference for permute / unpermute and their backward passes.
//!
//! Arguments are assumed validated by [`crate::ops::permute`]; on unvalidated input
//! these functions still never panic or write out of bounds (a row or token index that
//! is out of range is treated as not routed), they just compute something meaningless.
//!
//! Work is split into blocks of whole rows / tokens (about [`TASK_ELEMS`] elements
//! touched per rayon task), each task with its own `f32` scratch of `hidden` floats.
//! Every output row depends on its own inputs only, so the result does not depend on
//! the number of threads or on the block size.
//!
//! Element types: `f16` slices are widened / narrowed with `half`'s slice conversions
//! (F16C when the CPU has it); `bf16` with branch-free bit operations that give the
//! same bits as `half::bf16::{to_f32, from_f32}` and that the compiler vectorises.

use crate::cpu::CHUNK;
use crate::dtype::{DType, RouterFloat};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Elements read or written per rayon task, roughly: enough to amortise the task
/// overhead, small enough to balance 2..64 threads on 10^4-token batches.
pub const TASK_ELEMS: usize = 1 << 18;

/// Rows (or tokens) per task when each touches `row_elems` elements.
#[inline]
fn rows_per_task(row_elems: usize) -> usize {
    (TASK_ELEMS / row_elems.max(1)).clamp(1, CHUNK)
}

/// `bf16` bits to `f32`, bit-identical to `half::bf16::to_f32` (quiets NaNs).
#[inline(always)]
pub fn bf16_bits_to_f32(u: u16) -> f32 {
    let nan = (u & 0x7FFF) > 0x7F80;
    let u = if nan { u | 0x0040 } else { u };
    f32::from_bits((u as u32) << 16)
}

/// `f32` to `bf16` bits, round to nearest even, bit-identical to
/// `half::bf16::from_f32` (NaNs keep their high payload and become quiet).
#[inline(always)]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
    let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
    let quiet = ((x >> 16) | 0x0040) as u16;
    if nan {
        quiet
    } else {
        rounded
    }
}

/// Widen `src` to `f32` into `dst` (the common prefix if lengths differ).
#[inline]
pub fn load_f32<T: RouterFloat>(src: &[T], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    match T::DTYPE {
        DType::F32 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, f32>(src) {
                dst.copy_from_slice(s);
                return;
            }
        }
        DType::F16 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, f16>(src) {
                s.convert_to_f32_slice(dst);
                return;
            }
        }
        DType::BF16 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, u16>(src) {
                for (d, &u) in dst.iter_mut().zip(s) {
                    *d = bf16_bits_to_f32(u);
                }
                return;
            }
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Round `src` to `T` into `dst` (the common prefix if lengths differ).
#[inline]
pub fn store_f32<T: RouterFloat>(src: &[f32], dst: &mut [T]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    match T::DTYPE {
        DType::F32 => {
            if let Ok(d) = bytemuck::try_cast_slice_mut::<T, f32>(dst) {
                d.copy_from_slice(src);
                return;
            }
        }
        DType::F16 => {
            if let Ok(d) = bytemuck::try_cast_slice_mut::<T, f16>(dst) {
                d.convert_from_f32_slice(src);
                return;
            }
        }
        DType::BF16 => {
            if let Ok(d) = bytemuck::try_cast_slice_mut::<T, u16>(dst) {
                for (o, &v) in d.iter_mut().zip(src) {
                    *o = f32_to_bf16_bits(v);
                }
                return;
            }
        }
    }
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = T::from_f32(v);
    }
}

/// `src` as `f32`: the slice itself for `f32`, otherwise widened into `tmp`.
#[inline]
fn as_f32<'a, T: RouterFloat>(src: &'a [T], tmp: &'a mut [f32]) -> &'a [f32] {
    if T::DTYPE == DType::F32 {
        if let Ok(s) = bytemuck::try_cast_slice::<T, f32>(src) {
            return s;
        }
    }
    let n = src.len().min(tmp.len());
    load_f32(src, tmp);
    &tmp[..n]
}

/// `acc[i] += w * y[i]` in `f32`, with `y` widened from `T`. `bf16` is widened in the
/// same loop; `f16` through `tmp`.
#[inline]
fn axpy<T: RouterFloat>(acc: &mut [f32], w: f32, y: &[T], tmp: &mut [f32]) {
    if T::DTYPE == DType::BF16 {
        if let Ok(s) = bytemuck::try_cast_slice::<T, u16>(y) {
            for (a, &u) in acc.iter_mut().zip(s) {
                *a += w * bf16_bits_to_f32(u);
            }
            return;
        }
    }
    let y = as_f32(y, tmp);
    for (a, &v) in acc.iter_mut().zip(y) {
        *a += w * v;
    }
}

/// `dst[i] = T(w * g[i])`, the product in `f32` and rounded once (`tmp` holds the
/// products for `f16` / `bf16`).
#[inline]
fn scale_store<T: RouterFloat>(w: f32, g: &[f32], dst: &mut [T], tmp: &mut [f32]) {
    if T::DTYPE == DType::F32 {
        if let Ok(d) = bytemuck::try_cast_slice_mut::<T, f32>(dst) {
            for (o, &v) in d.iter_mut().zip(g) {
                *o = w * v;
            }
            return;
        }
    }
    for (o, &v) in tmp.iter_mut().zip(g) {
        *o = w * v;
    }
    let n = g.len().min(tmp.len());
    store_f32(&tmp[..n], dst);
}

/// `<a, b>` in `f32`: 8 interleaved partial sums (lane `l` takes the indices
/// `i ≡ l mod 8` of the full blocks of 8, in order), combined as
/// `((s0+s4)+(s1+s5)) + ((s2+s6)+(s3+s7))`, plus the tail summed in order. A fixed
/// order that vectorises.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut s = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            s[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (&x, &y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail
}

/// Row `i` (an `i32` index, `-1` or out of range gives `None`) of a `[_, hidden]` buffer.
#[inline]
fn row_of<T>(buf: &[T], i: i32, hidden: usize) -> Option<&[T]> {
    let i = usize::try_from(i).ok()?;
    let start = i.checked_mul(hidden)?;
    buf.get(start..start.checked_add(hidden)?)
}

/// `out[r] = x[row_to_token[r]]`, zeros for padding rows (`-1`).
/// `x [num_tokens, hidden]`, `out [row_to_token.len(), hidden]`.
pub fn permute<T: RouterFloat>(x: &[T], hidden: usize, row_to_token: &[i32], out: &mut [T]) {
    if hidden == 0 {
        return;
    }
    let zero = T::from_f32(0.0);
    let rpt = rows_per_task(hidden);
    out.par_chunks_mut(rpt * hidden)
        .zip(row_to_token.par_chunks(rpt))
        .for_each(|(oc, tc)| {
            for (o, &t) in oc.chunks_mut(hidden).zip(tc) {
                match row_of(x, t, hidden) {
                    Some(src) if src.len() == o.len() => o.copy_from_slice(src),
                    _ => o.fill(zero),
                }
            }
        });
}

/// `out[t] = Σ_j w[t, j] · src[row[t, j]]` over `row >= 0`, `f32` accumulation in `j`
/// order, one rounding; `w = 1` when `weights` is `None`.
fn gather_sum<T: RouterFloat>(
    src: &[T],
    hidden: usize,
    row: &[i32],
    weights: Option<&[f32]>,
    k: usize,
    out: &mut [T],
) {
    if hidden == 0 {
        return;
    }
    if k == 0 {
        out.fill(T::from_f32(0.0));
        return;
    }
    let tpt = rows_per_task(hidden * k);
    let widened = T::DTYPE == DType::F16;
    out.par_chunks_mut(tpt * hidden)
        .zip(row.par_chunks(tpt * k))
        .enumerate()
        .for_each(|(c, (oc, rc))| {
            let mut acc = vec![0.0f32; hidden];
            let mut tmp = vec![0.0f32; if widened { hidden } else { 0 }];
            let w0 = c * tpt * k;
            for (i, (o, rr)) in oc.chunks_mut(hidden).zip(rc.chunks(k)).enumerate() {
                acc.fill(0.0);
                for (j, &r) in rr.iter().enumerate() {
                    let Some(yr) = row_of(src, r, hidden) else {
                        continue;
                    };
                    let w = match weights {
                        Some(ws) => ws.get(w0 + i * k + j).copied().unwrap_or(0.0),
                        None => 1.0,
                    };
                    axpy(&mut acc, w, yr, &mut tmp);
                }
                store_f32(&acc, o);
            }
        });
}

/// `grad_x[t] = Σ_j grad_buf[row[t, j]]` over `row >= 0` (`f32` sum in `j` order, one
/// rounding). `grad_buf [num_rows, hidden]`, `row [num_tokens, k]`,
/// `grad_x [num_tokens, hidden]`.
pub fn permute_backward<T: RouterFloat>(
    grad_buf: &[T],
    hidden: usize,
    row: &[i32],
    k: usize,
    grad_x: &mut [T],
) {
    gather_sum(grad_buf, hidden, row, None, k, grad_x);
}

/// `out[t] = Σ_j weights[t, j] · y[row[t, j]]` over `row >= 0` (`f32` accumulation in
/// `j` order, one rounding; zeros if none). `y [num_rows, hidden]`,
/// `row, weights [num_tokens, k]`, `out [num_tokens, hidden]`.
pub fn unpermute<T: RouterFloat>(
    y: &[T],
    hidden: usize,
    row: &[i32],
    weights: &[f32],
    k: usize,
    out: &mut [T],
) {
    gather_sum(y, hidden, row, Some(weights), k, out);
}

/// `grad_y[row[t, j]] = weights[t, j] · grad_out[t]` (zeros for rows no assignment
/// points to) and `grad_weights[t, j] = <grad_out[t], y[row[t, j]]>` (see [`dot_f32`];
/// zero where `row < 0`). `grad_out [num_tokens, hidden]`, `y, grad_y [num_rows,
/// hidden]`, `row, weights, grad_weights [num_tokens, k]`.
///
/// Parallel over tokens: each grad_y row is handed, as a `&mut` slice, to the one
/// assignment that points to it, so grad_out is read once per token.
#[allow(clippy::too_many_arguments)]
pub fn unpermute_backward<T: RouterFloat>(
    grad_out: &[T],
    y: &[T],
    hidden: usize,
    row: &[i32],
    weights: &[f32],
    k: usize,
    grad_y: &mut [T],
    grad_weights: &mut [f32],
) {
    let zero = T::from_f32(0.0);
    if hidden == 0 || k == 0 {
        grad_y.fill(zero);
        grad_weights.fill(0.0);
        return;
    }
    let mut rows: Vec<Option<&mut [T]>> = grad_y.chunks_mut(hidden).map(Some).collect();
    let mut dst: Vec<Option<&mut [T]>> = row
        .iter()
        .map(|&r| {
            usize::try_from(r)
                .ok()
                .and_then(|r| rows.get_mut(r))
                .and_then(Option::take)
        })
        .collect();
    // Rows no assignment points to.
    rows.par_iter_mut().with_min_len(64).for_each(|r| {
        if let Some(s) = r {
            s.fill(zero);
        }
    });

    let tpt = rows_per_task(hidden * k);
    let widened = T::DTYPE != DType::F32;
    dst.par_chunks_mut(tpt * k)
        .zip(grad_out.par_chunks(tpt * hidden))
        .zip(row.par_chunks(tpt * k))
        .zip(grad_weights.par_chunks_mut(tpt * k))
        .enumerate()
        .for_each(|(c, (((dc, goc), rc), gwc))| {
            let mut g = vec![0.0f32; hidden];
            let mut tmp = vec![0.0f32; if widened { hidden } else { 0 }];
            let w0 = c * tpt * k;
            let per_token = dc
                .chunks_mut(k)
                .zip(goc.chunks(hidden))
                .zip(rc.chunks(k))
                .zip(gwc.chunks_mut(k));
            for (i, (((dt, go), rt), gwt)) in per_token.enumerate() {
                load_f32(go, &mut g);
                for (j, ((d, &r), gw)) in dt.iter_mut().zip(rt).zip(gwt.iter_mut()).enumerate() {
                    *gw = match row_of(y, r, hidden) {
                        Some(yr) => dot_f32(&g, as_f32(yr, &mut tmp)),
                        None => 0.0,
                    };
                    if let Some(d) = d.as_deref_mut() {
                        let w = weights.get(w0 + i * k + j).copied().unwrap_or(0.0);
                        scale_store(w, &g, d, &mut tmp);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn bf16_conversions_match_half() {
        for u in 0..=u16::MAX {
            let a = bf16_bits_to_f32(u);
            let b = bf16::from_bits(u).to_f32();
            assert_eq!(a.to_bits(), b.to_bits(), "bits {u:#06x}");
        }
        // Every f32 whose low 16 bits exercise the rounding cases, over a spread of
        // high halves (all signs, exponents incl. subnormal, max finite, inf, NaN).
        let lows = [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000];
        for hi in (0..=0xFFFFu32)
            .step_by(7)
            .chain([0x7F7F, 0x7F80, 0xFF7F, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF])
        {
            for &lo in &lows {
                let v = f32::from_bits((hi << 16) | lo);
                assert_eq!(
                    f32_to_bf16_bits(v),
                    bf16::from_f32(v).to_bits(),
                    "f32 bits {:#010x}",
                    v.to_bits()
                );
            }
        }
    }

    #[test]
    fn dot_order_is_fixed() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b = vec![1.0f32; 19];
        assert_eq!(dot_f32(&a, &b), (0..19).sum::<i32>() as f32);
        assert_eq!(dot_f32(&[], &[]), 0.0);
    }

    #[test]
    fn load_store_roundtrip() {
        let v = [1.5f32, -2.25, 0.0, 65504.0];
        let mut h = [f16::ZERO; 4];
        store_f32(&v, &mut h);
        let mut back = [0.0f32; 4];
        load_f32(&h, &mut back);
        assert_eq!(back, v);
        let mut b = [bf16::ZERO; 4];
        store_f32(&v[..3], &mut b[..3]);
        load_f32(&b[..3], &mut back[..3]);
        assert_eq!(back[..3], v[..3]);
    }
}
