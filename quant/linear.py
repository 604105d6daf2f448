"""``SVDQLinear``: a torch module holding one quantized layer's tensors and computing its forward.

The forward goes through ``kernels.dispatch``: fused Triton kernels on a CUDA GPU, the plain-PyTorch reference
elsewhere. Both compute the same function (``kernels.reference.svdq_linear_reference``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.reference import QuantizedLinearWeights


class SVDQLinear(nn.Module):
    """A quantized ``nn.Linear`` replacement. Tensors are buffers, so ``.to(device)`` and state dicts just work."""

    def __init__(self, weights: QuantizedLinearWeights):
        super().__init__()
        weights.validate()
        self.in_features = weights.in_features
        self.out_features = weights.out_features
        self.kind = weights.kind
        self.precision = weights.precision
        self.act_precision = weights.act_precision
        self.act_unsigned = weights.act_unsigned
        self.act_shift = float(weights.act_shift)
        for name in QuantizedLinearWeights.TENSOR_FIELDS:
            self.register_buffer(name, getattr(weights, name))

    @property
    def rank(self) -> int:
        return 0 if self.proj_down is None else int(self.proj_down.shape[1])

    def weights(self) -> QuantizedLinearWeights:
        return QuantizedLinearWeights(
            in_features=self.in_features,
            out_features=self.out_features,
            kind=self.kind,
            precision=self.precision,
            act_precision=self.act_precision,
            act_unsigned=self.act_unsigned,
            act_shift=self.act_shift,
            **{n: getattr(self, n) for n in QuantizedLinearWeights.TENSOR_FIELDS},
        )

    def forward(self, x: torch.Tensor, extra_down: torch.Tensor | None = None, extra_up: torch.Tensor | None = None):
        from ..kernels.dispatch import svdq_linear

        return svdq_linear(x, self.weights(), extra_down=extra_down, extra_up=extra_up)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
            f"precision={self.precision}, act={self.act_precision}{'(unsigned)' if self.act_unsigned else ''}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
