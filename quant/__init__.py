"""The SVDQuant algorithm: formats, smoothing, low-rank decomposition, layer quantization, calibration, checkpoints.

No ComfyUI imports: usable from diffusers or plain PyTorch.
"""

from .layer import QuantConfig, quantize_linear
from .linear import SVDQLinear

__all__ = ["QuantConfig", "SVDQLinear", "quantize_linear"]
