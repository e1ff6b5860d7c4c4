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

// ---------------------------------------------------------------------------
// Losses, dropout, router statistics, bias update: GPU against the CPU reference
// over random shapes (warp and block kernels), masks, caller counts, f32/f16/bf16.
// ---------------------------------------------------------------------------

use moe_router::cuda::bias_update::update_expert_bias_cuda;
use moe_router::cuda::dropout::{
    assignment_dropout_backward_cuda, assignment_dropout_cuda, expert_mask_cuda,
    AssignmentDropoutCudaBuffers,
};
use moe_router::cuda::losses::{
    aux_loss_backward_cuda, aux_loss_backward_workspace_len, aux_loss_cuda, losses_workspace_len,
    seq_aux_loss_backward_cuda, seq_aux_loss_cuda, z_loss_backward_cuda, AuxLossCudaBuffers,
    ZLossCudaBuffers,
};
use moe_router::cuda::router_stats::{
    router_stats_cuda, router_stats_workspace_len, RouterStatsCudaBuffers,
};
use moe_router::{AuxLossConfig, DropoutConfig};

const LOSS_SHAPES: [(usize, usize); 8] = [
    (0, 8),
    (1, 1),
    (37, 7),
    (256, 64),
    (1000, 256),
    (333, 300),
    (64, 2048),
    (5000, 16),
];

fn closef(a: f32, b: f32, rtol: f32, atol: f32) -> bool {
    close(a, b, rtol, atol)
}

/// Aux loss (global and sequence-level, fused z-loss) forward and backward.
#[allow(clippy::too_many_arguments)]
fn check_losses<T: RouterFloat + cudarc::driver::DeviceRepr>(
    be: &CudaBackend,
    z32: &[f32],
    t: usize,
    e: usize,
    seq_len: Option<usize>,
    mask: Option<&[bool]>,
    cfg: &AuxLossConfig,
    caller_counts: bool,
    rng: &mut Rng,
    what: &str,
) {
    let s = be.stream();
    let z: Vec<T> = z32.iter().map(|&v| T::from_f32(v)).collect();
    let gtol = match T::DTYPE {
        moe_router::DType::F32 => (1e-5, 1e-6),
        moe_router::DType::F16 => (2e-3, 1e-6),
        moe_router::DType::BF16 => (1.6e-2, 1e-6),
    };
    let segs = match seq_len {
        None => 1,
        Some(sl) if t == 0 => {
            let _ = sl;
            0
        }
        Some(sl) => t / sl,
    };
    let counts_in: Option<Vec<i64>> =
        caller_counts.then(|| (0..segs * e).map(|_| rng.below(50) as i64).collect());
    // CPU.
    let (closs, ccounts, csums, ctotal): (f32, Vec<i64>, Vec<f32>, Vec<i64>) = match seq_len {
        None => {
            let o = moe_router::aux_loss(&z, t, e, mask, counts_in.as_deref(), None, cfg).unwrap();
            (o.loss, o.counts, o.scores_sum, vec![o.total_tokens as i64])
        }
        Some(sl) => {
            let o =
                moe_router::seq_aux_loss(&z, t, e, sl, mask, counts_in.as_deref(), cfg).unwrap();
            let v = o.valid_tokens.iter().map(|&v| v as i64).collect();
            (o.loss, o.counts, o.scores_sum, v)
        }
    };
    let zc = 1e-3f32;
    let cz = moe_router::z_loss(&z, t, e, mask, zc).unwrap();
    // GPU, outputs poisoned.
    let dz = s.clone_htod(&z).unwrap();
    let dmask = mask.map(|m| s.clone_htod(m).unwrap());
    let dcounts_in = counts_in.as_ref().map(|c| s.clone_htod(c).unwrap());
    let mut dloss = s.clone_htod(&[f32::NAN]).unwrap();
    let mut dcounts = s.clone_htod(&vec![-9i64; segs * e]).unwrap();
    let mut dsums = s.clone_htod(&vec![f32::NAN; segs * e]).unwrap();
    let mut dtotal = s.clone_htod(&vec![-9i64; segs]).unwrap();
    let mut dws = s
        .clone_htod(&vec![f64::NAN; losses_workspace_len(t, e, seq_len)])
        .unwrap();
    let mut dzl = s.clone_htod(&[f32::NAN]).unwrap();
    let mut dzv = s.clone_htod(&[-9i64]).unwrap();
    let dmv = dmask.as_ref().map(|m| m.as_view());
    let dcv = dcounts_in.as_ref().map(|c| c.as_view());
    let out = AuxLossCudaBuffers {
        loss: dloss.as_view_mut(),
        counts: dcounts.as_view_mut(),
        scores_sum: dsums.as_view_mut(),
        total_tokens: dtotal.as_view_mut(),
        workspace: dws.as_view_mut(),
        z_loss: Some(ZLossCudaBuffers {
            loss: dzl.as_view_mut(),
            valid_tokens: dzv.as_view_mut(),
        }),
    };
    match seq_len {
        None => aux_loss_cuda(
            be,
            &dz.as_view(),
            t,
            e,
            dmv.as_ref(),
            dcv.as_ref(),
            None,
            cfg,
            Some(zc),
            out,
        )
        .unwrap(),
        Some(sl) => seq_aux_loss_cuda(
            be,
            &dz.as_view(),
            t,
            e,
            sl,
            dmv.as_ref(),
            dcv.as_ref(),
            cfg,
            Some(zc),
            out,
        )
        .unwrap(),
    }
    let gl = s.clone_dtoh(&dloss).unwrap()[0];
    let gcounts = s.clone_dtoh(&dcounts).unwrap();
    let gsums = s.clone_dtoh(&dsums).unwrap();
    let gtotal = s.clone_dtoh(&dtotal).unwrap();
    let gz = s.clone_dtoh(&dzl).unwrap()[0];
    let gzv = s.clone_dtoh(&dzv).unwrap()[0];
    assert_eq!(gtotal, ctotal, "{what}: total tokens");
    assert_eq!(gzv as usize, cz.valid_tokens, "{what}: z-loss valid tokens");
    if gcounts != ccounts {
        // Only near-ties of the aux scores may move a count between experts.
        let diff: i64 = gcounts
            .iter()
            .zip(&ccounts)
            .map(|(a, b)| (a - b).abs())
            .sum();
        assert!(
            diff as usize * 200 <= t.max(1) * cfg.topk,
            "{what}: counts GPU {gcounts:?} CPU {ccounts:?}"
        );
        return;
    }
    for (i, (&g, &c)) in gsums.iter().zip(&csums).enumerate() {
        assert!(
            closef(g, c, 1e-5, 1e-5),
            "{what}: scores_sum[{i}] GPU {g} CPU {c}"
        );
    }
    assert!(
        closef(gl, closs, 1e-5, 1e-7),
        "{what}: aux loss GPU {gl} CPU {closs}"
    );
    assert!(
        closef(gz, cz.loss, 1e-5, 1e-7),
        "{what}: z loss GPU {gz} CPU {}",
        cz.loss
    );
    // Backward on the same counts and totals.
    let grad_loss = 0.75f32;
    let mut cg = vec![T::default(); t * e];
    match seq_len {
        None => moe_router::aux_loss_backward_into(
            &z,
            t,
            e,
            mask,
            &ccounts,
            ctotal[0] as usize,
            cfg,
            grad_loss,
            &mut cg,
        )
        .unwrap(),
        Some(sl) => moe_router::seq_aux_loss_backward_into(
            &z, t, e, sl, mask, &ccounts, cfg, grad_loss, &mut cg,
        )
        .unwrap(),
    }
    let dgl = s.clone_htod(&[grad_loss]).unwrap();
    let mut dg = s.clone_htod(&vec![T::from_f32(f32::NAN); t * e]).unwrap();
    let mut dgws = s
        .clone_htod(&vec![
            f32::NAN;
            aux_loss_backward_workspace_len(t, e, seq_len)
        ])
        .unwrap();
    match seq_len {
        None => aux_loss_backward_cuda(
            be,
            &dz.as_view(),
            t,
            e,
            dmv.as_ref(),
            &dcounts.as_view(),
            &dtotal.as_view(),
            cfg,
            &dgl.as_view(),
            &mut dgws.as_view_mut(),
            &mut dg.as_view_mut(),
        )
        .unwrap(),
        Some(sl) => seq_aux_loss_backward_cuda(
            be,
            &dz.as_view(),
            t,
            e,
            sl,
            dmv.as_ref(),
            &dcounts.as_view(),
            &dtotal.as_view(),
            cfg,
            &dgl.as_view(),
            &mut dgws.as_view_mut(),
            &mut dg.as_view_mut(),
        )
        .unwrap(),
    }
    let gg = s.clone_dtoh(&dg).unwrap();
    for i in 0..t * e {
        let (g, c) = (gg[i].to_f32(), cg[i].to_f32());
        assert!(
            closef(g, c, gtol.0, gtol.1),
            "{what}: aux grad[{}][{}] GPU {g} CPU {c}",
            i / e,
            i % e
        );
    }
    let mut czg = vec![T::default(); t * e];
    moe_router::z_loss_backward_into(&z, t, e, mask, zc, grad_loss, &mut czg).unwrap();
    let mut dg2 = s.clone_htod(&vec![T::from_f32(f32::NAN); t * e]).unwrap();
    z_loss_backward_cuda(
        be,
        &dz.as_view(),
        t,
        e,
        dmv.as_ref(),
        &dzv.as_view(),
        zc,
        &dgl.as_view(),
        &mut dg2.as_view_mut(),
    )
    .unwrap();
    let gg2 = s.clone_dtoh(&dg2).unwrap();
    for i in 0..t * e {
        let (g, c) = (gg2[i].to_f32(), czg[i].to_f32());
        assert!(
            closef(g, c, gtol.0, gtol.1),
            "{what}: z grad[{}][{}] GPU {g} CPU {c}",
            i / e,
            i % e
        );
    }
}

#[test]
fn losses_match_cpu_every_shape_and_mode() {
    let Some(be) = backend_or_skip() else { return };
    let mut rng = Rng::new(99);
    for &(t, e) in &LOSS_SHAPES {
        for k in [1usize, 2, 8].map(|k| k.min(e)) {
            for (ci, sf) in [ScoreFunction::Softmax, ScoreFunction::Sigmoid]
                .into_iter()
                .enumerate()
            {
                let cfg = AuxLossConfig::new(k).score_function(sf).coeff(0.01);
                let z = rng.normal_vec(t * e, 2.0);
                let mask: Vec<bool> = (0..t).map(|_| rng.below(5) == 0).collect();
                let seq = [1usize, 4, 32]
                    .into_iter()
                    .find(|s| t % s == 0 && *s <= t.max(1));
                for (m, cc, sl) in [
                    (false, false, None),
                    (true, false, None),
                    (false, true, None),
                    (true, false, seq),
                    (false, true, seq),
                ] {
                    let what = format!("T={t} E={e} k={k} {sf:?} mask={m} counts={cc} seq={sl:?}");
                    let mk = m.then_some(mask.as_slice());
                    check_losses::<f32>(
                        &be,
                        &z,
                        t,
                        e,
                        sl,
                        mk,
                        &cfg,
                        cc,
                        &mut rng,
                        &format!("{what} f32"),
                    );
                    if ci == 0 && !cc {
                        check_losses::<f16>(
                            &be,
                            &z,
                            t,
                            e,
                            sl,
                            mk,
                            &cfg,
                            cc,
                            &mut rng,
                            &format!("{what} f16"),
                        );
                        check_losses::<bf16>(
                            &be,
                            &z,
                            t,
                            e,
                            sl,
                            mk,
                            &cfg,
                            cc,
                            &mut rng,
                            &format!("{what} bf16"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn losses_are_bitwise_reproducible() {
    let Some(be) = backend_or_skip() else { return };
    let mut rng = Rng::new(5);
    let (t, e) = (4099usize, 128usize);
    let z = rng.normal_vec(t * e, 2.0);
    let s = be.stream();
    let dz = s.clone_htod(&z).unwrap();
    let cfg = AuxLossConfig::new(4);
    let mut first: Option<(u32, u32, Vec<u32>)> = None;
    for _ in 0..20 {
        let mut dl = s.alloc_zeros::<f32>(1).unwrap();
        let mut dc = s.alloc_zeros::<i64>(e).unwrap();
        let mut ds = s.alloc_zeros::<f32>(e).unwrap();
        let mut dt = s.alloc_zeros::<i64>(1).unwrap();
        let mut dw = s
            .alloc_zeros::<f64>(losses_workspace_len(t, e, None))
            .unwrap();
        let mut dzl = s.alloc_zeros::<f32>(1).unwrap();
        let mut dzv = s.alloc_zeros::<i64>(1).unwrap();
        aux_loss_cuda(
            &be,
            &dz.as_view(),
            t,
            e,
            None,
            None,
            None,
            &cfg,
            Some(1.0),
            AuxLossCudaBuffers {
                loss: dl.as_view_mut(),
                counts: dc.as_view_mut(),
                scores_sum: ds.as_view_mut(),
                total_tokens: dt.as_view_mut(),
                workspace: dw.as_view_mut(),
                z_loss: Some(ZLossCudaBuffers {
                    loss: dzl.as_view_mut(),
                    valid_tokens: dzv.as_view_mut(),
                }),
            },
        )
        .unwrap();
        let r = (
            s.clone_dtoh(&dl).unwrap()[0].to_bits(),
            s.clone_dtoh(&dzl).unwrap()[0].to_bits(),
            s.clone_dtoh(&ds)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        );
        match &first {
            None => first = Some(r),
            Some(f) => assert_eq!(&r, f, "losses differ between runs"),
        }
    }
}

#[test]
fn dropout_matches_cpu() {
    let Some(be) = backend_or_skip() else { return };
    let s = be.stream();
    let mut rng = Rng::new(31);
    for &(t, e, k) in &[
        (0usize, 8usize, 2usize),
        (1, 1, 1),
        (257, 64, 8),
        (1000, 256, 6),
        (33, 2048, 32),
        (77, 300, 300),
    ] {
        for rate in [0.0f32, 0.3, 0.9] {
            let cfg = DropoutConfig::new(rate, rng.next_u64(), rng.below(100) as u64);
            let what = format!("T={t} E={e} k={k} rate={rate}");
            // Expert masking.
            let mut cm = vec![false; t * e];
            moe_router::expert_mask_into(t, e, k, &cfg, &mut cm).unwrap();
            let mut dm = s.clone_htod(&vec![true; t * e]).unwrap();
            expert_mask_cuda(&be, t, e, k, &cfg, &mut dm.as_view_mut()).unwrap();
            assert_eq!(s.clone_dtoh(&dm).unwrap(), cm, "{what}: expert mask");
            // Assignment dropout, indices with some unrouted (-1) entries.
            let kk = k.min(16);
            let idx: Vec<i32> = (0..t * kk)
                .map(|i| {
                    if rng.below(7) == 0 {
                        -1
                    } else {
                        ((i % kk) * (e / kk).max(1)) as i32 % e as i32
                    }
                })
                .collect();
            let idx: Vec<i32> = idx
                .chunks(kk)
                .flat_map(|row| {
                    let mut seen = std::collections::HashSet::new();
                    row.iter()
                        .map(move |&x| if x >= 0 && seen.insert(x) { x } else { -1 })
                        .collect::<Vec<_>>()
                })
                .collect();
            let w: Vec<f32> = (0..t * kk).map(|_| rng.uniform() as f32).collect();
            for renorm in [false, true] {
                let (mut oi, mut ow, mut ok) =
                    (vec![0i32; t * kk], vec![0f32; t * kk], vec![false; t * kk]);
                let cd = moe_router::assignment_dropout_into(
                    &idx,
                    &w,
                    t,
                    kk,
                    e,
                    &cfg,
                    renorm,
                    moe_router::AssignmentDropoutBuffers {
                        indices: &mut oi,
                        weights: &mut ow,
                        keep: &mut ok,
                    },
                )
                .unwrap();
                let di = s.clone_htod(&idx).unwrap();
                let dw = s.clone_htod(&w).unwrap();
                let mut goi = s.clone_htod(&vec![-7i32; t * kk]).unwrap();
                let mut gow = s.clone_htod(&vec![f32::NAN; t * kk]).unwrap();
                let mut gok = s.clone_htod(&vec![true; t * kk]).unwrap();
                let mut gd = s.clone_htod(&[u64::MAX]).unwrap();
                assignment_dropout_cuda(
                    &be,
                    &di.as_view(),
                    &dw.as_view(),
                    t,
                    kk,
                    e,
                    &cfg,
                    renorm,
                    AssignmentDropoutCudaBuffers {
                        indices: goi.as_view_mut(),
                        weights: gow.as_view_mut(),
                        keep: gok.as_view_mut(),
                        dropped: gd.as_view_mut(),
                    },
                )
                .unwrap();
                assert_eq!(s.clone_dtoh(&goi).unwrap(), oi, "{what}: indices");
                assert_eq!(s.clone_dtoh(&gok).unwrap(), ok, "{what}: keep");
                assert_eq!(
                    s.clone_dtoh(&gd).unwrap()[0] as usize,
                    cd,
                    "{what}: dropped"
                );
                let gw = s.clone_dtoh(&gow).unwrap();
                for i in 0..t * kk {
                    assert!(
                        closef(gw[i], ow[i], 1.3e-6, 1e-5),
                        "{what}: weight {i} GPU {} CPU {}",
                        gw[i],
                        ow[i]
                    );
                }
                // Backward.
                let go = rng.normal_vec(t * kk, 1.0);
                let mut cgw = vec![0f32; t * kk];
                moe_router::assignment_dropout_backward_into(
                    &idx, &w, &ok, t, kk, renorm, &go, &mut cgw,
                )
                .unwrap();
                let dgo = s.clone_htod(&go).unwrap();
                let mut dgw = s.clone_htod(&vec![f32::NAN; t * kk]).unwrap();
                assignment_dropout_backward_cuda(
                    &be,
                    &di.as_view(),
                    &dw.as_view(),
                    &gok.as_view(),
                    t,
                    kk,
                    renorm,
                    &dgo.as_view(),
                    &mut dgw.as_view_mut(),
                )
                .unwrap();
                let ggw = s.clone_dtoh(&dgw).unwrap();
                for i in 0..t * kk {
                    assert!(
                        closef(ggw[i], cgw[i], 1.3e-6, 1e-5),
                        "{what}: grad {i} GPU {} CPU {}",
                        ggw[i],
                        cgw[i]
                    );
                }
            }
        }
    }
}

#[test]
fn router_stats_and_bias_update_match_cpu() {
    let Some(be) = backend_or_skip() else { return };
    let s = be.stream();
    let mut rng = Rng::new(77);
    for &(t, e, k) in &[
        (0usize, 4usize, 1usize),
        (1, 1, 1),
        (300, 64, 4),
        (4099, 128, 8),
        (100, 1000, 8),
        (50, 7, 7),
    ] {
        for kind in [Input::Random, Input::Special] {
            let z = make_logits(&mut rng, t * e, kind);
            let mut idx = vec![0i32; t * k];
            let mut w = vec![0f32; t * k];
            topk_gating_into(&z, t, e, None, &TopkGatingConfig::new(k), &mut w, &mut idx).unwrap();
            let slots: Vec<i32> = idx
                .iter()
                .map(|_| if rng.below(4) == 0 { -1 } else { 0 })
                .collect();
            let mask: Vec<bool> = (0..t).map(|_| rng.below(6) == 0).collect();
            let what = format!("T={t} E={e} k={k} {kind:?}");
            let cs = moe_router::router_stats(
                &z,
                t,
                e,
                &idx,
                k,
                Some(&slots),
                Some(&mask),
                &moe_router::RouterStatsConfig::new(),
            )
            .unwrap();
            let dz = s.clone_htod(&z).unwrap();
            let di = s.clone_htod(&idx).unwrap();
            let ds = s.clone_htod(&slots).unwrap();
            let dm = s.clone_htod(&mask).unwrap();
            let mut sel = s.clone_htod(&vec![-1i64; e]).unwrap();
            let mut kept = s.clone_htod(&vec![-1i64; e]).unwrap();
            let mut sc = s.clone_htod(&[-1i64; 4]).unwrap();
            let mut fl = s.clone_htod(&[f32::NAN; 4]).unwrap();
            let mut ws = s
                .clone_htod(&vec![f64::NAN; router_stats_workspace_len(t)])
                .unwrap();
            router_stats_cuda(
                &be,
                &dz.as_view(),
                t,
                e,
                &di.as_view(),
                k,
                Some(&ds.as_view()),
                Some(&dm.as_view()),
                RouterStatsCudaBuffers {
                    selected_counts: sel.as_view_mut(),
                    kept_counts: kept.as_view_mut(),
                    scalars: sc.as_view_mut(),
                    floats: fl.as_view_mut(),
                    workspace: ws.as_view_mut(),
                },
            )
            .unwrap();
            assert_eq!(
                s.clone_dtoh(&sel).unwrap(),
                cs.selected_counts,
                "{what}: selected"
            );
            assert_eq!(
                Some(s.clone_dtoh(&kept).unwrap()),
                cs.kept_counts,
                "{what}: kept"
            );
            let sc = s.clone_dtoh(&sc).unwrap();
            assert_eq!(sc[0] as usize, cs.num_tokens, "{what}: valid");
            assert_eq!(sc[1] as u64, cs.dropped, "{what}: dropped");
            assert_eq!(sc[2] as u64, cs.nonfinite_logits, "{what}: non-finite");
            let fl = s.clone_dtoh(&fl).unwrap();
            for (g, c, name) in [
                (fl[0], cs.max_violation, "max_violation"),
                (fl[1], cs.mean_entropy, "mean_entropy"),
                (fl[2], cs.mean_lse, "mean_lse"),
                (fl[3], cs.max_lse, "max_lse"),
            ] {
                assert!(closef(g, c, 1e-5, 1e-5), "{what}: {name} GPU {g} CPU {c}");
            }
            // Bias update from these counts (and from huge counts: exact integer sign).
            let bias = rng.normal_vec(e, 0.1);
            for counts in [
                cs.selected_counts.clone(),
                (0..e).map(|i| i64::MAX - (i % 3) as i64).collect(),
            ] {
                let mut cb = bias.clone();
                moe_router::update_expert_bias(&mut cb, &counts, 1e-3).unwrap();
                let mut db = s.clone_htod(&bias).unwrap();
                let dc = s.clone_htod(&counts).unwrap();
                update_expert_bias_cuda(&be, &mut db.as_view_mut(), &dc.as_view(), 1e-3).unwrap();
                let gb = s.clone_dtoh(&db).unwrap();
                assert_eq!(
                    gb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    cb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{what}: bias update"
                );
            }
        }
    }
}
