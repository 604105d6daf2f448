"""Quantize a whole diffusion model: plan layers by rules, calibrate through forward hooks, quantize layer by
layer (layers sharing an input share λ), and return the checkpoint contents."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from ..kernels.reference import QuantizedLinearWeights
from .calibrate import Calibrator
from .layer import LayerReport, QuantConfig, choose_activation_mode, quantize_linear, search_smoothing
from .rules import LayerPlan, family_of, plan_model

log = logging.getLogger("svdq")


@dataclass
class ModelQuantResult:
    family: str
    layers: dict[str, QuantizedLinearWeights]
    tensors: dict[str, torch.Tensor]
    reports: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # planned layers left 16-bit, with the reason

    def config_dict(self, cfg: QuantConfig) -> dict:
        return {
            "method": "svdquant",
            "rank": cfg.rank,
            "precision": cfg.precision,
            "act_precision": cfg.resolved_act(),
            "weight_group_size": 64 if cfg.precision == "int4" else 16,
            "act_group_size": 64 if cfg.resolved_act() == "int4" else (16 if cfg.resolved_act() == "nvfp4" else None),
            "weight_scales": "int-multiplier" if cfg.precision == "int4" else "e4m3",
            "smooth_grid": cfg.smooth_grid,
            "refine_iters": cfg.refine_iters,
            "gptq": cfg.gptq,
        }


def _linear_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return mod.weight.detach(), (mod.bias.detach() if getattr(mod, "bias", None) is not None else None)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibrate: Callable[[], None],
    config: QuantConfig | None = None,
    family: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_rows: int = 256,
    progress: Callable[[int, int, str], None] | None = None,
    linear_types: tuple = (nn.Linear,),
) -> ModelQuantResult:
    """Quantize every planned linear of ``model``. ``calibrate()`` runs the model on representative inputs."""
    cfg = config or QuantConfig()
    fam = family or family_of(model)
    plans: list[LayerPlan] = plan_model(model, fam, linear_types)
    if not plans:
        raise ValueError(f"no linear layer of this {type(model).__name__} model matches the {fam!r} rules")
    kinds = {p.name: p.kind for p in plans}
    modules = {p.name: model.get_submodule(p.name) for p in plans}
    cal = Calibrator(modules, max_rows=max_rows)
    with cal:
        calibrate()

    result = ModelQuantResult(family=fam, layers={}, tensors={})
    total = len(plans)
    done = 0
    for group in cal.groups():
        live = [n for n in group if cal.stats[n].tokens > 0]
        for n in group:
            if n not in live:
                result.skipped[n] = "never called during calibration"
        shared_lam = None
        w4a4 = [n for n in live if kinds[n] == "w4a4"]
        if len(w4a4) > 1 and cfg.smooth_grid > 0 and cfg.resolved_act() != "none":
            ws = [_linear_weight(modules[n])[0] for n in w4a4]
            dev = torch.device(device) if device is not None else ws[0].device
            w_cat = torch.cat([w.to(dev, torch.float32) for w in ws], dim=0)
            st = cal.stats[w4a4[0]]
            x = cal.samples(w4a4[0]).to(dev, torch.float32)[: cfg.max_eval_tokens]
            unsigned, shift = choose_activation_mode(st.minimum, cfg)
            shared_lam, _, _ = search_smoothing(w_cat, x, st.absmax.to(dev), cfg, unsigned, shift)
        for name in group:
            if name in result.skipped:
                done += 1
                continue
            st = cal.stats[name]
            weight, bias = _linear_weight(modules[name])
            layer_cfg = cfg if kinds[name] == "w4a4" else replace(cfg, kind="w4a16", rank=0, smooth_grid=0, gptq=False)
            qmod, report = quantize_linear(
                weight,
                bias,
                cal.samples(name),
                layer_cfg,
                smooth=shared_lam if kinds[name] == "w4a4" else None,
                act_absmax=st.absmax,
                act_min=st.minimum,
                device=device,
                dtype=dtype,
                name=name,
            )
            result.layers[name] = qmod.weights()
            result.reports[name] = report
            done += 1
            if progress:
                progress(done, total, name)
            log.debug("%s: %s", name, report)
    for name, reason in result.skipped.items():
        log.warning("svdq: layer %s stays 16-bit: %s", name, reason)

    quantized = set(result.layers)
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized and leaf in ("weight", "bias"):
            continue
        result.tensors[key] = t.detach().to("cpu")
    for name, layer in result.layers.items():
        result.layers[name] = layer.to("cpu")
    return result
