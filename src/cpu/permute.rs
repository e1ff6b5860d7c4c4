//! CPU reference for permute / unpermute and their backward passes.
//!
//! Arguments are assumed validated by [`mod@crate::ops::permute`]; on unvalidated input
//! these functions still never panic, allocate beyond their buffers or write out of
//! bounds (a row or token index that is out of range is treated as not routed, sizes
//! that disagree with the slices use what the slices hold), they just compute
//! something meaningless. That is why this module is public: the GPU-vs-CPU tests
//! hold the kernels to it on out-of-range rows.
//!
//! Work is split into blocks of whole rows / tokens (about [`TASK_ELEMS`] elements
//! touched per rayon task). Every output row depends on its own inputs only, so the
//! result does not depend on the number of threads or on the block size.
//!
//! Sums over the assignments of a token run over `hidden` in register blocks of
//! [`BLK`] floats: for each block, `acc = 0; acc += w_j * y_j` for `j = 0..k` in order,
//! then one rounding on the store. That is the same arithmetic, in the same order, as a
//! row-at-a-time loop, without the round trips of a `hidden`-long accumulator.
//!
//! Element types: `f16` and `bf16` are read and written as their `u16` bits with
//! branch-free conversions (bit-identical to `half`'s `to_f32` / `from_f32`, checked
//! in the tests below) that the compiler vectorises; `f16` goes through `half`'s slice
//! conversions instead where the CPU converts in hardware (F16C, aarch64 FP16).

use crate::cpu::CHUNK;
use crate::dtype::{DType, RouterFloat};
use crate::ops::UnpermuteBackwardBuffers;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;

/// Elements read or written per rayon task, roughly: enough to amortise the task
/// overhead, small enough to balance 2..64 threads on 10^4-token batches.
pub const TASK_ELEMS: usize = 1 << 18;

/// Floats per register block of the accumulating loops.
pub const BLK: usize = 32;

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

/// `f16` bits to `f32`, bit-identical to `half::f16::to_f32` (quiets NaNs). Subnormals
/// go through an exact integer-to-float conversion, so no subnormal `f32` is ever an
/// operand.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    // Normal: rebias the exponent (15 -> 127).
    let normal = (em << 13) + (112 << 23);
    // Subnormal (and zero): mantissa * 2^-24, exact.
    let sub = (em as f32 * f32::from_bits((127 - 24) << 23)).to_bits();
    // Infinity / NaN (quiet bit set for NaN).
    let special = (em << 13) | 0x7F80_0000 | if em > 0x7C00 { 0x0040_0000 } else { 0 };
    let bits = if em >= 0x7C00 {
        special
    } else if em >= 0x0400 {
        normal
    } else {
        sub
    };
    f32::from_bits(sign | bits)
}

/// `f32` to `f16` bits, round to nearest even, bit-identical to `half::f16::from_f32`
/// (overflow to infinity; NaNs keep their high payload and become quiet).
#[inline(always)]
pub fn f32_to_f16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7FFF_FFFF;
    // |v| >= 2^16 (or inf / NaN): infinity, or a quiet NaN with the payload's top bits.
    let nan = a > 0x7F80_0000;
    let special = 0x7C00
        | if nan {
            0x0200 | ((a & 0x007F_FFFF) >> 13)
        } else {
            0
        };
    // Normal f16 (|v| >= 2^-14): rebias (127 -> 15) and round the 13 dropped bits to
    // nearest even; a carry into the exponent is the correct result (up to infinity).
    let normal = a
        .wrapping_sub(112 << 23)
        .wrapping_add(0x0FFF + ((a >> 13) & 1))
        >> 13;
    // Subnormal f16: adding 0.5 (ulp 2^-24, the f16 subnormal step) rounds to nearest
    // even in hardware; the low bits are then the f16 mantissa (0x400 is the smallest
    // normal, also correct).
    let sub = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3F00_0000);
    let bits = if a >= 0x4780_0000 {
        special
    } else if a >= 0x3880_0000 {
        normal
    } else {
        sub
    };
    (sign | bits) as u16
}

/// How one storage element is widened to `f32` and rounded back.
trait Codec<S: Copy>: Copy + Send + Sync {
    /// Whether converting whole slices ([`Codec::load_slice`], [`Codec::store_slice`])
    /// beats element-wise conversion in the loops (`f16` on a CPU with F16C / FP16).
    #[inline(always)]
    fn slices(self) -> bool {
        false
    }
    fn load(self, s: S) -> f32;
    fn store(self, v: f32) -> S;
    /// Widen the common prefix of `src` into `dst`.
    #[inline(always)]
    fn load_slice(self, src: &[S], dst: &mut [f32]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = self.load(v);
        }
    }
    /// Round the common prefix of `src` into `dst`.
    #[inline(always)]
    fn store_slice(self, src: &[f32], dst: &mut [S]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = self.store(v);
        }
    }
}

/// Through [`RouterFloat`] itself (`f32`, and the never-taken fallback of the others).
#[derive(Clone, Copy)]
struct Native;

impl<T: RouterFloat> Codec<T> for Native {
    #[inline(always)]
    fn load(self, s: T) -> f32 {
        s.to_f32()
    }
    #[inline(always)]
    fn store(self, v: f32) -> T {
        T::from_f32(v)
    }
}

/// `bf16` as `u16` bits.
#[derive(Clone, Copy)]
struct Bf16Bits;

impl Codec<u16> for Bf16Bits {
    /// The plain widening, without [`bf16_bits_to_f32`]'s NaN quieting: loaded values
    /// only enter arithmetic, which quiets a signalling NaN the same way, so the results
    /// have the same bits, and the loop is half as long without SSE4.1 blends.
    #[inline(always)]
    fn load(self, s: u16) -> f32 {
        f32::from_bits((s as u32) << 16)
    }
    #[inline(always)]
    fn store(self, v: f32) -> u16 {
        f32_to_bf16_bits(v)
    }
}

/// `f16` as `u16` bits: element-wise with the branch-free conversions, or through
/// `half`'s slice conversions where the CPU converts in hardware.
#[derive(Clone, Copy)]
struct F16Bits {
    hardware: bool,
}

impl F16Bits {
    fn new() -> Self {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        let hardware = std::arch::is_x86_feature_detected!("f16c");
        #[cfg(target_arch = "aarch64")]
        let hardware = std::arch::is_aarch64_feature_detected!("fp16");
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
        let hardware = false;
        F16Bits { hardware }
    }
}

impl Codec<u16> for F16Bits {
    #[inline(always)]
    fn slices(self) -> bool {
        self.hardware
    }
    #[inline(always)]
    fn load(self, s: u16) -> f32 {
        f16_bits_to_f32(s)
    }
    #[inline(always)]
    fn store(self, v: f32) -> u16 {
        f32_to_f16_bits(v)
    }
    /// `half`'s slice conversion (F16C, 8 at a time); the same bits as
    /// [`f16_bits_to_f32`].
    #[inline]
    fn load_slice(self, src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        src[..n]
            .reinterpret_cast::<f16>()
            .convert_to_f32_slice(&mut dst[..n]);
    }
    #[inline]
    fn store_slice(self, src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        dst[..n]
            .reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(&src[..n]);
    }
}

/// The `u16` bits of an `f16` / `bf16` slice (`None` for `f32`).
#[inline]
fn bits16<T: RouterFloat>(s: &[T]) -> Option<&[u16]> {
    if T::DTYPE == DType::F32 {
        return None;
    }
    bytemuck::try_cast_slice(s).ok()
}

/// The `u16` bits of an `f16` / `bf16` slice, mutably (`None` for `f32`).
#[inline]
fn bits16_mut<T: RouterFloat>(s: &mut [T]) -> Option<&mut [u16]> {
    if T::DTYPE == DType::F32 {
        return None;
    }
    bytemuck::try_cast_slice_mut(s).ok()
}

/// Row `i` (an `i32` index, `-1` or out of range gives `None`) of a `[_, hidden]` buffer.
#[inline]
fn row_of<T>(buf: &[T], i: i32, hidden: usize) -> Option<&[T]> {
    let i = usize::try_from(i).ok()?;
    let start = i.checked_mul(hidden)?;
    buf.get(start..start.checked_add(hidden)?)
}

/// `out[r] = x[row_to_token[r]]`, zeros for padding rows (`-1`); a bitwise copy.
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

/// `out = round(Σ_j w_j · y_j)` for the `(w_j, y_j)` in `kept`, accumulated in `f32`
/// in order, block by block (see the module docs).
#[inline]
fn weighted_sum_row<S: Copy, C: Codec<S>>(out: &mut [S], kept: &[(f32, &[S])], c: C) {
    let lo = out.len() - out.len() % BLK;
    let mut t = [0.0f32; BLK];
    let mut blocks = out.chunks_exact_mut(BLK);
    for (b, ob) in (&mut blocks).enumerate() {
        let lo = b * BLK;
        let mut a = [0.0f32; BLK];
        for &(w, y) in kept {
            if let Some(yb) = y
                .get(lo..lo + BLK)
                .and_then(|s| <&[S; BLK]>::try_from(s).ok())
            {
                if c.slices() {
                    c.load_slice(yb, &mut t);
                    for (ai, &v) in a.iter_mut().zip(&t) {
                        *ai += w * v;
                    }
                } else {
                    for (ai, &v) in a.iter_mut().zip(yb) {
                        *ai += w * c.load(v);
                    }
                }
            }
        }
        c.store_slice(&a, ob);
    }
    let tail = blocks.into_remainder();
    let mut a = [0.0f32; BLK];
    for &(w, y) in kept {
        if let Some(yt) = y.get(lo..) {
            let n = yt.len().min(BLK);
            c.load_slice(yt, &mut t[..n]);
            for (ai, &v) in a.iter_mut().zip(&t[..n]) {
                *ai += w * v;
            }
        }
    }
    c.store_slice(&a, tail);
}

/// `out[t] = Σ_j w[t, j] · src[row[t, j]]` over `row >= 0`, `f32` accumulation in `j`
/// order, one rounding; `w = 1` when `weights` is `None` (`1 · v == v` exactly).
fn gather_sum<S: Copy + Send + Sync, C: Codec<S>>(
    src: &[S],
    hidden: usize,
    row: &[i32],
    weights: Option<&[f32]>,
    k: usize,
    out: &mut [S],
    c: C,
) {
    if hidden == 0 {
        return;
    }
    if k == 0 {
        out.fill(c.store(0.0));
        return;
    }
    // Saturating: unvalidated sizes must not overflow (see the module docs).
    let tpt = rows_per_task(hidden.saturating_mul(k));
    out.par_chunks_mut(tpt * hidden)
        .zip(row.par_chunks(tpt * k))
        .enumerate()
        .for_each(|(ci, (oc, rc))| {
            let mut kept: Vec<(f32, &[S])> = Vec::with_capacity(k.min(rc.len()));
            let w0 = ci * tpt * k;
            for (i, (o, rr)) in oc.chunks_mut(hidden).zip(rc.chunks(k)).enumerate() {
                kept.clear();
                for (j, &r) in rr.iter().enumerate() {
                    if let Some(y) = row_of(src, r, hidden) {
                        let w = match weights {
                            Some(ws) => ws.get(w0 + i * k + j).copied().unwrap_or(0.0),
                            None => 1.0,
                        };
                        kept.push((w, y));
                    }
                }
                weighted_sum_row(o, &kept, c);
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
    if let (Some(src), Some(out)) = (bits16(grad_buf), bits16_mut(grad_x)) {
        match T::DTYPE {
            DType::BF16 => gather_sum(src, hidden, row, None, k, out, Bf16Bits),
            _ => gather_sum(src, hidden, row, None, k, out, F16Bits::new()),
        }
        return;
    }
    gather_sum(grad_buf, hidden, row, None, k, grad_x, Native);
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
    if let (Some(src), Some(o)) = (bits16(y), bits16_mut(out)) {
        match T::DTYPE {
            DType::BF16 => gather_sum(src, hidden, row, Some(weights), k, o, Bf16Bits),
            _ => gather_sum(src, hidden, row, Some(weights), k, o, F16Bits::new()),
        }
        return;
    }
    gather_sum(y, hidden, row, Some(weights), k, out, Native);
}

/// Partial sums of the `grad_weights` dot product: enough independent accumulators to
/// hide the latency of the floating-point add.
pub const DOT_LANES: usize = 32;

/// `<g, y>` in `f32` with `y` widened by `c`, in a fixed order that vectorises:
/// [`DOT_LANES`] partial sums (lane `l` takes the indices `i ≡ l (mod 32)` of the full
/// blocks of 32, in order), combined by halving (`s[l] += s[l + 16]`, then `+ 8`, `+ 4`,
/// `+ 2`, `+ 1`), then the tail (the last `len % 32` products, summed in order) added.
#[inline]
fn dot_load<S: Copy, C: Codec<S>>(g: &[f32], y: &[S], c: C) -> f32 {
    let mut s = [0.0f32; DOT_LANES];
    let cg = g.chunks_exact(DOT_LANES);
    let cy = y.chunks_exact(DOT_LANES);
    let (rg, ry) = (cg.remainder(), cy.remainder());
    for (a, b) in cg.zip(cy) {
        for ((sl, &x), &v) in s.iter_mut().zip(a).zip(b) {
            *sl += x * c.load(v);
        }
    }
    let mut half = DOT_LANES / 2;
    while half > 0 {
        let (lo, hi) = s.split_at_mut(half);
        for (a, &b) in lo.iter_mut().zip(hi.iter()) {
            *a += b;
        }
        half /= 2;
    }
    let mut tail = 0.0f32;
    for (&x, &v) in rg.iter().zip(ry) {
        tail += x * c.load(v);
    }
    s[0] + tail
}

/// `<a, b>` in `f32` in the fixed order of the `grad_weights` dot product.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_load(a, b, Native)
}

/// The inputs of the unpermute backward besides `grad_out`: the expert outputs `y`
/// and the routing (`row`, `weights`) with its sizes.
struct Routed<'a, S> {
    y: &'a [S],
    hidden: usize,
    row: &'a [i32],
    weights: &'a [f32],
    k: usize,
}

fn unpermute_backward_impl<S: Copy + Send + Sync, C: Codec<S>>(
    grad_out: &[S],
    a: Routed<'_, S>,
    out: UnpermuteBackwardBuffers<'_, S>,
    c: C,
) {
    let Routed {
        y,
        hidden,
        row,
        weights,
        k,
    } = a;
    let UnpermuteBackwardBuffers {
        grad_y,
        grad_weights,
    } = out;
    let zero = c.store(0.0);
    if hidden == 0 || k == 0 {
        grad_y.fill(zero);
        grad_weights.fill(0.0);
        return;
    }
    // Hand each grad_y row, as a `&mut` slice, to the one assignment that points to it
    // (parallel scatter without unsafe); the rows left over are zeroed.
    let mut rows: Vec<Option<&mut [S]>> = grad_y.chunks_mut(hidden).map(Some).collect();
    let mut dst: Vec<Option<&mut [S]>> = row
        .iter()
        .map(|&r| {
            usize::try_from(r)
                .ok()
                .and_then(|r| rows.get_mut(r))
                .and_then(Option::take)
        })
        .collect();
    rows.par_iter_mut().with_min_len(64).for_each(|r| {
        if let Some(s) = r {
            s.fill(zero);
        }
    });

    // Saturating: unvalidated sizes must not overflow (see the module docs).
    let tpt = rows_per_task(hidden.saturating_mul(k));
    dst.par_chunks_mut(tpt * k)
        .zip(grad_out.par_chunks(tpt * hidden))
        .zip(row.par_chunks(tpt * k))
        .zip(grad_weights.par_chunks_mut(tpt * k))
        .enumerate()
        .for_each(|(ci, (((dc, goc), rc), gwc))| {
            // One token's row of grad_out (`hidden` for validated sizes; never more
            // than the chunk holds, whatever `hidden` says).
            let h = hidden.min(goc.len());
            let mut g = vec![0.0f32; h];
            let mut tmp = vec![0.0f32; if c.slices() { h } else { 0 }];
            let w0 = ci * tpt * k;
            let per_token = dc
                .chunks_mut(k)
                .zip(goc.chunks(hidden))
                .zip(rc.chunks(k))
                .zip(gwc.chunks_mut(k));
            for (i, (((dt, go), rt), gwt)) in per_token.enumerate() {
                c.load_slice(go, &mut g);
                for (j, ((d, &r), gw)) in dt.iter_mut().zip(rt).zip(gwt.iter_mut()).enumerate() {
                    *gw = match row_of(y, r, hidden) {
                        Some(yr) if c.slices() => {
                            c.load_slice(yr, &mut tmp);
                            dot_load(&g, &tmp, Native)
                        }
                        Some(yr) => dot_load(&g, yr, c),
                        None => 0.0,
                    };
                    if let Some(d) = d.as_deref_mut() {
                        let w = weights.get(w0 + i * k + j).copied().unwrap_or(0.0);
                        if c.slices() {
                            for (o, &gv) in tmp.iter_mut().zip(&g) {
                                *o = w * gv;
                            }
                            c.store_slice(&tmp, d);
                        } else {
                            for (o, &gv) in d.iter_mut().zip(&g) {
                                *o = c.store(w * gv);
                            }
                        }
                    }
                }
            }
        });
}

/// `grad_y[row[t, j]] = weights[t, j] · grad_out[t]` (zeros for rows no assignment
/// points to) and `grad_weights[t, j] = <grad_out[t], y[row[t, j]]>` (see [`dot_f32`];
/// zero where `row < 0`). `grad_out [num_tokens, hidden]`, `y, out.grad_y [num_rows,
/// hidden]`, `row, weights, out.grad_weights [num_tokens, k]`.
///
/// Parallel over tokens: grad_out is read once per token.
pub fn unpermute_backward<T: RouterFloat>(
    grad_out: &[T],
    y: &[T],
    hidden: usize,
    row: &[i32],
    weights: &[f32],
    k: usize,
    out: UnpermuteBackwardBuffers<'_, T>,
) {
    let UnpermuteBackwardBuffers {
        grad_y,
        grad_weights,
    } = out;
    if let (Some(go), Some(ys), Some(gy)) = (bits16(grad_out), bits16(y), bits16_mut(grad_y)) {
        let a = Routed {
            y: ys,
            hidden,
            row,
            weights,
            k,
        };
        let out = UnpermuteBackwardBuffers {
            grad_y: gy,
            grad_weights,
        };
        match T::DTYPE {
            DType::BF16 => unpermute_backward_impl(go, a, out, Bf16Bits),
            _ => unpermute_backward_impl(go, a, out, F16Bits::new()),
        }
        return;
    }
    let a = Routed {
        y,
        hidden,
        row,
        weights,
        k,
    };
    let out = UnpermuteBackwardBuffers {
        grad_y,
        grad_weights,
    };
    unpermute_backward_impl(grad_out, a, out, Native);
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// f32 bit patterns that exercise every rounding case: a spread of high halves (all
    /// signs and exponents, incl. subnormal, max finite, inf, NaN) times low halves
    /// around the rounding points of both bf16 (bit 15) and f16 (bit 12).
    fn f32_sweep() -> impl Iterator<Item = f32> {
        let lows = [
            0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xA000, 0xFFFF,
        ];
        let his = (0..=0xFFFFu32).step_by(3).chain([
            0x7F7F, 0x7F80, 0xFF7F, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x477F, 0x4780,
        ]);
        his.flat_map(move |hi| {
            lows.into_iter()
                .map(move |lo| f32::from_bits((hi << 16) | lo))
        })
    }

    #[test]
    fn bf16_conversions_match_half() {
        for u in 0..=u16::MAX {
            let a = bf16_bits_to_f32(u);
            let b = bf16::from_bits(u).to_f32();
            assert_eq!(a.to_bits(), b.to_bits(), "bits {u:#06x}");
        }
        for v in f32_sweep() {
            assert_eq!(
                f32_to_bf16_bits(v),
                bf16::from_f32(v).to_bits(),
                "f32 bits {:#010x}",
                v.to_bits()
            );
        }
    }

    #[test]
    fn f16_conversions_match_half() {
        for u in 0..=u16::MAX {
            let a = f16_bits_to_f32(u);
            let b = f16::from_bits(u).to_f32();
            assert_eq!(a.to_bits(), b.to_bits(), "bits {u:#06x}");
        }
        // Every f32 in the f16 range's neighbourhood with all 13 dropped bits patterns
        // at a few exponents, plus the sweep.
        for e in [
            0u32, 90, 101, 102, 103, 110, 112, 113, 120, 127, 141, 142, 143, 254, 255,
        ] {
            for m in (0..1u32 << 23).step_by(97).chain([
                0x7F_FFFF, 0x7F_E000, 0x7F_F000, 0x7F_EFFF, 0x1000, 0x2000, 0x3000,
            ]) {
                for s in [0u32, 1] {
                    let v = f32::from_bits((s << 31) | (e << 23) | m);
                    assert_eq!(
                        f32_to_f16_bits(v),
                        f16::from_f32(v).to_bits(),
                        "f32 bits {:#010x}",
                        v.to_bits()
                    );
                }
            }
        }
        for v in f32_sweep() {
            assert_eq!(
                f32_to_f16_bits(v),
                f16::from_f32(v).to_bits(),
                "f32 bits {:#010x}",
                v.to_bits()
            );
        }
    }

    /// The element-wise `f16` path (CPUs without F16C) gives the same bits as the
    /// slice path.
    #[test]
    fn f16_paths_agree() {
        let (nt, k, hidden, nr) = (5usize, 3usize, 70usize, 16usize);
        let row: Vec<i32> = vec![3, -1, 7, 0, 1, 2, -1, -1, -1, 15, 4, 5, 9, 10, 11];
        let w: Vec<f32> = (0..nt * k).map(|i| 0.25 + i as f32 * 0.37).collect();
        let bits = |n: usize, seed: u32| -> Vec<u16> {
            (0..n as u32)
                .map(|i| {
                    f16::from_f32(
                        ((i.wrapping_mul(2654435761u32) ^ seed) % 2001) as f32 * 0.013 - 13.0,
                    )
                    .to_bits()
                })
                .collect()
        };
        let y = bits(nr * hidden, 1);
        let go = bits(nt * hidden, 2);
        let run = |hardware: bool| {
            let c = F16Bits { hardware };
            let mut out = vec![0u16; nt * hidden];
            gather_sum(&y, hidden, &row, Some(&w), k, &mut out, c);
            let mut gx = vec![0u16; nt * hidden];
            gather_sum(&y, hidden, &row, None, k, &mut gx, c);
            let mut gy = vec![7u16; nr * hidden];
            let mut gw = vec![7.0f32; nt * k];
            let a = Routed {
                y: &y,
                hidden,
                row: &row,
                weights: &w,
                k,
            };
            let bufs = UnpermuteBackwardBuffers {
                grad_y: &mut gy,
                grad_weights: &mut gw,
            };
            unpermute_backward_impl(&go, a, bufs, c);
            (
                out,
                gx,
                gy,
                gw.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn dot_order_is_fixed() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b = vec![1.0f32; 19];
        assert_eq!(dot_f32(&a, &b), (0..19).sum::<i32>() as f32);
        assert_eq!(dot_f32(&[], &[]), 0.0);
    }
}
