//! GPU kernels against the CPU reference (feature `cuda`, needs a CUDA device).
//!
//! A custom harness (`harness = false`): `main` runs every test function, catching
//! panics, and prints `test <name> ... ok | FAILED | SKIPPED (<reason>)` per test and
//! a closing `gpu_vs_cpu: P passed, F failed, S skipped` line; it exits non-zero on
//! any failure. Without a CUDA device every test is reported SKIPPED, never passed.
//! Arguments that do not start with `-` filter tests by substring; `--list` lists them.
//! With `MOE_ROUTER_REQUIRE_DEVICE=1` a missing device fails every test instead (CI
//! sets it where the CPU emulator of `emu/` must be loaded).
//!
//! Top-k gating forward, replay and backward over token counts {0, 1, 31, 33, 257,
//! 4099}, expert counts {1, 7, 8, 60, 64, 128, 160, 256, 1024, 2048} (both the
//! warp-per-token and the block-per-token kernels), topk up to 32, every score mode,
//! bias, groups, noise and expert masking; random, tie-heavy and ±Inf/NaN inputs;
//! f32, f16 and bf16 logits. Indices must be equal, except where the selection
//! scores of the two differing experts are within a few ulps of each other (the GPU's
//! `expf` and its tree-ordered softmax sum may round differently from the CPU): such
//! near-ties are counted and must stay rare. Values within the tolerance of
//! `docs/semantics.md` §1.7.
//! Every output buffer is poisoned before each launch. 20 repeated runs must be
//! bitwise identical.
//!
//! Dispatch: every drop policy x layout x renormalisation, ep_size over the divisors
//! of E, T up to 65537, E up to 256, k up to 8 (and one k = 32 case), uniform,
//! skewed (over capacity) and tie-heavy routings with -1 entries and NaN weights:
//! every integer output and the kept weights exactly equal to the CPU's;
//! out-of-range device indices act as -1. Expert choice: T up to 65537, E up to
//! 256, capacities from 0 past T, f32/f16/bf16; integer outputs exact up to rare
//! near-ties of p (the GPU's exp may differ from libm by an ulp), weights and the
//! backward within the tolerance of `docs/semantics.md` §1.7.

mod common;

use common::Rng;
use half::{bf16, f16};
use moe_router::cuda::topk_gating::{
    topk_gating_backward_cuda, topk_gating_cuda, topk_gating_replay_cuda, TopkGatingCudaBuffers,
};
use moe_router::cuda::{device_available, CudaBackend, DevBuf, RouterLogitsCuda};
use moe_router::{
    dispatch_into, dispatch_max_rows, topk_gating_backward_into, topk_gating_into,
    topk_gating_replay_into, DispatchBuffers, DispatchConfig, DispatchLayout, DropPolicy,
    RouterFloat, ScoreFunction, TopkGatingConfig,
};

const TOKENS: [usize; 6] = [0, 1, 31, 33, 257, 4099];
const EXPERTS: [usize; 10] = [1, 7, 8, 60, 64, 128, 160, 256, 1024, 2048];

/// Set by `main` when device 0 is the moe-router CPU emulator (`emu/`, what CI runs):
/// the same kernels, host code and checks, at sizes a CPU can afford.
static EMULATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn emulated() -> bool {
    EMULATED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `gpu` on a GPU, `emu` on the emulator.
fn scaled<T>(gpu: T, emu: T) -> T {
    if emulated() {
        emu
    } else {
        gpu
    }
}

/// Runs of the bitwise-reproducibility tests: 20 on a GPU. The emulator alternates
/// forward and reverse thread and block order between launches, so each of its 6
/// runs after the first also switches the schedule.
fn repeats() -> u32 {
    scaled(20, 6)
}

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

/// f64 selection score of every expert of token `t` (the formula of
/// `docs/semantics.md` §2.1), used only to recognise near-ties.
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
        TopkGatingCudaBuffers {
            weights: dw.as_view_mut(),
            indices: di.as_view_mut(),
        },
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

fn topk_gating_matches_cpu_every_shape_and_mode(be: &CudaBackend) {
    let mut rng = Rng::new(2024);
    let (mut tokens, mut near_ties) = (0usize, 0usize);
    for &e in &EXPERTS {
        for &t in &TOKENS {
            // Keep the CPU side of the biggest cases affordable; on the emulator, T = 4099
            // with up to 64 experts and T <= 257 up to 256 experts and 33 tokens above.
            let skip = if emulated() {
                (t == 4099 && e > 64) || (t == 257 && e > 256) || (t > 33 && e > 256)
            } else {
                t * e > 4099 * 256 && t != 4099
            };
            if skip {
                continue;
            }
            for &k in &topks(e) {
                for (ci, (cfg, with_bias)) in configs(e, k, &mut rng).into_iter().enumerate() {
                    let kind = [Input::Random, Input::Ties, Input::Special][(ci + k) % 3];
                    let z = make_logits(&mut rng, t * e, kind);
                    let bias: Option<Vec<f32>> = with_bias.then(|| rng.normal_vec(e, 0.1));
                    let what = format!("T={t} E={e} k={k} cfg#{ci} {kind:?}");
                    near_ties += check_case::<f32>(
                        be,
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
                            be,
                            &z,
                            t,
                            e,
                            bias.as_deref(),
                            &cfg,
                            &mut rng,
                            &format!("{what} f16"),
                        );
                        near_ties += check_case::<bf16>(
                            be,
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

fn topk_gating_is_bitwise_reproducible(be: &CudaBackend) {
    let mut rng = Rng::new(7);
    for &(t, e) in scaled(
        &[(4099usize, 256usize), (257, 2048)],
        &[(1031, 64), (33, 2048)],
    ) {
        let k = 8;
        let z = make_logits(&mut rng, t * e, Input::Random);
        let cfg = TopkGatingConfig::new(k)
            .pre_softmax(true)
            .normalize(true)
            .noise(0.3, 5, 9);
        let s = be.stream();
        let dz = s.clone_htod(&z).unwrap();
        let mut first: Option<(Vec<u32>, Vec<i32>)> = None;
        for run in 0..repeats() {
            let mut dw = s
                .clone_htod(&vec![f32::from_bits(0x7fc0_0000 | run); t * k])
                .unwrap();
            let mut di = s.clone_htod(&vec![-1 - run as i32; t * k]).unwrap();
            topk_gating_cuda(
                be,
                &dz.as_view(),
                t,
                e,
                None,
                &cfg,
                TopkGatingCudaBuffers {
                    weights: dw.as_view_mut(),
                    indices: di.as_view_mut(),
                },
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

fn topk_gating_cuda_rejects_what_the_cpu_rejects(be: &CudaBackend) {
    let s = be.stream();
    let dz = s.clone_htod(&vec![0f32; 4 * 8]).unwrap();
    let mut dw = s.alloc_zeros::<f32>(4 * 2).unwrap();
    let mut di = s.alloc_zeros::<i32>(4 * 2).unwrap();
    let err = topk_gating_cuda(
        be,
        &dz.as_view(),
        4,
        8,
        None,
        &TopkGatingConfig::new(9),
        TopkGatingCudaBuffers {
            weights: dw.as_view_mut(),
            indices: di.as_view_mut(),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("topk"), "{err}");
    let err = topk_gating_cuda(
        be,
        &dz.as_view(),
        4,
        8,
        None,
        &TopkGatingConfig::new(3),
        TopkGatingCudaBuffers {
            weights: dw.as_view_mut(),
            indices: di.as_view_mut(),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("weights"), "{err}");
    let err = topk_gating_cuda(
        be,
        &dz.as_view(),
        5,
        8,
        None,
        &TopkGatingConfig::new(2),
        TopkGatingCudaBuffers {
            weights: dw.as_view_mut(),
            indices: di.as_view_mut(),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("logits"), "{err}");
    let big = s.alloc_zeros::<f32>(4096).unwrap();
    let mut w1 = s.alloc_zeros::<f32>(2).unwrap();
    let mut i1 = s.alloc_zeros::<i32>(2).unwrap();
    let err = topk_gating_cuda(
        be,
        &big.as_view(),
        1,
        4096,
        None,
        &TopkGatingConfig::new(2),
        TopkGatingCudaBuffers {
            weights: w1.as_view_mut(),
            indices: i1.as_view_mut(),
        },
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
    AssignmentDropoutCudaBuffers, AssignmentsCuda,
};
use moe_router::cuda::losses::{
    aux_loss_backward_cuda, aux_loss_backward_workspace_len, aux_loss_cuda, losses_workspace_len,
    seq_aux_loss_backward_cuda, seq_aux_loss_cuda, z_loss_backward_cuda, z_loss_cuda,
    AuxLossBackwardCudaBuffers, AuxLossBackwardCudaInputs, AuxLossCudaBuffers, CudaTotalTokens,
    ZLossCudaBuffers,
};
use moe_router::cuda::router_stats::{
    router_stats_cuda, router_stats_workspace_len, RouterStatsCudaBuffers,
};
use moe_router::{AuxLossConfig, DropoutConfig};

const LOSS_SHAPES: [(usize, usize); 9] = [
    (0, 8),
    (4096, 32),
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
            RouterLogitsCuda::new(dz.as_view(), t, e)
                .padding_mask(dmask.as_ref().map(|m| m.as_view())),
            dcv.as_ref(),
            CudaTotalTokens::Valid,
            cfg,
            Some(zc),
            out,
        )
        .unwrap(),
        Some(sl) => seq_aux_loss_cuda(
            be,
            RouterLogitsCuda::new(dz.as_view(), t, e)
                .padding_mask(dmask.as_ref().map(|m| m.as_view())),
            sl,
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
            moe_router::RouterLogits::new(&z, t, e).padding_mask(mask),
            &ccounts,
            ctotal[0] as usize,
            cfg,
            grad_loss,
            &mut cg,
        )
        .unwrap(),
        Some(sl) => moe_router::seq_aux_loss_backward_into(
            moe_router::RouterLogits::new(&z, t, e).padding_mask(mask),
            sl,
            &ccounts,
            cfg,
            grad_loss,
            &mut cg,
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
            RouterLogitsCuda::new(dz.as_view(), t, e)
                .padding_mask(dmask.as_ref().map(|m| m.as_view())),
            AuxLossBackwardCudaInputs {
                counts: dcounts.as_view(),
                total_tokens: dtotal.as_view(),
                grad_loss: dgl.as_view(),
            },
            cfg,
            AuxLossBackwardCudaBuffers {
                workspace: dgws.as_view_mut(),
                grad_logits: dg.as_view_mut(),
            },
        )
        .unwrap(),
        Some(sl) => seq_aux_loss_backward_cuda(
            be,
            RouterLogitsCuda::new(dz.as_view(), t, e)
                .padding_mask(dmask.as_ref().map(|m| m.as_view())),
            sl,
            AuxLossBackwardCudaInputs {
                counts: dcounts.as_view(),
                total_tokens: dtotal.as_view(),
                grad_loss: dgl.as_view(),
            },
            cfg,
            AuxLossBackwardCudaBuffers {
                workspace: dgws.as_view_mut(),
                grad_logits: dg.as_view_mut(),
            },
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
    moe_router::z_loss_backward_into(
        moe_router::RouterLogits::new(&z, t, e).padding_mask(mask),
        zc,
        grad_loss,
        &mut czg,
    )
    .unwrap();
    let mut dg2 = s.clone_htod(&vec![T::from_f32(f32::NAN); t * e]).unwrap();
    z_loss_backward_cuda(
        be,
        RouterLogitsCuda::new(dz.as_view(), t, e).padding_mask(dmask.as_ref().map(|m| m.as_view())),
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

fn losses_match_cpu_every_shape_and_mode(be: &CudaBackend) {
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
                // The longest of these sequence lengths that divides T, so that a
                // sequence spans several chunks of the kernel's partial sums.
                let seq = [256usize, 32, 4, 1]
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
                        be,
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
                            be,
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
                            be,
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

/// The global aux loss with caller counts and a caller `T_total` given on the host or
/// in device memory (read by the kernels): both as the CPU's loss with that total; a
/// device total <= 0 gives loss 0 and total 0; a total without counts is an error on
/// both backends, before any launch.
fn aux_loss_caller_total_host_and_device(be: &CudaBackend) {
    let s = be.stream();
    let mut rng = Rng::new(41);
    let (t, e) = (37usize, 7usize);
    let cfg = AuxLossConfig::new(2).coeff(0.5);
    let z = rng.normal_vec(t * e, 2.0);
    let mask: Vec<bool> = (0..t).map(|i| i % 5 == 1).collect();
    let counts: Vec<i64> = (0..e).map(|_| rng.below(90) as i64).collect();
    let dz = s.clone_htod(&z).unwrap();
    let dm = s.clone_htod(&mask).unwrap();
    let dc = s.clone_htod(&counts).unwrap();
    let run = |total: CudaTotalTokens<'_, '_>,
               counts: bool|
     -> moe_router::Result<(f32, Vec<i64>, i64)> {
        let mut dl = s.clone_htod(&[f32::NAN]).unwrap();
        let mut dco = s.clone_htod(&vec![-9i64; e]).unwrap();
        let mut dsu = s.clone_htod(&vec![f32::NAN; e]).unwrap();
        let mut dto = s.clone_htod(&[-9i64]).unwrap();
        let mut dws = s
            .clone_htod(&vec![f64::NAN; losses_workspace_len(t, e, None)])
            .unwrap();
        aux_loss_cuda(
            be,
            RouterLogitsCuda::new(dz.as_view(), t, e).padding_mask(Some(dm.as_view())),
            counts.then(|| dc.as_view()).as_ref(),
            total,
            &cfg,
            None,
            AuxLossCudaBuffers {
                loss: dl.as_view_mut(),
                counts: dco.as_view_mut(),
                scores_sum: dsu.as_view_mut(),
                total_tokens: dto.as_view_mut(),
                workspace: dws.as_view_mut(),
                z_loss: None,
            },
        )?;
        Ok((
            s.clone_dtoh(&dl).unwrap()[0],
            s.clone_dtoh(&dco).unwrap(),
            s.clone_dtoh(&dto).unwrap()[0],
        ))
    };
    for total in [1usize, 29, 500, 1 << 40] {
        let c =
            moe_router::aux_loss(&z, t, e, Some(&mask), Some(&counts), Some(total), &cfg).unwrap();
        let dt = s.clone_htod(&[total as i64]).unwrap();
        let dtv = dt.as_view();
        for (how, tt) in [
            ("host", CudaTotalTokens::Host(total)),
            ("device", CudaTotalTokens::Device(&dtv)),
        ] {
            let (l, co, to) = run(tt, true).unwrap();
            assert!(
                closef(l, c.loss, 1e-5, 1e-12),
                "total {total} {how}: loss GPU {l} CPU {}",
                c.loss
            );
            assert_eq!(co, counts, "total {total} {how}: counts");
            assert_eq!(to, total as i64, "total {total} {how}: total_tokens");
        }
    }
    for bad in [0i64, -3, i64::MIN] {
        let dt = s.clone_htod(&[bad]).unwrap();
        let (l, _, to) = run(CudaTotalTokens::Device(&dt.as_view()), true).unwrap();
        assert_eq!((l, to), (0.0, 0), "device total {bad}");
    }
    let name = |r: moe_router::Result<(f32, Vec<i64>, i64)>, what: &str| {
        let err = r.expect_err(what).to_string();
        assert!(err.contains("total_tokens"), "{what}: {err}");
        err
    };
    let err = name(
        run(CudaTotalTokens::Host(7), false),
        "host total without counts",
    );
    assert!(err.contains("counts"), "{err}");
    let cerr = moe_router::aux_loss(&z, t, e, Some(&mask), None, Some(7), &cfg).unwrap_err();
    assert_eq!(err, cerr.to_string(), "CUDA and CPU reject it alike");
    let dt = s.clone_htod(&[7i64]).unwrap();
    let err = name(
        run(CudaTotalTokens::Device(&dt.as_view()), false),
        "device total without counts",
    );
    assert!(err.contains("counts"), "{err}");
    name(run(CudaTotalTokens::Host(0), true), "host total 0");
    let dt2 = s.clone_htod(&[7i64, 8]).unwrap();
    name(
        run(CudaTotalTokens::Device(&dt2.as_view()), true),
        "device total of 2 elements",
    );
}

/// A `+inf` logit: logsumexp `+inf` (as torch.logsumexp), so the z-loss (alone or
/// fused into the aux forward) and router statistics' mean / max logsumexp are `+inf`
/// on both backends, not NaN.
fn plus_inf_logits_give_inf_lse(be: &CudaBackend) {
    let s = be.stream();
    let inf = f32::INFINITY;
    for e in [3usize, 300] {
        let t = 3usize;
        let mut z: Vec<f32> = (0..t * e).map(|i| (i % 5) as f32 * 0.25).collect();
        z[e + 1] = inf;
        z[e + 2] = inf;
        let c = moe_router::z_loss(&z, t, e, None, 1e-3).unwrap();
        assert_eq!(c.loss, inf, "E={e}: CPU z-loss");
        let dz = s.clone_htod(&z).unwrap();
        let mut dws = s
            .clone_htod(&vec![f64::NAN; losses_workspace_len(t, e, None)])
            .unwrap();
        let mut dl = s.clone_htod(&[f32::NAN]).unwrap();
        let mut dv = s.clone_htod(&[-9i64]).unwrap();
        z_loss_cuda(
            be,
            RouterLogitsCuda::new(dz.as_view(), t, e),
            1e-3,
            &mut dws.as_view_mut(),
            ZLossCudaBuffers {
                loss: dl.as_view_mut(),
                valid_tokens: dv.as_view_mut(),
            },
        )
        .unwrap();
        assert_eq!(s.clone_dtoh(&dl).unwrap()[0], inf, "E={e}: GPU z-loss");
        // Fused into the aux forward.
        let mut al = s.clone_htod(&[f32::NAN]).unwrap();
        let mut ac = s.clone_htod(&vec![0i64; e]).unwrap();
        let mut asu = s.clone_htod(&vec![0f32; e]).unwrap();
        let mut at = s.clone_htod(&[0i64]).unwrap();
        let mut zl = s.clone_htod(&[f32::NAN]).unwrap();
        aux_loss_cuda(
            be,
            RouterLogitsCuda::new(dz.as_view(), t, e),
            None,
            CudaTotalTokens::Valid,
            &AuxLossConfig::new(1),
            Some(1e-3),
            AuxLossCudaBuffers {
                loss: al.as_view_mut(),
                counts: ac.as_view_mut(),
                scores_sum: asu.as_view_mut(),
                total_tokens: at.as_view_mut(),
                workspace: dws.as_view_mut(),
                z_loss: Some(ZLossCudaBuffers {
                    loss: zl.as_view_mut(),
                    valid_tokens: dv.as_view_mut(),
                }),
            },
        )
        .unwrap();
        assert_eq!(
            s.clone_dtoh(&zl).unwrap()[0],
            inf,
            "E={e}: GPU fused z-loss"
        );
        // Router statistics.
        let idx: Vec<i32> = (0..t as i32).collect();
        let cs = moe_router::router_stats(
            moe_router::RouterLogits::new(&z, t, e),
            &idx,
            1,
            None,
            &moe_router::RouterStatsConfig::new(),
        )
        .unwrap();
        assert_eq!((cs.mean_lse, cs.max_lse), (inf, inf), "E={e}: CPU stats");
        let di = s.clone_htod(&idx).unwrap();
        let mut sel = s.clone_htod(&vec![-1i64; e]).unwrap();
        let mut kept = s.clone_htod(&vec![-1i64; e]).unwrap();
        let mut sc = s.clone_htod(&[-1i64; 4]).unwrap();
        let mut fl = s.clone_htod(&[f32::NAN; 4]).unwrap();
        let mut ws = s
            .clone_htod(&vec![f64::NAN; router_stats_workspace_len(t)])
            .unwrap();
        router_stats_cuda(
            be,
            RouterLogitsCuda::new(dz.as_view(), t, e),
            &di.as_view(),
            1,
            None,
            RouterStatsCudaBuffers {
                selected_counts: sel.as_view_mut(),
                kept_counts: kept.as_view_mut(),
                scalars: sc.as_view_mut(),
                floats: fl.as_view_mut(),
                workspace: ws.as_view_mut(),
            },
        )
        .unwrap();
        let fl = s.clone_dtoh(&fl).unwrap();
        assert_eq!((fl[2], fl[3]), (inf, inf), "E={e}: GPU stats {fl:?}");
        assert!(fl[1].is_nan() && cs.mean_entropy.is_nan(), "E={e}: entropy");
    }
}

fn losses_are_bitwise_reproducible(be: &CudaBackend) {
    let mut rng = Rng::new(5);
    let (t, e) = (4099usize, 128usize);
    let z = rng.normal_vec(t * e, 2.0);
    let s = be.stream();
    let dz = s.clone_htod(&z).unwrap();
    let cfg = AuxLossConfig::new(4);
    let mut first: Option<(u32, u32, Vec<u32>)> = None;
    for _ in 0..repeats() {
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
            be,
            RouterLogitsCuda::new(dz.as_view(), t, e),
            None,
            CudaTotalTokens::Valid,
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

fn dropout_matches_cpu(be: &CudaBackend) {
    let s = be.stream();
    let mut rng = Rng::new(31);
    for &(t, e, k) in &[
        (0usize, 8usize, 2usize),
        (1, 1, 1),
        (257, 64, 8),
        (1000, 256, 6),
        (33, 2048, 32),
        (77, 300, 300),
        // Rates close to 1 with a large topk: most candidates are unmasked again
        // (the kernels' threshold search, both group sizes).
        (50, 256, 250),
        (9, 2048, 1500),
    ] {
        for rate in [0.0f32, 0.3, 0.9, 0.999_999_9] {
            let cfg = DropoutConfig::new(rate, rng.next_u64(), rng.below(100) as u64);
            let what = format!("T={t} E={e} k={k} rate={rate}");
            // Expert masking.
            let mut cm = vec![false; t * e];
            moe_router::expert_mask_into(t, e, k, &cfg, &mut cm).unwrap();
            let mut dm = s.clone_htod(&vec![true; t * e]).unwrap();
            expert_mask_cuda(be, t, e, k, &cfg, &mut dm.as_view_mut()).unwrap();
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
                    moe_router::Assignments::new(&idx, &w, t, kk),
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
                    be,
                    AssignmentsCuda {
                        indices: di.as_view(),
                        weights: dw.as_view(),
                        num_tokens: t,
                        topk: kk,
                    },
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
                    moe_router::Assignments::new(&idx, &w, t, kk),
                    &ok,
                    renorm,
                    &go,
                    &mut cgw,
                )
                .unwrap();
                let dgo = s.clone_htod(&go).unwrap();
                let mut dgw = s.clone_htod(&vec![f32::NAN; t * kk]).unwrap();
                assignment_dropout_backward_cuda(
                    be,
                    AssignmentsCuda {
                        indices: di.as_view(),
                        weights: dw.as_view(),
                        num_tokens: t,
                        topk: kk,
                    },
                    &gok.as_view(),
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

fn router_stats_and_bias_update_match_cpu(be: &CudaBackend) {
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
                moe_router::RouterLogits::new(&z, t, e).padding_mask(Some(&mask)),
                &idx,
                k,
                Some(&slots),
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
                be,
                RouterLogitsCuda::new(dz.as_view(), t, e).padding_mask(Some(dm.as_view())),
                &di.as_view(),
                k,
                Some(&ds.as_view()),
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
                update_expert_bias_cuda(be, &mut db.as_view_mut(), &dc.as_view(), 1e-3).unwrap();
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

// ---------------------------------------------------------------------------
// Permute / unpermute (cuda/permute.cu) against src/cpu/permute.rs: the same
// arithmetic in the same order, so every value must have the CPU's bits (NaN
// payloads aside; the inputs here are finite).
// ---------------------------------------------------------------------------

/// Bits of an element for comparison (`f16`/`bf16` widen injectively to `f32`).
fn ebits<T: RouterFloat>(v: T) -> u32 {
    v.to_f32().to_bits()
}

fn assert_bits<T: RouterFloat>(gpu: &[T], cpu: &[T], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let (gf, cf) = (g.to_f32(), c.to_f32());
        let same = ebits(*g) == ebits(*c) || (gf.is_nan() && cf.is_nan());
        assert!(same, "{what}: element {i}: gpu {gf:e} != cpu {cf:e}");
    }
}

/// A routing with drops, padding rows, one repeated row and a few out-of-range
/// entries (which both backends must treat as unrouted / padding).
struct PermuteCase {
    num_tokens: usize,
    num_rows: usize,
    k: usize,
    row: Vec<i32>,
    row_to_token: Vec<i32>,
    weights: Vec<f32>,
}

fn permute_case(rng: &mut Rng, num_tokens: usize, k: usize) -> PermuteCase {
    let num_rows = num_tokens * k + 5;
    let mut perm: Vec<i32> = (0..num_rows as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let mut row: Vec<i32> = (0..num_tokens * k)
        .map(|a| if rng.below(5) == 0 { -1 } else { perm[a] })
        .collect();
    let mut row_to_token = vec![-1i32; num_rows];
    for (a, &r) in row.iter().enumerate() {
        if r >= 0 {
            row_to_token[r as usize] = (a / k) as i32;
        }
    }
    if row.len() >= 4 {
        // Out of range both ways, and a row used twice (the first owner wins grad_y).
        row[0] = num_rows as i32 + 3;
        row[1] = -7;
        row[3] = row[2];
    }
    // Invalid token indices in padding rows give zero rows.
    let pads: Vec<usize> = (0..num_rows).filter(|&r| row_to_token[r] < 0).collect();
    if pads.len() >= 2 {
        row_to_token[pads[0]] = num_tokens as i32 + 2;
        row_to_token[pads[1]] = -9;
    }
    let weights = (0..num_tokens * k)
        .map(|_| (rng.normal() * 0.8) as f32)
        .collect();
    PermuteCase {
        num_tokens,
        num_rows,
        k,
        row,
        row_to_token,
        weights,
    }
}

fn poison<T: RouterFloat>(n: usize) -> Vec<T> {
    vec![T::from_f32(f32::NAN); n]
}

/// Upload `v` at element offset `off` (1 makes every 16-byte chunk misaligned: the
/// scalar path).
fn upload<T: cudarc::driver::DeviceRepr + Copy + Default>(
    be: &CudaBackend,
    v: &[T],
    off: usize,
) -> cudarc::driver::CudaSlice<T> {
    let mut h = vec![T::default(); off];
    h.extend_from_slice(v);
    be.stream().clone_htod(&h).unwrap()
}

fn check_permute<T: RouterFloat + cudarc::driver::DeviceRepr>(
    be: &CudaBackend,
    rng: &mut Rng,
    hidden: usize,
    off: usize,
) {
    use moe_router::cuda::permute::*;
    let nt = if hidden >= 1024 { 37 } else { 301 };
    let c = permute_case(rng, nt, 3);
    let (nr, k) = (c.num_rows, c.k);
    let s = be.stream();
    let ctx = format!("{} hidden={hidden} offset={off}", T::DTYPE);
    let x: Vec<T> = (0..nt * hidden)
        .map(|_| T::from_f32(rng.normal() as f32))
        .collect();
    let y: Vec<T> = (0..nr * hidden)
        .map(|_| T::from_f32(rng.normal() as f32))
        .collect();
    let go: Vec<T> = (0..nt * hidden)
        .map(|_| T::from_f32(rng.normal() as f32))
        .collect();
    let (dx, dy, dgo) = (
        upload(be, &x, off),
        upload(be, &y, off),
        upload(be, &go, off),
    );
    let drow = upload(be, &c.row, 0);
    let drtt = upload(be, &c.row_to_token, 0);
    let dw = upload(be, &c.weights, 0);

    // permute
    let mut cpu = vec![T::default(); nr * hidden];
    moe_router::cpu::permute::permute(&x, hidden, &c.row_to_token, &mut cpu);
    let mut dout = upload(be, &poison::<T>(nr * hidden), off);
    permute_cuda(
        be,
        &dx.slice(off..),
        nt,
        hidden,
        &drtt.as_view(),
        &mut dout.slice_mut(off..),
    )
    .unwrap();
    assert_bits(
        &s.clone_dtoh(&dout.slice(off..)).unwrap(),
        &cpu,
        &format!("permute {ctx}"),
    );

    // permute backward (grad_buf = y)
    let mut cpu = vec![T::default(); nt * hidden];
    moe_router::cpu::permute::permute_backward(&y, hidden, &c.row, k, &mut cpu);
    let mut dgx = upload(be, &poison::<T>(nt * hidden), off);
    permute_backward_cuda(
        be,
        PermuteSizes {
            num_tokens: nt,
            num_rows: nr,
            hidden,
            k,
        },
        &dy.slice(off..),
        &drow.as_view(),
        &mut dgx.slice_mut(off..),
    )
    .unwrap();
    assert_bits(
        &s.clone_dtoh(&dgx.slice(off..)).unwrap(),
        &cpu,
        &format!("permute_backward {ctx}"),
    );

    // unpermute
    let mut cpu = vec![T::default(); nt * hidden];
    moe_router::cpu::permute::unpermute(&y, hidden, &c.row, &c.weights, k, &mut cpu);
    let mut dout = upload(be, &poison::<T>(nt * hidden), off);
    unpermute_cuda(
        be,
        PermuteSizes {
            num_tokens: nt,
            num_rows: nr,
            hidden,
            k,
        },
        &dy.slice(off..),
        &drow.as_view(),
        &dw.as_view(),
        &mut dout.slice_mut(off..),
    )
    .unwrap();
    assert_bits(
        &s.clone_dtoh(&dout.slice(off..)).unwrap(),
        &cpu,
        &format!("unpermute {ctx}"),
    );

    // unpermute backward
    let mut cgy = vec![T::default(); nr * hidden];
    let mut cgw = vec![0f32; nt * k];
    moe_router::cpu::permute::unpermute_backward(
        &go,
        &y,
        hidden,
        &c.row,
        &c.weights,
        k,
        moe_router::UnpermuteBackwardBuffers {
            grad_y: &mut cgy,
            grad_weights: &mut cgw,
        },
    );
    let mut dgy = upload(be, &poison::<T>(nr * hidden), off);
    let mut dgw = upload(be, &vec![f32::NAN; nt * k], 0);
    let mut dws = upload(be, &vec![-5i32; unpermute_backward_workspace_len(nr)], 0);
    unpermute_backward_cuda(
        be,
        PermuteSizes {
            num_tokens: nt,
            num_rows: nr,
            hidden,
            k,
        },
        &dgo.slice(off..),
        &dy.slice(off..),
        &drow.as_view(),
        &dw.as_view(),
        &mut UnpermuteBackwardCudaBuffers {
            grad_y: dgy.slice_mut(off..),
            grad_weights: dgw.as_view_mut(),
            workspace: dws.as_view_mut(),
        },
    )
    .unwrap();
    assert_bits(
        &s.clone_dtoh(&dgy.slice(off..)).unwrap(),
        &cgy,
        &format!("grad_y {ctx}"),
    );
    assert_bits(
        &s.clone_dtoh(&dgw).unwrap(),
        &cgw,
        &format!("grad_weights {ctx}"),
    );
}

fn permute_matches_cpu(be: &CudaBackend) {
    let mut rng = Rng::new(0x9e37);
    for hidden in [1usize, 7, 64, 4096] {
        // Offset 0: the 16-byte path where hidden allows it; offset 1: scalar.
        for off in [0usize, 1] {
            check_permute::<f32>(be, &mut rng, hidden, off);
            check_permute::<f16>(be, &mut rng, hidden, off);
            check_permute::<bf16>(be, &mut rng, hidden, off);
        }
    }
    use moe_router::cuda::permute::permute_vector_path;
    use moe_router::DType;
    assert!(permute_vector_path(DType::BF16, 64, &[256, 512]));
    assert!(!permute_vector_path(DType::BF16, 7, &[256, 512]));
    assert!(!permute_vector_path(DType::F32, 64, &[256, 514]));
}

fn permute_empty_and_k0(be: &CudaBackend) {
    use moe_router::cuda::permute::*;
    let s = be.stream();
    // num_tokens = 0, num_rows = 0, k = 0 launch nothing and succeed.
    let e = s.clone_htod(&[0f32; 1]).unwrap();
    let ei = s.clone_htod(&[0i32; 1]).unwrap();
    let mut eo = s.clone_htod(&[0f32; 1]).unwrap();
    permute_cuda(
        be,
        &e.slice(0..0),
        0,
        8,
        &ei.slice(0..0),
        &mut eo.slice_mut(0..0),
    )
    .unwrap();
    // k = 0: unpermute gives zeros.
    let y = s.clone_htod(&[1f32; 4 * 3]).unwrap();
    let mut out = s.clone_htod(&[f32::NAN; 2 * 3]).unwrap();
    unpermute_cuda(
        be,
        PermuteSizes {
            num_tokens: 2,
            num_rows: 4,
            hidden: 3,
            k: 0,
        },
        &y.as_view(),
        &ei.slice(0..0),
        &e.slice(0..0),
        &mut out.as_view_mut(),
    )
    .unwrap();
    assert_eq!(s.clone_dtoh(&out).unwrap(), vec![0f32; 6]);
    // Wrong lengths are shape errors naming the argument.
    let err = permute_cuda(
        be,
        &y.as_view(),
        5,
        3,
        &ei.as_view(),
        &mut out.as_view_mut(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("x"), "{err}");
}

fn permute_is_bitwise_reproducible(be: &CudaBackend) {
    use moe_router::cuda::permute::*;
    let mut rng = Rng::new(77);
    let (hidden, s) = (4096usize, be.stream());
    let c = permute_case(&mut rng, 211, 4);
    let (nt, nr, k) = (c.num_tokens, c.num_rows, c.k);
    let y: Vec<bf16> = (0..nr * hidden)
        .map(|_| bf16::from_f32(rng.normal() as f32))
        .collect();
    let go: Vec<bf16> = (0..nt * hidden)
        .map(|_| bf16::from_f32(rng.normal() as f32))
        .collect();
    let (dy, dgo) = (upload(be, &y, 0), upload(be, &go, 0));
    let (drow, dw) = (upload(be, &c.row, 0), upload(be, &c.weights, 0));
    let mut first: Option<(Vec<u16>, Vec<u16>, Vec<u32>)> = None;
    for run in 0..repeats() {
        let mut dout = upload(be, &vec![bf16::from_bits(run as u16); nt * hidden], 0);
        unpermute_cuda(
            be,
            PermuteSizes {
                num_tokens: nt,
                num_rows: nr,
                hidden,
                k,
            },
            &dy.as_view(),
            &drow.as_view(),
            &dw.as_view(),
            &mut dout.as_view_mut(),
        )
        .unwrap();
        let mut dgy = upload(be, &vec![bf16::from_bits(run as u16); nr * hidden], 0);
        let mut dgw = upload(be, &vec![run as f32; nt * k], 0);
        let mut dws = upload(be, &vec![run as i32; nr], 0);
        unpermute_backward_cuda(
            be,
            PermuteSizes {
                num_tokens: nt,
                num_rows: nr,
                hidden,
                k,
            },
            &dgo.as_view(),
            &dy.as_view(),
            &drow.as_view(),
            &dw.as_view(),
            &mut UnpermuteBackwardCudaBuffers {
                grad_y: dgy.as_view_mut(),
                grad_weights: dgw.as_view_mut(),
                workspace: dws.as_view_mut(),
            },
        )
        .unwrap();
        let o: Vec<u16> = s
            .clone_dtoh(&dout)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let gy: Vec<u16> = s
            .clone_dtoh(&dgy)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let gw: Vec<u32> = s
            .clone_dtoh(&dgw)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        match &first {
            None => first = Some((o, gy, gw)),
            Some((o0, gy0, gw0)) => {
                assert!(&o == o0, "run {run}: unpermute differs bitwise");
                assert!(&gy == gy0, "run {run}: grad_y differs bitwise");
                assert!(&gw == gw0, "run {run}: grad_weights differs bitwise");
            }
        }
    }
}

/// The raw-pointer entry on a caller-owned stream gives the safe wrapper's result.
fn permute_raw_entry_matches(be: &CudaBackend) {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use moe_router::cuda::permute::*;
    let mut rng = Rng::new(5);
    let (hidden, s) = (64usize, be.stream());
    let c = permute_case(&mut rng, 50, 2);
    let x: Vec<f16> = (0..c.num_tokens * hidden)
        .map(|_| f16::from_f32(rng.normal() as f32))
        .collect();
    let mut cpu = vec![f16::default(); c.num_rows * hidden];
    moe_router::cpu::permute::permute(&x, hidden, &c.row_to_token, &mut cpu);
    let dx = upload(be, &x, 0);
    let drtt = upload(be, &c.row_to_token, 0);
    let mut dbuf = upload(be, &poison::<f16>(c.num_rows * hidden), 0);
    {
        let (xp, _g1) = dx.device_ptr(s);
        let (rp, _g2) = drtt.device_ptr(s);
        let (bp, _g3) = dbuf.device_ptr_mut(s);
        let sizes = PermuteSizes {
            num_tokens: c.num_tokens,
            num_rows: c.num_rows,
            hidden,
            k: 0,
        };
        let ptrs = PermuteRawPtrs {
            x: DevBuf::new(xp, x.len()),
            row_to_token: DevBuf::new(rp, c.row_to_token.len()),
            buf: DevBuf::new(bp, c.num_rows * hidden),
            ..Default::default()
        };
        // SAFETY: live buffers of this context with the documented shapes, on the
        // backend's own stream.
        unsafe {
            permute_raw(
                be,
                s.cu_stream(),
                PermutePass::Permute,
                moe_router::DType::F16,
                sizes,
                ptrs,
            )
        }
        .unwrap();
    }
    assert_bits(&s.clone_dtoh(&dbuf).unwrap(), &cpu, "permute_raw f16");
}

/// The raw entries (what the Python layer calls) refuse, naming the buffer and before
/// any launch: a buffer whose length is not its shape's (the op's validator runs on
/// the given lengths), a null or misaligned one they use, and a non-empty one the pass
/// does not use; an absent optional buffer is fine. (The CUDA aux-loss binding once
/// passed a null `scores_sum`, which the kernel writes.)
fn raw_entries_reject_null_and_misaligned_pointers(be: &CudaBackend) {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use moe_router::cuda::losses::{losses_raw, LossesPass, LossesRawPtrs};
    use moe_router::cuda::permute::*;
    use moe_router::cuda::topk_gating::{topk_gating_raw, TopkGatingPass, TopkGatingRawPtrs};
    use moe_router::DType;
    let s = be.stream();
    let (t, e, k) = (8usize, 4usize, 2usize);
    let z = upload(be, &vec![0.5f32; t * e], 0);
    let mut w = upload(be, &vec![0f32; t * k], 0);
    let mut i = upload(be, &vec![0i32; t * k], 0);
    let (zp, _g1) = z.device_ptr(s);
    let (wp, _g2) = w.device_ptr_mut(s);
    let (ip, _g3) = i.device_ptr_mut(s);
    let expect = |r: moe_router::Result<()>, arg: &str| {
        let err = r.expect_err(arg).to_string();
        assert!(err.contains(arg), "error should name `{arg}`: {err}");
    };
    let gating = |ptrs: TopkGatingRawPtrs| {
        // SAFETY: every non-empty buffer is a live buffer of at least its length; the
        // call must fail on the bad one before launching anything.
        unsafe {
            topk_gating_raw(
                be,
                s.cu_stream(),
                TopkGatingPass::Forward,
                DType::F32,
                t,
                e,
                &TopkGatingConfig::new(k),
                ptrs,
            )
        }
    };
    let ok = TopkGatingRawPtrs {
        logits: DevBuf::new(zp, t * e),
        indices: DevBuf::new(ip, t * k),
        weights: DevBuf::new(wp, t * k),
        ..Default::default()
    };
    gating(ok).unwrap(); // expert_bias = None: no bias
    let weights = DevBuf::new(0, t * k);
    expect(gating(TopkGatingRawPtrs { weights, ..ok }), "weights");
    let weights = DevBuf::new(wp, t * k - 1);
    expect(gating(TopkGatingRawPtrs { weights, ..ok }), "weights");
    let logits = DevBuf::new(zp + 2, t * e);
    expect(gating(TopkGatingRawPtrs { logits, ..ok }), "logits");
    let expert_bias = Some(DevBuf::new(wp + 1, e));
    expect(
        gating(TopkGatingRawPtrs { expert_bias, ..ok }),
        "expert_bias",
    );
    let grad_logits = DevBuf::new(zp, t * e);
    expect(
        gating(TopkGatingRawPtrs { grad_logits, ..ok }),
        "grad_logits",
    );
    // permute: a null destination, then one too short.
    let sizes = PermuteSizes {
        num_tokens: t,
        num_rows: 4,
        hidden: e,
        k: 0,
    };
    let rtt = upload(be, &[0i32; 4], 0);
    let (rp, _g4) = rtt.device_ptr(s);
    let permute = |buf: DevBuf| {
        // SAFETY: as above (`z` holds more than 4 rows of `e`).
        unsafe {
            permute_raw(
                be,
                s.cu_stream(),
                PermutePass::Permute,
                DType::F32,
                sizes,
                PermuteRawPtrs {
                    x: DevBuf::new(zp, t * e),
                    row_to_token: DevBuf::new(rp, 4),
                    buf,
                    ..Default::default()
                },
            )
        }
    };
    expect(permute(DevBuf::new(0, 4 * e)), "buf");
    expect(permute(DevBuf::new(zp, 4 * e - 1)), "out");
    // The aux-loss forward with every buffer but `scores_sum`.
    let mut out = upload(be, &vec![0i64; 64], 0);
    let ws_len = moe_router::cuda::losses::losses_workspace_len(t, e, None);
    let mut ws = upload(be, &vec![0f64; ws_len], 0);
    let (op, _g5) = out.device_ptr_mut(s);
    let (wsp, _g6) = ws.device_ptr_mut(s);
    let pass = LossesPass::AuxForward {
        cfg: AuxLossConfig::new(k),
        seq_len: None,
        total_tokens: None,
        z_loss_coeff: None,
    };
    let ok = LossesRawPtrs {
        logits: DevBuf::new(zp, t * e),
        loss: DevBuf::new(op, 1),
        out_counts: DevBuf::new(op + 64, e),
        scores_sum: DevBuf::new(op + 128, e),
        total_tokens: DevBuf::new(op + 192, 1),
        workspace: DevBuf::new(wsp, ws_len),
        ..Default::default()
    };
    let losses = |ptrs: LossesRawPtrs| {
        // SAFETY: as above; every buffer of `ok` lies in `out` or `ws`, apart.
        unsafe { losses_raw(be, s.cu_stream(), pass, DType::F32, t, e, ptrs) }
    };
    losses(ok).unwrap();
    let scores_sum = DevBuf::new(0, e);
    expect(losses(LossesRawPtrs { scores_sum, ..ok }), "scores_sum");
    // Not fused: the z-loss buffers must be empty.
    let z_loss = DevBuf::new(op + 256, 1);
    expect(losses(LossesRawPtrs { z_loss, ..ok }), "z_loss");
    let workspace = DevBuf::new(wsp, ws_len - 1);
    expect(losses(LossesRawPtrs { workspace, ..ok }), "workspace");
}

// ---------------------------------------------------------------------------
// Dispatch (cuda/dispatch.cu) against src/cpu/dispatch.rs: every integer output
// exactly, kept weights bit for bit (the same f32 operations in the same order).
// ---------------------------------------------------------------------------

const DISPATCH_TOKENS: [usize; 7] = [0, 1, 31, 33, 257, 4099, 65537];
const DISPATCH_EXPERTS: [usize; 8] = [1, 7, 8, 60, 64, 128, 160, 256];

#[derive(Clone, Copy, Debug)]
enum Routing {
    /// Distinct uniform experts per token, normal weights.
    Uniform,
    /// Most assignments go to a few experts (over capacity), a few -1 entries.
    Skewed,
    /// Few distinct weights (key ties broken by the token), -1 entries, NaN weights.
    Ties,
}

/// Distinct experts per token (or -1), weights per `kind`.
fn make_routing(
    rng: &mut Rng,
    t: usize,
    e: usize,
    k: usize,
    kind: Routing,
) -> (Vec<i32>, Vec<f32>) {
    let mut idx = vec![-1i32; t * k];
    let mut w = vec![0f32; t * k];
    let mut row: Vec<i32> = Vec::with_capacity(k);
    for tok in 0..t {
        row.clear();
        while row.len() < k {
            let x = match kind {
                Routing::Uniform => rng.below(e),
                // Half the picks among the first two experts.
                Routing::Skewed | Routing::Ties => {
                    if rng.below(2) == 0 {
                        rng.below(e.min(2))
                    } else {
                        rng.below(e)
                    }
                }
            } as i32;
            if !row.contains(&x) {
                row.push(x);
            }
        }
        for (j, &rj) in row.iter().enumerate() {
            let a = tok * k + j;
            let unrouted = match kind {
                Routing::Uniform => false,
                Routing::Skewed => rng.below(10) == 0,
                Routing::Ties => rng.below(6) == 0,
            };
            idx[a] = if unrouted { -1 } else { rj };
            w[a] = match kind {
                Routing::Uniform | Routing::Skewed => rng.uniform() as f32,
                Routing::Ties => match rng.below(12) {
                    0 => f32::NAN,
                    1 => -0.0,
                    x => (x % 3) as f32 * 0.25,
                },
            };
        }
    }
    (idx, w)
}

/// Every dispatch output, host side.
#[derive(Debug, Clone, PartialEq)]
struct DispatchHost {
    slot: Vec<i32>,
    row: Vec<i32>,
    kept_weights: Vec<u32>,
    tokens_per_expert: Vec<i32>,
    row_to_token: Vec<i32>,
    expert_offsets: Vec<i32>,
    rows_per_rank: Vec<i32>,
    counts: Vec<i64>,
}

fn canon_bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() })
        .collect()
}

fn dispatch_cpu(idx: &[i32], w: &[f32], t: usize, k: usize, cfg: &DispatchConfig) -> DispatchHost {
    let n = t * k;
    let e = cfg.num_experts;
    let max_rows = dispatch_max_rows(t, k, cfg).unwrap();
    let mut slot = vec![0; n];
    let mut row = vec![0; n];
    let mut kw = vec![0f32; n];
    let mut tpe = vec![0; e];
    let mut rtt = vec![0; max_rows];
    let mut eo = vec![0; e + 1];
    let mut rpr = vec![0; cfg.ep_size];
    let c = dispatch_into(
        idx,
        w,
        t,
        k,
        cfg,
        DispatchBuffers {
            slot: &mut slot,
            row: &mut row,
            kept_weights: &mut kw,
            tokens_per_expert: &mut tpe,
            row_to_token: &mut rtt,
            expert_offsets: &mut eo,
            rows_per_rank: &mut rpr,
        },
    )
    .unwrap();
    DispatchHost {
        slot,
        row,
        kept_weights: canon_bits(&kw),
        tokens_per_expert: tpe,
        row_to_token: rtt,
        expert_offsets: eo,
        rows_per_rank: rpr,
        counts: vec![c.num_rows as i64, c.dropped as i64],
    }
}

/// Device buffers of one dispatch call, every output poisoned.
struct DispatchDev {
    slot: cudarc::driver::CudaSlice<i32>,
    row: cudarc::driver::CudaSlice<i32>,
    kw: cudarc::driver::CudaSlice<f32>,
    tpe: cudarc::driver::CudaSlice<i32>,
    rtt: cudarc::driver::CudaSlice<i32>,
    eo: cudarc::driver::CudaSlice<i32>,
    rpr: cudarc::driver::CudaSlice<i32>,
    counts: cudarc::driver::CudaSlice<i64>,
    ws: cudarc::driver::CudaSlice<i32>,
}

impl DispatchDev {
    fn new(be: &CudaBackend, t: usize, k: usize, cfg: &DispatchConfig) -> Self {
        use moe_router::cuda::dispatch::dispatch_workspace_len;
        let s = be.stream();
        let n = t * k;
        let e = cfg.num_experts;
        let max_rows = dispatch_max_rows(t, k, cfg).unwrap();
        let ws = dispatch_workspace_len(t, k, cfg).unwrap();
        let pi = |len: usize| s.clone_htod(&vec![-7i32; len]).unwrap();
        DispatchDev {
            slot: pi(n),
            row: pi(n),
            kw: s.clone_htod(&vec![f32::from_bits(0x7fc0_dead); n]).unwrap(),
            tpe: pi(e),
            rtt: pi(max_rows),
            eo: pi(e + 1),
            rpr: pi(cfg.ep_size),
            counts: s.clone_htod(&[-7i64, -7]).unwrap(),
            ws: s.clone_htod(&vec![0x5a5a_5a5a_i32; ws]).unwrap(),
        }
    }

    fn bufs(&mut self) -> moe_router::cuda::dispatch::DispatchCudaBuffers<'_> {
        moe_router::cuda::dispatch::DispatchCudaBuffers {
            slot: self.slot.as_view_mut(),
            row: self.row.as_view_mut(),
            kept_weights: self.kw.as_view_mut(),
            tokens_per_expert: self.tpe.as_view_mut(),
            row_to_token: self.rtt.as_view_mut(),
            expert_offsets: self.eo.as_view_mut(),
            rows_per_rank: self.rpr.as_view_mut(),
            counts: self.counts.as_view_mut(),
            workspace: self.ws.as_view_mut(),
        }
    }

    fn host(&self, be: &CudaBackend) -> DispatchHost {
        let s = be.stream();
        DispatchHost {
            slot: s.clone_dtoh(&self.slot).unwrap(),
            row: s.clone_dtoh(&self.row).unwrap(),
            kept_weights: canon_bits(&s.clone_dtoh(&self.kw).unwrap()),
            tokens_per_expert: s.clone_dtoh(&self.tpe).unwrap(),
            row_to_token: s.clone_dtoh(&self.rtt).unwrap(),
            expert_offsets: s.clone_dtoh(&self.eo).unwrap(),
            rows_per_rank: s.clone_dtoh(&self.rpr).unwrap(),
            counts: s.clone_dtoh(&self.counts).unwrap(),
        }
    }
}

fn dispatch_gpu(
    be: &CudaBackend,
    idx: &[i32],
    w: &[f32],
    t: usize,
    k: usize,
    cfg: &DispatchConfig,
) -> DispatchHost {
    let di = upload(be, idx, 0);
    let dw = upload(be, w, 0);
    let mut d = DispatchDev::new(be, t, k, cfg);
    moe_router::cuda::dispatch::dispatch_cuda(
        be,
        &di.as_view(),
        &dw.as_view(),
        t,
        k,
        cfg,
        d.bufs(),
    )
    .unwrap();
    d.host(be)
}

fn assert_dispatch_eq(g: &DispatchHost, c: &DispatchHost, what: &str) {
    let fields: [(&str, &[i32], &[i32]); 6] = [
        ("slot", &g.slot, &c.slot),
        ("row", &g.row, &c.row),
        (
            "tokens_per_expert",
            &g.tokens_per_expert,
            &c.tokens_per_expert,
        ),
        ("row_to_token", &g.row_to_token, &c.row_to_token),
        ("expert_offsets", &g.expert_offsets, &c.expert_offsets),
        ("rows_per_rank", &g.rows_per_rank, &c.rows_per_rank),
    ];
    for (name, a, b) in fields {
        assert_eq!(a.len(), b.len(), "{what}: {name} length");
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            panic!("{what}: {name}[{i}]: gpu {} != cpu {}", a[i], b[i]);
        }
    }
    assert_eq!(g.counts, c.counts, "{what}: (num_rows, dropped)");
    if let Some(i) = (0..g.kept_weights.len()).find(|&i| g.kept_weights[i] != c.kept_weights[i]) {
        panic!(
            "{what}: kept_weights[{i}]: gpu {:e} != cpu {:e}",
            f32::from_bits(g.kept_weights[i]),
            f32::from_bits(c.kept_weights[i])
        );
    }
}

fn policies(rng: &mut Rng) -> [DropPolicy; 5] {
    [
        DropPolicy::Position,
        DropPolicy::ChoiceThenPosition,
        DropPolicy::Probs,
        DropPolicy::BatchPrioritized,
        DropPolicy::Random {
            seed: rng.next_u64(),
            offset: rng.below(1000) as u64,
        },
    ]
}

/// The dispatch configs tried for one routing: every policy with both capacity
/// layouts, and the two layouts without capacity, each with and without
/// renormalisation, `ep_size` cycling through divisors of `e`.
fn dispatch_configs(rng: &mut Rng, t: usize, e: usize, k: usize) -> Vec<DispatchConfig> {
    let divisors: Vec<usize> = (1..=e).filter(|d| e % d == 0).collect();
    let mut v = Vec::new();
    let mut cap_i = 0usize;
    for renorm in [false, true] {
        for policy in policies(rng) {
            for layout in [DispatchLayout::PadToCapacity, DispatchLayout::Compact] {
                // Capacity factors 0.5 .. 2 around the balanced load, sometimes 0.
                let cf = [0.5, 1.0, 1.25, 2.0][cap_i % 4];
                cap_i += 1;
                let cap = if cap_i % 11 == 0 {
                    0
                } else {
                    ((t * k) as f64 / e as f64 * cf).ceil() as usize
                };
                v.push(
                    DispatchConfig::new(e)
                        .capacity(cap)
                        .drop_policy(policy)
                        .layout(layout)
                        .renormalize(renorm)
                        .ep_size(divisors[rng.below(divisors.len())]),
                );
            }
        }
        for layout in [
            DispatchLayout::Compact,
            DispatchLayout::Dropless { align: 1 },
            DispatchLayout::Dropless {
                align: [2, 8, 16, 128][rng.below(4)],
            },
        ] {
            v.push(
                DispatchConfig::new(e)
                    .layout(layout)
                    .renormalize(renorm)
                    .ep_size(divisors[rng.below(divisors.len())]),
            );
        }
    }
    v
}

fn dispatch_topks(e: usize) -> Vec<usize> {
    let mut v = vec![1, 2, 8];
    v.retain(|&k| k <= e);
    v
}

fn dispatch_matches_cpu_every_policy_and_layout(be: &CudaBackend) {
    let mut rng = Rng::new(31);
    let mut cases = 0usize;
    for &t in &DISPATCH_TOKENS {
        for &e in &DISPATCH_EXPERTS {
            // The largest batch: a few expert counts only (it is slow on the CPU side);
            // on the emulator T = 4099 is the largest, with the same few expert counts.
            if (t > 10_000 && !matches!(e, 8 | 160 | 256))
                || (emulated() && (t > 10_000 || (t > 1000 && !matches!(e, 8 | 160 | 256))))
            {
                continue;
            }
            for k in dispatch_topks(e) {
                for kind in [Routing::Uniform, Routing::Skewed, Routing::Ties] {
                    let (idx, w) = make_routing(&mut rng, t, e, k, kind);
                    let mut cfgs = dispatch_configs(&mut rng, t, e, k);
                    if t > 10_000 {
                        // Every policy and layout still, but fewer repeats.
                        cfgs.truncate(cfgs.len() / 2 + 3);
                    }
                    for cfg in &cfgs {
                        let what = format!("T={t} E={e} k={k} {kind:?} {cfg:?}");
                        let c = dispatch_cpu(&idx, &w, t, k, cfg);
                        let g = dispatch_gpu(be, &idx, &w, t, k, cfg);
                        assert_dispatch_eq(&g, &c, &what);
                        cases += 1;
                    }
                }
            }
        }
    }
    // One k = 32 case per policy, over capacity.
    let (t, e, k) = (1000, 64, 32);
    let (idx, w) = make_routing(&mut rng, t, e, k, Routing::Ties);
    for policy in policies(&mut rng) {
        for layout in [DispatchLayout::PadToCapacity, DispatchLayout::Compact] {
            let cfg = DispatchConfig::new(e)
                .capacity(300)
                .drop_policy(policy)
                .layout(layout)
                .renormalize(true)
                .ep_size(4);
            let c = dispatch_cpu(&idx, &w, t, k, &cfg);
            let g = dispatch_gpu(be, &idx, &w, t, k, &cfg);
            assert_dispatch_eq(&g, &c, &format!("k=32 {cfg:?}"));
            cases += 1;
        }
    }
    println!("  dispatch: {cases} cases equal to the CPU");
}

/// Indices outside [0, E) on the device (which the host cannot check) act as -1.
fn dispatch_treats_out_of_range_indices_as_unrouted(be: &CudaBackend) {
    let mut rng = Rng::new(32);
    let (t, e, k) = (777, 60, 4);
    let (mut idx, w) = make_routing(&mut rng, t, e, k, Routing::Skewed);
    let mut clean = idx.clone();
    for a in (0..t * k).step_by(13) {
        idx[a] = [e as i32, e as i32 + 5, -2, i32::MIN, i32::MAX][a % 5];
        clean[a] = -1;
    }
    for policy in policies(&mut rng) {
        let cfg = DispatchConfig::new(e)
            .capacity(40)
            .drop_policy(policy)
            .layout(DispatchLayout::PadToCapacity)
            .renormalize(true);
        let c = dispatch_cpu(&clean, &w, t, k, &cfg);
        let g = dispatch_gpu(be, &idx, &w, t, k, &cfg);
        assert_dispatch_eq(&g, &c, &format!("out-of-range indices {cfg:?}"));
    }
}

fn dispatch_is_bitwise_reproducible(be: &CudaBackend) {
    let mut rng = Rng::new(33);
    let (t, e, k) = scaled((65537, 256, 8), (4099, 256, 8));
    let (idx, w) = make_routing(&mut rng, t, e, k, Routing::Ties);
    let di = upload(be, &idx, 0);
    let dw = upload(be, &w, 0);
    for policy in policies(&mut rng) {
        let cfg = DispatchConfig::new(e)
            .capacity(scaled(1500, 100))
            .drop_policy(policy)
            .layout(DispatchLayout::Compact)
            .renormalize(true)
            .ep_size(8);
        let mut first: Option<DispatchHost> = None;
        for run in 0..repeats() {
            let mut d = DispatchDev::new(be, t, k, &cfg);
            moe_router::cuda::dispatch::dispatch_cuda(
                be,
                &di.as_view(),
                &dw.as_view(),
                t,
                k,
                &cfg,
                d.bufs(),
            )
            .unwrap();
            let h = d.host(be);
            match &first {
                None => {
                    assert_dispatch_eq(&h, &dispatch_cpu(&idx, &w, t, k, &cfg), "run 0");
                    first = Some(h);
                }
                Some(f) => assert!(&h == f, "{policy:?}: run {run} differs"),
            }
        }
    }
}

fn dispatch_cuda_rejects_what_the_cpu_rejects(be: &CudaBackend) {
    use moe_router::cuda::dispatch::dispatch_cuda;
    let (t, k) = (10, 2);
    let idx = upload(be, &vec![0i32; t * k], 0);
    let w = upload(be, &vec![0.5f32; t * k], 0);
    let bad = [
        (
            DispatchConfig::new(8).layout(DispatchLayout::PadToCapacity),
            "capacity",
        ),
        (DispatchConfig::new(8).ep_size(3), "ep_size"),
        (
            DispatchConfig::new(8).layout(DispatchLayout::Dropless { align: 0 }),
            "align",
        ),
        (DispatchConfig::new(0), "num_experts"),
        (DispatchConfig::new(1), "topk"),
    ];
    for (cfg, arg) in bad {
        let ok_cfg = DispatchConfig::new(8);
        let mut d = DispatchDev::new(be, t, k, &ok_cfg);
        let err =
            dispatch_cuda(be, &idx.as_view(), &w.as_view(), t, k, &cfg, d.bufs()).unwrap_err();
        assert!(err.to_string().contains(arg), "{arg}: {err}");
        let cpu = dispatch_max_rows(t, k, &cfg).unwrap_err();
        assert_eq!(err.to_string(), cpu.to_string());
    }
    // A wrong output length names the buffer.
    let cfg = DispatchConfig::new(8).capacity(2);
    let mut d = DispatchDev::new(be, t, k, &cfg.clone().ep_size(2));
    let err = dispatch_cuda(be, &idx.as_view(), &w.as_view(), t, k, &cfg, d.bufs()).unwrap_err();
    assert!(err.to_string().contains("rows_per_rank"), "{err}");
}

/// The raw-pointer entry on a caller-owned stream gives the safe wrapper's result.
fn dispatch_raw_entry_matches(be: &CudaBackend) {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use moe_router::cuda::dispatch::{dispatch_raw, DispatchRawPtrs};
    let mut rng = Rng::new(34);
    let (t, e, k) = (300, 16, 2);
    let (idx, w) = make_routing(&mut rng, t, e, k, Routing::Skewed);
    let cfg = DispatchConfig::new(e)
        .capacity(30)
        .drop_policy(DropPolicy::Probs)
        .layout(DispatchLayout::PadToCapacity)
        .ep_size(4);
    let s = be.stream();
    let di = upload(be, &idx, 0);
    let dw = upload(be, &w, 0);
    let mut d = DispatchDev::new(be, t, k, &cfg);
    {
        let n = [
            di.len(),
            dw.len(),
            d.slot.len(),
            d.row.len(),
            d.kw.len(),
            d.tpe.len(),
            d.rtt.len(),
            d.eo.len(),
            d.rpr.len(),
            d.counts.len(),
            d.ws.len(),
        ];
        let (ip, _g1) = di.device_ptr(s);
        let (wp, _g2) = dw.device_ptr(s);
        let (slot, _g3) = d.slot.device_ptr_mut(s);
        let (row, _g4) = d.row.device_ptr_mut(s);
        let (kw, _g5) = d.kw.device_ptr_mut(s);
        let (tpe, _g6) = d.tpe.device_ptr_mut(s);
        let (rtt, _g7) = d.rtt.device_ptr_mut(s);
        let (eo, _g8) = d.eo.device_ptr_mut(s);
        let (rpr, _g9) = d.rpr.device_ptr_mut(s);
        let (counts, _g10) = d.counts.device_ptr_mut(s);
        let (ws, _g11) = d.ws.device_ptr_mut(s);
        let ptrs = DispatchRawPtrs {
            indices: DevBuf::new(ip, n[0]),
            weights: DevBuf::new(wp, n[1]),
            slot: DevBuf::new(slot, n[2]),
            row: DevBuf::new(row, n[3]),
            kept_weights: DevBuf::new(kw, n[4]),
            tokens_per_expert: DevBuf::new(tpe, n[5]),
            row_to_token: DevBuf::new(rtt, n[6]),
            expert_offsets: DevBuf::new(eo, n[7]),
            rows_per_rank: DevBuf::new(rpr, n[8]),
            counts: DevBuf::new(counts, n[9]),
            workspace: DevBuf::new(ws, n[10]),
        };
        // SAFETY: live buffers of this context with the documented shapes, on the
        // backend's own stream.
        unsafe { dispatch_raw(be, s.cu_stream(), t, k, &cfg, ptrs) }.unwrap();
    }
    assert_dispatch_eq(
        &d.host(be),
        &dispatch_cpu(&idx, &w, t, k, &cfg),
        "dispatch_raw",
    );
}

// ---------------------------------------------------------------------------
// Expert choice (cuda/expert_choice.cu) against src/cpu/expert_choice.rs. The GPU's
// p can differ from the CPU's by an ulp (exp), so an expert's chosen set may differ
// only between tokens whose CPU p are within a few ulps of each other at the
// selection boundary; such experts are counted and must stay rare. Everything
// else is exact; weights within the tolerance of `docs/semantics.md` §1.7.
// ---------------------------------------------------------------------------

const EC_TOKENS: [usize; 7] = [0, 1, 31, 33, 257, 4099, 65537];
const EC_EXPERTS: [usize; 8] = [1, 7, 8, 60, 64, 128, 160, 256];

struct EcHost {
    weights: Vec<f32>,
    row: Vec<i32>,
    row_to_token: Vec<i32>,
    row_weights: Vec<f32>,
    tokens_per_expert: Vec<i32>,
    expert_offsets: Vec<i32>,
}

fn ec_cpu<T: RouterFloat>(z: &[T], t: usize, e: usize, cap: usize) -> EcHost {
    let mut h = EcHost {
        weights: vec![0.0; t * e],
        row: vec![0; t * e],
        row_to_token: vec![0; e * cap],
        row_weights: vec![0.0; e * cap],
        tokens_per_expert: vec![0; e],
        expert_offsets: vec![0; e + 1],
    };
    moe_router::expert_choice_into(
        z,
        t,
        e,
        cap,
        moe_router::ExpertChoiceBuffers {
            weights: &mut h.weights,
            row: &mut h.row,
            row_to_token: &mut h.row_to_token,
            row_weights: &mut h.row_weights,
            tokens_per_expert: &mut h.tokens_per_expert,
            expert_offsets: &mut h.expert_offsets,
        },
    )
    .unwrap();
    h
}

fn ec_gpu<T: RouterFloat + cudarc::driver::DeviceRepr>(
    be: &CudaBackend,
    z: &[T],
    t: usize,
    e: usize,
    cap: usize,
) -> EcHost {
    use moe_router::cuda::expert_choice::{expert_choice_cuda, ExpertChoiceCudaBuffers};
    let s = be.stream();
    let dz = upload(be, z, 0);
    let mut w = upload(be, &poison::<f32>(t * e), 0);
    let mut row = upload(be, &vec![-7i32; t * e], 0);
    let mut rtt = upload(be, &vec![-7i32; e * cap], 0);
    let mut rw = upload(be, &poison::<f32>(e * cap), 0);
    let mut tpe = upload(be, &vec![-7i32; e], 0);
    let mut eo = upload(be, &vec![-7i32; e + 1], 0);
    expert_choice_cuda(
        be,
        &dz.as_view(),
        t,
        e,
        cap,
        ExpertChoiceCudaBuffers {
            weights: w.as_view_mut(),
            row: row.as_view_mut(),
            row_to_token: rtt.as_view_mut(),
            row_weights: rw.as_view_mut(),
            tokens_per_expert: tpe.as_view_mut(),
            expert_offsets: eo.as_view_mut(),
        },
    )
    .unwrap();
    EcHost {
        weights: s.clone_dtoh(&w).unwrap(),
        row: s.clone_dtoh(&row).unwrap(),
        row_to_token: s.clone_dtoh(&rtt).unwrap(),
        row_weights: s.clone_dtoh(&rw).unwrap(),
        tokens_per_expert: s.clone_dtoh(&tpe).unwrap(),
        expert_offsets: s.clone_dtoh(&eo).unwrap(),
    }
}

/// Compare one expert-choice forward; returns the number of experts whose chosen
/// set differed by a tolerated near-tie.
fn check_ec(
    g: &EcHost,
    c: &EcHost,
    p: &[f32],
    t: usize,
    e: usize,
    cap: usize,
    what: &str,
) -> usize {
    let (rtol, atol) = (1.3e-6f32, 1e-5f32);
    assert_eq!(
        g.tokens_per_expert, c.tokens_per_expert,
        "{what}: tokens_per_expert"
    );
    assert_eq!(g.expert_offsets, c.expert_offsets, "{what}: expert_offsets");
    let taken = cap.min(t);
    let mut near_experts = 0;
    for x in 0..e {
        let seg = x * cap..x * cap + cap;
        let (gs, cs) = (&g.row_to_token[seg.clone()], &c.row_to_token[seg.clone()]);
        // Unused rows.
        for (s, &tok) in gs.iter().enumerate().skip(taken) {
            assert_eq!(tok, -1, "{what}: expert {x} unused row {s}");
            assert_eq!(
                g.row_weights[x * cap + s].to_bits(),
                0,
                "{what}: unused weight"
            );
        }
        // GPU consistency: token order, in range, row/weights agree.
        for s in 0..taken {
            let tok = gs[s];
            assert!(
                tok >= 0 && (tok as usize) < t,
                "{what}: expert {x} slot {s}: token {tok}"
            );
            if s > 0 {
                assert!(
                    gs[s - 1] < tok,
                    "{what}: expert {x}: rows not in token order"
                );
            }
            let a = tok as usize * e + x;
            assert_eq!(g.row[a], (x * cap + s) as i32, "{what}: row[{tok}, {x}]");
            let rw = g.row_weights[x * cap + s];
            assert_eq!(
                g.weights[a].to_bits(),
                rw.to_bits(),
                "{what}: weights vs row_weights"
            );
            assert!(
                close(rw, p[a], rtol, atol),
                "{what}: p[{tok}, {x}]: gpu {rw:e} cpu {:e}",
                p[a]
            );
        }
        if gs[..taken] != cs[..taken] {
            // Tolerated only as a near-tie at the boundary: every token in the
            // symmetric difference has a CPU p within a few ulps of the CPU's
            // taken-th largest p of this expert.
            let thr = cs[..taken]
                .iter()
                .map(|&tok| p[tok as usize * e + x])
                .min_by(|a, b| a.total_cmp(b))
                .unwrap_or(f32::NAN);
            for &tok in gs[..taken].iter().chain(&cs[..taken]) {
                let in_g = gs[..taken].contains(&tok);
                let in_c = cs[..taken].contains(&tok);
                if in_g != in_c {
                    let v = p[tok as usize * e + x];
                    assert!(
                        (v - thr).abs() <= 4e-7 * thr.abs().max(1e-30) + 1e-37,
                        "{what}: expert {x}: token {tok} (p {v:e}) chosen differently, threshold {thr:e}"
                    );
                }
            }
            near_experts += 1;
        } else {
            for s in 0..taken {
                assert!(close(
                    g.row_weights[x * cap + s],
                    c.row_weights[x * cap + s],
                    rtol,
                    atol
                ));
            }
        }
    }
    // Every unchosen (t, e) has row -1 and weight +0.
    for a in 0..t * e {
        if g.row[a] < 0 {
            assert_eq!(g.row[a], -1, "{what}: row[{a}]");
            assert_eq!(g.weights[a].to_bits(), 0, "{what}: unchosen weight [{a}]");
        }
    }
    if near_experts == 0 {
        assert_eq!(g.row, c.row, "{what}: row");
    }
    near_experts
}

/// The CPU's p of every (t, e) (what the reference selects on).
fn cpu_p<T: RouterFloat>(z: &[T], t: usize, e: usize) -> Vec<f32> {
    let mut p = vec![0f32; t * e];
    for (pr, zr) in p.chunks_mut(e.max(1)).zip(z.chunks(e.max(1))).take(t) {
        moe_router::cpu::softmax_row(zr.iter().map(|v| v.to_f32()), pr);
    }
    p
}

fn ec_capacities(t: usize, e: usize) -> Vec<usize> {
    let mut v = vec![0, 1, (2 * t).div_ceil(e), t / 2, t, t + 3];
    v.sort_unstable();
    v.dedup();
    v
}

fn check_ec_case<T: RouterFloat + cudarc::driver::DeviceRepr>(
    be: &CudaBackend,
    z32: &[f32],
    t: usize,
    e: usize,
    what: &str,
) -> (usize, usize) {
    let z: Vec<T> = z32.iter().map(|&v| T::from_f32(v)).collect();
    let p = cpu_p(&z, t, e);
    let (mut near, mut experts) = (0, 0);
    for cap in ec_capacities(t, e) {
        let c = ec_cpu(&z, t, e, cap);
        let g = ec_gpu(be, &z, t, e, cap);
        near += check_ec(
            &g,
            &c,
            &p,
            t,
            e,
            cap,
            &format!("{what} {} cap={cap}", T::DTYPE),
        );
        experts += e;
        // Backward on the CPU's row (the same selection for both).
        let gw: Vec<f32> = (0..t * e)
            .map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let mut cg = vec![T::default(); t * e];
        moe_router::expert_choice_backward_into(&z, t, e, &c.row, &gw, &mut cg).unwrap();
        let dz = upload(be, &z, 0);
        let drow = upload(be, &c.row, 0);
        let dgw = upload(be, &gw, 0);
        let mut dg = upload(be, &poison::<T>(t * e), 0);
        moe_router::cuda::expert_choice::expert_choice_backward_cuda(
            be,
            &dz.as_view(),
            t,
            e,
            &drow.as_view(),
            &dgw.as_view(),
            &mut dg.as_view_mut(),
        )
        .unwrap();
        let gg = be.stream().clone_dtoh(&dg).unwrap();
        let (rtol, atol) = match T::DTYPE {
            moe_router::DType::F32 => (1.3e-6, 1e-5),
            moe_router::DType::F16 => (2e-3, 1e-5),
            moe_router::DType::BF16 => (1.6e-2, 1e-5),
        };
        for i in 0..t * e {
            let (a, b) = (gg[i].to_f32(), cg[i].to_f32());
            assert!(
                close(a, b, rtol, atol),
                "{what} cap={cap}: grad[{i}]: gpu {a:e} cpu {b:e}"
            );
        }
    }
    (near, experts)
}

fn expert_choice_matches_cpu(be: &CudaBackend) {
    let mut rng = Rng::new(41);
    let (mut near, mut experts) = (0usize, 0usize);
    for &t in &EC_TOKENS {
        for &e in &EC_EXPERTS {
            if (t > 10_000 && !matches!(e, 8 | 64))
                || (emulated() && (t > 10_000 || (t > 1000 && !matches!(e, 8 | 64))))
            {
                continue;
            }
            for kind in [Input::Random, Input::Ties, Input::Special] {
                let z = make_logits(&mut rng, t * e, kind);
                let what = format!("T={t} E={e} {kind:?}");
                let (n, x) = check_ec_case::<f32>(be, &z, t, e, &what);
                near += n;
                experts += x;
                if t <= 257 {
                    let (n, x) = check_ec_case::<f16>(be, &z, t, e, &what);
                    near += n;
                    experts += x;
                    let (n, x) = check_ec_case::<bf16>(be, &z, t, e, &what);
                    near += n;
                    experts += x;
                }
            }
        }
    }
    println!("  expert_choice: {near} of {experts} expert selections differ by a near-tie");
    assert!(
        near * 100 <= experts,
        "near-ties are not rare: {near} of {experts}"
    );
}

fn expert_choice_is_bitwise_reproducible(be: &CudaBackend) {
    let mut rng = Rng::new(42);
    let (t, e, cap) = scaled((4099, 256, 40), (1031, 256, 10));
    let z = make_logits(&mut rng, t * e, Input::Ties);
    let first = ec_gpu::<f32>(be, &z, t, e, cap);
    for run in 1..repeats() {
        let g = ec_gpu::<f32>(be, &z, t, e, cap);
        assert_eq!(g.row, first.row, "run {run}: row");
        assert_eq!(
            g.row_to_token, first.row_to_token,
            "run {run}: row_to_token"
        );
        assert_eq!(
            canon_bits(&g.weights),
            canon_bits(&first.weights),
            "run {run}: weights"
        );
        assert_eq!(
            canon_bits(&g.row_weights),
            canon_bits(&first.row_weights),
            "run {run}: row_weights"
        );
    }
}

fn expert_choice_raw_entry_matches(be: &CudaBackend) {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use moe_router::cuda::expert_choice::{
        expert_choice_raw, ExpertChoicePass, ExpertChoiceRawPtrs,
    };
    use moe_router::DType;
    let mut rng = Rng::new(43);
    let (t, e, cap) = (100, 12, 9);
    let z: Vec<bf16> = make_logits(&mut rng, t * e, Input::Random)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let safe = ec_gpu::<bf16>(be, &z, t, e, cap);
    let s = be.stream();
    let dz = upload(be, &z, 0);
    let mut w = upload(be, &poison::<f32>(t * e), 0);
    let mut row = upload(be, &vec![-7i32; t * e], 0);
    let mut rtt = upload(be, &vec![-7i32; e * cap], 0);
    let mut rw = upload(be, &poison::<f32>(e * cap), 0);
    let mut tpe = upload(be, &vec![-7i32; e], 0);
    let mut eo = upload(be, &vec![-7i32; e + 1], 0);
    let gw: Vec<f32> = (0..t * e).map(|i| (i % 5) as f32 - 2.0).collect();
    let dgw = upload(be, &gw, 0);
    let mut dg = upload(be, &poison::<bf16>(t * e), 0);
    {
        let (zp, _g1) = dz.device_ptr(s);
        let (wp, _g2) = w.device_ptr_mut(s);
        let (rp, _g3) = row.device_ptr_mut(s);
        let (rttp, _g4) = rtt.device_ptr_mut(s);
        let (rwp, _g5) = rw.device_ptr_mut(s);
        let (tp, _g6) = tpe.device_ptr_mut(s);
        let (ep, _g7) = eo.device_ptr_mut(s);
        let ptrs = ExpertChoiceRawPtrs {
            logits: DevBuf::new(zp, t * e),
            weights: DevBuf::new(wp, t * e),
            row: DevBuf::new(rp, t * e),
            row_to_token: DevBuf::new(rttp, e * cap),
            row_weights: DevBuf::new(rwp, e * cap),
            tokens_per_expert: DevBuf::new(tp, e),
            expert_offsets: DevBuf::new(ep, e + 1),
            ..Default::default()
        };
        let pass = ExpertChoicePass::Forward { capacity: cap };
        // SAFETY: live buffers of this context with the documented shapes, on the
        // backend's own stream.
        unsafe { expert_choice_raw(be, s.cu_stream(), pass, DType::BF16, t, e, ptrs) }.unwrap();
    }
    assert_eq!(s.clone_dtoh(&row).unwrap(), safe.row, "raw row");
    assert_eq!(
        s.clone_dtoh(&rtt).unwrap(),
        safe.row_to_token,
        "raw row_to_token"
    );
    assert_eq!(
        canon_bits(&s.clone_dtoh(&w).unwrap()),
        canon_bits(&safe.weights),
        "raw weights"
    );
    {
        let (zp, _g1) = dz.device_ptr(s);
        let (rp, _g2) = row.device_ptr(s);
        let (gp, _g3) = dgw.device_ptr(s);
        let (gz, _g4) = dg.device_ptr_mut(s);
        let ptrs = ExpertChoiceRawPtrs {
            logits: DevBuf::new(zp, t * e),
            row: DevBuf::new(rp, t * e),
            grad_weights: DevBuf::new(gp, t * e),
            grad_logits: DevBuf::new(gz, t * e),
            ..Default::default()
        };
        let pass = ExpertChoicePass::Backward;
        // SAFETY: as above.
        unsafe { expert_choice_raw(be, s.cu_stream(), pass, DType::BF16, t, e, ptrs) }.unwrap();
    }
    let mut cg = vec![bf16::default(); t * e];
    moe_router::expert_choice_backward_into(&z, t, e, &safe.row, &gw, &mut cg).unwrap();
    let gg = s.clone_dtoh(&dg).unwrap();
    for i in 0..t * e {
        assert!(
            close(gg[i].to_f32(), cg[i].to_f32(), 1.6e-2, 1e-5),
            "raw grad[{i}]"
        );
    }
}

// ---------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------

type TestFn = fn(&CudaBackend);

const TESTS: &[(&str, TestFn)] = &[
    (
        "topk_gating_matches_cpu_every_shape_and_mode",
        topk_gating_matches_cpu_every_shape_and_mode,
    ),
    (
        "topk_gating_is_bitwise_reproducible",
        topk_gating_is_bitwise_reproducible,
    ),
    (
        "topk_gating_cuda_rejects_what_the_cpu_rejects",
        topk_gating_cuda_rejects_what_the_cpu_rejects,
    ),
    (
        "losses_match_cpu_every_shape_and_mode",
        losses_match_cpu_every_shape_and_mode,
    ),
    (
        "losses_are_bitwise_reproducible",
        losses_are_bitwise_reproducible,
    ),
    (
        "aux_loss_caller_total_host_and_device",
        aux_loss_caller_total_host_and_device,
    ),
    ("plus_inf_logits_give_inf_lse", plus_inf_logits_give_inf_lse),
    ("dropout_matches_cpu", dropout_matches_cpu),
    (
        "router_stats_and_bias_update_match_cpu",
        router_stats_and_bias_update_match_cpu,
    ),
    ("permute_matches_cpu", permute_matches_cpu),
    ("permute_empty_and_k0", permute_empty_and_k0),
    (
        "permute_is_bitwise_reproducible",
        permute_is_bitwise_reproducible,
    ),
    ("permute_raw_entry_matches", permute_raw_entry_matches),
    (
        "raw_entries_reject_null_and_misaligned_pointers",
        raw_entries_reject_null_and_misaligned_pointers,
    ),
    (
        "dispatch_matches_cpu_every_policy_and_layout",
        dispatch_matches_cpu_every_policy_and_layout,
    ),
    (
        "dispatch_treats_out_of_range_indices_as_unrouted",
        dispatch_treats_out_of_range_indices_as_unrouted,
    ),
    (
        "dispatch_is_bitwise_reproducible",
        dispatch_is_bitwise_reproducible,
    ),
    (
        "dispatch_cuda_rejects_what_the_cpu_rejects",
        dispatch_cuda_rejects_what_the_cpu_rejects,
    ),
    ("dispatch_raw_entry_matches", dispatch_raw_entry_matches),
    ("expert_choice_matches_cpu", expert_choice_matches_cpu),
    (
        "expert_choice_is_bitwise_reproducible",
        expert_choice_is_bitwise_reproducible,
    ),
    (
        "expert_choice_raw_entry_matches",
        expert_choice_raw_entry_matches,
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let selected: Vec<&(&str, TestFn)> = TESTS
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return;
    }
    // A device that is present but cannot be opened is a failure, not a skip.
    let backend: Result<CudaBackend, (bool, String)> = if device_available() {
        CudaBackend::new(0).map_err(|e| (true, format!("CUDA device 0 could not be opened: {e}")))
    } else {
        Err((
            false,
            "no CUDA device: libcuda not loadable or no device visible".to_string(),
        ))
    };
    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    // Set where a device (or the emulator) must be there: a skip would be a false pass.
    let require_device = std::env::var_os("MOE_ROUTER_REQUIRE_DEVICE").is_some_and(|v| v == "1");
    let device = backend
        .as_ref()
        .ok()
        .and_then(|be| be.context().name().ok())
        .unwrap_or_default();
    if device.contains("CPU emulator") {
        EMULATED.store(true, std::sync::atomic::Ordering::Relaxed);
        println!(
            "\ngpu_vs_cpu: device 0 is `{device}` (emu/, built by scripts/build_emu.sh): the \
             real kernels and host code on the CPU, at reduced sizes. Not a GPU run: no \
             timing, device math or memory-model evidence."
        );
    } else if !device.is_empty() {
        println!("\ngpu_vs_cpu: device 0 is `{device}`");
    }
    println!("\nrunning {} tests", selected.len());
    for (name, f) in &selected {
        match &backend {
            Ok(be) => {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(be)));
                if r.is_ok() {
                    passed += 1;
                    println!("test {name} ... ok");
                } else {
                    failed += 1;
                    println!("test {name} ... FAILED");
                }
            }
            Err((true, why)) => {
                failed += 1;
                println!("test {name} ... FAILED ({why})");
            }
            Err((false, why)) if require_device => {
                failed += 1;
                println!("test {name} ... FAILED ({why}; MOE_ROUTER_REQUIRE_DEVICE=1)");
            }
            Err((false, why)) => {
                skipped += 1;
                println!("test {name} ... SKIPPED ({why})");
            }
        }
    }
    let on = if emulated() {
        " (on the CPU emulator)"
    } else {
        ""
    };
    println!("gpu_vs_cpu: {passed} passed, {failed} failed, {skipped} skipped{on}");
    if failed > 0 {
        std::process::exit(1);
    }
}
