//! Permute / unpermute (forward and backward): hand-computed cases, properties over
//! random layouts against an independent float64 reference, finite differences,
//! f16/bf16 error bounds, thread independence and every bad input.

mod common;

use common::{assert_close, finite_diff, with_threads, Rng};
use half::{bf16, f16};
use moe_router::{
    permute, permute_backward, permute_backward_into, permute_into, permute_row_to_token,
    unpermute, unpermute_backward, unpermute_backward_into, unpermute_into, Error, PermuteSizes,
    RouterFloat, UnpermuteBackwardBuffers,
};
use ndarray::{array, s, Array1, Array2};
use proptest::prelude::*;

// ---------------------------------------------------------------- helpers

/// A random valid routing: `row [num_tokens, k]` and the matching `row_to_token`.
#[derive(Debug, Clone)]
struct Layout {
    num_tokens: usize,
    k: usize,
    num_rows: usize,
    row: Vec<i32>,
    row_to_token: Vec<i32>,
}

/// Each assignment is kept with probability `keep`; kept assignments get distinct rows
/// of a random permutation of `kept + pad` rows; the `pad` rows left over are padding.
fn random_layout(rng: &mut Rng, num_tokens: usize, k: usize, keep: f64, pad: usize) -> Layout {
    let kept: Vec<bool> = (0..num_tokens * k).map(|_| rng.uniform() < keep).collect();
    let num_rows = kept.iter().filter(|&&b| b).count() + pad;
    let mut perm: Vec<usize> = (0..num_rows).collect();
    for i in (1..num_rows).rev() {
        let j = rng.below(i + 1);
        perm.swap(i, j);
    }
    let mut row = vec![-1i32; num_tokens * k];
    let mut row_to_token = vec![-1i32; num_rows];
    let mut next = 0;
    for (a, &kp) in kept.iter().enumerate() {
        if kp {
            let r = perm[next];
            next += 1;
            row[a] = r as i32;
            row_to_token[r] = (a / k) as i32;
        }
    }
    Layout {
        num_tokens,
        k,
        num_rows,
        row,
        row_to_token,
    }
}

fn cast<T: RouterFloat>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn to64<T: RouterFloat>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

fn bits<T: RouterFloat>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Independent f64 permute: `out[r] = x[row_to_token[r]]`, zero for `-1`.
fn permute_ref(x: &[f64], hidden: usize, row_to_token: &[i32]) -> Vec<f64> {
    let mut out = vec![0.0; row_to_token.len() * hidden];
    for (r, &t) in row_to_token.iter().enumerate() {
        if t >= 0 {
            let t = t as usize;
            out[r * hidden..(r + 1) * hidden].copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
    }
    out
}

/// Independent f64 unpermute: `out[t] = Σ_{row >= 0} w[t, j] y[row[t, j]]`.
fn unpermute_ref(
    y: &[f64],
    hidden: usize,
    row: &[i32],
    w: &[f64],
    num_tokens: usize,
    k: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; num_tokens * hidden];
    for t in 0..num_tokens {
        for j in 0..k {
            let r = row[t * k + j];
            if r >= 0 {
                for h in 0..hidden {
                    out[t * hidden + h] += w[t * k + j] * y[r as usize * hidden + h];
                }
            }
        }
    }
    out
}

/// `Σ_j |w[t, j]| · |y[row[t, j]][h]|` for every `(t, h)`: the scale of the rounding
/// error of an accumulated sum.
fn abs_terms(
    y: &[f64],
    hidden: usize,
    row: &[i32],
    w: &[f64],
    num_tokens: usize,
    k: usize,
) -> Vec<f64> {
    let ya: Vec<f64> = y.iter().map(|v| v.abs()).collect();
    let wa: Vec<f64> = w.iter().map(|v| v.abs()).collect();
    unpermute_ref(&ya, hidden, row, &wa, num_tokens, k)
}

/// Unit roundoff of each element type and half its smallest subnormal (the absolute
/// error floor of a rounding into it).
fn unit_roundoff<T: RouterFloat>() -> (f64, f64) {
    match T::DTYPE {
        moe_router::DType::F32 => (2f64.powi(-24), 2f64.powi(-150)),
        moe_router::DType::F16 => (2f64.powi(-11), 2f64.powi(-25)),
        moe_router::DType::BF16 => (2f64.powi(-8), 2f64.powi(-134)),
    }
}

const U32: f64 = 5.960_464_477_539_063e-8; // 2^-24

/// Assert `|got - want| <= u_T |want| + (n + 1) u_32 (1 + u_T) scale + tiny_T`
/// elementwise. This is the standard bound for a sum (or dot product) of `n` terms
/// accumulated in f32 (each product and each addition rounds with relative error at
/// most `u_32`, so the f32 sum is within `n u_32 Σ|terms|` of the exact one; `(n + 1)`
/// leaves room for second-order terms) followed by one rounding into `T` (relative
/// error `u_T`, or an absolute `tiny_T` in the subnormal range). A kernel that rounded
/// in `T` along the way, or summed in a lower precision, breaks it.
fn assert_sum_bound<T: RouterFloat>(
    got: &[f64],
    want: &[f64],
    scale: &[f64],
    n: usize,
    what: &str,
) {
    let (u, tiny) = unit_roundoff::<T>();
    assert_eq!(got.len(), want.len(), "{what}: length");
    for i in 0..got.len() {
        let bound = u * want[i].abs() + (n as f64 + 1.0) * U32 * (1.0 + u) * scale[i] + tiny;
        assert!(
            (got[i] - want[i]).abs() <= bound,
            "{what}[{i}] ({}): got {}, expected {} (bound {bound})",
            T::DTYPE,
            got[i],
            want[i]
        );
    }
}

/// Random inputs for a layout: `x [T, H]`, `y [rows, H]`, weights `[T, k]` (kept and
/// dropped; dropped weights are NaN to show they are ignored), `g_out [T, H]`,
/// `g_buf [rows, H]`.
struct Data {
    x: Vec<f32>,
    y: Vec<f32>,
    w: Vec<f32>,
    g_out: Vec<f32>,
    g_buf: Vec<f32>,
}

fn random_data(rng: &mut Rng, l: &Layout, hidden: usize) -> Data {
    let w = l
        .row
        .iter()
        .map(|&r| {
            if r >= 0 {
                rng.range(-1.0, 2.0) as f32
            } else {
                f32::NAN
            }
        })
        .collect();
    Data {
        x: rng.normal_vec(l.num_tokens * hidden, 1.0),
        y: rng.normal_vec(l.num_rows * hidden, 1.0),
        w,
        g_out: rng.normal_vec(l.num_tokens * hidden, 1.0),
        g_buf: rng.normal_vec(l.num_rows * hidden, 1.0),
    }
}

/// All four ops through the ndarray API (and the `_into` API, which must agree bitwise).
struct Outputs<T> {
    buf: Vec<T>,
    grad_x: Vec<T>,
    out: Vec<T>,
    grad_y: Vec<T>,
    grad_w: Vec<f32>,
}

fn run_all<T: RouterFloat>(l: &Layout, hidden: usize, d: &Data) -> Outputs<T> {
    let (nt, nr, k) = (l.num_tokens, l.num_rows, l.k);
    let x = Array2::from_shape_vec((nt, hidden), cast::<T>(&d.x)).unwrap();
    let y = Array2::from_shape_vec((nr, hidden), cast::<T>(&d.y)).unwrap();
    let g_out = Array2::from_shape_vec((nt, hidden), cast::<T>(&d.g_out)).unwrap();
    let g_buf = Array2::from_shape_vec((nr, hidden), cast::<T>(&d.g_buf)).unwrap();
    let row = Array2::from_shape_vec((nt, k), l.row.clone()).unwrap();
    let w = Array2::from_shape_vec((nt, k), d.w.clone()).unwrap();
    let rtt = Array1::from_vec(l.row_to_token.clone());

    let buf = permute(x.view(), rtt.view())
        .unwrap()
        .into_raw_vec_and_offset()
        .0;
    let grad_x = permute_backward(g_buf.view(), row.view())
        .unwrap()
        .into_raw_vec_and_offset()
        .0;
    let out = unpermute(y.view(), row.view(), w.view())
        .unwrap()
        .into_raw_vec_and_offset()
        .0;
    let g = unpermute_backward(g_out.view(), y.view(), row.view(), w.view()).unwrap();
    let o = Outputs {
        buf,
        grad_x,
        out,
        grad_y: g.grad_y.into_raw_vec_and_offset().0,
        grad_w: g.grad_weights.into_raw_vec_and_offset().0,
    };

    // The flat-slice forms write the same bits (into dirty buffers).
    let dirty = T::from_f32(7.0);
    let mut b2 = vec![dirty; nr * hidden];
    permute_into(x.as_slice().unwrap(), nt, hidden, &l.row_to_token, &mut b2).unwrap();
    assert_eq!(bits(&b2), bits(&o.buf), "permute_into");
    let mut gx2 = vec![dirty; nt * hidden];
    permute_backward_into(
        PermuteSizes {
            num_tokens: nt,
            num_rows: nr,
            hidden,
            k,
        },
        g_buf.as_slice().unwrap(),
        &l.row,
        &mut gx2,
    )
    .unwrap();
    assert_eq!(bits(&gx2), bits(&o.grad_x), "permute_backward_into");
    let mut out2 = vec![dirty; nt * hidden];
    unpermute_into(
        PermuteSizes {
            num_tokens: nt,
            num_rows: nr,
            hidden,
            k,
        },
        y.as_slice().unwrap(),
        &l.row,
        &d.w,
        &mut out2,
    )
    .unwrap();
    assert_eq!(bits(&out2), bits(&o.out), "unpermute_into");
    let mut gy2 = vec![dirty; nr * hidden];
    let mut gw2 = vec![7.0f32; nt * k];
    unpermute_backward_into(
        PermuteSizes {
            num_tokens: nt,
            num_rows: nr,
            hidden,
            k,
        },
        g_out.as_slice().unwrap(),
        y.as_slice().unwrap(),
        &l.row,
        &d.w,
        UnpermuteBackwardBuffers {
            grad_y: &mut gy2,
            grad_weights: &mut gw2,
        },
    )
    .unwrap();
    assert_eq!(
        bits(&gy2),
        bits(&o.grad_y),
        "unpermute_backward_into grad_y"
    );
    assert_eq!(
        bits(&gw2),
        bits(&o.grad_w),
        "unpermute_backward_into grad_weights"
    );
    o
}

/// Weights as the op sees them: NaN for dropped assignments is replaced by 0 in the
/// reference (the op must ignore them; a NaN leaking through fails every comparison).
fn kept_weights(l: &Layout, w: &[f32]) -> Vec<f64> {
    l.row
        .iter()
        .zip(w)
        .map(|(&r, &v)| if r >= 0 { v as f64 } else { 0.0 })
        .collect()
}

/// Check all four ops in element type `T` against the f64 reference evaluated on the
/// same (T-rounded) inputs.
fn check_against_f64<T: RouterFloat>(l: &Layout, hidden: usize, d: &Data) {
    let (nt, nr, k) = (l.num_tokens, l.num_rows, l.k);
    let o = run_all::<T>(l, hidden, d);
    let x = to64(&cast::<T>(&d.x));
    let y = to64(&cast::<T>(&d.y));
    let g_out = to64(&cast::<T>(&d.g_out));
    let g_buf = to64(&cast::<T>(&d.g_buf));
    let w = kept_weights(l, &d.w);
    let ones: Vec<f64> = l
        .row
        .iter()
        .map(|&r| if r >= 0 { 1.0 } else { 0.0 })
        .collect();

    // permute: an exact copy, row by row.
    let buf_ref = permute_ref(&x, hidden, &l.row_to_token);
    for r in 0..nr {
        assert_eq!(
            &to64(&o.buf)[r * hidden..(r + 1) * hidden],
            &buf_ref[r * hidden..(r + 1) * hidden],
            "permute row {r}"
        );
    }

    // permute_backward: a sum of k terms, rounded once.
    let gx_ref = unpermute_ref(&g_buf, hidden, &l.row, &ones, nt, k);
    let gx_scale = abs_terms(&g_buf, hidden, &l.row, &ones, nt, k);
    assert_sum_bound::<T>(&to64(&o.grad_x), &gx_ref, &gx_scale, k, "permute_backward");

    // unpermute.
    let out_ref = unpermute_ref(&y, hidden, &l.row, &w, nt, k);
    let out_scale = abs_terms(&y, hidden, &l.row, &w, nt, k);
    assert_sum_bound::<T>(&to64(&o.out), &out_ref, &out_scale, k, "unpermute");

    // unpermute_backward: grad_y by the explicit formula (one product, rounded once),
    // zero rows where no assignment points.
    let mut gy_ref = vec![0.0; nr * hidden];
    for t in 0..nt {
        for j in 0..k {
            let r = l.row[t * k + j];
            if r >= 0 {
                for h in 0..hidden {
                    gy_ref[r as usize * hidden + h] = w[t * k + j] * g_out[t * hidden + h];
                }
            }
        }
    }
    let gy_scale: Vec<f64> = gy_ref.iter().map(|v| v.abs()).collect();
    assert_sum_bound::<T>(&to64(&o.grad_y), &gy_ref, &gy_scale, 1, "grad_y");

    // grad_weights: an f32 dot product of `hidden` terms (f32 output: no T rounding).
    let mut gw_ref = vec![0.0; nt * k];
    let mut gw_scale = vec![0.0; nt * k];
    for t in 0..nt {
        for j in 0..k {
            let r = l.row[t * k + j];
            if r >= 0 {
                let yr = &y[r as usize * hidden..(r as usize + 1) * hidden];
                let gt = &g_out[t * hidden..(t + 1) * hidden];
                gw_ref[t * k + j] = dot64(gt, yr);
                gw_scale[t * k + j] = gt.iter().zip(yr).map(|(a, b)| (a * b).abs()).sum();
            }
        }
    }
    let gw: Vec<f64> = o.grad_w.iter().map(|&v| v as f64).collect();
    assert_sum_bound::<f32>(&gw, &gw_ref, &gw_scale, hidden, "grad_weights");
}

// ---------------------------------------------------------------- hand cases

#[test]
fn permute_hand_padding_rows_are_zero() {
    // rows: token 1, padding, token 0, token 1, padding.
    let x = array![[1.0f32, -2.0], [3.5, 4.0]];
    let rtt = array![1, -1, 0, 1, -1];
    let buf = permute(x.view(), rtt.view()).unwrap();
    assert_eq!(
        buf,
        array![[3.5, 4.0], [0.0, 0.0], [1.0, -2.0], [3.5, 4.0], [0.0, 0.0]]
    );

    let xb = x.mapv(bf16::from_f32);
    let bb = permute(xb.view(), rtt.view()).unwrap();
    assert_eq!(bb, buf.mapv(bf16::from_f32));
    let xh = x.mapv(f16::from_f32);
    assert_eq!(
        permute(xh.view(), rtt.view()).unwrap(),
        buf.mapv(f16::from_f32)
    );
}

#[test]
fn permute_copies_bits() {
    // NaN payloads, -0 and infinities are copied as they are.
    let x = array![[f32::from_bits(0x7FA0_0001), -0.0, f32::NEG_INFINITY]];
    let buf = permute(x.view(), array![0, 0].view()).unwrap();
    for r in 0..2 {
        for h in 0..3 {
            assert_eq!(buf[[r, h]].to_bits(), x[[0, h]].to_bits());
        }
    }
}

#[test]
fn permute_backward_hand() {
    let g_buf = array![
        [1.0f32, 2.0],
        [10.0, 20.0],
        [100.0, 200.0],
        [1000.0, 2000.0]
    ];
    // token 0: row 2 (choice 1 dropped); token 1: rows 0 and 3; token 2: nothing kept.
    let row = array![[2, -1], [0, 3], [-1, -1]];
    let gx = permute_backward(g_buf.view(), row.view()).unwrap();
    assert_eq!(gx, array![[100.0, 200.0], [1001.0, 2002.0], [0.0, 0.0]]);
    // Row 1 is referenced by no assignment: it contributes nowhere.
}

#[test]
fn unpermute_hand_dropped_and_unrouted() {
    let y = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]];
    // token 0: 0.5*y1 + 0.25*y0; token 1: second choice dropped (its NaN weight is
    // ignored) -> 2*y3; token 2: nothing kept -> 0.
    let row = array![[1, 0], [3, -1], [-1, -1]];
    let w = array![[0.5f32, 0.25], [2.0, f32::NAN], [f32::NAN, 1.0]];
    let out = unpermute(y.view(), row.view(), w.view()).unwrap();
    assert_eq!(
        out,
        array![
            [0.5 * 3.0 + 0.25 * 1.0, 0.5 * 4.0 + 0.25 * 2.0],
            [14.0, 16.0],
            [0.0, 0.0]
        ]
    );

    // bf16: 1.75, 2.5, 14, 16 are exact in bf16.
    let yb = y.mapv(bf16::from_f32);
    let ob = unpermute(yb.view(), row.view(), w.view()).unwrap();
    assert_eq!(ob, out.mapv(bf16::from_f32));
}

#[test]
fn unpermute_accumulates_in_f32_then_rounds_once() {
    // In bf16 (8 significant bits), 256 + 1 + 1 rounds to 256 at each step if summed in
    // bf16, but the f32 sum is 258, exactly representable in bf16.
    let y = array![[256.0f32], [1.0], [1.0]].mapv(bf16::from_f32);
    let row = array![[0, 1, 2]];
    let w = array![[1.0f32, 1.0, 1.0]];
    let out = unpermute(y.view(), row.view(), w.view()).unwrap();
    assert_eq!(out[[0, 0]].to_f32(), 258.0);
    let gx = permute_backward(y.view(), row.view()).unwrap();
    assert_eq!(gx[[0, 0]].to_f32(), 258.0);
}

#[test]
fn unpermute_nan_weight_of_kept_assignment_propagates() {
    let y = array![[1.0f32], [2.0]];
    let out = unpermute(
        y.view(),
        array![[0, 1]].view(),
        array![[f32::NAN, 1.0]].view(),
    )
    .unwrap();
    assert!(out[[0, 0]].is_nan());
}

#[test]
fn unpermute_backward_hand() {
    let y = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]];
    let row = array![[1, 0], [3, -1], [-1, -1]];
    let w = array![[0.5f32, 0.25], [2.0, f32::NAN], [1.0, 1.0]];
    let g_out = array![[1.0f32, -1.0], [2.0, 0.5], [9.0, 9.0]];
    let g = unpermute_backward(g_out.view(), y.view(), row.view(), w.view()).unwrap();
    // grad_y[row] = w * g_out[t]; row 2 is referenced by nobody -> 0.
    assert_eq!(
        g.grad_y,
        array![[0.25, -0.25], [0.5, -0.5], [0.0, 0.0], [4.0, 1.0]]
    );
    // grad_w[t, j] = <g_out[t], y[row]>: token 0: <(1,-1),(3,4)> = -1, <(1,-1),(1,2)> = -1;
    // token 1: <(2,0.5),(7,8)> = 18, dropped -> 0; token 2: nothing kept.
    assert_eq!(
        g.grad_weights,
        array![[-1.0, -1.0], [18.0, 0.0], [0.0, 0.0]]
    );
}

#[test]
fn empty_and_degenerate_sizes() {
    // No tokens, padding rows only.
    let x = Array2::<f32>::zeros((0, 3));
    assert_eq!(
        permute(x.view(), array![-1, -1].view()).unwrap(),
        Array2::<f32>::zeros((2, 3))
    );
    // No rows at all.
    let y = Array2::<f32>::zeros((0, 3));
    let row = array![[-1, -1], [-1, -1]];
    let w = array![[1.0f32, 1.0], [1.0, 1.0]];
    assert_eq!(
        unpermute(y.view(), row.view(), w.view()).unwrap(),
        Array2::<f32>::zeros((2, 3))
    );
    assert_eq!(
        permute_backward(y.view(), row.view()).unwrap(),
        Array2::<f32>::zeros((2, 3))
    );
    let g = unpermute_backward(
        Array2::<f32>::ones((2, 3)).view(),
        y.view(),
        row.view(),
        w.view(),
    )
    .unwrap();
    assert_eq!(g.grad_y.dim(), (0, 3));
    assert_eq!(g.grad_weights, Array2::<f32>::zeros((2, 2)));
    // hidden = 0: empty hidden states, grad_weights zero (the empty dot product).
    let y0 = Array2::<f32>::zeros((2, 0));
    let row = array![[1, 0]];
    let g = unpermute_backward(
        Array2::<f32>::zeros((1, 0)).view(),
        y0.view(),
        row.view(),
        array![[1.0f32, 2.0]].view(),
    )
    .unwrap();
    assert_eq!(g.grad_weights, array![[0.0f32, 0.0]]);
    assert_eq!(
        unpermute(y0.view(), row.view(), array![[1.0f32, 2.0]].view())
            .unwrap()
            .dim(),
        (1, 0)
    );
    // k = 0: every token gets 0.
    let row = Array2::<i32>::zeros((3, 0));
    let w = Array2::<f32>::zeros((3, 0));
    let y = Array2::<f32>::ones((2, 4));
    assert_eq!(
        unpermute(y.view(), row.view(), w.view()).unwrap(),
        Array2::<f32>::zeros((3, 4))
    );
    let g = unpermute_backward(
        Array2::<f32>::ones((3, 4)).view(),
        y.view(),
        row.view(),
        w.view(),
    )
    .unwrap();
    assert_eq!(g.grad_y, Array2::<f32>::zeros((2, 4)));
    assert_eq!(g.grad_weights.dim(), (3, 0));
    // hidden = 0 with a huge num_rows is still bounded by the i32 row index.
    let mut gx: Vec<f32> = vec![];
    assert!(permute_backward_into::<f32>(
        PermuteSizes {
            num_tokens: 1,
            num_rows: 1 << 20,
            hidden: 0,
            k: 1
        },
        &[],
        &[5],
        &mut gx
    )
    .is_ok());
}

#[test]
fn row_to_token_from_rows() {
    let row = [3, 0, -1, 1, 4, -1]; // [num_tokens = 3, k = 2]
    assert_eq!(
        permute_row_to_token(&row, 3, 2, 6).unwrap(),
        vec![0, 1, -1, 0, 2, -1]
    );
    let mut rng = Rng::new(5);
    let l = random_layout(&mut rng, 50, 3, 0.7, 4);
    assert_eq!(
        permute_row_to_token(&l.row, 50, 3, l.num_rows).unwrap(),
        l.row_to_token
    );
    assert!(matches!(
        permute_row_to_token(&[0, 0], 2, 1, 3),
        Err(Error::InvalidArgument { arg: "row", .. })
    ));
}

// ---------------------------------------------------------------- properties

fn layout_strategy(
    max_tokens: usize,
    max_k: usize,
    max_hidden: usize,
) -> impl Strategy<Value = (Layout, usize, u64)> {
    (
        0..=max_tokens,
        0..=max_k,
        0..=max_hidden,
        0u32..=100,
        0..20usize,
        any::<u64>(),
    )
        .prop_map(|(nt, k, hidden, keep, pad, seed)| {
            let mut rng = Rng::new(seed);
            (
                random_layout(&mut rng, nt, k, keep as f64 / 100.0, pad),
                hidden,
                seed,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every op in f32, f16 and bf16 against the f64 reference on the same inputs;
    /// permute exactly, sums within the f32-accumulate-then-round-once bound.
    #[test]
    fn prop_all_dtypes_vs_f64((l, hidden, seed) in layout_strategy(199, 8, 40)) {
        let d = random_data(&mut Rng::new(seed ^ 1), &l, hidden);
        check_against_f64::<f32>(&l, hidden, &d);
        check_against_f64::<f16>(&l, hidden, &d);
        check_against_f64::<bf16>(&l, hidden, &d);
    }

    /// Adjoint identities (in f64 from the op's f32 outputs):
    /// `<permute(x), g> == <x, permute_backward(g)>` and
    /// `<unpermute(y, w), g> == <y, grad_y> == Σ w · grad_weights`.
    #[test]
    fn prop_adjoint_identities((l, hidden, seed) in layout_strategy(199, 8, 40)) {
        let d = random_data(&mut Rng::new(seed ^ 2), &l, hidden);
        let o = run_all::<f32>(&l, hidden, &d);
        let to = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (x, y, g_out, g_buf) = (to(&d.x), to(&d.y), to(&d.g_out), to(&d.g_buf));
        let w = kept_weights(&l, &d.w);
        let abs_dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| (p * q).abs()).sum::<f64>();
        let tol = |scale: f64| 4.0 * (l.k.max(1) + hidden) as f64 * U32 * scale + 1e-30;

        let lhs = dot64(&to(&o.buf), &g_buf);
        let rhs = dot64(&x, &to(&o.grad_x));
        let scale = abs_dot(&to(&o.buf), &g_buf);
        prop_assert!((lhs - rhs).abs() <= tol(scale), "permute adjoint: {lhs} vs {rhs}");

        let lhs = dot64(&to(&o.out), &g_out);
        let rhs = dot64(&y, &to(&o.grad_y));
        let gw: f64 = w.iter().zip(&o.grad_w).map(|(a, &b)| a * b as f64).sum();
        let scale: f64 = abs_terms(&y, hidden, &l.row, &w, l.num_tokens, l.k)
            .iter().zip(&g_out).map(|(a, b)| a * b.abs()).sum();
        prop_assert!((lhs - rhs).abs() <= tol(scale), "unpermute adjoint (grad_y): {lhs} vs {rhs}");
        prop_assert!((lhs - gw).abs() <= tol(scale), "unpermute adjoint (grad_weights): {lhs} vs {gw}");
    }

    /// Every backward against central finite differences of the independent f64
    /// forward: `L = <permute(x), g_buf>` for grad_x, `L = <unpermute(y, w), g_out>` for
    /// grad_y and grad_weights.
    #[test]
    fn prop_backward_vs_finite_differences((l, hidden, seed) in layout_strategy(16, 4, 8)) {
        let d = random_data(&mut Rng::new(seed ^ 3), &l, hidden);
        let o = run_all::<f32>(&l, hidden, &d);
        let to = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (x, y, g_out, g_buf) = (to(&d.x), to(&d.y), to(&d.g_out), to(&d.g_buf));
        let w = kept_weights(&l, &d.w);
        let (nt, k) = (l.num_tokens, l.k);
        let h = 1e-3;

        let fd_x = finite_diff(&x, h, |x| dot64(&permute_ref(x, hidden, &l.row_to_token), &g_buf));
        assert_close(&to(&o.grad_x), &fd_x, 1e-4, 1e-5, "grad_x vs finite differences");

        let fd_y = finite_diff(&y, h, |y| dot64(&unpermute_ref(y, hidden, &l.row, &w, nt, k), &g_out));
        assert_close(&to(&o.grad_y), &fd_y, 1e-4, 1e-5, "grad_y vs finite differences");

        let fd_w = finite_diff(&w, h, |w| dot64(&unpermute_ref(&y, hidden, &l.row, w, nt, k), &g_out));
        // Dropped assignments have no gradient (the op reports 0 there).
        let fd_w: Vec<f64> = fd_w.iter().zip(&l.row).map(|(&v, &r)| if r >= 0 { v } else { 0.0 }).collect();
        assert_close(&to(&o.grad_w), &fd_w, 1e-4, 1e-5 * (1 + hidden) as f64, "grad_weights vs finite differences");
    }
}

/// flash-attention's rule for low-precision inputs: the op's max error against f64 is
/// at most twice the max error of the same computation done in that dtype (weights
/// cast to `T`, every product and partial sum rounded to `T`, as PyTorch would do it).
fn dtype_rule<T: RouterFloat>() {
    let (nt, k, hidden) = (128, 4, 64);
    let mut rng = Rng::new(77);
    let l = random_layout(&mut rng, nt, k, 0.85, 8);
    let d = random_data(&mut rng, &l, hidden);
    let yt = cast::<T>(&d.y);
    let y = to64(&yt);
    let w = kept_weights(&l, &d.w);
    let o = run_all::<T>(&l, hidden, &d);
    let exact = unpermute_ref(&y, hidden, &l.row, &w, nt, k);

    let rt = |v: f32| T::from_f32(v).to_f32();
    let mut in_dtype = vec![0.0f64; nt * hidden];
    for t in 0..nt {
        for hh in 0..hidden {
            let mut acc = 0.0f32;
            for j in 0..k {
                let r = l.row[t * k + j];
                if r >= 0 {
                    let p = rt(rt(d.w[t * k + j]) * yt[r as usize * hidden + hh].to_f32());
                    acc = rt(acc + p);
                }
            }
            in_dtype[t * hidden + hh] = acc as f64;
        }
    }
    let max_err = |v: &[f64]| {
        v.iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    };
    let ours = max_err(&to64(&o.out));
    let theirs = max_err(&in_dtype);
    assert!(
        theirs > 0.0,
        "{}: the in-dtype computation should not be exact here",
        T::DTYPE
    );
    assert!(
        ours <= 2.0 * theirs,
        "{}: max error {ours} > 2 x in-dtype max error {theirs}",
        T::DTYPE
    );
}

#[test]
fn low_precision_within_twice_dtype_error() {
    dtype_rule::<f16>();
    dtype_rule::<bf16>();
}

#[test]
fn thread_count_does_not_change_bits() {
    let mut rng = Rng::new(11);
    let hidden = 72;
    let l = random_layout(&mut rng, 700, 6, 0.8, 30);
    let d = random_data(&mut rng, &l, hidden);
    fn all_bits<T: RouterFloat>(l: &Layout, hidden: usize, d: &Data) -> Vec<Vec<u8>> {
        let o = run_all::<T>(l, hidden, d);
        vec![
            bits(&o.buf),
            bits(&o.grad_x),
            bits(&o.out),
            bits(&o.grad_y),
            bits(&o.grad_w),
        ]
    }
    assert_eq!(
        with_threads(1, || all_bits::<f32>(&l, hidden, &d)),
        with_threads(3, || all_bits::<f32>(&l, hidden, &d))
    );
    assert_eq!(
        with_threads(1, || all_bits::<f16>(&l, hidden, &d)),
        with_threads(3, || all_bits::<f16>(&l, hidden, &d))
    );
    assert_eq!(
        with_threads(1, || all_bits::<bf16>(&l, hidden, &d)),
        with_threads(4, || all_bits::<bf16>(&l, hidden, &d))
    );
}

// ---------------------------------------------------------------- bad inputs

fn assert_shape(e: Error, arg: &str) {
    match &e {
        Error::Shape { arg: a, .. } => assert_eq!(*a, arg, "{e}"),
        other => panic!("expected a Shape error for `{arg}`, got {other:?}"),
    }
    assert!(e.to_string().contains(&format!("`{arg}`")), "{e}");
}

fn assert_invalid(e: Error, arg: &str, value: &str) {
    match &e {
        Error::InvalidArgument { arg: a, .. } => assert_eq!(*a, arg, "{e}"),
        other => panic!("expected an InvalidArgument error for `{arg}`, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("`{arg}`")) && msg.contains(value),
        "{msg}"
    );
}

fn assert_layout(e: Error, arg: &str) {
    match &e {
        Error::Layout { arg: a, .. } => assert_eq!(*a, arg, "{e}"),
        other => panic!("expected a Layout error for `{arg}`, got {other:?}"),
    }
    assert!(e.to_string().contains(&format!("`{arg}`")), "{e}");
}

#[test]
fn bad_permute_inputs() {
    let x = vec![0.0f32; 6]; // [3, 2]
    let mut out = vec![1.0f32; 4]; // [2, 2]
    assert_shape(
        permute_into(&x[..5], 3, 2, &[0, 1], &mut out).unwrap_err(),
        "x",
    );
    assert_shape(
        permute_into(&x, 3, 2, &[0, 1], &mut out[..3]).unwrap_err(),
        "out",
    );
    assert_invalid(
        permute_into(&x, 3, 2, &[0, 3], &mut out).unwrap_err(),
        "row_to_token",
        "3 at row 1",
    );
    assert_invalid(
        permute_into(&x, 3, 2, &[-2, 0], &mut out).unwrap_err(),
        "row_to_token",
        "-2 at row 0",
    );
    assert_eq!(out, vec![1.0; 4], "out untouched on error");

    let xa = Array2::<f32>::zeros((2, 3));
    assert_layout(permute(xa.t(), array![0, 1].view()).unwrap_err(), "x");
    let rtt = Array1::from_vec(vec![0, 9, 1, 9]);
    assert_layout(
        permute(xa.view(), rtt.slice(s![..;2])).unwrap_err(),
        "row_to_token",
    );
    assert_invalid(
        permute(xa.view(), array![0, 2].view()).unwrap_err(),
        "row_to_token",
        "[0, 2)",
    );
}

#[test]
fn bad_permute_backward_inputs() {
    let gb = vec![0.0f32; 8]; // [4, 2]
    let row = [0, 1, 2, -1]; // [2, 2]
    let mut gx = vec![1.0f32; 4];
    assert_shape(
        permute_backward_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &gb[..7],
            &row,
            &mut gx,
        )
        .unwrap_err(),
        "grad_buf",
    );
    assert_shape(
        permute_backward_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &gb,
            &row[..3],
            &mut gx,
        )
        .unwrap_err(),
        "row",
    );
    assert_shape(
        permute_backward_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &gb,
            &row,
            &mut gx[..2],
        )
        .unwrap_err(),
        "grad_x",
    );
    assert_invalid(
        permute_backward_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &gb,
            &[0, 4, 1, 2],
            &mut gx,
        )
        .unwrap_err(),
        "row",
        "4 at token 0, choice 1",
    );
    assert_invalid(
        permute_backward_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &gb,
            &[0, -3, 1, 2],
            &mut gx,
        )
        .unwrap_err(),
        "row",
        "-3",
    );
    let e = permute_backward_into(
        PermuteSizes {
            num_tokens: 2,
            num_rows: 4,
            hidden: 2,
            k: 2,
        },
        &gb,
        &[0, 2, 1, 2],
        &mut gx,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("token 0, choice 1"),
        "names the first user of the row: {e}"
    );
    assert_invalid(e, "row", "2 at token 1, choice 1");
    assert_eq!(gx, vec![1.0; 4], "grad_x untouched on error");
    // num_rows must fit the i32 row index (hidden = 0 makes the buffers empty).
    let e = permute_backward_into::<f32>(
        PermuteSizes {
            num_tokens: 1,
            num_rows: 1 << 31,
            hidden: 0,
            k: 1,
        },
        &[],
        &[0],
        &mut [],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Overflow {
                what: "num_rows",
                ..
            }
        ),
        "{e}"
    );

    let g = Array2::<f32>::zeros((4, 2));
    assert_layout(
        permute_backward(g.slice(s![..;2, ..]), array![[0]].view()).unwrap_err(),
        "grad_buf",
    );
    let r = Array2::<i32>::zeros((2, 2));
    assert_layout(permute_backward(g.view(), r.t()).unwrap_err(), "row");
}

#[test]
fn bad_unpermute_inputs() {
    let y = vec![0.0f32; 8]; // [4, 2]
    let row = [0, 1, 2, -1]; // [2, 2]
    let w = [1.0f32; 4];
    let mut out = vec![1.0f32; 4];
    assert_shape(
        unpermute_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &y[..6],
            &row,
            &w,
            &mut out,
        )
        .unwrap_err(),
        "y",
    );
    assert_shape(
        unpermute_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &y,
            &row[..2],
            &w,
            &mut out,
        )
        .unwrap_err(),
        "row",
    );
    assert_shape(
        unpermute_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &y,
            &row,
            &w[..3],
            &mut out,
        )
        .unwrap_err(),
        "weights",
    );
    assert_shape(
        unpermute_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &y,
            &row,
            &w,
            &mut out[..1],
        )
        .unwrap_err(),
        "out",
    );
    assert_invalid(
        unpermute_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &y,
            &[0, 1, 7, -1],
            &w,
            &mut out,
        )
        .unwrap_err(),
        "row",
        "7 at token 1, choice 0",
    );
    assert_invalid(
        unpermute_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            &y,
            &[3, 3, 1, -1],
            &w,
            &mut out,
        )
        .unwrap_err(),
        "row",
        "at most one assignment",
    );
    assert_eq!(out, vec![1.0; 4], "out untouched on error");

    let ya = Array2::<f32>::zeros((4, 2));
    let ra = array![[0, 1], [2, -1]];
    let wa = Array2::<f32>::ones((2, 2));
    assert_layout(
        unpermute(ya.slice(s![.., ..;2]), ra.view(), wa.view()).unwrap_err(),
        "y",
    );
    assert_layout(unpermute(ya.view(), ra.t(), wa.view()).unwrap_err(), "row");
    assert_layout(
        unpermute(ya.view(), ra.view(), wa.t()).unwrap_err(),
        "weights",
    );
    assert_shape(
        unpermute(ya.view(), ra.view(), Array2::<f32>::ones((2, 3)).view()).unwrap_err(),
        "weights",
    );
}

#[test]
fn bad_unpermute_backward_inputs() {
    let go = vec![0.0f32; 4]; // [2, 2]
    let y = vec![0.0f32; 8]; // [4, 2]
    let row = [0, 1, 2, -1];
    let w = [1.0f32; 4];
    let (mut gy, mut gw) = (vec![1.0f32; 8], vec![1.0f32; 4]);
    let mut call = |go: &[f32], y: &[f32], row: &[i32], w: &[f32], gy_len: usize, gw_len: usize| {
        unpermute_backward_into(
            PermuteSizes {
                num_tokens: 2,
                num_rows: 4,
                hidden: 2,
                k: 2,
            },
            go,
            y,
            row,
            w,
            UnpermuteBackwardBuffers {
                grad_y: &mut gy[..gy_len],
                grad_weights: &mut gw[..gw_len],
            },
        )
        .unwrap_err()
    };
    assert_shape(call(&go[..3], &y, &row, &w, 8, 4), "grad_out");
    assert_shape(call(&go, &y[..7], &row, &w, 8, 4), "y");
    assert_shape(call(&go, &y, &row[..3], &w, 8, 4), "row");
    assert_shape(call(&go, &y, &row, &w[..3], 8, 4), "weights");
    assert_shape(call(&go, &y, &row, &w, 6, 4), "grad_y");
    assert_shape(call(&go, &y, &row, &w, 8, 3), "grad_weights");
    assert_invalid(
        call(&go, &y, &[0, 1, 4, -1], &w, 8, 4),
        "row",
        "4 at token 1, choice 0",
    );
    assert_invalid(
        call(&go, &y, &[0, 1, 1, -1], &w, 8, 4),
        "row",
        "at most one assignment",
    );
    assert_eq!(
        (gy, gw),
        (vec![1.0; 8], vec![1.0; 4]),
        "outputs untouched on error"
    );

    let ya = Array2::<f32>::zeros((4, 2));
    let ra = array![[0, 1], [2, -1]];
    let wa = Array2::<f32>::ones((2, 2));
    let goa = Array2::<f32>::ones((2, 2));
    assert_shape(
        unpermute_backward(
            Array2::<f32>::ones((3, 2)).view(),
            ya.view(),
            ra.view(),
            wa.view(),
        )
        .unwrap_err(),
        "grad_out",
    );
    assert_layout(
        unpermute_backward(goa.t(), ya.view(), ra.view(), wa.view()).unwrap_err(),
        "grad_out",
    );
    assert_shape(
        unpermute_backward(goa.view(), ya.slice(s![.., ..;2]), ra.view(), wa.view()).unwrap_err(),
        "grad_out",
    );
    let go1 = Array2::<f32>::ones((2, 1));
    assert_layout(
        unpermute_backward(go1.view(), ya.slice(s![.., ..;2]), ra.view(), wa.view()).unwrap_err(),
        "y",
    );
    assert_layout(
        unpermute_backward(goa.view(), ya.slice(s![..;2, ..]), ra.view(), wa.view()).unwrap_err(),
        "y",
    );
    assert_layout(
        unpermute_backward(goa.view(), ya.view(), ra.t(), wa.view()).unwrap_err(),
        "row",
    );
    assert_layout(
        unpermute_backward(goa.view(), ya.view(), ra.view(), wa.t()).unwrap_err(),
        "weights",
    );
}

#[test]
fn bad_sizes_overflow_i32() {
    // num_tokens * k beyond i32 (a zero-width hidden and empty buffers get past the
    // length checks only if the overflow check is missing).
    let e = unpermute_into::<f32>(
        PermuteSizes {
            num_tokens: 1 << 20,
            num_rows: 0,
            hidden: 0,
            k: 1 << 12,
        },
        &[],
        &[],
        &[],
        &mut [],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Overflow {
                what: "num_tokens * k",
                ..
            }
        ),
        "{e}"
    );
}
