"""``SVDQModelPatcher``: ComfyUI's ModelPatcher for svdq models. LoRA extends the low-rank branch.

Core ``LoraLoader`` (and anything else that calls ``add_patches``) works unchanged: quantized layers expose a
storage-free ``.weight`` of the logical shape, so ComfyUI's key maps find them. When ComfyUI loads the model, the
patches on those keys are *not* merged into weights: each LoRA becomes extra (down, up) factors appended to the
layer's 16-bit branch (``svdq_lora``), with alpha/rank and strength folded into ``down``. The 4-bit residual is
never touched, so strength changes and removals cost a re-patch, not a reload. Patch kinds that are not low-rank
(LoHa, LoKr, full diffs ...) are computed densely and truncated to low rank by SVD, with the error logged.
Memory accounting counts the real 4-bit tensors, never the logical 16-bit size.
"""

from __future__ import annotations

import logging

import torch

import comfy.lora
import comfy.model_management
import comfy.model_patcher

log = logging.getLogger("svdq")

DENSE_TO_LOWRANK_MAX_RANK = 64


def is_fake(t) -> bool:
    """The storage-free logical weights of quantized layers (expanded 0-d tensors)."""
    return torch.is_tensor(t) and t.dim() >= 1 and t.numel() > 1 and all(st == 0 for st in t.stride())


def real_module_size(module: torch.nn.Module) -> int:
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values() if not is_fake(t))


def svdq_modules(model: torch.nn.Module):
    for name, m in model.named_modules():
        if getattr(m, "svdq_meta", None) is not None:
            yield name, m


def lora_factors(patch_list, out_features: int, in_features: int, key: str, device, dtype=torch.float32):
    """(down [K, r], up [N, r]) for every patch on one quantized layer; strengths and alpha folded into down."""
    downs, ups = [], []
    for strength, adapter, strength_model, offset, function in patch_list:
        if strength == 0:
            continue
        if function is not None:
            raise ValueError(f"{key}: patches with a post-function cannot be applied to an svdq layer")
        if strength_model != 1.0:
            log.warning("svdq: %s: strength_model %.3f ignored on a quantized layer", key, strength_model)
        row0, rows = 0, out_features
        if offset is not None:
            if offset[0] != 0:
                raise ValueError(f"{key}: LoRA slices along the input dimension are not supported")
            row0, rows = int(offset[1]), int(offset[2])
        d, u = _adapter_lowrank(adapter, rows, in_features, key, device)
        if d is None:
            continue
        up = torch.zeros(out_features, u.shape[1], device=device, dtype=dtype)
        up[row0 : row0 + rows] = u.to(dtype)
        downs.append((d * strength).to(dtype))
        ups.append(up)
    if not downs:
        return None, None
    return torch.cat(downs, dim=1), torch.cat(ups, dim=1)


def _adapter_lowrank(adapter, rows: int, cols: int, key: str, device):
    name = type(adapter).__name__
    weights = getattr(adapter, "weights", None)
    if name == "LoRAAdapter" and weights is not None and weights[3] is None and weights[4] is None:
        up, down, alpha = weights[0], weights[1], weights[2]
        up = up.to(device, torch.float32).reshape(up.shape[0], -1)
        down = down.to(device, torch.float32).reshape(down.shape[0], -1)
        if up.shape[0] != rows or down.shape[1] != cols:
            raise ValueError(
                f"{key}: LoRA shapes up {tuple(up.shape)} / down {tuple(down.shape)} do not fit the layer "
                f"({rows} outputs x {cols} inputs): a LoRA for another model?"
            )
        scale = (float(alpha) / down.shape[0]) if alpha is not None else 1.0
        return down.T * scale, up
    # anything else: dense delta through ComfyUI's own code, then a truncated SVD
    zero = torch.zeros(rows, cols, device=device, dtype=torch.float32)
    try:
        delta = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], zero.clone(), key)
    except Exception as exc:
        raise ValueError(f"{key}: cannot apply patch of type {name} to an svdq layer ({exc})") from exc
    if delta is None or tuple(delta.shape) != (rows, cols):
        raise ValueError(f"{key}: patch of type {name} does not fit the layer ({rows}x{cols})")
    delta = delta.float()
    if not torch.any(delta):
        return None, None
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(DENSE_TO_LOWRANK_MAX_RANK, int((s > s[0] * 1e-6).sum()))
    err = float(s[r:].norm() / s.norm()) if s.norm() > 0 else 0.0
    log.info("svdq: %s: %s patch brought to rank %d by SVD, relative error %.2e", key, name, r, err)
    return (vh[:r].T * s[:r]).contiguous(), u[:, :r].contiguous()


class SVDQModelPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher whose LoRA patches on quantized layers extend the low-rank branch."""

    _svdq_stay = False  # the next unpatch keeps the weights where they are (``partially_load``)

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = real_module_size(self.model)
        return self.size

    def _load_list(self):
        out = []
        for module_offload_mem, module_mem, n, m, params in super()._load_list():
            if getattr(m, "svdq_meta", None) is not None:
                real = real_module_size(m)
                module_offload_mem, module_mem = real, real
            out.append((module_offload_mem, module_mem, n, m, params))
        return out

    def _svdq_key(self, key: str):
        suffix = next((x for x in (".weight", ".bias") if key.endswith(x)), None)
        if suffix is None:
            return None
        mod = comfy.utils.get_attr(self.model, key[: -len(suffix)]) if "." in key else None
        return mod if getattr(mod, "svdq_meta", None) is not None else None

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if self._svdq_key(key) is not None:
            return  # applied as low-rank factors in apply_svdq_loras
        return super().patch_weight_to_device(key, device_to, inplace_update)

    def apply_svdq_loras(self):
        device = self.load_device
        for name, m in svdq_modules(self.model.diffusion_model):
            key = f"diffusion_model.{name}.weight"
            patches = self.patches.get(key)
            if not patches:
                m.svdq_lora = []
            else:
                d, u = lora_factors(patches, m.out_features, m.in_features, key, device)
                m.svdq_lora = [] if d is None else [(d, u)]
            bias_patches = self.patches.get(f"diffusion_model.{name}.bias")
            m.svdq_bias_delta = None
            if bias_patches:  # bias deltas (diff_b): ComfyUI's own arithmetic on a zero bias
                zero = torch.zeros(m.out_features, dtype=torch.float32, device=device)
                m.svdq_bias_delta = comfy.lora.calculate_weight(bias_patches, zero, f"diffusion_model.{name}.bias")

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        super().load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=force_patch_weights,
                     full_load=full_load)
        self.apply_svdq_loras()

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        """Loading a clone with other patches (a LoRA added, removed or its strength changed), ComfyUI unpatches by
        moving the whole model to the offload device, then loads it back: on a GPU every weight made a round trip
        (6 GB each way for FLUX). Quantized layers are never patched, so where the model is fully loaded on
        ``device_to`` and will be again, the unpatch restores the 16-bit layers' backups in place and the weights
        stay: a re-patch, not a reload. Only that first unpatch: if the load then fails, ComfyUI's detach still
        moves the model off the device."""
        m = self.model
        self._svdq_stay = (not getattr(m, "model_lowvram", False) and getattr(m, "device", None) == device_to
                           and m.model_loaded_weight_memory > 0
                           and m.model_loaded_weight_memory + extra_memory >= self.model_size())
        try:
            return super().partially_load(device_to, extra_memory=extra_memory, force_patch_weights=force_patch_weights)
        finally:
            self._svdq_stay = False

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if self._svdq_stay:  # see partially_load
            self._svdq_stay, device_to = False, None
        if unpatch_weights:
            for _, m in svdq_modules(self.model.diffusion_model):
                m.svdq_lora = []
                m.svdq_bias_delta = None
                m.forget_device_state()
        return super().unpatch_model(device_to, unpatch_weights)
