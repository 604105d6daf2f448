"""Plain-PyTorch semantics of every svdq kernel. Runs on CPU and GPU; the tests' ground truth.

A quantized linear layer computes, for raw input x [M, K]:

    y = Q(x̂) · Q(R)ᵀ  +  (x · L1) · L2ᵀ  +  bias,      x̂ = (x + shift) / λ

with L1 = proj_down [K, R] already divided by λ (so it reads the raw input), L2 = proj_up [N, R], and the shift
compensation (-(shift/λ)·Q(R)) folded into bias. Q(·) is INT4 with integer group multipliers (see
``quant.formats``) or NVFP4. The INT4 product is an exact integer sum, scaled once per token and per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..quant.formats import (
    INT4_GROUP,
    NVFP4_GROUP,
    e2m1_decode,
    quantize_int8_activation,
    quantize_int4_activation,
    quantize_nvfp4_activation,
    unpack_int4,
)

KINDS = ("w4a4", "w4a16")
PRECISIONS = ("int4", "int4g", "nvfp4")
ACT_PRECISIONS = ("int4", "int8", "nvfp4", "none")


@dataclass
class QuantizedLinearWeights:
    """The tensors of one quantized linear layer (the checkpoint format's per-layer contract).

    INT4:  qweight uint8 [N, Kp/2] (two codes a byte, low nibble first), wmult uint8 [N, Kp/64], wscale fp32 [N]
    INT4G: qweight as INT4, wscales 16-bit [N, Kp/64] (one float scale per group, the Nunchaku/AWQ layout);
           with wzeros [N, Kp/64] the codes are unsigned 0..15 and value = code * scale + zero (AWQ)
    NVFP4: qweight uint8 [N, Kp/2] (E2M1 codes),  wscales float8_e4m3fn [N, Kp/16], wtscale fp32 [1],
           optional wcscales [N] per-channel factor
    smooth [K] (λ; ones if unsmoothed), proj_down [K, R], proj_up [N, R] (R may be 0), bias [N] or None.
    """

    in_features: int
    out_features: int
    qweight: torch.Tensor
    kind: str = "w4a4"
    precision: str = "int4"
    act_precision: str = "int4"
    wmult: torch.Tensor | None = None
    wscale: torch.Tensor | None = None
    wscales: torch.Tensor | None = None
    wtscale: torch.Tensor | None = None
    wzeros: torch.Tensor | None = None
    wcscales: torch.Tensor | None = None
    smooth: torch.Tensor | None = None
    proj_down: torch.Tensor | None = None
    proj_up: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act_unsigned: bool = False
    act_shift: float = 0.0
    extra: dict = field(default_factory=dict)

    TENSOR_FIELDS = ("qweight", "wmult", "wscale", "wscales", "wtscale", "wzeros", "wcscales", "smooth", "proj_down",
                     "proj_up", "bias")

    @property
    def rank(self) -> int:
        return 0 if self.proj_down is None else int(self.proj_down.shape[1])

    @property
    def k_padded(self) -> int:
        return int(self.qweight.shape[1]) * 2

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.TENSOR_FIELDS if getattr(self, n) is not None}

    def to(self, device=None) -> "QuantizedLinearWeights":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for n in self.TENSOR_FIELDS:
            if kw[n] is not None:
                kw[n] = kw[n].to(device)
        return QuantizedLinearWeights(**kw)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def validate(self) -> None:
        """Shape and dtype checks with messages a user can act on."""
        n, k = self.out_features, self.in_features
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {KINDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.act_precision not in ACT_PRECISIONS:
            raise ValueError(f"unknown activation precision {self.act_precision!r}; expected one of {ACT_PRECISIONS}")
        group = NVFP4_GROUP if self.precision == "nvfp4" else INT4_GROUP
        kp = k + (-k) % INT4_GROUP  # both formats pad K to 64 so kernels see one layout
        if tuple(self.qweight.shape) != (n, kp // 2) or self.qweight.dtype != torch.uint8:
            raise ValueError(f"qweight must be uint8 [{n}, {kp // 2}], got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        if self.precision == "int4":
            if self.wmult is None or tuple(self.wmult.shape) != (n, kp // group):
                raise ValueError(f"wmult must be [{n}, {kp // group}], got {None if self.wmult is None else tuple(self.wmult.shape)}")
            if self.wscale is None or tuple(self.wscale.shape) != (n,):
                raise ValueError(f"wscale must be [{n}]")
        elif self.precision == "int4g":
            if self.wscales is None or tuple(self.wscales.shape) != (n, kp // group) or not self.wscales.is_floating_point():
                raise ValueError(f"int4g wscales must be float [{n}, {kp // group}]")
            if self.wzeros is not None and tuple(self.wzeros.shape) != (n, kp // group):
                raise ValueError(f"wzeros must be [{n}, {kp // group}], got {tuple(self.wzeros.shape)}")
        else:
            if self.wscales is None or tuple(self.wscales.shape) != (n, kp // group):
                raise ValueError(f"wscales must be [{n}, {kp // group}]")
            if self.wtscale is None or self.wtscale.numel() != 1:
                raise ValueError("wtscale must hold one value")
        if self.wzeros is not None and self.precision != "int4g":
            raise ValueError("wzeros (asymmetric codes) exist only for int4g layers")
        if self.wcscales is not None and tuple(self.wcscales.shape) != (n,):
            raise ValueError(f"wcscales must be [{n}], got {tuple(self.wcscales.shape)}")
        if (self.proj_down is None) != (self.proj_up is None):
            raise ValueError("proj_down and proj_up must both be present or both absent")
        if self.proj_down is not None:
            r = self.proj_down.shape[1]
            if tuple(self.proj_down.shape) != (k, r) or tuple(self.proj_up.shape) != (n, r):
                raise ValueError(
                    f"low-rank shapes mismatch: proj_down {tuple(self.proj_down.shape)} (want [{k}, R]), "
                    f"proj_up {tuple(self.proj_up.shape)} (want [{n}, R])"
                )
        if self.smooth is not None and tuple(self.smooth.shape) != (k,):
            raise ValueError(f"smooth must be [{k}], got {tuple(self.smooth.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"bias must be [{n}], got {tuple(self.bias.shape)}")


def int8_weight_operand(w: QuantizedLinearWeights) -> torch.Tensor:
    """INT4 codes times group multipliers, as the int8 [N, Kp] operand of the GEMM."""
    codes = unpack_int4(w.qweight, signed=True).to(torch.int16)
    mult = w.wmult.to(torch.int16).repeat_interleave(INT4_GROUP, dim=1)
    return (codes * mult).to(torch.int8)


def dequantize_weight(w: QuantizedLinearWeights) -> torch.Tensor:
    """The 4-bit residual as fp32 [N, K] (padding cropped); ``Q(R)`` of the smoothed weight."""
    if w.precision == "int4":
        deq = int8_weight_operand(w).float() * w.wscale.float()[:, None]
    elif w.precision == "int4g":
        codes = unpack_int4(w.qweight, signed=w.wzeros is None).float()
        n, kp = codes.shape
        deq = codes.reshape(n, kp // INT4_GROUP, INT4_GROUP) * w.wscales.float()[:, :, None]
        if w.wzeros is not None:
            deq = deq + w.wzeros.float()[:, :, None]
        deq = deq.reshape(n, kp)
    else:
        codes = unpack_int4(w.qweight, signed=False)
        s = w.wscales.float().repeat_interleave(NVFP4_GROUP, dim=1)
        deq = e2m1_decode(codes) * s * w.wtscale.float().reshape(())
    if w.wcscales is not None:
        deq = deq * w.wcscales.float()[:, None]
    return deq[:, : w.in_features]


def activation_operand(x2: torch.Tensor, w: QuantizedLinearWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation kernel's quantized output: int8 operand [M, Kp] and per-token scale [M]."""
    if w.act_precision == "int4":
        return quantize_int4_activation(x2, w.smooth, w.act_shift, w.act_unsigned)
    if w.act_precision == "int8":
        return quantize_int8_activation(x2, w.smooth, w.act_shift, w.k_padded)
    raise ValueError(f"no integer operand for activation precision {w.act_precision!r}")


def lowrank_down(x2: torch.Tensor, w: QuantizedLinearWeights) -> torch.Tensor | None:
    """x · L1 in fp32 (the activation kernel computes it from the same tile)."""
    if w.rank == 0:
        return None
    return x2.float() @ w.proj_down.float()


def epilogue(
    acc: torch.Tensor,
    w: QuantizedLinearWeights,
    lora_act: torch.Tensor | None,
    extra_down: torch.Tensor | None = None,
    extra_up: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """Low-rank up-projection, bias and optional GELU on the fp32 GEMM result."""
    y = acc
    if lora_act is not None:
        y = y + lora_act @ w.proj_up.float().T
    if extra_down is not None:
        y = y + extra_down @ extra_up.float().T
    if w.bias is not None:
        y = y + w.bias.float()
    if gelu:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    return y


def svdq_linear_reference(
    x: torch.Tensor,
    w: QuantizedLinearWeights,
    extra_down: torch.Tensor | None = None,
    extra_up: torch.Tensor | None = None,
    gelu: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The quantized linear in plain PyTorch. ``extra_down``/``extra_up`` are LoRA factors appended to the branch.

    x: [..., K] in any float dtype; returns [..., N] in ``out_dtype`` (default: x's dtype).
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {w.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if w.kind == "w4a16" or w.act_precision == "none":
        xs = x2.float() / w.smooth.float() if w.smooth is not None else x2.float()
        acc = xs @ dequantize_weight(w).T
    elif w.precision != "int4" or w.act_precision == "nvfp4":
        if w.act_precision == "nvfp4":
            xs = x2.float() + w.act_shift if w.act_shift else x2.float()
            a = quantize_nvfp4_activation(xs, w.smooth)[:, : w.in_features]
        else:
            op, s = activation_operand(x2, w)
            a = (op.float() * s[:, None])[:, : w.in_features]
        acc = a @ dequantize_weight(w).T
    else:
        a, ascale = activation_operand(x2, w)
        w8 = int8_weight_operand(w)
        acc = (a.double() @ w8.double().T).float() * ascale[:, None] * w.wscale.float()[None, :]
    extra_act = x2.float() @ extra_down.float() if extra_down is not None else None
    y = epilogue(acc, w, lowrank_down(x2, w), extra_act, extra_up, gelu)
    return y.to(out_dtype or x.dtype).reshape(*lead, w.out_features)
