//! CPU criterion benches: the CPU column of the performance table.
//!
//! Shapes from the router issue: T = 16384 tokens, E = 128 experts, k = 8, H = 1024
//! for permute / unpermute. Run with `cargo bench --bench cpu`; CI runs each bench
//! once in test mode (`cargo test --release --benches`) to keep them compiling.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use moe_router::*;
use std::hint::black_box;

const T: usize = 16384;
const E: usize = 128;
const K: usize = 8;
const H: usize = 1024;

/// Deterministic pseudo-normal logits (sum of uniforms), no dependency on the crate.
fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (acc - 2.0) * 1.7
        })
        .collect()
}

fn gating(c: &mut Criterion) {
    let z = logits(T * E, 1);
    let zb: Vec<bf16> = z.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut g = c.benchmark_group("cpu_topk_gating");
    g.throughput(Throughput::Elements((T * E) as u64));
    let mut w = vec![0f32; T * K];
    let mut i = vec![0i32; T * K];
    let cfgs = [
        ("softmax_post", TopkGatingConfig::new(K)),
        (
            "softmax_pre_norm",
            TopkGatingConfig::new(K).pre_softmax(true).normalize(true),
        ),
        (
            "sigmoid_groups_bias",
            TopkGatingConfig::new(K)
                .score_function(ScoreFunction::Sigmoid)
                .normalize(true)
                .group_limit(8, 4)
                .scaling_factor(2.5),
        ),
    ];
    let bias: Vec<f32> = (0..E).map(|e| (e as f32 - 64.0) * 1e-3).collect();
    for (name, cfg) in &cfgs {
        g.bench_function(BenchmarkId::new("fwd_f32", name), |b| {
            b.iter(|| {
                topk_gating_into(black_box(&z), T, E, Some(&bias), cfg, &mut w, &mut i).unwrap()
            })
        });
    }
    g.bench_function(BenchmarkId::new("fwd_bf16", "softmax_post"), |b| {
        b.iter(|| topk_gating_into(black_box(&zb), T, E, None, &cfgs[0].1, &mut w, &mut i).unwrap())
    });
    let cfg = &cfgs[1].1;
    topk_gating_into(&z, T, E, None, cfg, &mut w, &mut i).unwrap();
    let gw = logits(T * K, 2);
    let mut gz = vec![0f32; T * E];
    g.bench_function(BenchmarkId::new("bwd_f32", "softmax_pre_norm"), |b| {
        b.iter(|| topk_gating_backward_into(black_box(&z), T, E, &i, &gw, cfg, &mut gz).unwrap())
    });
    g.finish();
}

fn routed() -> (Vec<f32>, Vec<f32>, Vec<i32>) {
    let z = logits(T * E, 3);
    let mut w = vec![0f32; T * K];
    let mut i = vec![0i32; T * K];
    topk_gating_into(
        &z,
        T,
        E,
        None,
        &TopkGatingConfig::new(K).pre_softmax(true),
        &mut w,
        &mut i,
    )
    .unwrap();
    (z, w, i)
}

fn dispatch_bench(c: &mut Criterion) {
    let (_, w, i) = routed();
    let cap = capacity(T, E, K, &CapacityConfig::new(1.0)).unwrap();
    let mut g = c.benchmark_group("cpu_dispatch");
    g.throughput(Throughput::Elements((T * K) as u64));
    let cases = [
        (
            "position_compact",
            DispatchConfig::new(E)
                .capacity(cap)
                .drop_policy(DropPolicy::Position)
                .layout(DispatchLayout::Compact),
        ),
        (
            "probs_pad",
            DispatchConfig::new(E)
                .capacity(cap)
                .drop_policy(DropPolicy::Probs)
                .layout(DispatchLayout::PadToCapacity),
        ),
        (
            "dropless_align128",
            DispatchConfig::new(E).layout(DispatchLayout::Dropless { align: 128 }),
        ),
    ];
    for (name, cfg) in &cases {
        let rows = dispatch_max_rows(T, K, cfg).unwrap();
        let (mut slot, mut row, mut kw) = (vec![0i32; T * K], vec![0i32; T * K], vec![0f32; T * K]);
        let (mut tpe, mut r2t, mut off, mut rpr) = (
            vec![0i32; E],
            vec![0i32; rows],
            vec![0i32; E + 1],
            vec![0i32; 1],
        );
        g.bench_function(*name, |b| {
            b.iter(|| {
                let out = DispatchBuffers {
                    slot: &mut slot,
                    row: &mut row,
                    kept_weights: &mut kw,
                    tokens_per_expert: &mut tpe,
                    row_to_token: &mut r2t,
                    expert_offsets: &mut off,
                    rows_per_rank: &mut rpr,
                };
                dispatch_into(black_box(&i), &w, T, K, cfg, out).unwrap()
            })
        });
    }
    g.finish();
}

fn losses(c: &mut Criterion) {
    let z = logits(T * E, 4);
    let mut g = c.benchmark_group("cpu_losses");
    g.throughput(Throughput::Elements((T * E) as u64));
    let cfg = AuxLossConfig::new(K).coeff(1e-2);
    g.bench_function("aux_plus_z_fwd_f32", |b| {
        b.iter(|| {
            let a = aux_loss(black_box(&z), T, E, None, None, None, &cfg).unwrap();
            let zl = z_loss(black_box(&z), T, E, None, 1e-3).unwrap();
            (a.loss, zl.loss)
        })
    });
    let a = aux_loss(&z, T, E, None, None, None, &cfg).unwrap();
    let mut gz = vec![0f32; T * E];
    g.bench_function("aux_plus_z_bwd_f32", |b| {
        b.iter(|| {
            aux_loss_backward_into(
                RouterLogits::new(black_box(&z), T, E),
                &a.counts,
                a.total_tokens,
                &cfg,
                1.0,
                &mut gz,
            )
            .unwrap();
            z_loss_backward_into(RouterLogits::new(black_box(&z), T, E), 1e-3, 1.0, &mut gz)
                .unwrap();
        })
    });
    g.finish();
}

fn permute_bench(c: &mut Criterion) {
    let (_, w, i) = routed();
    let cfg = DispatchConfig::new(E).layout(DispatchLayout::Compact);
    let d = dispatch(
        ndarray::ArrayView2::from_shape((T, K), &i).unwrap(),
        ndarray::ArrayView2::from_shape((T, K), &w).unwrap(),
        &cfg,
    )
    .unwrap();
    let rows = d.num_rows;
    let r2t = d.row_to_token.as_slice().unwrap();
    let row = d.row.as_slice().unwrap();
    let kw = d.kept_weights.as_slice().unwrap();
    let x32 = logits(T * H, 5);
    let xb: Vec<bf16> = x32.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut g = c.benchmark_group("cpu_permute");
    // Reference point: a plain memcpy of the permute buffer's bytes (read + write).
    {
        let src = vec![1.0f32; rows * H];
        let mut dst = vec![0.0f32; rows * H];
        g.throughput(Throughput::Bytes((2 * rows * H * 4) as u64));
        g.bench_function("memcpy_baseline", |b| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
    }
    // bytes moved: read x rows + write buffer rows (permute); read buffer + write out (unpermute)
    for (dt, size) in [("f32", 4usize), ("bf16", 2)] {
        g.throughput(Throughput::Bytes((2 * rows * H * size) as u64));
        if dt == "f32" {
            let mut buf = vec![0f32; rows * H];
            let mut out = vec![0f32; T * H];
            g.bench_function(BenchmarkId::new("permute", dt), |b| {
                b.iter(|| permute_into(black_box(&x32), T, H, r2t, &mut buf).unwrap())
            });
            g.throughput(Throughput::Bytes(((rows + T) * H * size) as u64));
            g.bench_function(BenchmarkId::new("unpermute", dt), |b| {
                b.iter(|| {
                    unpermute_into(
                        PermuteSizes {
                            num_tokens: T,
                            num_rows: rows,
                            hidden: H,
                            k: K,
                        },
                        black_box(&buf),
                        row,
                        kw,
                        &mut out,
                    )
                    .unwrap()
                })
            });
        } else {
            let mut buf = vec![bf16::ZERO; rows * H];
            let mut out = vec![bf16::ZERO; T * H];
            g.bench_function(BenchmarkId::new("permute", dt), |b| {
                b.iter(|| permute_into(black_box(&xb), T, H, r2t, &mut buf).unwrap())
            });
            g.throughput(Throughput::Bytes(((rows + T) * H * size) as u64));
            g.bench_function(BenchmarkId::new("unpermute", dt), |b| {
                b.iter(|| {
                    unpermute_into(
                        PermuteSizes {
                            num_tokens: T,
                            num_rows: rows,
                            hidden: H,
                            k: K,
                        },
                        black_box(&buf),
                        row,
                        kw,
                        &mut out,
                    )
                    .unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = gating, dispatch_bench, losses, permute_bench
}
criterion_main!(benches);
