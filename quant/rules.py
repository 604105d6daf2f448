"""Which linear layers get W4A4, W4A16 or stay 16-bit, per architecture family (data, not code).

Names are module paths inside ComfyUI's diffusion model (``model.diffusion_model``). The first matching pattern
wins, checked in the order skip → w4a16 → w4a4; a layer matching nothing stays 16-bit. Following the paper:
embedders, final projections and norms stay 16-bit; adaLN modulation linears (inputs = the conditioning vector,
M = batch size) are W4A16; attention and MLP projections inside the repeated blocks are W4A4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

RULES: dict[str, dict[str, list[str]]] = {
    # comfy.ldm.flux.model.Flux (FLUX.1 dev/schnell/Kontext/Krea and Flux-type DiTs)
    "flux": {
        "skip": [r"^img_in$", r"^txt_in$", r"^time_in\.", r"^vector_in\.", r"^guidance_in\.", r"^final_layer\."],
        "w4a16": [r"\.img_mod\.lin$", r"\.txt_mod\.lin$", r"\.modulation\.lin$"],
        "w4a4": [r"^double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])$", r"^single_blocks\.\d+\.linear[12]$"],
    },
    # comfy.ldm.modules.diffusionmodules.mmdit.MMDiT (SD3, SD3.5)
    "mmdit": {
        "skip": [r"^x_embedder\.", r"^t_embedder\.", r"^y_embedder\.", r"^context_embedder$", r"^final_layer\."],
        "w4a16": [r"\.adaLN_modulation\.\d+$"],
        "w4a4": [r"^joint_blocks\.\d+\.(x|context)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12])$"],
    },
    # comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel (SD1.x, SD2.x, SDXL)
    "unet": {
        # cross-attention K/V read the 77 text tokens: a small share of time, kept 16-bit as the paper does
        "skip": [r"^time_embed\.", r"^label_emb\.", r"\.attn2\.to_[kv]$", r"\.proj_(in|out)$"],
        "w4a16": [],
        "w4a4": [r"\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"],
    },
    # comfy.ldm.qwen_image.model.QwenImageTransformer2DModel
    "qwen_image": {
        "skip": [r"^img_in$", r"^txt_in$", r"^time_text_embed\.", r"^norm_out\.", r"^proj_out$"],
        "w4a16": [r"\.(img|txt)_mod\.\d+$"],
        "w4a4": [r"^transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|(img|txt)_mlp\.net\.(0\.proj|2))$"],
    },
    # comfy.ldm.wan.model.WanModel (Wan 2.x video DiTs)
    "wan": {
        "skip": [r"^patch_embedding", r"^text_embedding\.", r"^time_embedding\.", r"^time_projection\.", r"^head\.", r"^img_emb\."],
        "w4a16": [],
        "w4a4": [r"^blocks\.\d+\.(self_attn|cross_attn)\.[qo]$", r"^blocks\.\d+\.self_attn\.[kv]$", r"^blocks\.\d+\.ffn\.[02]$"],
    },
    # Anything else: linears inside numbered blocks; modulation-like names W4A16; the rest 16-bit.
    "default": {
        "skip": [r"(^|\.)(embed|embedder|embedding|final|head|norm)[^.]*(\.|$)", r"^[^.]*$"],
        "w4a16": [r"(mod|modulation|adaLN)[^.]*(\.\d+|\.lin)?$"],
        "w4a4": [r"\.\d+\."],
    },
}

CLASS_TO_FAMILY = {
    "Flux": "flux",
    "Chroma": "flux",
    "MMDiT": "mmdit",
    "OpenAISignatureMMDITWrapper": "mmdit",
    "UNetModel": "unet",
    "QwenImageTransformer2DModel": "qwen_image",
    "WanModel": "wan",
}

# Layers smaller than this on either side stay 16-bit: 4-bit saves nothing there and costs accuracy.
MIN_FEATURES = 64


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str  # "w4a4" | "w4a16"
    in_features: int
    out_features: int


def family_of(model: nn.Module) -> str:
    """Architecture family from ComfyUI's diffusion-model class (``default`` if unknown)."""
    for cls in type(model).__mro__:
        fam = CLASS_TO_FAMILY.get(cls.__name__)
        if fam:
            return fam
    return "default"


def family_from_keys(keys) -> str:
    """Family from state-dict key names, for files seen without a model."""
    keys = list(keys)
    has = lambda pat: any(re.search(pat, k) for k in keys)  # noqa: E731
    if has(r"^double_blocks\.\d+\.img_attn\.qkv\.weight$"):
        return "flux"
    if has(r"^joint_blocks\.\d+\.x_block\."):
        return "mmdit"
    if has(r"^input_blocks\.\d+\."):
        return "unet"
    if has(r"^transformer_blocks\.\d+\.img_mod\."):
        return "qwen_image"
    if has(r"^blocks\.\d+\.self_attn\.q\.weight$"):
        return "wan"
    return "default"


def classify(name: str, family: str) -> str:
    """"w4a4", "w4a16" or "skip" for one linear layer name."""
    rules = RULES.get(family)
    if rules is None:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(RULES)}")
    for kind in ("skip", "w4a16", "w4a4"):
        if any(re.search(p, name) for p in rules[kind]):
            return kind
    return "skip"


def plan_model(model: nn.Module, family: str | None = None, linear_types: tuple = (nn.Linear,)) -> list[LayerPlan]:
    """The quantization plan of a model: every linear layer that will be W4A4 or W4A16."""
    fam = family or family_of(model)
    plans = []
    for name, mod in model.named_modules():
        if not isinstance(mod, linear_types):
            continue
        kind = classify(name, fam)
        if kind == "skip" or min(mod.in_features, mod.out_features) < MIN_FEATURES:
            continue
        plans.append(LayerPlan(name, kind, mod.in_features, mod.out_features))
    return plans
