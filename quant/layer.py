"""Quantize one linear layer: weight + bias + sample input activations → an ``SVDQLinear``.

Pipeline (SVDQuant, Li et al. 2025): choose the activation format from the inputs' range; search the smoothing
factor λ over an (α, β) grid, scoring the whole quantized layer's output error; decompose the smoothed weight
into a rank-r branch plus a 4-bit residual with alternating refinement; optionally GPTQ the residual; fold the
activation shift into the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.reference import QuantizedLinearWeights
from .formats import (
    NVFP4_GROUP,
    fake_quant_activation,
    fake_quant_weight,
    pack_int4,
    pad_to_multiple,
    quantize_int4_weight,
    quantize_nvfp4,
)
from .gptq import gptq_int4
from .linear import SVDQLinear
from .lowrank import lowrank, refine
from .smooth import smoothing_factors, smoothing_grid

GELU_SHIFT = 0.171875  # -min(GELU) rounded up to a short binary fraction, as Nunchaku uses


@dataclass
class QuantConfig:
    """How to quantize. Defaults follow the paper (rank 32, 39-candidate grid, ≤100 refinement steps)."""

    rank: int = 32
    precision: str = "int4"  # weights: "int4" or "nvfp4"
    act_precision: str | None = None  # None: same as precision; "int8" = the Hopper A8 mode; "none" = W4A16
    kind: str = "w4a4"
    smooth_grid: int = 20  # 0 disables smoothing
    refine_iters: int = 100
    svd_method: str = "auto"
    gptq: bool = False
    unsigned_acts: bool = True  # use unsigned INT4 (with the GELU shift if needed) when inputs allow it
    max_eval_tokens: int = 512

    def resolved_act(self) -> str:
        if self.kind == "w4a16":
            return "none"
        return self.act_precision or self.precision


@dataclass
class LayerReport:
    alpha: float
    beta: float
    error: float  # relative output error on the samples
    refine_steps: int
    act_unsigned: bool
    act_shift: float


def choose_activation_mode(act_min: float, cfg: QuantConfig) -> tuple[bool, float]:
    """(unsigned, shift): unsigned INT4 for non-negative inputs, with the GELU shift for inputs ≥ −0.171875."""
    if cfg.resolved_act() != "int4" or not cfg.unsigned_acts:
        return False, 0.0
    if act_min >= 0.0:
        return True, 0.0
    if act_min >= -GELU_SHIFT:
        return True, GELU_SHIFT
    return False, 0.0


def output_scorer(x, y_ref, lam, act: str, shift: float, unsigned: bool):
    """score(down, up, q_residual) -> relative squared output error of the whole quantized layer on samples x."""
    x_hat_q = fake_quant_activation(x, act, smooth=lam, shift=shift, unsigned=unsigned) if act != "none" else x / lam
    x_hat = x / lam
    # The shift is compensated exactly in the bias at export, so score the unshifted product.
    shift_corr = (shift / lam)[None, :] if shift else None
    ref_norm = y_ref.pow(2).mean().clamp(min=1e-30)

    def score(down: torch.Tensor, up: torch.Tensor, q: torch.Tensor) -> float:
        y = x_hat_q @ q.T
        if shift_corr is not None:
            y = y - shift_corr @ q.T
        if down.shape[1]:
            y = y + (x_hat @ down) @ up.T
        return float((y - y_ref).pow(2).mean() / ref_norm)

    return score


@torch.no_grad()
def search_smoothing(
    w: torch.Tensor,
    x: torch.Tensor,
    absmax: torch.Tensor,
    cfg: "QuantConfig",
    unsigned: bool = False,
    shift: float = 0.0,
    y_ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Grid search of λ = max|X|^α / max|W|^β scored with the rank-r branch and 4-bit residual in the loop.

    ``w`` may be several layers concatenated along N (layers sharing an input share λ). Returns (λ, α, β).
    """
    n, k = w.shape
    rank = max(0, min(cfg.rank, n, k))
    act = cfg.resolved_act()
    y_ref = x @ w.T if y_ref is None else y_ref
    best = None
    for a, b in smoothing_grid(cfg.smooth_grid):
        lam = smoothing_factors(absmax, w, a, b)
        w_hat = w * lam[None, :]
        down, up = lowrank(w_hat, rank, cfg.svd_method)
        err = output_scorer(x, y_ref, lam, act, shift, unsigned)(
            down, up, fake_quant_weight(w_hat - up @ down.T, cfg.precision)
        )
        if best is None or err < best[0]:
            best = (err, lam, a, b)
    return best[1], best[2], best[3]


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/Inf values; cannot quantize it")


@torch.no_grad()
def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: torch.Tensor,
    config: QuantConfig | None = None,
    smooth: torch.Tensor | None = None,
    act_absmax: torch.Tensor | None = None,
    act_min: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    name: str = "layer",
) -> tuple[SVDQLinear, LayerReport]:
    """Quantize one linear layer and return the module computing its quantized forward, with a short report.

    weight [N, K], bias [N] or None, inputs [S, K] sample input rows (raw, as the layer sees them). ``smooth``
    fixes λ (e.g. shared by layers reading the same input); otherwise it is searched. ``act_absmax``/``act_min``
    may come from calibration statistics over more data than the samples. ``dtype`` is the 16-bit dtype of the
    stored low-rank branch, bias and smoothing vector.
    """
    cfg = config or QuantConfig()
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if inputs.dim() != 2 or inputs.shape[1] != k:
        raise ValueError(f"{name}: inputs must be [tokens, {k}], got {tuple(inputs.shape)}")
    if inputs.shape[0] == 0:
        raise ValueError(f"{name}: no calibration inputs were recorded for this layer")
    dev = torch.device(device) if device is not None else weight.device
    w = weight.to(dev, torch.float32)
    b = bias.to(dev, torch.float32) if bias is not None else None
    x = inputs.to(dev, torch.float32)
    _check_finite(f"{name}.weight", w)
    if b is not None:
        _check_finite(f"{name}.bias", b)
    _check_finite(f"{name} calibration inputs", x)
    if x.shape[0] > cfg.max_eval_tokens:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: cfg.max_eval_tokens]
        x = x[idx.to(dev)]
    absmax = act_absmax.to(dev).float() if act_absmax is not None else x.abs().amax(dim=0)
    amin = float(act_min) if act_min is not None else float(x.min())

    act = cfg.resolved_act()
    unsigned, shift = choose_activation_mode(amin, cfg)
    y_ref = x @ w.T
    rank = max(0, min(cfg.rank, n, k))
    alpha = beta = 0.0
    if smooth is not None:
        lam = smooth.to(dev).float()
    elif cfg.smooth_grid > 0 and act != "none":
        lam, alpha, beta = search_smoothing(w, x, absmax, cfg, unsigned, shift, y_ref)
    else:
        lam = torch.ones(k, device=dev)

    def fq(r: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(r, cfg.precision)

    lam = lam.to(dtype).float()  # the runtime divides by the stored 16-bit λ: search with exactly that value
    w_hat = w * lam[None, :]
    score = output_scorer(x, y_ref, lam, act, shift, unsigned)
    down, up, q_fake, err, steps = refine(w_hat, rank, fq, score, cfg.refine_iters, cfg.svd_method)
    residual = w_hat - up @ down.T

    fields: dict = {}
    if cfg.precision == "int4":
        if cfg.gptq:
            xs = x / lam
            q4 = gptq_int4(residual, xs.T @ xs)
            fields["wmult"] = q4.mult
            # keep GPTQ only if it lowers the output error
            g_err = score(down, up, q4.dequantize()[:, :k])
            if g_err < err:
                err = g_err
            else:
                q4 = quantize_int4_weight(residual)
        else:
            q4 = quantize_int4_weight(residual)
        fields.update(qweight=pack_int4(q4.codes), wmult=q4.mult, wscale=q4.scale)
        q_deq = q4.dequantize()[:, :k]
    elif cfg.precision == "nvfp4":
        res_p = pad_to_multiple(residual, 64)  # one K padding (64) for every format
        qn = quantize_nvfp4(res_p, NVFP4_GROUP)
        fields.update(qweight=pack_int4(qn.codes), wscales=qn.scales, wtscale=qn.tensor_scale)
        q_deq = qn.dequantize()[:, :k]
    else:
        raise ValueError(f"unknown precision {cfg.precision!r}")

    new_bias = b.clone() if b is not None else None
    if shift:
        corr = (shift / lam)[None, :] @ q_deq.T  # [1, N]
        new_bias = (new_bias if new_bias is not None else torch.zeros(n, device=dev)) - corr[0]

    layer = QuantizedLinearWeights(
        in_features=k,
        out_features=n,
        kind=cfg.kind,
        precision=cfg.precision,
        act_precision=act,
        smooth=lam.to(dtype),
        proj_down=(down / lam[:, None]).to(dtype) if rank else None,
        proj_up=up.to(dtype) if rank else None,
        bias=new_bias.to(dtype) if new_bias is not None else None,
        act_unsigned=unsigned,
        act_shift=shift,
        **fields,
    )
    rel = float(err) ** 0.5
    return SVDQLinear(layer), LayerReport(alpha, beta, rel, steps, unsigned, shift)
