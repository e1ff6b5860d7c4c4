//! CUDA criterion benches (feature `cuda`): the GPU column of the performance table.
//!
//! Shapes from the router issue: T ∈ {16384, 262144} tokens, E ∈ {128, 256} experts,
//! k = 8 for top-k gating forward / backward (f32, bf16), the fused aux + z loss
//! forward and dispatch (position / compact, probs / pad-to-capacity, capacity
//! factor 1); permute / unpermute forward at T = 16384, E = 128, H = 4096, bf16
//! (dropless layout, segments aligned to 128 rows). `cuda_memcpy_d2d` is the
//! baseline: a 1 GiB device-to-device copy, the device's measured copy bandwidth.
//!
//! Names are `cuda_<op>_<dtype>/<variant>/<shape>`. Throughput is the fewest bytes
//! each op must move through device memory (every input read once, every output
//! written once; a copy counts read plus write), so GB/s compares directly with the
//! memcpy baseline. Timing is `iter_custom`: synchronise the stream, start the
//! clock, launch `iters` times, synchronise, stop; it includes each call's host-side
//! checks and launch cost (what a caller pays). Small inputs are rotated among
//! several copies (at least ~64 MiB in all) so that repeated runs do not time L2.
//!
//! Before timing, each op runs once on poisoned outputs (NaN / out-of-range
//! integers) with random inputs (never zeros); the outputs are read back and
//! checked to be written and plausible. An op that fails is reported as
//! `FAILED <name>: <why>`, not timed, and makes the process exit non-zero.
//! Without a CUDA device it prints `SKIPPED: no CUDA device (...)` and exits 0.
//!
//! Run: `cargo bench --features cuda --bench gpu` (or the packed `bench-gpu --bench`,
//! see `scripts/gpu_run.sh`); criterion options (`--warm-up-time`,
//! `--measurement-time`, `--sample-size`, a name filter) override the short
//! defaults below.

use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;
use moe_router::cuda::dispatch::{dispatch_cuda, dispatch_workspace_len, DispatchCudaBuffers};
use moe_router::cuda::losses::{
    aux_loss_cuda, losses_workspace_len, AuxLossCudaBuffers, CudaTotalTokens, ZLossCudaBuffers,
};
use moe_router::cuda::permute::{permute_cuda, unpermute_cuda};
use moe_router::cuda::topk_gating::{
    topk_gating_backward_cuda, topk_gating_cuda, TopkGatingCudaBuffers,
};
use moe_router::cuda::{device_available, nvrtc_available, CudaBackend, RouterLogitsCuda};
use moe_router::*;
use std::time::{Duration, Instant};

const TOKENS: [usize; 2] = [16384, 262144];
const EXPERTS: [usize; 2] = [128, 256];
const K: usize = 8;
const PERMUTE_T: usize = 16384;
const PERMUTE_E: usize = 128;
const H: usize = 4096;
/// Rotate inputs until the copies hold at least this many bytes (L2 is 50 MiB).
const ROTATE_BYTES: usize = 64 << 20;
const MAX_ROTATE: usize = 16;
const MEMCPY_BYTES: usize = 1 << 30;

type BenchResult<T> = std::result::Result<T, String>;

/// Deterministic pseudo-normal values (sum of two uniforms, scaled), never all zero.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| (next() + next() - 1.0) * 3.0).collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn copies(bytes_each: usize) -> usize {
    ROTATE_BYTES
        .div_ceil(bytes_each.max(1))
        .clamp(1, MAX_ROTATE)
}

struct Bench<'a> {
    c: Criterion,
    be: &'a CudaBackend,
    failures: Vec<String>,
}

impl Bench<'_> {
    fn up<T: DeviceRepr>(&self, v: &[T]) -> BenchResult<CudaSlice<T>> {
        self.be
            .stream()
            .clone_htod(v)
            .map_err(|e| format!("upload: {e}"))
    }

    fn down<T: DeviceRepr>(&self, s: &CudaSlice<T>) -> BenchResult<Vec<T>> {
        self.be
            .stream()
            .clone_dtoh(s)
            .map_err(|e| format!("download: {e}"))
    }

    /// `n` uploaded copies of `v` (inputs rotated between launches).
    fn up_rotated<T: DeviceRepr>(&self, v: &[T]) -> BenchResult<Vec<CudaSlice<T>>> {
        let n = copies(std::mem::size_of_val(v));
        (0..n).map(|_| self.up(v)).collect()
    }

    /// Run `op` once and synchronise (compiles and loads the kernels).
    fn warm(&self, op: &mut dyn FnMut(usize) -> Result<()>) -> BenchResult<()> {
        op(0).map_err(|e| format!("launch: {e}"))?;
        self.be
            .stream()
            .synchronize()
            .map_err(|e| format!("synchronize after the first run: {e}"))
    }

    fn fail(&mut self, name: &str, why: String) {
        println!("FAILED {name}: {why}");
        self.failures.push(format!("{name}: {why}"));
    }

    /// Time `op(i)` (i = iteration number, for rotating inputs) with a stream
    /// synchronise before each clock read.
    fn time(
        &mut self,
        group: &str,
        id: BenchmarkId,
        bytes: usize,
        op: &mut dyn FnMut(usize) -> Result<()>,
    ) {
        let be = self.be;
        let mut g = self.c.benchmark_group(group);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                be.stream().synchronize().expect("stream synchronize");
                let t0 = Instant::now();
                for i in 0..iters as usize {
                    op(i).expect("launch");
                }
                be.stream().synchronize().expect("stream synchronize");
                t0.elapsed()
            })
        });
        g.finish();
    }

    /// Record a failed warm-up or check under `name`; true when `r` is Ok.
    fn ok(&mut self, name: &str, r: BenchResult<()>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.fail(name, e);
                false
            }
        }
    }
}

fn shape_id(variant: &str, t: usize, e: usize) -> BenchmarkId {
    BenchmarkId::new(variant, format!("T{t}_E{e}_k{K}"))
}

fn id_str(variant: &str, t: usize, e: usize) -> String {
    format!("{variant}/T{t}_E{e}_k{K}")
}

fn memcpy_bench(b: &mut Bench) -> BenchResult<()> {
    let n = MEMCPY_BYTES / 4;
    let src = b.up(&randn(n, 99))?;
    let mut dst = b.up(&vec![f32::NAN; n])?;
    let s = b.be.stream().clone();
    let mut op = |_: usize| -> Result<()> { Ok(s.memcpy_dtod(&src, &mut dst)?) };
    b.warm(&mut op)?;
    let (a, d) = (b.down(&src)?, b.down(&dst)?);
    if a.iter().zip(&d).any(|(x, y)| x.to_bits() != y.to_bits()) {
        return Err("the copy differs from its source".into());
    }
    let mut op = |_: usize| -> Result<()> { Ok(s.memcpy_dtod(&src, &mut dst)?) };
    b.time(
        "cuda_memcpy_d2d_f32",
        BenchmarkId::new("copy", "1GiB"),
        2 * MEMCPY_BYTES,
        &mut op,
    );
    Ok(())
}

/// Gating forward and backward for one shape and dtype; returns the forward's
/// `(weights, indices)` (the routing dispatch runs on).
fn gating_bench<T: RouterFloat + DeviceRepr>(
    b: &mut Bench,
    z: &[T],
    t: usize,
    e: usize,
    dtype: &str,
) -> BenchResult<(CudaSlice<f32>, CudaSlice<i32>)> {
    let be = b.be;
    let zs = b.up_rotated(z)?;
    let es = std::mem::size_of::<T>();
    let fwd_cfg = TopkGatingConfig::new(K);
    let mut w = b.up(&vec![f32::NAN; t * K])?;
    let mut ix = b.up(&vec![i32::MIN; t * K])?;
    macro_rules! fwd {
        () => {
            |i: usize| -> Result<()> {
                topk_gating_cuda(
                    be,
                    &zs[i % zs.len()].as_view(),
                    t,
                    e,
                    None,
                    &fwd_cfg,
                    TopkGatingCudaBuffers {
                        weights: w.as_view_mut(),
                        indices: ix.as_view_mut(),
                    },
                )
            }
        };
    }
    let group = format!("cuda_topk_gating_fwd_{dtype}");
    let id = shape_id("softmax_topk", t, e);
    let r = b.warm(&mut fwd!()).and_then(|_| {
        let (wh, ih) = (b.down(&w)?, b.down(&ix)?);
        if let Some(p) = ih.iter().position(|&v| v < 0 || v as usize >= e) {
            return Err(format!("indices[{p}] = {} not in [0, {e})", ih[p]));
        }
        if let Some(p) = wh.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(format!("weights[{p}] = {} (poison left or invalid)", wh[p]));
        }
        Ok(())
    });
    if !b.ok(&format!("{group}/{}", id_str("softmax_topk", t, e)), r) {
        return Err("forward failed: no backward or dispatch for this shape".into());
    }
    b.time(&group, id, t * e * es + t * K * 8, &mut fwd!());

    // Backward of softmax -> top-k -> renormalise, at the forward's indices.
    let bwd_cfg = TopkGatingConfig::new(K).pre_softmax(true).normalize(true);
    let gw = b.up(&randn(t * K, 7))?;
    let mut gz = b.up(&vec![T::from_f32(f32::NAN); t * e])?;
    macro_rules! bwd {
        () => {
            |i: usize| -> Result<()> {
                topk_gating_backward_cuda(
                    be,
                    &zs[i % zs.len()].as_view(),
                    t,
                    e,
                    &ix.as_view(),
                    &gw.as_view(),
                    &bwd_cfg,
                    &mut gz.as_view_mut(),
                )
            }
        };
    }
    let group = format!("cuda_topk_gating_bwd_{dtype}");
    let r = b.warm(&mut bwd!()).and_then(|_| {
        let g = b.down(&gz)?;
        match g.iter().position(|v| !v.to_f32().is_finite()) {
            Some(p) => Err(format!("grad_logits[{p}] not finite (poison left?)")),
            None if g.iter().all(|v| v.to_f32() == 0.0) => Err("grad_logits all zero".into()),
            None => Ok(()),
        }
    });
    if b.ok(&format!("{group}/{}", id_str("pre_softmax_norm", t, e)), r) {
        b.time(
            &group,
            shape_id("pre_softmax_norm", t, e),
            2 * t * e * es + t * K * 8,
            &mut bwd!(),
        );
    }
    Ok((w, ix))
}

fn loss_bench<T: RouterFloat + DeviceRepr>(
    b: &mut Bench,
    z: &[T],
    t: usize,
    e: usize,
    dtype: &str,
) -> BenchResult<()> {
    let be = b.be;
    let zs = b.up_rotated(z)?;
    let cfg = AuxLossConfig::new(K).coeff(1e-2);
    let mut loss = b.up(&[f32::NAN])?;
    let mut counts = b.up(&vec![-9i64; e])?;
    let mut sums = b.up(&vec![f32::NAN; e])?;
    let mut total = b.up(&[-9i64])?;
    let mut ws = b.up(&vec![f64::NAN; losses_workspace_len(t, e, None)])?;
    let mut zl = b.up(&[f32::NAN])?;
    let mut zv = b.up(&[-9i64])?;
    let mut op = |i: usize| -> Result<()> {
        aux_loss_cuda(
            be,
            RouterLogitsCuda::new(zs[i % zs.len()].as_view(), t, e),
            None,
            CudaTotalTokens::Valid,
            &cfg,
            Some(1e-3),
            AuxLossCudaBuffers {
                loss: loss.as_view_mut(),
                counts: counts.as_view_mut(),
                scores_sum: sums.as_view_mut(),
                total_tokens: total.as_view_mut(),
                workspace: ws.as_view_mut(),
                z_loss: Some(ZLossCudaBuffers {
                    loss: zl.as_view_mut(),
                    valid_tokens: zv.as_view_mut(),
                }),
            },
        )
    };
    b.warm(&mut op)?;
    let (l, c, zlh, zvh) = (b.down(&loss)?, b.down(&counts)?, b.down(&zl)?, b.down(&zv)?);
    let sum: i64 = c.iter().sum();
    if !l[0].is_finite() || !zlh[0].is_finite() || zvh[0] != t as i64 || sum != (t * K) as i64 {
        return Err(format!(
            "aux loss {}, z loss {}, valid tokens {} (want {t}), Σcounts {sum} (want {})",
            l[0],
            zlh[0],
            zvh[0],
            t * K
        ));
    }
    let mut op = |i: usize| -> Result<()> {
        aux_loss_cuda(
            be,
            RouterLogitsCuda::new(zs[i % zs.len()].as_view(), t, e),
            None,
            CudaTotalTokens::Valid,
            &cfg,
            Some(1e-3),
            AuxLossCudaBuffers {
                loss: loss.as_view_mut(),
                counts: counts.as_view_mut(),
                scores_sum: sums.as_view_mut(),
                total_tokens: total.as_view_mut(),
                workspace: ws.as_view_mut(),
                z_loss: Some(ZLossCudaBuffers {
                    loss: zl.as_view_mut(),
                    valid_tokens: zv.as_view_mut(),
                }),
            },
        )
    };
    let bytes = t * e * std::mem::size_of::<T>() + e * 12 + 32;
    b.time(
        &format!("cuda_aux_z_loss_fwd_{dtype}"),
        shape_id("fused", t, e),
        bytes,
        &mut op,
    );
    Ok(())
}

/// Device outputs of one dispatch configuration.
struct DispatchDev {
    slot: CudaSlice<i32>,
    row: CudaSlice<i32>,
    kw: CudaSlice<f32>,
    tpe: CudaSlice<i32>,
    rtt: CudaSlice<i32>,
    eo: CudaSlice<i32>,
    rpr: CudaSlice<i32>,
    counts: CudaSlice<i64>,
    ws: CudaSlice<i32>,
    max_rows: usize,
}

impl DispatchDev {
    fn new(b: &Bench, t: usize, cfg: &DispatchConfig) -> BenchResult<Self> {
        let n = t * K;
        let e = cfg.num_experts;
        let max_rows = dispatch_max_rows(t, K, cfg).map_err(|e| e.to_string())?;
        let ws = dispatch_workspace_len(t, K, cfg).map_err(|e| e.to_string())?;
        Ok(DispatchDev {
            slot: b.up(&vec![i32::MIN; n])?,
            row: b.up(&vec![i32::MIN; n])?,
            kw: b.up(&vec![f32::NAN; n])?,
            tpe: b.up(&vec![i32::MIN; e])?,
            rtt: b.up(&vec![i32::MIN; max_rows])?,
            eo: b.up(&vec![i32::MIN; e + 1])?,
            rpr: b.up(&vec![i32::MIN; cfg.ep_size])?,
            counts: b.up(&[-9i64, -9])?,
            ws: b.up(&vec![i32::MIN; ws])?,
            max_rows,
        })
    }

    fn run(
        &mut self,
        be: &CudaBackend,
        idx: &CudaSlice<i32>,
        w: &CudaSlice<f32>,
        t: usize,
        cfg: &DispatchConfig,
    ) -> Result<()> {
        dispatch_cuda(
            be,
            &idx.as_view(),
            &w.as_view(),
            t,
            K,
            cfg,
            DispatchCudaBuffers {
                slot: self.slot.as_view_mut(),
                row: self.row.as_view_mut(),
                kept_weights: self.kw.as_view_mut(),
                tokens_per_expert: self.tpe.as_view_mut(),
                row_to_token: self.rtt.as_view_mut(),
                expert_offsets: self.eo.as_view_mut(),
                rows_per_rank: self.rpr.as_view_mut(),
                counts: self.counts.as_view_mut(),
                workspace: self.ws.as_view_mut(),
            },
        )
    }

    fn check(&self, b: &Bench, t: usize) -> BenchResult<()> {
        let n = (t * K) as i64;
        let c = b.down(&self.counts)?;
        if c[0] < 0 || c[0] > self.max_rows as i64 || c[1] < 0 || c[1] > n {
            return Err(format!(
                "counts = {c:?} (num_rows, dropped) with max_rows {} and {n} assignments",
                self.max_rows
            ));
        }
        let (slot, row) = (b.down(&self.slot)?, b.down(&self.row)?);
        let kept = row.iter().filter(|&&r| r >= 0).count() as i64;
        if let Some(p) = slot.iter().chain(&row).position(|&v| v < -1) {
            return Err(format!("slot/row entry {p} still poisoned"));
        }
        if kept + c[1] != n {
            return Err(format!("{kept} kept + {} dropped != {n} assignments", c[1]));
        }
        let rtt = b.down(&self.rtt)?;
        if let Some(p) = rtt.iter().position(|&v| v < -1 || v >= t as i32) {
            return Err(format!("row_to_token[{p}] = {} not in [-1, {t})", rtt[p]));
        }
        Ok(())
    }

    /// Bytes dispatch must move: read indices and weights, write every output.
    fn bytes(&self, t: usize, cfg: &DispatchConfig) -> usize {
        let e = cfg.num_experts;
        t * K * (8 + 12) + self.max_rows * 4 + (2 * e + 1 + cfg.ep_size) * 4 + 16
    }
}

fn dispatch_bench(
    b: &mut Bench,
    idx: &CudaSlice<i32>,
    w: &CudaSlice<f32>,
    t: usize,
    e: usize,
) -> BenchResult<()> {
    let cap = capacity(t, e, K, &CapacityConfig::new(1.0)).map_err(|e| e.to_string())?;
    let cases = [
        (
            "position_compact",
            DispatchConfig::new(e)
                .capacity(cap)
                .drop_policy(DropPolicy::Position)
                .layout(DispatchLayout::Compact),
        ),
        (
            "probs_pad",
            DispatchConfig::new(e)
                .capacity(cap)
                .drop_policy(DropPolicy::Probs)
                .layout(DispatchLayout::PadToCapacity),
        ),
    ];
    let be = b.be;
    for (name, cfg) in &cases {
        let mut d = DispatchDev::new(b, t, cfg)?;
        let bytes = d.bytes(t, cfg);
        let mut op = |_: usize| d.run(be, idx, w, t, cfg);
        if let Err(err) = b.warm(&mut op) {
            b.fail(&format!("cuda_dispatch_i32/{name}/T{t}_E{e}_k{K}"), err);
            continue;
        }
        if let Err(err) = d.check(b, t) {
            b.fail(&format!("cuda_dispatch_i32/{name}/T{t}_E{e}_k{K}"), err);
            continue;
        }
        let mut op = |_: usize| d.run(be, idx, w, t, cfg);
        b.time("cuda_dispatch_i32", shape_id(name, t, e), bytes, &mut op);
    }
    Ok(())
}

/// Permute and unpermute at T = 16384, E = 128, k = 8, H = 4096 (bf16), on the
/// dropless routing of the f32 gating forward.
fn permute_bench(b: &mut Bench) -> BenchResult<()> {
    let (t, e) = (PERMUTE_T, PERMUTE_E);
    let be = b.be;
    let z = randn(t * e, 11);
    let dz = b.up(&z)?;
    let mut w = b.up(&vec![f32::NAN; t * K])?;
    let mut ix = b.up(&vec![i32::MIN; t * K])?;
    topk_gating_cuda(
        be,
        &dz.as_view(),
        t,
        e,
        None,
        &TopkGatingConfig::new(K),
        TopkGatingCudaBuffers {
            weights: w.as_view_mut(),
            indices: ix.as_view_mut(),
        },
    )
    .map_err(|e| format!("gating for the routing: {e}"))?;
    let cfg = DispatchConfig::new(e).layout(DispatchLayout::Dropless { align: 128 });
    let mut d = DispatchDev::new(b, t, &cfg)?;
    d.run(be, &ix, &w, t, &cfg)
        .map_err(|e| format!("dispatch for the routing: {e}"))?;
    be.stream().synchronize().map_err(|e| e.to_string())?;
    d.check(b, t)
        .map_err(|e| format!("dispatch for the routing: {e}"))?;
    let rows = d.max_rows;
    let used = t * K; // dropless: every assignment has a row
    let es = std::mem::size_of::<bf16>();

    let x = b.up(&to_bf16(&randn(t * H, 12)))?;
    let mut buf = b.up(&vec![bf16::NAN; rows * H])?;
    let variant = format!("H{H}");
    let shape = format!("T{t}_E{e}_k{K}");
    macro_rules! perm {
        () => {
            |_: usize| -> Result<()> {
                permute_cuda(
                    be,
                    &x.as_view(),
                    t,
                    H,
                    &d.rtt.as_view(),
                    &mut buf.as_view_mut(),
                )
            }
        };
    }
    let r = b
        .warm(&mut perm!())
        .and_then(|_| no_nan(&b.down(&buf)?, "buf"));
    if b.ok(&format!("cuda_permute_fwd_bf16/{variant}/{shape}"), r) {
        b.time(
            "cuda_permute_fwd_bf16",
            BenchmarkId::new(&variant, &shape),
            t * H * es + rows * (H * es + 4),
            &mut perm!(),
        );
    } else {
        return Err("permute failed: unpermute not run".into());
    }

    // Unpermute reads the permuted buffer back (random rows, zero padding).
    let mut out = b.up(&vec![bf16::NAN; t * H])?;
    macro_rules! unperm {
        () => {
            |_: usize| -> Result<()> {
                unpermute_cuda(
                    be,
                    PermuteSizes {
                        num_tokens: t,
                        num_rows: rows,
                        hidden: H,
                        k: K,
                    },
                    &buf.as_view(),
                    &d.row.as_view(),
                    &d.kw.as_view(),
                    &mut out.as_view_mut(),
                )
            }
        };
    }
    let r = b
        .warm(&mut unperm!())
        .and_then(|_| no_nan(&b.down(&out)?, "out"));
    if b.ok(&format!("cuda_unpermute_fwd_bf16/{variant}/{shape}"), r) {
        b.time(
            "cuda_unpermute_fwd_bf16",
            BenchmarkId::new(&variant, &shape),
            used * (H * es + 8) + t * H * es,
            &mut unperm!(),
        );
    }
    Ok(())
}

fn no_nan(v: &[bf16], what: &str) -> BenchResult<()> {
    match v.iter().position(|x| x.is_nan()) {
        Some(p) => Err(format!("{what}[{p}] still NaN (the poison)")),
        None => Ok(()),
    }
}

fn run_all(b: &mut Bench) {
    if let Err(e) = memcpy_bench(b) {
        b.fail("cuda_memcpy_d2d_f32", e);
    }
    for &t in &TOKENS {
        for &e in &EXPERTS {
            let z = randn(t * e, (t + e) as u64);
            let zb = to_bf16(&z);
            let routing = match gating_bench::<f32>(b, &z, t, e, "f32") {
                Ok(r) => Some(r),
                Err(err) => {
                    b.fail(&format!("cuda_topk_gating_f32/T{t}_E{e}"), err);
                    None
                }
            };
            if let Err(err) = gating_bench::<bf16>(b, &zb, t, e, "bf16") {
                b.fail(&format!("cuda_topk_gating_bf16/T{t}_E{e}"), err);
            }
            if let Err(err) = loss_bench::<f32>(b, &z, t, e, "f32") {
                b.fail(&format!("cuda_aux_z_loss_fwd_f32/T{t}_E{e}"), err);
            }
            if let Err(err) = loss_bench::<bf16>(b, &zb, t, e, "bf16") {
                b.fail(&format!("cuda_aux_z_loss_fwd_bf16/T{t}_E{e}"), err);
            }
            if let Some((w, ix)) = routing {
                if let Err(err) = dispatch_bench(b, &ix, &w, t, e) {
                    b.fail(&format!("cuda_dispatch_i32/T{t}_E{e}"), err);
                }
            }
        }
    }
    if let Err(e) = permute_bench(b) {
        b.fail("cuda_permute_fwd_bf16", e);
    }
}

fn main() {
    if !device_available() {
        println!("SKIPPED: no CUDA device (libcuda could not be loaded or reports no device)");
        return;
    }
    if !nvrtc_available() {
        println!(
            "FAILED: a CUDA device but no libnvrtc (CUDA 13): put its lib directory on LD_LIBRARY_PATH"
        );
        std::process::exit(1);
    }
    let be = match CudaBackend::new(0) {
        Ok(be) => be,
        Err(e) => {
            println!("SKIPPED: no CUDA device ({e})");
            return;
        }
    };
    let name = be.context().name().unwrap_or_else(|e| format!("? ({e})"));
    println!("device 0: {name}, {}", be.arch());
    let c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    let mut b = Bench {
        c,
        be: &be,
        failures: Vec::new(),
    };
    run_all(&mut b);
    b.c.final_summary();
    if b.failures.is_empty() {
        println!("gpu bench: all cases ran");
    } else {
        println!("gpu bench: {} case(s) FAILED:", b.failures.len());
        for f in &b.failures {
            println!("  {f}");
        }
        std::process::exit(1);
    }
}
