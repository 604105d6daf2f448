"""Pick the fused Triton kernels or the plain-PyTorch reference for each call.

``SVDQ_KERNELS``: ``auto`` (default: Triton on CUDA, reference elsewhere), ``reference`` (always the reference),
``triton`` (Triton wherever it can run, including the CPU interpreter under ``TRITON_INTERPRET=1``).
A call the kernels cannot take falls back to the reference with one log line per reason, never wrong numbers.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from .reference import QuantizedLinearWeights, dequantize_weight, svdq_linear_reference

log = logging.getLogger("svdq")

try:  # Triton is optional: CPU-only installs run the reference
    import triton  # noqa: F401

    from .act_quant import quantize_activation
    from .gemm_w4a4 import expand_weight, w4a4_gemm
    from .gemv_w4a16 import w4a16_linear

    HAS_TRITON = True
except Exception as _exc:  # pragma: no cover - depends on the install
    HAS_TRITON = False
    _TRITON_ERROR = _exc

_warned: set[str] = set()
_workspaces: dict[torch.device, torch.Tensor] = {}
_resident_int8: dict[int, torch.Tensor] = {}
W4A16_MAX_M = 64  # above this the dequantize + cuBLAS path wins


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("svdq: using the reference path: %s", reason)


def mode() -> str:
    return os.environ.get("SVDQ_KERNELS", "auto").lower()


def triton_usable(x: torch.Tensor) -> bool:
    m = mode()
    if m == "reference" or not HAS_TRITON:
        return False
    if x.is_cuda:
        return True
    return m == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def weight_workspace(n: int, kp: int, device: torch.device) -> torch.Tensor:
    """A reused int8 buffer for the just-in-time expanded weight (one per device, grown to the largest layer)."""
    need = n * kp
    ws = _workspaces.get(device)
    if ws is None or ws.numel() < need:
        ws = torch.empty(need, dtype=torch.int8, device=device)
        _workspaces[device] = ws
    return ws[:need].view(n, kp)


def int8_weights(w: QuantizedLinearWeights) -> torch.Tensor:
    """The expanded int8 weight operand: by default re-expanded per call into a shared workspace (weights stay
    4-bit in memory); with ``SVDQ_INT8_WEIGHTS=1`` kept resident per layer (8-bit memory, one launch fewer)."""
    if os.environ.get("SVDQ_INT8_WEIGHTS", "0") == "1":
        key = id(w.qweight)
        cached = _resident_int8.get(key)
        if cached is None or cached.device != w.qweight.device:
            cached = expand_weight(w.qweight, w.wmult)
            _resident_int8[key] = cached
            weakref.finalize(w.qweight, _resident_int8.pop, key, None)
        return cached
    return expand_weight(w.qweight, w.wmult, out=weight_workspace(w.out_features, w.k_padded, w.qweight.device))


def _unsupported(x: torch.Tensor, w: QuantizedLinearWeights) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"input dtype {x.dtype}"
    if w.precision == "nvfp4":
        return "NVFP4 has no native MMA before Blackwell; emulated with dequantized operands"
    if w.qweight.device != x.device:
        return "weights and input on different devices"
    return None


def svdq_linear(
    x: torch.Tensor,
    w: QuantizedLinearWeights,
    extra_down: torch.Tensor | None = None,
    extra_up: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """The quantized linear on [..., K] input; ``extra_down``/``extra_up`` append LoRA ranks to the branch."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {w.in_features}")
    if not triton_usable(x):
        return svdq_linear_reference(x, w, extra_down, extra_up, gelu)
    reason = _unsupported(x, w)
    if reason:
        _warn_once(reason)
        return svdq_linear_reference(x, w, extra_down, extra_up, gelu)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    down, up = w.proj_down, w.proj_up
    if extra_down is not None:
        down = extra_down if down is None else torch.cat([down, extra_down.to(down.dtype)], dim=1)
        up = extra_up if up is None else torch.cat([up, extra_up.to(up.dtype)], dim=1)
    if w.precision == "int4g":
        y = _int4g(x2, w, down, up, gelu)
    elif w.kind == "w4a16" or w.act_precision == "none":
        y = _w4a16(x2, w, down, up, gelu)
    elif w.act_precision in ("int4", "int8"):
        a8, ascale, lora = quantize_activation(
            x2, w.k_padded, w.smooth, down, w.act_shift, w.act_unsigned and w.act_precision == "int4", w.act_precision
        )
        w8 = int8_weights(w)
        y = w4a4_gemm(a8, ascale, w8, w.wscale, lora, up, w.bias, x.dtype, gelu)
    else:
        _warn_once(f"activation precision {w.act_precision}")
        return svdq_linear_reference(x, w, extra_down, extra_up, gelu)
    return y.reshape(*lead, w.out_features)


def _w4a16(x2, w, down, up, gelu):
    if x2.shape[0] <= W4A16_MAX_M:
        y = w4a16_linear(x2, w.qweight, w.wmult, w.wscale, w.smooth, w.in_features, bias=w.bias)
    else:
        w8 = expand_weight(w.qweight, w.wmult, out=weight_workspace(w.out_features, w.k_padded, x2.device))
        wd = (w8[:, : w.in_features].to(x2.dtype) * w.wscale.to(x2.dtype)[:, None])
        xs = x2 / w.smooth.to(x2.dtype) if w.smooth is not None else x2
        y = (xs @ wd.T).float()
        if w.bias is not None:
            y = y + w.bias.float()
    return _finish(y, x2, down, up, gelu)


def _int4g(x2, w, down, up, gelu):
    """Layers with one float scale per group (Nunchaku/AWQ files loaded exactly): the activation kernel quantizes,
    the weight is dequantized to 16 bit per call and cuBLAS multiplies. Exact int8 codes times 16-bit weights;
    slower than the int4 path (``svdq convert --requantize`` trades a measured error for that path)."""
    wd = dequantize_weight(w).to(x2.dtype)
    if w.kind == "w4a16" or w.act_precision == "none":
        xs = x2 / w.smooth.to(x2.dtype) if w.smooth is not None else x2
        y = (xs @ wd.T).float()
    else:
        a8, ascale, lora = quantize_activation(
            x2, w.k_padded, w.smooth, None, w.act_shift, w.act_unsigned and w.act_precision == "int4", w.act_precision
        )
        y = (a8[:, : w.in_features].to(x2.dtype) @ wd.T).float() * ascale[:, None]
    if w.bias is not None:
        y = y + w.bias.float()
    return _finish(y, x2, down, up, gelu)


def _finish(y, x2, down, up, gelu):
    """The unfused tail of the W4A16 and int4g paths: low-rank branch, GELU, output dtype."""
    if down is not None:
        y = y + (x2.float() @ down.float()) @ up.float().T
    if gelu:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    return y.to(x2.dtype)
