"""moe_router demo: train a small Mixture-of-Experts and watch load balancing work.

A synthetic regression task with clustered inputs (8 clusters of Zipf-skewed
frequency, each with its own target function) is learned by one MoE layer
(8 SwiGLU experts, top-2, hidden 64, capacity factor 1.25, "probs" drop policy).
The router starts collapsed (two experts win almost every token). Two runs:

* ``balanced``: Switch aux loss + ST-MoE z-loss (attached to the routing weights, as
  Megatron's MoEAuxLossAutoScaler) and DeepSeek-V3 aux-loss-free expert bias;
* ``baseline``: no balancing at all (skip with ``--no-baseline``).

Every few steps it prints per-expert load, drops, aux and z losses and MaxVio
(``moe_router.router_stats``), and at the end writes a plot of the expert load over
the steps to ``<out>/expert_load.png`` (and the numbers to ``<out>/metrics.json``).

    python python/demo.py                  # ~1 minute on 2 CPU cores
    python python/demo.py --steps 100 --no-baseline --out /tmp/demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# `python python/demo.py` puts python/ first on sys.path, where the moe_router source
# tree (without its compiled _native module) would shadow the installed package.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _HERE:
    sys.path.pop(0)

import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    from tqdm import tqdm  # noqa: E402
except ImportError:  # pragma: no cover - the setup script installs tqdm
    tqdm = None

import moe_router  # noqa: E402
from moe_router.modules import MoELayer, update_router_biases  # noqa: E402


# ------------------------------------------------------------------------------------------
# Data: clustered regression
# ------------------------------------------------------------------------------------------


class ClusteredRegression:
    """Inputs around ``clusters`` centres (Zipf-skewed frequencies); each cluster has its
    own target ``tanh(x W_c) * 2``. Feature 0 is a constant 1 (a bias input)."""

    def __init__(self, hidden: int, clusters: int, seed: int, device) -> None:
        g = torch.Generator().manual_seed(seed)
        self.hidden, self.clusters, self.device = hidden, clusters, device
        self.centers = torch.randn(clusters, hidden, generator=g) * 1.5
        self.teachers = torch.randn(clusters, hidden, hidden, generator=g) / math.sqrt(hidden)
        p = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float64)
        self.freqs = (p / p.sum()).float()
        self.gen = torch.Generator().manual_seed(seed + 1)

    def batch(self, n: int):
        c = torch.multinomial(self.freqs, n, replacement=True, generator=self.gen)
        x = self.centers[c] + 0.5 * torch.randn(n, self.hidden, generator=self.gen)
        x[:, 0] = 1.0
        y = 2.0 * torch.tanh(torch.einsum("nh,nhk->nk", x, self.teachers[c]))
        return x.to(self.device), y.to(self.device), c


class Model(nn.Module):
    def __init__(self, hidden: int, ffn: int, experts: int, topk: int, balanced: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.moe = MoELayer(
            hidden,
            ffn,
            experts,
            topk,
            activation="swiglu",
            capacity_factor=1.25,  # --moe-expert-capacity-factor 1.25
            token_drop_policy="probs",  # --moe-token-drop-policy probs
            load_balancing_type="aux_loss",  # --moe-router-load-balancing-type aux_loss
            aux_loss_coeff=1e-2,  # --moe-aux-loss-coeff
            z_loss_coeff=1e-3,  # --moe-z-loss-coeff
            # balanced: the losses ride on the routing weights' backward (Megatron's
            # MoEAuxLossAutoScaler); baseline: computed for the log, never trained on.
            loss_mode="attach" if balanced else "return",
            enable_expert_bias=balanced,  # --moe-router-enable-expert-bias
            bias_update_rate=2e-2,  # --moe-router-bias-update-rate (large: tiny run)
        )
        self.head = nn.Linear(hidden, hidden)
        with torch.no_grad():  # a collapsed router: experts 0 and 1 win almost every token
            self.moe.router.gate.weight[0, 0] = 2.0
            self.moe.router.gate.weight[1, 0] = 1.6

    def forward(self, x):
        h, r = self.moe(x)
        return self.head(h + x), r


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def _num(v) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def train(name: str, balanced: bool, args, device) -> dict:
    data = ClusteredRegression(args.hidden, args.clusters, args.seed, device)
    model = Model(args.hidden, args.ffn, args.experts, args.topk, balanced, args.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    hist = {k: [] for k in ("step", "loss", "aux", "z", "maxvio", "dropped_frac", "load")}
    tokens_k = args.batch * args.topk
    bar = None
    if tqdm is not None and not args.quiet and sys.stdout.isatty():
        # a progress bar on a terminal; plain log lines when piped to a file or a CI log
        bar = tqdm(range(args.steps), desc=f"{name:>8}", ncols=100, file=sys.stdout)
    it = bar if bar is not None else range(args.steps)
    t0 = time.perf_counter()
    for step in it:
        x, y, _ = data.batch(args.batch)
        pred, r = model(x)
        loss = torch.nn.functional.mse_loss(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # balanced: the attached aux / z losses train the router too
        opt.step()
        update_router_biases(model)  # aux-loss-free balancing, after the optimizer step

        st = r.stats
        load = st.selected_counts.double() / tokens_k
        hist["step"].append(step)
        hist["loss"].append(loss.item())
        hist["aux"].append(_num(r.aux_loss))
        hist["z"].append(_num(r.z_loss))
        hist["maxvio"].append(_num(st.max_violation))
        hist["dropped_frac"].append(_num(st.dropped) / tokens_k)
        hist["load"].append(load.tolist())
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", maxvio=f"{_num(st.max_violation):.2f}", refresh=False)
        if step % args.log_every == 0 or step == args.steps - 1:
            _log(name, step, loss.item(), r, st, tokens_k, bar)
    hist["seconds"] = time.perf_counter() - t0

    # held-out evaluation (eval mode: no training randomness, bias not counted)
    model.eval()
    with torch.no_grad():
        x, y, c = data.batch(4096)
        pred, r = model(x)
        hist["eval_loss"] = torch.nn.functional.mse_loss(pred, y).item()
        hist["eval_maxvio"] = _num(r.stats.max_violation)
        hist["eval_dropped_frac"] = _num(r.stats.dropped) / (x.shape[0] * args.topk)
        # which experts serve each cluster (top-1 expert share per cluster)
        top1 = r.indices[:, 0].cpu()
        spec = []
        for cl in range(args.clusters):
            sel = top1[c == cl]
            spec.append(torch.bincount(sel, minlength=args.experts).tolist())
        hist["cluster_to_top1_expert"] = spec
    return hist


def _log(name, step, loss, r, st, tokens_k, bar) -> None:
    sel = st.selected_counts.tolist()
    kept = st.kept_counts.tolist() if st.kept_counts is not None else sel
    lines = [
        f"[{name}] step {step:4d}  loss {loss:.4f}  aux {_num(r.aux_loss):.4f}  z {_num(r.z_loss):.4f}  "
        f"MaxVio {_num(st.max_violation):.3f}  dropped {int(_num(st.dropped))}/{tokens_k} "
        f"(capacity {r.capacity}/expert)  entropy {_num(st.mean_entropy):.3f}",
        "    load (routed/kept): " + "  ".join(f"e{e}:{s}/{k}" for e, (s, k) in enumerate(zip(sel, kept))),
    ]
    for line in lines:
        (bar.write if bar is not None else print)(line)


# ------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------


def _smooth(v, w):
    out, acc = [], []
    for a in v:
        acc.append(a)
        if len(acc) > w:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot(runs: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(5.2 * (len(names) + 1), 7.5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    w = max(1, args.steps // 40)
    ideal = 1.0 / args.experts
    for col, name in enumerate(names):
        h = runs[name]
        loads = list(zip(*h["load"]))
        ax = axes[0][col]
        for e, series in enumerate(loads):
            sm = _smooth(series, w)
            stuck = max(series) == 0.0
            # an expert that never receives a token is drawn as a thick dotted line on 0
            ax.plot(h["step"], sm, color=cmap(e % 10), lw=2.5 if stuck else 1.2, ls=":" if stuck else "-",
                    label=f"expert {e}" + (" (never used)" if stuck else ""), zorder=3 if stuck else 2)  # fmt: skip
        ax.axhline(ideal, color="k", ls="--", lw=1, label=f"perfectly balanced (1/E = {ideal:.3f})")
        ax.set_title(f"{name}: share of routed assignments per expert")
        ax.set_xlabel("step")
        ax.set_ylabel("fraction of the T·k assignments")
        top = max(max(s) for s in loads) if loads else ideal
        ax.set_ylim(-0.02, max(0.55, top * 1.05))  # below 0 so experts stuck at 0 stay visible
        ax.legend(fontsize=7, ncol=2, loc="best")
        ax = axes[1][col]
        ax.plot(h["step"], [100 * v for v in _smooth(h["dropped_frac"], w)], color="tab:red", label="dropped (%)")
        ax.set_ylabel("assignments dropped at capacity 1.25 (%)", color="tab:red")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("step")
        ax2 = ax.twinx()  # loss on its own axis: a different unit and scale
        ax2.plot(h["step"], _smooth(h["loss"], w), color="tab:blue", label="train MSE")
        ax2.set_ylabel("train MSE", color="tab:blue")
        ax2.set_ylim(bottom=0)
        ax.set_title(f"{name}: drops and training loss")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper right")
    ax = axes[0][-1]
    for i, name in enumerate(names):
        ax.plot(runs[name]["step"], _smooth(runs[name]["maxvio"], w), color=cmap(i), label=name)
    ax.set_title("MaxVio = max_e load / mean load - 1")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio (0 = perfectly balanced)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax = axes[1][-1]
    for i, name in enumerate(names):
        ax.plot(runs[name]["step"], _smooth(runs[name]["aux"], w), color=cmap(i), label=f"{name} aux")
        ax.plot(runs[name]["step"], _smooth(runs[name]["z"], w), color=cmap(i), ls=":", label=f"{name} z")
    ax.set_title("aux loss and z-loss (baseline: logged, not trained on)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss value")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"moe_router demo: {args.experts} experts, top-{args.topk}, hidden {args.hidden}, "
        f"batch {args.batch} tokens, {args.steps} steps\n'balanced' = Switch aux loss (coeff 1e-2) and z-loss "
        "(1e-3) trained on, plus the aux-loss-free expert bias; 'baseline' = the same model with neither"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------


def pick_device(want: str) -> torch.device:
    if want == "cpu" or not torch.cuda.is_available():
        if want == "cuda":
            print("demo: CUDA requested but not available; using the CPU")
        return torch.device("cpu")
    dev = torch.device("cuda")
    try:  # every op the demo uses must have a CUDA path in this build
        layer = MoELayer(8, 8, 4, 2, capacity_factor=1.25, aux_loss_coeff=1e-2, z_loss_coeff=1e-3,
                         enable_expert_bias=True).to(dev)  # fmt: skip
        out, _ = layer(torch.randn(6, 8, device=dev))
        out.sum().backward()
        layer.router.update_bias()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        if want == "cuda":
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"demo: this moe_router build cannot run the MoE layer on CUDA ({type(exc).__name__}: {msg}); "
              "using the CPU")  # fmt: skip
        return torch.device("cpu")
    return dev


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=512, help="tokens per step")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op CPU threads (default 1: the matrices are tiny, and extra OpenMP threads only "
        "add synchronisation, badly so on a busy machine; 0 keeps torch's default)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the run without balancing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    print(
        f"moe_router {getattr(moe_router, '__version__', '?')} | torch {torch.__version__} | device {device} | "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"task: clustered regression, {args.clusters} clusters (Zipf frequencies), MoE {args.experts} experts "
        f"top-{args.topk}, hidden {args.hidden}, ffn {args.ffn}, {args.batch} tokens/step, {args.steps} steps"
    )
    t0 = time.perf_counter()
    runs = {"balanced": train("balanced", True, args, device)}
    if not args.no_baseline:
        runs["baseline"] = train("baseline", False, args, device)

    print("\nsummary (held-out batch of 4096 tokens, eval mode):")
    print(f"  {'run':<9} {'MaxVio':>8} {'dropped':>8} {'MSE':>8}   {'MaxVio first->last 20 steps':>28}  train s")
    for name, h in runs.items():
        first = sum(h["maxvio"][:20]) / min(20, len(h["maxvio"]))
        last = sum(h["maxvio"][-20:]) / min(20, len(h["maxvio"]))
        print(
            f"  {name:<9} {h['eval_maxvio']:8.3f} {100 * h['eval_dropped_frac']:7.1f}% {h['eval_loss']:8.4f}   "
            f"{first:12.3f} -> {last:<12.3f}  {h['seconds']:6.1f}"
        )
    b = runs["balanced"]
    print("  balanced run, held-out tokens of each cluster by top-1 expert (experts specialise):")
    freqs = ClusteredRegression(args.hidden, args.clusters, args.seed, "cpu").freqs.tolist()
    print("    " + " " * 20 + " ".join(f"{'e' + str(e):>5}" for e in range(args.experts)))
    for cl, row in enumerate(b["cluster_to_top1_expert"]):
        print(f"    cluster {cl} (p={freqs[cl]:.2f}) " + " ".join(f"{v:5d}" for v in row))

    png = os.path.join(args.out, "expert_load.png")
    plot(runs, args, png)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs}, f)
    print(f"\nwrote {png} and {os.path.join(args.out, 'metrics.json')}  (total {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
