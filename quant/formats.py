"""4-bit number formats: INT4 with integer group multipliers, and NVFP4 (E2M1 codes, E4M3 group scales).

Why integer group multipliers: Hopper has no 4-bit tensor cores, so the GEMM runs on int8. A float scale per
64-group would have to be applied inside the K loop, which serialises the asynchronous MMA pipeline. Writing each
group scale as ``u * s_row`` with a small integer ``u`` (1..15) lets the int8 operand carry ``q * u`` exactly
(|q * u| <= 105), so the whole K reduction is one int32 accumulation and only ``s_row * s_col`` remain, applied
once in the epilogue. The same representation is used for weights (``u`` per output row and group) and
activations (``v`` per token and group).

Everything here is plain PyTorch and defines the exact semantics the kernels must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP = 64
NVFP4_GROUP = 16
INT4_QMAX_SIGNED = 7
INT4_QMAX_UNSIGNED = 15
# Largest group multiplier such that |q| * u still fits an int8 operand: 7 * 15 = 105, 15 * 8 = 120.
INT4_UMAX_SIGNED = 15
INT4_UMAX_UNSIGNED = 8
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0
# Round-half-to-even for |y| < 2**22 in fp32: add and subtract 1.5 * 2**23. The Triton kernels use the same
# trick, so codes agree bit for bit.
_MAGIC = 12582912.0


def round_half_even(y: torch.Tensor) -> torch.Tensor:
    """fp32 round-half-to-even exactly as the kernels compute it."""
    y = y.float()
    return (y + _MAGIC) - _MAGIC


def pad_to_multiple(t: torch.Tensor, multiple: int, dim: int = -1) -> torch.Tensor:
    """Zero-pad ``dim`` up to a multiple (shapes not divisible by the group size are padded, never rejected)."""
    size = t.shape[dim]
    rem = (-size) % multiple
    if rem == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = rem
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


# ----------------------------------------------------------------------------------------------------------
# Nibble packing
# ----------------------------------------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed (-8..7) or unsigned (0..15) codes along the last dim: even index -> low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(codes.shape)}")
    c = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`; returns int8 codes."""
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    out = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        out = torch.where(out >= 8, out - 16, out)
    return out.to(torch.int8)


# ----------------------------------------------------------------------------------------------------------
# INT4 with integer group multipliers
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Int4Tensor:
    """A [rows, cols] matrix as codes (int8, -7..7), multipliers (uint8, 1..15 per group) and row scales (fp32).

    value[r, c] = codes[r, c] * mult[r, c // group] * scale[r]
    """

    codes: torch.Tensor
    mult: torch.Tensor
    scale: torch.Tensor
    group: int = INT4_GROUP

    def int8_operand(self) -> torch.Tensor:
        """codes * mult as int8: the operand the int8 GEMM consumes."""
        m = self.mult.to(torch.int16).repeat_interleave(self.group, dim=-1)
        return (self.codes.to(torch.int16) * m).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        return self.int8_operand().float() * self.scale.float()[:, None]


def quantize_int4_weight(w: torch.Tensor, group: int = INT4_GROUP, allow_clip: bool = True) -> Int4Tensor:
    """Symmetric INT4 per (row, group) with integer multipliers of one fp32 scale per row.

    ``allow_clip`` also tries multiplier ``u - 1`` per group (clipping the largest values a little) and keeps the
    one with the lower squared error, which measured better than exact absmax fp16 group scales.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    w = pad_to_multiple(w.float(), group)
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    amax = g.abs().amax(dim=-1)  # [rows, groups]
    qmax, umax = INT4_QMAX_SIGNED, INT4_UMAX_SIGNED
    row_max = amax.amax(dim=-1)
    scale = torch.where(row_max > 0, row_max / (qmax * umax), torch.ones_like(row_max))
    u0 = torch.ceil(amax / (qmax * scale[:, None])).clamp(1, umax)

    def codes_for(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = (u * scale[:, None])[..., None]
        q = torch.round(g / step).clamp(-qmax, qmax)
        err = ((q * step - g) ** 2).sum(dim=-1)
        return q, err

    q, err = codes_for(u0)
    u = u0
    if allow_clip:
        u1 = (u0 - 1).clamp(min=1)
        q1, err1 = codes_for(u1)
        better = err1 < err
        q = torch.where(better[..., None], q1, q)
        u = torch.where(better, u1, u0)
    return Int4Tensor(
        codes=q.reshape(rows, cols).to(torch.int8),
        mult=u.to(torch.uint8),
        scale=scale.float(),
        group=group,
    )


def quantize_int4_activation(
    x: torch.Tensor,
    smooth: torch.Tensor | None = None,
    shift: float = 0.0,
    unsigned: bool = False,
    group: int = INT4_GROUP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token INT4 quantization of ``(x + shift) / smooth`` in groups, as the activation kernel does.

    Returns (int8 operand = code * multiplier, [M, K_pad]) and the per-token fp32 scale [M].
    Unsigned mode (non-negative inputs, e.g. after GELU with the shift) uses codes 0..15 and multipliers 1..8;
    values below zero are clamped. Arithmetic is fp32 and, for speed and bit-exactness on every device,
    divisions are multiplications by IEEE reciprocals: ``x̂ = (x + shift) * (1/λ)``, ``q = round(x̂ * (1/step))``.
    """
    xf = x.float()
    if shift:
        xf = xf + shift
    if smooth is not None:
        xf = xf * inv_smooth(smooth)
    xf = pad_to_multiple(xf, group)
    m, k = xf.shape
    g = xf.reshape(m, k // group, group)
    if unsigned:
        g = g.clamp(min=0.0)
        qmax, umax, qmin = INT4_QMAX_UNSIGNED, INT4_UMAX_UNSIGNED, 0
    else:
        qmax, umax, qmin = INT4_QMAX_SIGNED, INT4_UMAX_SIGNED, -INT4_QMAX_SIGNED
    amax = g.abs().amax(dim=-1)
    row_max = amax.amax(dim=-1)
    # Tensor-by-tensor divisions: PyTorch's CUDA division by a Python scalar multiplies by the reciprocal,
    # which is not IEEE division and would make codes device-dependent.
    scale = torch.where(row_max > 0, row_max / torch.full_like(row_max, float(qmax * umax)), torch.ones_like(row_max))
    v = torch.ceil(amax / (scale[:, None] * float(qmax))).clamp(1, umax)
    inv_step = torch.reciprocal(v * scale[:, None])
    q = round_half_even(g * inv_step[..., None]).clamp(qmin, qmax)
    operand = (q * v[..., None]).reshape(m, k).to(torch.int8)
    return operand, scale


def quantize_int8_activation(
    x: torch.Tensor, smooth: torch.Tensor | None = None, shift: float = 0.0, k_padded: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8 of (x + shift) / λ (the Hopper A8 mode): int8 operand [M, Kp] and fp32 scale [M]."""
    xf = x.float()
    if shift:
        xf = xf + shift
    if smooth is not None:
        xf = xf * inv_smooth(smooth)
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, 127.0), torch.ones_like(amax))
    q = round_half_even(xf * torch.reciprocal(scale)[:, None]).clamp(-127, 127).to(torch.int8)
    if k_padded is not None and k_padded > q.shape[1]:
        q = torch.cat([q, q.new_zeros(q.shape[0], k_padded - q.shape[1])], dim=1)
    return q, scale


def inv_smooth(smooth: torch.Tensor) -> torch.Tensor:
    """fp32 1/λ, computed once per layer call by the launcher and by the reference alike."""
    return torch.reciprocal(smooth.float())


# ----------------------------------------------------------------------------------------------------------
# NVFP4: E2M1 codes, E4M3 group scales (groups of 16), fp32 per-tensor scale
# ----------------------------------------------------------------------------------------------------------

_E2M1 = torch.tensor(E2M1_VALUES)


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to the even code); returns 4-bit codes (bit 3 = sign) as uint8."""
    mag = y.abs().float().clamp(max=6.0)
    vals = _E2M1.to(y.device)
    dist = (mag[..., None] - vals).abs()
    best = dist.min(dim=-1, keepdim=True).values
    ties = dist == best
    # prefer the even code among the tied candidates
    idx = torch.arange(8, device=y.device)
    score = ties.to(torch.int16) * 2 + ((idx % 2) == 0).to(torch.int16)
    code = score.argmax(dim=-1).to(torch.uint8)
    sign = ((y < 0) & (code > 0)).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    vals = _E2M1.to(codes.device)
    mag = vals[(codes & 0x7).long()]
    return torch.where((codes & 0x8) > 0, -mag, mag)


def to_e4m3(t: torch.Tensor) -> torch.Tensor:
    return t.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


@dataclass
class NVFP4Tensor:
    """value[r, c] = e2m1(codes[r, c]) * float(scales[r, c // 16]) * tensor_scale"""

    codes: torch.Tensor  # uint8 4-bit codes
    scales: torch.Tensor  # float8_e4m3fn [rows, cols / 16]
    tensor_scale: torch.Tensor  # fp32 [1]
    group: int = NVFP4_GROUP

    def dequantize(self) -> torch.Tensor:
        s = self.scales.float().repeat_interleave(self.group, dim=-1)
        return e2m1_decode(self.codes) * s * self.tensor_scale.float()


def quantize_nvfp4(w: torch.Tensor, group: int = NVFP4_GROUP, tensor_scale: torch.Tensor | None = None) -> NVFP4Tensor:
    """NVFP4 quantization. Weights get a per-tensor scale amax / (6 * 448); activations pass tensor_scale=1."""
    w = pad_to_multiple(w.float(), group)
    rows, cols = w.shape
    if tensor_scale is None:
        amax = w.abs().max()
        tensor_scale = torch.where(amax > 0, amax / (6.0 * E4M3_MAX), torch.ones_like(amax)).reshape(1)
    ts = tensor_scale.float().reshape(1)
    g = w.reshape(rows, cols // group, group) / ts
    gscale = to_e4m3(g.abs().amax(dim=-1) / 6.0)
    gs = gscale.float()
    gs = torch.where(gs > 0, gs, torch.ones_like(gs))
    codes = e2m1_encode(g / gs[..., None]).reshape(rows, cols)
    return NVFP4Tensor(codes=codes, scales=gscale, tensor_scale=ts, group=group)


def quantize_nvfp4_activation(
    x: torch.Tensor, smooth: torch.Tensor | None = None, group: int = NVFP4_GROUP
) -> torch.Tensor:
    """Fake-quantize activations to NVFP4 per token per group of 16 (E4M3 scale = min(amax/6, 448)).

    Returns the dequantized fp32 values of (x / smooth), padded to a multiple of the group.
    """
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    q = quantize_nvfp4(xf, group, tensor_scale=torch.ones(1, device=x.device))
    return q.dequantize()


def fake_quant_int4_weight(w: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Quantize-dequantize helper for searches; crops the padding again."""
    return quantize_int4_weight(w, group).dequantize()[:, : w.shape[1]]


def fake_quant_weight(w: torch.Tensor, precision: str) -> torch.Tensor:
    if precision == "int4":
        return fake_quant_int4_weight(w)
    if precision == "nvfp4":
        return quantize_nvfp4(w).dequantize()[:, : w.shape[1]]
    raise ValueError(f"unknown precision {precision!r} (expected 'int4' or 'nvfp4')")


def fake_quant_activation(
    x: torch.Tensor, precision: str, smooth: torch.Tensor | None = None, shift: float = 0.0, unsigned: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``(x + shift) / smooth`` as the runtime does; returns fp32, padding cropped."""
    k = x.shape[-1]
    if precision == "int4":
        op, scale = quantize_int4_activation(x, smooth, shift, unsigned)
        return (op.float() * scale[:, None])[:, :k]
    if precision == "nvfp4":
        xs = x.float() + shift if shift else x.float()
        return quantize_nvfp4_activation(xs, smooth)[:, :k]
    if precision == "int8":
        op, scale = quantize_int8_activation(x, smooth, shift)
        return op.float() * scale[:, None]
    raise ValueError(f"unknown activation precision {precision!r}")
