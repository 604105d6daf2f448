"""Rank-r decomposition of the smoothed weight, and the alternating refinement against the quantized residual.

Exact SVD (float64) is used for small matrices; larger ones use a randomized range finder with power
iterations on the compute device, which keeps the top singular subspace to well under the 4-bit noise floor and
is what makes whole-model quantization take minutes instead of hours.
"""

from __future__ import annotations

from typing import Callable

import torch


def lowrank(a: torch.Tensor, rank: int, method: str = "auto", niter: int = 4, oversample: int = 16):
    """Best rank-``rank`` factors of ``a`` [N, K]: returns (down [K, r], up [N, r]) with a ≈ up @ down.T.

    Singular values are folded into ``up`` (as the paper's L2). ``method``: "exact", "randomized" or "auto".
    """
    n, k = a.shape
    if rank <= 0:
        return a.new_zeros(k, 0), a.new_zeros(n, 0)
    rank = min(rank, n, k)
    if method == "auto":
        method = "exact" if min(n, k) <= 1024 or rank + oversample >= min(n, k) else "randomized"
    if method == "exact":
        dt = torch.float64 if a.device.type == "cpu" else torch.float32
        u, s, vh = torch.linalg.svd(a.to(dt), full_matrices=False)
        up = (u[:, :rank] * s[:rank]).float()
        down = vh[:rank].T.float()
        return down.contiguous(), up.contiguous()
    if method != "randomized":
        raise ValueError(f"unknown SVD method {method!r}")
    af = a.float()
    q = min(rank + oversample, n, k)
    gen = torch.Generator(device=a.device).manual_seed(1234)
    omega = torch.randn(k, q, device=a.device, dtype=torch.float32, generator=gen)
    y = af @ omega
    basis, _ = torch.linalg.qr(y)
    for _ in range(niter):
        z, _ = torch.linalg.qr(af.T @ basis)
        basis, _ = torch.linalg.qr(af @ z)
    b = basis.T @ af  # [q, K]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = basis @ ub
    up = u[:, :rank] * s[:rank]
    down = vh[:rank].T
    return down.contiguous(), up.contiguous()


def refine(
    w_hat: torch.Tensor,
    rank: int,
    quantize: Callable[[torch.Tensor], torch.Tensor],
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float],
    iters: int = 100,
    method: str = "auto",
):
    """Alternate L ← SVD_r(Ŵ − Q), Q ← quant(Ŵ − L), keeping the pair with the lowest output error.

    ``quantize`` maps a residual to its fake-quantized value; ``score(down, up, q_residual)`` returns the output
    error of the whole layer. Stops at the first step that does not improve. Returns (down, up, q, error, steps).
    """
    down, up = lowrank(w_hat, rank, method)
    q = quantize(w_hat - up @ down.T)
    best = (down, up, q, score(down, up, q))
    steps = 1
    if rank == 0:
        return (*best, steps)
    for _ in range(iters - 1):
        down, up = lowrank(w_hat - q, rank, method)
        q = quantize(w_hat - up @ down.T)
        err = score(down, up, q)
        steps += 1
        if err >= best[3]:
            break
        best = (down, up, q, err)
    return (*best, steps)
