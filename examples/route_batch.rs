//! Route a realistic batch on the CPU backend and report what a training job watches:
//! per-expert load, drops under a capacity factor, aux and z losses, MaxVio; then
//! run DeepSeek-V3's aux-loss-free bias update for a few steps and watch MaxVio fall.
//!
//! `cargo run --release --example route_batch [-- num_tokens num_experts topk]`

use moe_router::*;
use std::time::Instant;

/// SplitMix64 + Box-Muller: synthetic router logits with skewed expert popularity,
/// the shape real routers have early in training.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (1.0 - self.next(), self.next());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (t, e, k) = (
        args.first().copied().unwrap_or(16384),
        args.get(1).copied().unwrap_or(64),
        args.get(2).copied().unwrap_or(6),
    );
    let mut rng = Rng(7);
    // popularity: a few hot experts, a long tail
    let popularity: Vec<f64> = (0..e)
        .map(|i| 1.5 * (-(i as f64) / (e as f64 / 6.0)).exp() + 0.3 * rng.normal())
        .collect();
    let logits: Vec<f32> = (0..t * e)
        .map(|i| (popularity[i % e] + rng.normal()) as f32)
        .collect();
    let view = ndarray::ArrayView2::from_shape((t, e), &logits).expect("shape");
    println!(
        "moe-router demo: {t} tokens, {e} experts, top-{k} (CPU backend, {} threads)\n",
        rayon::current_num_threads()
    );

    // 1. gating (Mixtral / Megatron default: softmax over the selected k)
    let gate_cfg = TopkGatingConfig::new(k).normalize(true);
    let t0 = Instant::now();
    let gate = topk_gating(view, None, &gate_cfg)?;
    let t_gate = t0.elapsed();

    // 2. capacity factor 1.25, Megatron "probs" drop policy, padded to capacity
    let cap = capacity(t, e, k, &CapacityConfig::new(1.25))?;
    let disp_cfg = DispatchConfig::new(e)
        .capacity(cap)
        .drop_policy(DropPolicy::Probs)
        .layout(DispatchLayout::PadToCapacity);
    let t0 = Instant::now();
    let disp = dispatch(gate.indices.view(), gate.weights.view(), &disp_cfg)?;
    let t_disp = t0.elapsed();

    // 3. losses and statistics
    let aux = aux_loss(
        &logits,
        t,
        e,
        None,
        None,
        None,
        &AuxLossConfig::new(k).coeff(1e-2),
    )?;
    let z = z_loss(&logits, t, e, None, 1e-3)?;
    let stats = router_stats(
        RouterLogits::new(&logits, t, e),
        gate.indices.as_slice().expect("contiguous"),
        k,
        Some(disp.slot.as_slice().expect("contiguous")),
        &RouterStatsConfig::new(),
    )?;

    println!(
        "capacity per expert: {cap} (factor 1.25), rows {} (pad_to_capacity)",
        disp.num_rows
    );
    println!("expert  selected  kept  dropped");
    let kept = stats.kept_counts.clone().unwrap_or_default();
    let typical = (t * k / e).max(1) as i64;
    for (x, (&sel, &kept)) in stats.selected_counts.iter().zip(&kept).enumerate() {
        let bar = "#".repeat((sel * 20 / typical).min(60) as usize);
        if x < 12 || x + 4 >= e {
            println!("{x:>6}  {sel:>8}  {kept:>4}  {:>7}  {bar}", sel - kept);
        } else if x == 12 {
            println!("   ...");
        }
    }
    println!(
        "\ndropped assignments: {} of {} ({:.2}%)",
        disp.dropped,
        t * k,
        100.0 * disp.dropped as f64 / (t * k) as f64
    );
    println!("aux loss (Switch, coeff 1e-2): {:.6}", aux.loss);
    println!("z loss (coeff 1e-3):           {:.6}", z.loss);
    println!("MaxVio:                        {:.4}", stats.max_violation);
    println!(
        "mean router entropy:           {:.4} nats (max ln E = {:.4})",
        stats.mean_entropy,
        (e as f32).ln()
    );
    println!("non-finite logits:             {}", stats.nonfinite_logits);
    println!(
        "time: gating {:.2} ms, dispatch {:.2} ms",
        t_gate.as_secs_f64() * 1e3,
        t_disp.as_secs_f64() * 1e3
    );

    // 4. aux-loss-free balancing (DeepSeek-V3): the bias steers selection, not weights
    println!("\naux-loss-free bias update (rate 1e-3 per step, sigmoid router):");
    let sig_cfg = TopkGatingConfig::new(k)
        .score_function(ScoreFunction::Sigmoid)
        .normalize(true);
    let mut bias = vec![0f32; e];
    let (mut w, mut idx) = (vec![0f32; t * k], vec![0i32; t * k]);
    for step in 0..=200 {
        topk_gating_into(&logits, t, e, Some(&bias), &sig_cfg, &mut w, &mut idx)?;
        let s = router_stats(
            RouterLogits::new(&logits, t, e),
            &idx,
            k,
            None,
            &RouterStatsConfig::new(),
        )?;
        if step % 40 == 0 {
            println!("  step {step:>3}: MaxVio {:.4}", s.max_violation);
        }
        update_expert_bias(&mut bias, &s.selected_counts, 1e-3)?;
    }
    Ok(())
}
