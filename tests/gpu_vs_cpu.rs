//! GPU kernels against the CPU reference (feature `cuda`, needs a CUDA device; prints
//! `SKIPPED: no CUDA device` and returns without one).
//!
//! Top-k gating forward, replay and backward over token counts {0, 1, 31, 33, 257,
//! 4099}, expert counts {1, 7, 8, 60, 64, 128, 160, 256, 1024, 2048} (both the
//! warp-per-token and the block-per-token kernels), topk up to 32, every score mode,
//! bias, groups, noise and expert masking; random, tie-heavy and ±Inf/NaN inputs;
//! f32, f16 and bf16 logits. Indices must be equal, except where the selection
//! scores of the two differing experts are within a few ulps of each other (the GPU's
//! `expf` and its tree-ordered softmax sum may round differently from the CPU): such
//! near-ties are counted and must stay rare. Values within the SPEC tolerance.
//! Every output buffer is poisoned before each launch. 20 repeated runs must be
//! bitwise identical.
#![cfg(feature = "cuda")]

mod common;

use common::Rng;
use half::{bf16, f16};
use moe_router::cuda::topk_gating::{
    topk_gating_backward_cuda, topk_gating_cuda, topk_gating_replay_cuda,
};
use moe_router::cuda::{device_available, CudaBackend};
use moe_router::{
    topk_gating_backward_into, topk_gating_into, topk_gating_replay_into, RouterFloat,
    ScoreFunction, TopkGatingConfig,
};
use std::io::Write as _;

fn backend_or_skip() -> Option<CudaBackend> {
    if !device_available() {
        // Straight to the stderr handle: not swallowed by the test harness's capture.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: no CUDA device (libcuda not loadable or no device visible); the GPU-vs-CPU tests did not run"
        );
        return None;
    }
    Some(CudaBackend::new(0).expect("CUDA device 0"))
}

const TOKENS: [usize; 6] = [0, 1, 31, 33, 257, 4099];
const EXPERTS: [usize; 10] = [1, 7, 8, 60, 64, 128, 160, 256, 1024, 2048];

#[derive(Clone, Copy, Debug)]
enum Input {
    Random,
    Ties,
    Special,
}

fn make_logits(rng: &mut Rng, n: usize, kind: Input) -> Vec<f32> {
    match kind {
        Input::Random => rng.normal_vec(n, 2.0),
        // Few distinct values: many exact ties, broken by the lower index.
        Input::Ties => (0..n).map(|_| rng.below(4) as f32 * 0.5 - 1.0).collect(),
        Input::Special => (0..n)
            .map(|_| match rng.below(20) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                3 => -0.0,
                _ => (rng.normal() * 2.0) as f32,
            })
            .collect(),
    }
}

/// The configs tried for `(num_experts, topk)`.
fn configs(e: usize, k: usize, rng: &mut Rng) -> Vec<(TopkGatingConfig, bool)> {
    let mut v = vec![
        (TopkGatingConfig::new(k), false),
        (
            TopkGatingConfig::new(k)
                .pre_softmax(true)
                .normalize(true)
                .scaling_factor(1.5),
            false,
        ),
        (
            TopkGatingConfig::new(k)
                .score_function(ScoreFunction::Sigmoid)
                .normalize(k > 1)
                .scaling_factor(2.5),
            true,
        ),
        (TopkGatingConfig::new(k).noise(0.7, rng.next_u64(), 3), true),
        (
            TopkGatingConfig::new(k)
                .pre_softmax(true)
                .expert_masking(0.6, rng.next_u64(), 11),
            false,
        ),
    ];
    for g in [4usize, 8] {
        if e % g == 0 && e / g >= 1 {
            let gt = (g / 2).min(k).max(1);
            if gt * (e / g) >= k {
                v.push((
                    TopkGatingConfig::new(k)
                        .score_function(ScoreFunction::Sigmoid)
                        .normalize(true)
                        .group_limit(g, gt),
                    true,
                ));
            }
        }
    }
    v
}

/// f64 selection score of every expert of token `t` (the SPEC formula), used only to
/// recognise near-ties.
fn selection_scores(
    z: &[f32],
    bias: Option<&[f32]>,
    cfg: &TopkGatingConfig,
    t: usize,
    e: usize,
) -> Vec<f64> {
    let row: Vec<f64> = z[t * e..(t + 1) * e].iter().map(|&v| v as f64).collect();
    let mut q: Vec<f64> = match cfg.score_function {
        ScoreFunction::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        ScoreFunction::Softmax if cfg.pre_softmax => {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|&x| (x - m).exp()).sum();
            row.iter().map(|&x| (x - m).exp() / s).collect()
        }
        ScoreFunction::Softmax => row,
    };
    if let Some(b) = bias {
        for (qi, bi) in q.iter_mut().zip(b) {
            *qi += *bi as f64;
        }
    }
    if let Some(n) = cfg.noise {
        for (i, qi) in q.iter_mut().enumerate() {
            *qi += n.std as f64
                * moe_router::philox::normal(
                    n.seed,
                    n.offset,
                    moe_router::philox::Domain::SelectionNoise,
                    (t * e + i) as u64,
                ) as f64;
        }
    }
    q
}

fn near(a: f64, b: f64) -> bool {
    a != b && (a - b).abs() <= 1e-5 * (1.0 + a.abs().max(b.abs()))
}

fn close(a: f32, b: f32, rtol: f32, atol: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= atol + rtol * b.abs()
}

/// Forward, replay and backward on one case; returns the number of tokens whose
/// indices differed by a tolerated near-tie.
#[allow(clippy::too_many_arguments)]
fn check_case<T: RouterFloat + cudarc::driver::DeviceRepr>(
    be: &CudaBackend,
    z32: &[f32],
    t: usize,
    e: usize,
    bias: Option<&[f32]>,
    cfg: &TopkGatingConfig,
    rng: &mut Rng,
    what: &str,
) -> usize {
    let k = cfg.topk;
    let z: Vec<T> = z32.iter().map(|&v| T::from_f32(v)).collect();
    let zr: Vec<f32> = z.iter().map(|v| v.to_f32()).collect();
    let (wtol, gtol) = match T::DTYPE {
        moe_router::DType::F32 => ((1.3e-6, 1e-5), (1.3e-6, 1e-5)),
        moe_router::DType::F16 => ((1.3e-6, 1e-5), (2e-3, 1e-5)),
        moe_router::DType::BF16 => ((1.3e-6, 1e-5), (1.6e-2, 1e-5)),
    };
    // CPU reference.
    let mut cw = vec![0f32; t * k];
    let mut ci = vec![0i32; t * k];
    topk_gating_into(&z, t, e, bias, cfg, &mut cw, &mut ci).unwrap();
    // GPU, outputs poisoned.
    let s = be.stream();
    let dz = s.clone_htod(&z).unwrap();
    let db = bias.map(|b| s.clone_htod(b).unwrap());
    let mut dw = s
        .clone_htod(&vec![f32::from_bits(0x7fc0_dead); t * k])
        .unwrap();
    let mut di = s.clone_htod(&vec![-7i32; t * k]).unwrap();
    let dbv = db.as_ref().map(|b| b.as_view());
    topk_gating_cuda(
        be,
        &dz.as_view(),
        t,
        e,
        dbv.as_ref(),
        cfg,
        &mut dw.as_view_mut(),
        &mut di.as_view_mut(),
    )
    .unwrap();
    let gw = s.clone_dtoh(&dw).unwrap();
    let gi = s.clone_dtoh(&di).unwrap();
    let mut near_ties = 0;
    for tok in 0..t {
        let (a, b) = (&gi[tok * k..(tok + 1) * k], &ci[tok * k..(tok + 1) * k]);
        for &x in a {
            assert!(
                x >= 0 && (x as usize) < e,
                "{what}: token {tok} index {x} out of range"
            );
        }
        if a != b {
            let q = selection_scores(&zr, bias, cfg, tok, e);
            for j in 0..k {
                if a[j] != b[j] {
                    assert!(
                        near(q[a[j] as usize], q[b[j] as usize]),
                        "{what}: token {tok}: GPU indices {a:?} != CPU {b:?}"
                    );
                }
            }
            near_ties += 1;
            continue;
        }
        for j in 0..k {
            let (g, c) = (gw[tok * k + j], cw[tok * k + j]);
            assert!(
                close(g, c, wtol.0, wtol.1),
                "{what}: token {tok} weight {j}: GPU {g} CPU {c}"
            );
        }
    }
    // Replay and backward on the CPU's indices (so both sides weigh the same experts).
    let mut rw = vec![0f32; t * k];
    topk_gating_replay_into(&z, t, e, &ci, cfg, &mut rw).unwrap();
    let dci = s.clone_htod(&ci).unwrap();
    let mut drw = s
        .clone_htod(&vec![f32::from_bits(0x7fc0_beef); t * k])
        .unwrap();
    topk_gating_replay_cuda(
        be,
        &dz.as_view(),
        t,
        e,
        &dci.as_view(),
        cfg,
        &mut drw.as_view_mut(),
    )
    .unwrap();
    let grw = s.clone_dtoh(&drw).unwrap();
    for i in 0..t * k {
        assert!(
            close(grw[i], rw[i], wtol.0, wtol.1),
            "{what}: replay weight {i}: GPU {} CPU {}",
            grw[i],
            rw[i]
        );
    }
    let gwt: Vec<f32> = rng.normal_vec(t * k, 1.0);
    let mut cg = vec![T::default(); t * e];
    topk_gating_backward_into(&z, t, e, &ci, &gwt, cfg, &mut cg).unwrap();
    let dgw = s.clone_htod(&gwt).unwrap();
    let mut dg = s.clone_htod(&vec![T::from_f32(f32::NAN); t * e]).unwrap();
    topk_gating_backward_cuda(
        be,
        &dz.as_view(),
        t,
        e,
        &dci.as_view(),
        &dgw.as_view(),
        cfg,
        &mut dg.as_view_mut(),
    )
    .unwrap();
    let gg = s.clone_dtoh(&dg).unwrap();
    for i in 0..t * e {
        let (g, c) = (gg[i].to_f32(), cg[i].to_f32());
        assert!(
            close(g, c, gtol.0, gtol.1),
            "{what}: grad_logits[{}][{}]: GPU {g} CPU {c}",
            i / e,
            i % e
        );
    }
    near_ties
}

fn topks(e: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [1, 2, 8, 32].iter().map(|&k| k.min(e)).collect();
    v.dedup();
    v
}

#[test]
fn topk_gating_matches_cpu_every_shape_and_mode() {
    let Some(be) = backend_or_skip() else { return };
    let mut rng = Rng::new(2024);
    let (mut tokens, mut near_ties) = (0usize, 0usize);
    for &e in &EXPERTS {
        for &t in &TOKENS {
            // Keep the CPU side of the biggest cases affordable.
            if t * e > 4099 * 256 && t != 4099 {
                continue;
            }
            for &k in &topks(e) {
                for (ci, (cfg, with_bias)) in configs(e, k, &mut rng).into_iter().enumerate() {
                    let kind = [Input::Random, Input::Ties, Input::Special][(ci + k) % 3];
                    let z = make_logits(&mut rng, t * e, kind);
                    let bias: Option<Vec<f32>> = with_bias.then(|| rng.normal_vec(e, 0.1));
                    let what = format!("T={t} E={e} k={k} cfg#{ci} {kind:?}");
                    near_ties += check_case::<f32>(
                        &be,
                        &z,
                        t,
                        e,
                        bias.as_deref(),
                        &cfg,
                        &mut rng,
                        &format!("{what} f32"),
                    );
                    tokens += t;
                    if ci == 1 || ci == 2 {
                        near_ties += check_case::<f16>(
                            &be,
                            &z,
                            t,
                            e,
                            bias.as_deref(),
                            &cfg,
                            &mut rng,
                            &format!("{what} f16"),
                        );
                        near_ties += check_case::<bf16>(
                            &be,
                            &z,
                            t,
                            e,
                            bias.as_deref(),
                            &cfg,
                            &mut rng,
                            &format!("{what} bf16"),
                        );
                        tokens += 2 * t;
                    }
                }
            }
        }
    }
    eprintln!("{tokens} tokens checked, {near_ties} with a near-tie reordering");
    assert!(
        near_ties * 1000 <= tokens.max(1),
        "too many near-tie differences: {near_ties} of {tokens}"
    );
}

#[test]
fn topk_gating_is_bitwise_reproducible() {
    let Some(be) = backend_or_skip() else { return };
    let mut rng = Rng::new(7);
    for &(t, e) in &[(4099usize, 256usize), (257, 2048)] {
        let k = 8;
        let z = make_logits(&mut rng, t * e, Input::Random);
        let cfg = TopkGatingConfig::new(k)
            .pre_softmax(true)
            .normalize(true)
            .noise(0.3, 5, 9);
        let s = be.stream();
        let dz = s.clone_htod(&z).unwrap();
        let mut first: Option<(Vec<u32>, Vec<i32>)> = None;
        for run in 0..20 {
            let mut dw = s
                .clone_htod(&vec![f32::from_bits(0x7fc0_0000 | run); t * k])
                .unwrap();
            let mut di = s.clone_htod(&vec![-1 - run as i32; t * k]).unwrap();
            topk_gating_cuda(
                &be,
                &dz.as_view(),
                t,
                e,
                None,
                &cfg,
                &mut dw.as_view_mut(),
                &mut di.as_view_mut(),
            )
            .unwrap();
            let w: Vec<u32> = s
                .clone_dtoh(&dw)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let i = s.clone_dtoh(&di).unwrap();
            match &first {
                None => first = Some((w, i)),
                Some((w0, i0)) => {
                    assert_eq!(&w, w0, "run {run}: weights differ bitwise (T={t}, E={e})");
                    assert_eq!(&i, i0, "run {run}: indices differ (T={t}, E={e})");
                }
            }
        }
    }
}

#[test]
fn topk_gating_cuda_rejects_what_the_cpu_rejects() {
    let Some(be) = backend_or_skip() else { return };
    let s = be.stream();
    let dz = s.clone_htod(&vec![0f32; 4 * 8]).unwrap();
    let mut dw = s.alloc_zeros::<f32>(4 * 2).unwrap();
    let mut di = s.alloc_zeros::<i32>(4 * 2).unwrap();
    let err = topk_gating_cuda(
        &be,
        &dz.as_view(),
        4,
        8,
        None,
        &TopkGatingConfig::new(9),
        &mut dw.as_view_mut(),
        &mut di.as_view_mut(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("topk"), "{err}");
    let err = topk_gating_cuda(
        &be,
        &dz.as_view(),
        4,
        8,
        None,
        &TopkGatingConfig::new(3),
        &mut dw.as_view_mut(),
        &mut di.as_view_mut(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("weights"), "{err}");
    let err = topk_gating_cuda(
        &be,
        &dz.as_view(),
        5,
        8,
        None,
        &TopkGatingConfig::new(2),
        &mut dw.as_view_mut(),
        &mut di.as_view_mut(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("logits"), "{err}");
    let big = s.alloc_zeros::<f32>(4096).unwrap();
    let mut w1 = s.alloc_zeros::<f32>(2).unwrap();
    let mut i1 = s.alloc_zeros::<i32>(2).unwrap();
    let err = topk_gating_cuda(
        &be,
        &big.as_view(),
        1,
        4096,
        None,
        &TopkGatingConfig::new(2),
        &mut w1.as_view_mut(),
        &mut i1.as_view_mut(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("num_experts"), "{err}");
}
