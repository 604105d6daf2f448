"""The SVDQuant algorithm: formats, smoothing, low-rank decomposition, layer quantization, calibration, checkpoints.

No ComfyUI imports: usable from diffusers or plain PyTorch. ``quantize_linear`` is the one-layer entry point.
"""

__all__ = ["QuantConfig", "SVDQLinear", "quantize_linear"]


def __getattr__(name):  # lazy, so `quant.formats` can be imported by the kernels without a cycle
    if name in ("QuantConfig", "quantize_linear"):
        from . import layer

        return getattr(layer, name)
    if name == "SVDQLinear":
        from .linear import SVDQLinear

        return SVDQLinear
    raise AttributeError(name)
