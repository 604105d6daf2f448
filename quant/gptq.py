"""Optional GPTQ on the 4-bit residual: quantize column by column, pushing each column's error onto the columns
not yet quantized through the inverse Hessian of the layer's (smoothed) inputs."""

from __future__ import annotations

import torch

from .formats import INT4_GROUP, INT4_QMAX_SIGNED, INT4_UMAX_SIGNED, Int4Tensor, pad_to_multiple


def gptq_int4(residual: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, block: int = 128) -> Int4Tensor:
    """GPTQ for INT4 with integer group multipliers. ``hessian`` = X̂ᵀX̂ [K, K] of the smoothed inputs."""
    group = INT4_GROUP
    n, k = residual.shape
    w = pad_to_multiple(residual.float().clone(), group)
    kp = w.shape[1]
    h = torch.eye(kp, device=w.device, dtype=torch.float32)
    h[:k, :k] = hessian.float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(kp, device=w.device)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        hinv = torch.linalg.cholesky(hinv, upper=True)
    except RuntimeError as exc:  # not positive definite even after damping
        raise ValueError(f"GPTQ: the input Hessian is not positive definite ({exc}); run without --gptq") from exc

    qmax, umax = INT4_QMAX_SIGNED, INT4_UMAX_SIGNED
    row_max = w.abs().amax(dim=1)
    scale = torch.where(row_max > 0, row_max / (qmax * umax), torch.ones_like(row_max))
    codes = torch.zeros_like(w, dtype=torch.int8)
    mults = torch.ones(n, kp // group, dtype=torch.uint8, device=w.device)
    block = max(group, block - block % group)
    for i1 in range(0, kp, block):
        i2 = min(i1 + block, kp)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        u = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                amax = w1[:, i : i + group].abs().amax(dim=1)
                u = torch.ceil(amax / (qmax * scale)).clamp(1, umax)
                mults[:, col // group] = u.to(torch.uint8)
            step = u * scale
            wc = w1[:, i]
            q = torch.round(wc / step).clamp(-qmax, qmax)
            codes[:, col] = q.to(torch.int8)
            e = (wc - q * step) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Int4Tensor(codes=codes, mult=mults, scale=scale, group=group)
