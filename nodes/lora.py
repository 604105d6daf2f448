"""Apply LoRA files to svdq (or any) ComfyUI models through ComfyUI's own key mapping, with clear errors.

The core ``LoraLoader`` path works on svdq models as is (see ``patcher.py``); this adds what the core path does
silently wrong: a LoRA whose keys match nothing, or whose shapes do not fit, is an error naming the file.
"""

from __future__ import annotations

import logging

import torch

import comfy.lora
import comfy.utils

from .patcher import lora_factors

log = logging.getLogger("svdq")


def load_lora_file(path: str) -> dict[str, torch.Tensor]:
    from ..quant.checkpoint import read_header

    read_header(path)  # clear message for missing / truncated / non-safetensors files
    return comfy.utils.load_torch_file(path, safe_load=True)


def apply_lora(model, lora: dict[str, torch.Tensor], strength: float, name: str = "LoRA"):
    """A clone of ``model`` with the LoRA added at ``strength``. Raises ValueError if it does not fit the model."""
    if strength == 0:
        return model
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    if not patches:
        raise ValueError(f"{name}: none of its {len(lora)} tensors match a layer of this model (a LoRA for another architecture?)")
    check_shapes(model, patches, name)
    m = model.clone()
    added = m.add_patches(patches, strength)
    unmatched = len(patches) - len(added)
    if unmatched:
        log.warning("svdq: %s: %d patch targets not found in the model", name, unmatched)
    return m


def check_shapes(model, patches: dict, name: str) -> None:
    """Validate every patch against its layer's logical shape before anything is applied."""
    sd_shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    for k, adapter in patches.items():
        key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
        shape = sd_shapes.get(key)
        if shape is None or len(shape) != 2:
            continue
        rows = shape[0] if offset is None else int(offset[2])
        try:
            lora_factors([(1.0, adapter, 1.0, None, None)], rows, shape[1], key, torch.device("cpu"))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
