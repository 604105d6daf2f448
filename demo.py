"""``svdq demo``: the main job end to end on a model the project generates itself.

Builds a small Flux-type DiT with ComfyUI's own Flux class and realistic weight statistics, saves it as a 16-bit
file, quantizes it (calibrating through ComfyUI's sampler), loads the svdq file back through ComfyUI's model
classes with the quantized op, samples the same prompts with both models and reports size and error.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .comfy_runtime import import_comfy
from .synthetic import TINY_FLUX, fill_flux_weights, fill_generic_weights

log = logging.getLogger("svdq")


def make_float_model_file(path: Path, unet_config: dict = TINY_FLUX, seed: int = 0) -> Path:
    """Write a 16-bit model with generated weights; ComfyUI's own class for ``unet_config`` decides keys and shapes."""
    import json

    import comfy.model_detection

    mc = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    if unet_config.get("image_model") == "flux":
        sd = fill_flux_weights(model.diffusion_model.state_dict(), unet_config["hidden_size"], seed)
    else:
        sd = fill_generic_weights(model.diffusion_model.state_dict(), seed)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"comfy_unet_config": json.dumps(unet_config)})
    tmp.replace(path)
    return path


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    rng = float(ref.max() - ref.min())
    mse = float((a.float() - ref.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(rng * rng / mse)


def run_demo(out_dir: str | Path = "svdq-demo", fast: bool = False, rank: int = 32, prompts: int = 8,
             steps: int = 4, progress: bool = True) -> dict:
    import_comfy()
    from .nodes.loading import load_svdq_model
    from .nodes.pipeline import load_float_model, quantize_patcher, random_conditioning, sample, save_result
    from .quant.layer import QuantConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    float_path = make_float_model_file(out / "tiny-flux-bf16.safetensors")
    float_model = load_float_model(float_path)
    cfg = QuantConfig(rank=rank, smooth_grid=10 if fast else 20, refine_iters=10 if fast else 100)
    conds = random_conditioning(float_model, prompts + 2, seed=0)
    calib, held_out = conds[:prompts], conds[prompts:]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=0, desc="quantize", unit="layer")

    def on_layer(i, total, name):
        if bar is not None:
            bar.total = total
            bar.set_postfix_str(name[-28:])
            bar.update(1)

    result = quantize_patcher(float_model, cfg, calib, steps=steps, progress=on_layer)
    if bar is not None:
        bar.close()
    q_path = save_result(result, cfg, float_model, out / f"tiny-flux-svdq-int4-r{rank}.safetensors", float_path)
    t_quant = time.time() - t0
    q_model = load_svdq_model(q_path)

    errs, psnrs = [], []
    for i, cond in enumerate(held_out):
        ref = sample(float_model, cond, seed=i, steps=steps)
        got = sample(q_model, cond, seed=i, steps=steps)
        errs.append(relative_error(got, ref))
        psnrs.append(psnr(got, ref))
    info = q_model.model.svdq_info
    report = {
        "float_file": str(float_path),
        "svdq_file": str(q_path),
        "bytes_16bit": info["bytes_16bit"],
        "bytes_svdq": info["bytes"],
        "size_ratio": info["bytes"] / info["bytes_16bit"],
        "bits_per_weight": info["bits_per_weight"],
        "quantized_layers": info["quantized_layers"],
        "rank": info["rank"],
        "latent_rel_error": sum(errs) / len(errs),
        "latent_psnr_db": sum(psnrs) / len(psnrs),
        "mean_layer_error": sum(r.error for r in result.reports.values()) / max(1, len(result.reports)),
        "seconds": time.time() - t0,
        "quantize_seconds": t_quant,
    }
    return report


def format_report(r: dict) -> str:
    lines = [
        "svdq demo: tiny Flux-type DiT (ComfyUI's Flux class, generated weights)",
        f"  16-bit model file      {r['float_file']}",
        f"  svdq file              {r['svdq_file']}",
        f"  diffusion-model bytes  {r['bytes_16bit']:,} (16-bit) -> {r['bytes_svdq']:,} (svdq), {r['size_ratio']:.3f}x",
        f"  bits per weight        {r['bits_per_weight']:.2f} over {r['quantized_layers']} quantized layers (rank {r['rank']})",
        f"  mean layer output err  {r['mean_layer_error']:.4f} (relative, calibration samples)",
        f"  sampled latent error   {r['latent_rel_error']:.4f} relative, PSNR {r['latent_psnr_db']:.1f} dB vs the 16-bit model",
        f"  time                   {r['seconds']:.1f} s (quantization {r['quantize_seconds']:.1f} s)",
    ]
    return "\n".join(lines)
