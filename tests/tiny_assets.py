"""Small generated models for end-to-end tests through a real ComfyUI server: a Flux-type DiT taking CLIP-L
conditioning, a CLIP-L text encoder and a TAESD-style VAE (random weights, real ComfyUI classes and key names)."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from svdq.synthetic import TINY_FLUX

E2E_FLUX = dict(TINY_FLUX, context_in_dim=768, vec_in_dim=768)


def make_clip_l(path: Path, seed: int = 0) -> Path:
    import comfy.sd1_clip

    model = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, t in model.state_dict().items():
        if k.endswith("position_ids") or not t.is_floating_point():
            sd[k] = t
        elif "layer_norm" in k and k.endswith("weight"):
            sd[k] = torch.ones_like(t)
        elif k.endswith("bias") or "layer_norm" in k:
            sd[k] = torch.zeros_like(t)
        else:
            sd[k] = torch.randn(t.shape, generator=g) * 0.02
    sd = {k.removeprefix("transformer."): v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(path))
    return path


def make_taesd(path: Path, latent_channels: int = 16, seed: int = 0) -> Path:
    from comfy.taesd.taesd import TAESD

    torch.manual_seed(seed)
    model = TAESD(latent_channels=latent_channels)
    for m in model.modules():  # ComfyUI's ops skip init: give every conv sensible values
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_uniform_(m.weight, a=5**0.5)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return path
