"""Relative output error of 4-bit schemes on layers with the outlier structure SVDQuant targets (CPU).

    python bench/quality_layers.py [--json] [--plot error_vs_rank.png]

Layers: Student-t(3) weights; inputs with a few channels 10-100x larger than the rest. Rows: RTN W4A4,
SmoothQuant-only W4A4 (searched λ, no branch), low-rank-only W4A4 (branch, no smoothing), SVDQuant W4A4 INT4 and
NVFP4 (rank 32), W4A16, INT8 W8A8 and the Hopper A8 mode (4-bit weights, int8 activations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401

from svdq.quant import QuantConfig, quantize_linear  # noqa: E402
from svdq.quant.formats import fake_quant_activation, fake_quant_weight  # noqa: E402

SHAPES = [(512, 512), (768, 1024), (1024, 768)]


def layer(n, k, seed):
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((n, k)) * (0.5 / math.sqrt(k))
    x = torch.randn(384, k)
    idx = torch.randperm(k)[:8]
    x[:, idx] *= torch.empty(8).uniform_(10, 100)
    b = torch.randn(n) * 0.05
    return w, b, x


def rel(a, b):
    return float((a - b).norm() / b.norm())


def int8_w(w):
    s = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / s).clamp(-127, 127) * s


def errors(w, b, x, fast):
    y = x @ w.T + b
    grid = 10 if fast else 20
    it = 10 if fast else 100

    def q(**kw):
        m, _ = quantize_linear(w, b, x, QuantConfig(smooth_grid=grid, refine_iters=it, **kw), dtype=torch.float32)
        return rel(m(x), y)

    out = {
        "RTN W4A4": rel(fake_quant_activation(x, "int4") @ fake_quant_weight(w, "int4").T + b, y),
        "SmoothQuant W4A4": q(rank=0),
        "low-rank only W4A4": rel(quantize_linear(w, b, x, QuantConfig(rank=32, smooth_grid=0, refine_iters=it), dtype=torch.float32)[0](x), y),
        "SVDQuant W4A4 INT4": q(rank=32),
        "SVDQuant W4A4 NVFP4": q(rank=32, precision="nvfp4"),
        "SVDQuant W4A8 (Hopper A8)": q(rank=32, act_precision="int8"),
        "W4A16 (INT4 weights)": rel(x @ fake_quant_weight(w, "int4").T + b, y),
        "W8A8 INT8 per-token/channel": rel(fake_quant_activation(x, "int8") @ int8_w(w).T + b, y),
    }
    ranks = {}
    for r in (0, 8, 16, 32, 64, 128):
        ranks[r] = q(rank=r)
    return out, ranks


def write_plot(path, rank_mean, baselines):
    """Error vs rank for SVDQuant INT4, with the RTN and SmoothQuant-only errors as reference lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'svdq[bench]'") from exc
    ranks = list(rank_mean)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(range(len(ranks)), [rank_mean[r] for r in ranks], "o-", label="SVDQuant W4A4 INT4")
    for name, v in baselines.items():
        ax.axhline(v, linestyle="--", linewidth=1, label=name, color="gray" if "RTN" in name else "tab:orange")
    ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("low-rank branch rank")
    ax.set_ylabel("relative output error")
    ax.set_yscale("log")
    ax.set_title("4-bit error vs rank on outlier layers (bench/quality_layers.py)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--plot", default=None, help="PNG of SVDQuant INT4 error vs rank (0..128)")
    args = ap.parse_args()
    totals: dict[str, list] = {}
    rank_tot: dict[int, list] = {}
    for i, (n, k) in enumerate(SHAPES):
        e, rk = errors(*layer(n, k, i), args.fast)
        for name, v in e.items():
            totals.setdefault(name, []).append(v)
        for r, v in rk.items():
            rank_tot.setdefault(r, []).append(v)
    mean = {k: sum(v) / len(v) for k, v in totals.items()}
    rank_mean = {r: sum(v) / len(v) for r, v in rank_tot.items()}
    print(f"relative output error, mean over {len(SHAPES)} outlier layers {SHAPES}")
    for name, v in mean.items():
        print(f"  {name:30s} {v:.4f}")
    svd = mean["SVDQuant W4A4 INT4"]
    ratios = {"svdq_vs_rtn": svd / mean["RTN W4A4"], "svdq_vs_smoothquant": svd / mean["SmoothQuant W4A4"]}
    print(f"  SVDQuant INT4 / RTN = {ratios['svdq_vs_rtn']:.3f} (target <= 0.5); / SmoothQuant = {ratios['svdq_vs_smoothquant']:.3f} (target <= 0.7)")
    print("  SVDQuant INT4 error vs rank: " + ", ".join(f"r{r} {v:.4f}" for r, v in rank_mean.items()))
    if args.plot:
        write_plot(args.plot, rank_mean, {"RTN W4A4": mean["RTN W4A4"], "SmoothQuant W4A4 (rank 0)": mean["SmoothQuant W4A4"]})
        print(f"  plot: {args.plot}")
    if args.json:
        print(json.dumps({"errors": mean, "error_vs_rank": rank_mean, **ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
