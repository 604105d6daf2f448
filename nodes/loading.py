"""Build a ComfyUI MODEL from an svdq checkpoint with ComfyUI's own model classes and our quantized op.

Mirrors ``comfy.sd.load_diffusion_model_state_dict``: detect the architecture (or take the ``unet_config`` stored
in the file's metadata), pick dtypes the way core does, build the stock model with ``custom_operations``, load
weights and wrap it in a ModelPatcher with ComfyUI's load and offload devices.
"""

from __future__ import annotations

import json
import logging
import os

import torch

import comfy.model_detection
import comfy.model_management
import comfy.utils

from ..quant.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .ops import fuse_mlp_gelu, make_svdq_ops
from .patcher import SVDQModelPatcher

log = logging.getLogger("svdq")


def logical_state_dict(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors plus, per quantized layer, a storage-free ``.weight`` of the logical shape.

    ComfyUI's architecture detection and dtype choice read ``.weight`` shapes and dtypes; an expanded 0-d
    tensor has the right shape and costs two bytes.
    """
    sd = ckpt.state_dict()
    for name, shape in ckpt.logical_shapes().items():
        sd[f"{name}.weight"] = torch.zeros((), dtype=dtype).expand(*shape)
    return sd


def model_config_for(sd: dict, metadata: dict, path: str = "model"):
    unet_config = metadata.get("comfy_unet_config")
    if isinstance(unet_config, str):
        unet_config = json.loads(unet_config)
    cfg = None
    if unet_config:
        cfg = comfy.model_detection.model_config_from_unet_config(dict(unet_config), sd)
    if cfg is None:  # no stored config, or one ComfyUI does not match: detect from the tensors' names and shapes
        cfg = comfy.model_detection.model_config_from_unet(sd, "")
    if cfg is None:
        raise CheckpointError(f"{path}: ComfyUI does not recognise this model's architecture")
    return cfg


def build_model_patcher(
    sd: dict[str, torch.Tensor],
    metadata: dict,
    layer_meta: dict[str, dict],
    dtype: torch.dtype | None = None,
    path: str = "model",
):
    """A ModelPatcher over ComfyUI's model for ``sd`` with quantized layers from ``layer_meta``."""
    model_config = model_config_for(sd, metadata, path)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    parameters = comfy.utils.calculate_parameters(sd)
    weight_dtype = comfy.utils.weight_dtype(sd)
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        unet_dtype = comfy.model_management.unet_dtype(
            model_params=parameters, supported_dtypes=supported, weight_dtype=weight_dtype
        )
    else:
        unet_dtype = dtype
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device, supported)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    model_config.custom_operations = make_svdq_ops(layer_meta)
    model = model_config.get_model(sd, "")
    model = model.to(offload_device)
    model.load_model_weights(dict(sd), "")
    moved = fuse_mlp_gelu(model.diffusion_model)
    if moved:
        log.info("svdq: %d MLP GELUs run in their first layer's GEMM epilogue", moved)
    return SVDQModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load_svdq_model(path: str | os.PathLike, dtype: torch.dtype | None = None, nunchaku_scales: str = "exact"):
    """Load an svdq checkpoint, or a Nunchaku SVDQuant file/folder (converted in memory), as a ComfyUI
    ModelPatcher. Raises ``CheckpointError`` with the file named."""
    from ..quant.nunchaku_file import is_nunchaku_checkpoint, load_nunchaku_checkpoint

    report = None
    if is_nunchaku_checkpoint(path):
        ckpt, report = load_nunchaku_checkpoint(path, scales=nunchaku_scales)
        log.info("svdq: %s", report.describe())
    else:
        ckpt = load_checkpoint(path)
    sd = logical_state_dict(ckpt)
    patcher = build_model_patcher(sd, ckpt.metadata, ckpt.layer_meta(), dtype=dtype, path=str(path))
    patcher.model.svdq_info = ckpt.summary()
    if report is not None:
        patcher.model.svdq_info["conversion"] = report.describe(with_source=False)
    return patcher
