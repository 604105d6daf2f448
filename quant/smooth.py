"""Smoothing factors λ = max|X|^α / max|W|^β and the grid of (α, β) candidates searched per layer.

Smoothing moves activation outliers into the weight (where the low-rank branch absorbs them). The search scores
each candidate by the output error of the *whole* quantized layer, as deepcompressor does.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def smoothing_grid(num_grids: int = 20) -> list[tuple[float, float]]:
    """(0, 0), then (α, 0) and (α, 1 − α) for α = 1/n … (n−1)/n: 39 candidates for n = 20, 19 for n = 10."""
    cands = [(0.0, 0.0)]
    for i in range(1, num_grids):
        a = round(i / num_grids, 6)
        cands.append((a, 0.0))
        cands.append((a, round(1.0 - a, 6)))
    return cands


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """λ per input channel for weight [N, K] (one or several layers concatenated along N)."""
    xmax = act_absmax.float().clamp(min=EPS)
    wmax = weight.abs().amax(dim=0).float().clamp(min=EPS)
    lam = xmax.pow(alpha) / wmax.pow(beta)
    lam = lam.clamp(min=EPS, max=1e4)
    # Normalise so the geometric mean is one; keeps proj_down and the residual in a comfortable 16-bit range.
    return lam / lam.log().mean().exp()
