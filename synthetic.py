"""Generated weights and inputs with the statistics SVDQuant is designed for (no downloads needed).

Real diffusion transformers have heavy-tailed weights and a few activation channels 10–100× larger than the
rest, which is what breaks plain 4-bit activations. We reproduce both: Student-t weights, and adaLN modulation
biases whose ``scale`` chunks amplify a handful of channels of the normalised block inputs.
"""

from __future__ import annotations

import math
import re

import torch

# A Flux-type DiT small enough for a CPU: ComfyUI's own Flux class, head dim 128 (= sum(axes_dim)), 2 heads.
TINY_FLUX = {
    "image_model": "flux",
    "guidance_embed": True,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "vec_in_dim": 64,
    "context_in_dim": 128,
    "hidden_size": 256,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
}

# The FLUX.1-dev configuration (12B): same class, full size.
FLUX_DEV = dict(TINY_FLUX, context_in_dim=4096, vec_in_dim=768, hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38)


def heavy_tailed(shape, fan_in: int, gen: torch.Generator, dof: float = 4.0, gain: float = 0.8,
                 device=None) -> torch.Tensor:
    """Student-t samples normalised to variance gain²/fan_in."""
    n = torch.randn(shape, generator=gen, device=device)
    chi2 = torch.randn((*shape, int(dof)), generator=gen, device=device).pow(2).sum(-1)
    t = n / torch.sqrt(chi2 / dof)
    std = math.sqrt(dof / (dof - 2))
    return t * (gain / std / math.sqrt(fan_in))


def outlier_mod_bias(n_out: int, hidden: int, chunks: int, scale_chunks: tuple, gen: torch.Generator,
                     n_outliers: int = 6, magnitude: tuple = (10.0, 60.0)) -> torch.Tensor:
    """adaLN bias: shifts ~0, gates ~0.3, and in each ``scale`` chunk a few channels with 1+scale of 10–60."""
    b = torch.randn(n_out, generator=gen) * 0.02
    for c in range(chunks):
        sl = slice(c * hidden, (c + 1) * hidden)
        if c in scale_chunks:
            idx = torch.randperm(hidden, generator=gen)[:n_outliers]
            mags = torch.empty(n_outliers).uniform_(*magnitude, generator=gen)
            b[sl][idx] = mags
        elif (c % 3) == 2:  # gates
            b[sl] = 0.3 + 0.05 * torch.randn(hidden, generator=gen)
    return b


def fill_flux_weights(state_dict: dict[str, torch.Tensor], hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Realistic values for every tensor of a ComfyUI Flux state dict (same keys, shapes, dtypes)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state_dict.items():
        shape = tuple(t.shape)
        if key.endswith(".scale") or re.search(r"norm.*\.weight$", key):
            v = torch.ones(shape)
        elif key.endswith(".weight") and len(shape) == 2:
            v = heavy_tailed(shape, shape[1], gen)
            if re.search(r"(_mod|modulation)\.lin\.weight$", key):
                v = v * 0.05  # conditioning moves modulation a little; the bias sets its level
        elif key.endswith(".bias"):
            if key.endswith("_mod.lin.bias"):
                v = outlier_mod_bias(shape[0], hidden, 6, (1, 4), gen)
            elif key.endswith("modulation.lin.bias"):
                v = outlier_mod_bias(shape[0], hidden, 3, (1,), gen)
            else:
                v = torch.randn(shape, generator=gen) * 0.02
        else:
            v = torch.randn(shape, generator=gen) * 0.02
        out[key] = v.to(t.dtype if t.is_floating_point() else torch.float32)
    return out


# A UNet of ComfyUI's SD1.x class (model_channels 320 is what its config matching requires), one level deep.
TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1, "legacy": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


# ComfyUI's Qwen-Image class, 2 layers of 2 heads (head dim 128 = sum of the RoPE axes).
TINY_QWEN_IMAGE = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 128, "num_attention_heads": 2, "joint_attention_dim": 128, "axes_dims_rope": [16, 56, 56],
}


# ComfyUI's Wan 2.1 text-to-video class, 2 layers of 2 heads (head dim 128).
TINY_WAN = {
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": [1, 2, 2], "text_len": 512, "in_dim": 16, "dim": 256,
    "ffn_dim": 512, "freq_dim": 256, "text_dim": 128, "out_dim": 16, "num_heads": 2, "num_layers": 2,
    "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}


def fill_generic_weights(state_dict: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Plausible values for any state dict: norms 1, biases small, linears heavy-tailed, convs He-scaled."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state_dict.items():
        shape = tuple(t.shape)
        if len(shape) == 1 and key.endswith(("weight", "scale")):
            v = torch.ones(shape)
        elif len(shape) == 1:
            v = torch.randn(shape, generator=gen) * 0.02
        elif len(shape) == 2:
            v = heavy_tailed(shape, shape[1], gen)
        elif len(shape) > 2:
            fan_in = math.prod(shape[1:])
            v = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(fan_in))
        else:
            v = torch.randn(shape, generator=gen) * 0.02
        out[key] = v.to(t.dtype if t.is_floating_point() else torch.float32)
    return out


def flux_inputs(cfg: dict, batch: int = 1, image: int = 16, tokens: int = 16, seed: int = 0):
    """(latent [B, C, H, W], context [B, T, D], pooled y [B, V]) for a Flux-type model."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], image, image, generator=gen)
    ctx = torch.randn(batch, tokens, cfg["context_in_dim"], generator=gen)
    y = torch.randn(batch, cfg["vec_in_dim"], generator=gen)
    return x, ctx, y


@torch.no_grad()
def fill_flux_weights_(module: torch.nn.Module, hidden: int, seed: int = 0) -> None:
    """``fill_flux_weights`` in place, on the module's own device (a 12B model is generated on the GPU in
    seconds; the CPU version is for tiny models and files)."""
    for i, (key, t) in enumerate(module.state_dict(keep_vars=True).items()):
        if not t.is_floating_point():
            continue
        gen = torch.Generator(device=t.device).manual_seed(seed * 100003 + i)
        shape = tuple(t.shape)
        if key.endswith(".scale") or re.search(r"norm.*\.weight$", key):
            t.fill_(1.0)
        elif key.endswith(".weight") and len(shape) == 2:
            rows = max(1, (1 << 26) // shape[1])  # in slices: the chi-square draw needs 5 floats per value
            for r0 in range(0, shape[0], rows):
                part = heavy_tailed((min(rows, shape[0] - r0), shape[1]), shape[1], gen, device=t.device)
                if re.search(r"(_mod|modulation)\.lin\.weight$", key):
                    part = part * 0.05
                t[r0 : r0 + part.shape[0]].copy_(part)
        elif key.endswith("_mod.lin.bias"):
            t.copy_(outlier_mod_bias(shape[0], hidden, 6, (1, 4), torch.Generator().manual_seed(seed + i)))
        elif key.endswith("modulation.lin.bias"):
            t.copy_(outlier_mod_bias(shape[0], hidden, 3, (1,), torch.Generator().manual_seed(seed + i)))
        else:
            t.copy_(torch.randn(shape, generator=gen, device=t.device) * 0.02)
