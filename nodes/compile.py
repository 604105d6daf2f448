"""torch.compile of a ComfyUI model the ways the benchmarks measured fastest, through ComfyUI's own compile wrapper.

ComfyUI's TorchCompileModel node compiles the whole diffusion model with Inductor's default mode. On an H100 the
svdq FLUX step at batch 1 is then host-bound (the host needs as long to queue a step as the GPU to run it), and the
two settings that measured faster are out of its reach (BENCHMARKS.md, session 22):

- ``per block``: one compiled module per transformer block (blocks of one class share their compiled code, so the
  first step compiles in seconds, not minutes; the first-block cache keeps working, its decision stays in Python);
- ``reduce-overhead`` (whole model): Inductor's CUDA graphs take the host out of the step: 1.27x bf16 at batch 1
  against 1.0-1.1x without them.

Both go through ``comfy_api.torch_helpers.set_torch_compile_wrapper``, so the compiled modules are swapped in at
sampling time and everything else about the model (patches, LoRAs, memory management) stays ComfyUI's.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("svdq")

MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
SCOPES = ("per block", "whole model")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def block_keys(diffusion_model: torch.nn.Module) -> list[str]:
    """``diffusion_model.<list>.<i>`` for every block of every ``nn.ModuleList`` directly under the diffusion model
    (Flux's double/single blocks, MMDiT's joint blocks, Wan's and Qwen-Image's blocks). Lists of ``nn.Sequential``
    are left out: their callers iterate them and dispatch on each layer's class (a UNet's input/output blocks,
    ``forward_timestep_embed``), which a compiled wrapper module would break; such models compile whole."""
    keys = []
    for name, child in diffusion_model.named_children():
        if isinstance(child, torch.nn.ModuleList) and not any(isinstance(b, torch.nn.Sequential) for b in child):
            keys += [f"diffusion_model.{name}.{i}" for i in range(len(child))]
    return keys


def _allow_recompiles(blocks: int) -> None:
    """A margin in Dynamo's recompile limit. torch 2.14 shares one compiled graph among the blocks of a class (the
    tiny Flux: 2 graphs for 2 double + 2 single blocks); a Dynamo that guards on each instance would need an entry
    per block and shape (``dynamic=False``), and past its default limit (8) blocks would silently run uncompiled."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4 * blocks + 8))
            return


def compile_model(model, mode: str = "default", scope: str = "per block", backend: str = "inductor"):
    """A clone of the ComfyUI ``ModelPatcher`` whose diffusion model (or each of its blocks) runs under
    ``torch.compile(backend, mode)`` while it samples. ``backend`` is for tests (``aot_eager``: no code generation).

    CUDA-graph modes need the whole model in one graph (ComfyUI's blocks add residuals in place into their inputs,
    which CUDA-graph trees refuse per block) and a CUDA device; other combinations are adjusted and logged."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    if mode not in MODES + ("max-autotune",):  # max-autotune (with CUDA graphs): benchmarks only, not offered
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    m = model.clone()
    if mode in CUDA_GRAPH_MODES:
        device = torch.device(m.load_device)
        if device.type != "cuda":
            log.warning("svdq: %s needs a CUDA device (the model loads on %s); compiling with the default mode",
                        mode, device)
            mode = "default"
        elif scope != "whole model":
            log.info("svdq: %s compiles the whole model as one graph (CUDA graphs cannot be taken per block)", mode)
            scope = "whole model"
    keys = block_keys(m.model.diffusion_model) if scope == "per block" else []
    if scope == "per block" and not keys:
        log.info("svdq: no list of directly called blocks under this diffusion model; compiling it whole")
    if keys:
        _allow_recompiles(len(keys))
    set_torch_compile_wrapper(m, backend=backend, mode=None if mode == "default" else mode, dynamic=False,
                              keys=keys or ["diffusion_model"])
    log.info("svdq: torch.compile (%s, %s) on %s", backend, mode,
             f"{len(keys)} blocks" if keys else "the whole diffusion model")
    return m
