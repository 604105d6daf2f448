"""Pick the fused Triton kernels or the plain-PyTorch reference for each call."""

from __future__ import annotations

import logging

import torch

from .reference import QuantizedLinearWeights, svdq_linear_reference

log = logging.getLogger("svdq")


def svdq_linear(
    x: torch.Tensor,
    w: QuantizedLinearWeights,
    extra_down: torch.Tensor | None = None,
    extra_up: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    return svdq_linear_reference(x, w, extra_down, extra_up, gelu)
