"""Quantize a model ComfyUI loaded: calibrate through ComfyUI's real sampler, quantize, write the checkpoint.

Shared by the ``svdq quantize`` command and the in-graph quantization node.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

import comfy.model_management
import comfy.sample
import comfy.sd

from ..quant.checkpoint import read_header, save_checkpoint
from ..quant.layer import QuantConfig
from ..quant.model import ModelQuantResult, quantize_model
from .loading import build_model_patcher

log = logging.getLogger("svdq")


def load_float_model(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """A 16-bit diffusion model file as a ComfyUI ModelPatcher.

    Files ComfyUI can detect go through core ``load_diffusion_model``; files carrying a ``comfy_unet_config``
    metadata entry (our generated models) are built from that config.
    """
    _, meta = read_header(path)
    if meta.get("format") == "svdq":
        raise ValueError(f"{path} is already an svdq checkpoint")
    if meta.get("comfy_unet_config"):
        sd = load_file(str(path))
        return build_model_patcher(sd, meta, {}, dtype=dtype, path=str(path))
    opts = {"dtype": dtype} if dtype is not None else {}
    return comfy.sd.load_diffusion_model(str(path), model_options=opts)


def unet_config_of(patcher) -> dict:
    cfg = dict(patcher.model.model_config.unet_config)
    return {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def random_conditioning(patcher, count: int, tokens: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Gaussian text-encoder outputs shaped for the model: the fallback when no calibration prompts are given."""
    cfg = patcher.model.model_config.unet_config
    ctx_dim = cfg.get("context_in_dim") or cfg.get("context_dim") or cfg.get("joint_attention_dim") or cfg.get("text_dim") or 4096
    vec_dim = cfg.get("vec_in_dim") or cfg.get("adm_in_channels")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ctx = torch.randn(1, tokens, ctx_dim, generator=gen)
        pooled = torch.randn(1, vec_dim, generator=gen) if vec_dim else None
        out.append((ctx, pooled))
    return out


def load_calibration_file(path: str | os.PathLike) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Conditioning from a safetensors file with ``context`` [P, T, D] and optionally ``pooled`` [P, V]."""
    t = load_file(str(path))
    if "context" not in t:
        raise ValueError(f"{path}: calibration file needs a 'context' tensor [prompts, tokens, dim]")
    ctx, pooled = t["context"], t.get("pooled")
    return [(ctx[i : i + 1], pooled[i : i + 1] if pooled is not None else None) for i in range(ctx.shape[0])]


def latent_channels(patcher) -> int:
    fmt = patcher.model.latent_format
    return getattr(fmt, "latent_channels", 4)


def sample(patcher, cond, seed: int, steps: int, size: int = 16, cfg: float = 1.0, guidance: float = 3.5,
           sampler: str = "euler", scheduler: str = "simple", batch: int = 1) -> torch.Tensor:
    """Run ComfyUI's KSampler (positive = cond, empty negative) and return the final latent."""
    ctx, second = cond
    if isinstance(second, dict):  # a ComfyUI CONDITIONING entry: keep its extras (pooled_output, guidance ...)
        extra = {"guidance": guidance, **second}
    else:
        extra = {"guidance": guidance}
        if second is not None:
            extra["pooled_output"] = second
    positive = [[ctx, extra]]
    negative = [[torch.zeros_like(ctx), dict(extra)]]
    dims = getattr(patcher.model.latent_format, "latent_dimensions", 2)
    shape = (batch, latent_channels(patcher)) + ((1,) if dims == 3 else ()) + (size, size)  # video models: 1 frame
    latent = torch.zeros(shape)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(
        patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent, disable_pbar=True, seed=seed
    )


def quantize_patcher(
    patcher,
    config: QuantConfig,
    conditioning: list,
    steps: int = 4,
    size: int = 16,
    progress: Callable[[int, int, str], None] | None = None,
    calib_progress: Callable[[int, int], None] | None = None,
    device: torch.device | str | None = None,
    max_rows: int = 256,
) -> ModelQuantResult:
    """Calibrate by sampling every conditioning through ComfyUI's sampler, then quantize the diffusion model."""
    comfy.model_management.load_models_gpu([patcher])
    dm = patcher.model.diffusion_model

    def calibrate():
        for i, cond in enumerate(conditioning):
            sample(patcher, cond, seed=1000 + i, steps=steps, size=size)
            if calib_progress:
                calib_progress(i + 1, len(conditioning))

    dev = device if device is not None else comfy.model_management.get_torch_device()
    return quantize_model(dm, calibrate, config, device=dev, dtype=torch.bfloat16, max_rows=max_rows,
                          progress=progress)


def save_result(result: ModelQuantResult, config: QuantConfig, patcher, out_path: str | os.PathLike,
                source: str = "") -> Path:
    meta = {
        "model_family": result.family,
        "comfy_unet_config": json.dumps(unet_config_of(patcher)),
        "source": os.path.basename(str(source)),
        "svdq_version": "0.1.0",
        "layer_errors": json.dumps({k: round(v.error, 6) for k, v in result.reports.items()}),
    }
    return save_checkpoint(out_path, result.layers, result.tensors, result.config_dict(config), meta)


def config_summary(cfg: QuantConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(cfg).items())
