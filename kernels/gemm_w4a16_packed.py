"""W4A16 on tensor cores for a few rows (M up to 64): packed 4-bit weights unpacked to bf16 in registers.

Reference: ``kernels.reference.svdq_linear_reference`` (W4A16 path: ``(x / λ) · (codes · mult · wscale)ᵀ + bias``).

Why: with 16-bit activations the layer is memory-bound at small M, so it should read the 4-bit weights once and do
little per weight. As in ``gemm_w4a4_packed``, the tile is computed transposed, ``Cᵀ = W · Xᵀ``: TMA brings the
16-bit words of four codes and the transposed group multipliers, each thread turns its words into the bf16 operand
``code · mult`` (an exact small integer) in registers as wgmma's A operand, and the smoothed input rows ``x / λ``
(bf16) are the B operand, up to 64 rows padded to a 16-row tile. The per-row ``wscale`` and the bias are applied to
the fp32 result.

Unpacking a pair of codes (GPU, inline PTX): the two nibbles, offset by 8, are placed in the mantissas of a bf16x2
128 (``0x4300 | u`` is 128 + u exactly), and one bf16x2 FMA gives ``(128 + u) · mult − 136 · mult = code · mult``,
exact. A pair is (k, k + 1) with k even: one register of wgmma's bf16 A operand (the next register of a thread holds
k + 8, so a whole word of four codes does not map to one asm call). The interpreter runs the same arithmetic in plain
Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune_cache import interpreting, sm_count
from .gemm_w4a4_packed import check_packed, weight_descriptors
from .launch import launch

_UNPACK_BF16_PTX = tl.constexpr("""{
.reg .b32 t, v, h, m2, k2;
.reg .f32 kf;
xor.b32 t, $1, 0x88;
and.b32 v, t, 0xF;
shl.b32 h, t, 12;
and.b32 h, h, 0xF0000;
or.b32 v, v, h;
or.b32 v, v, 0x43004300;
cvt.rn.bf16x2.f32 m2, $3, $3;
mul.f32 kf, $3, 0fC3080000;
cvt.rn.bf16x2.f32 k2, kf, kf;
fma.rn.bf16x2 $0, v, m2, k2;
}""")


@triton.jit
def _unpack_bf16(words, mult, BN: tl.constexpr, BK: tl.constexpr, USE_PTX: tl.constexpr):
    """int16 words [BN, BK/4] (four signed codes each, lowest nibble first) × multipliers [BN, BK/64]
    → bf16 [BN, BK] ``code * mult`` (exact)."""
    m = tl.broadcast_to(mult.to(tl.float32)[:, :, None], [BN, BK // 64, 64]).reshape(BN, BK)
    if USE_PTX:  # pairs (k, k + 1), k even: the two bf16 of one register of wgmma's A operand (kWidth = 2)
        w32 = words.to(tl.int32)
        pairs = tl.join(w32, w32 >> 8)  # [BN, BK/4, 2]: each word with its first or second pair of codes lowest
        w = tl.broadcast_to(pairs[:, :, :, None], [BN, BK // 4, 2, 2]).reshape(BN, BK)
        return tl.inline_asm_elementwise(_UNPACK_BF16_PTX, "=r,r,r,r,r", [w, m], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    else:
        w = words.to(tl.int32)
        shift = (tl.arange(0, 4) * 4)[None, None, :]
        codes = ((((w[:, :, None] >> shift) & 15) ^ 8) - 8).reshape(BN, BK)
        return (codes.to(tl.float32) * m).to(tl.bfloat16)


@triton.jit
def _w4a16_packed_kernel(
    x_ptr, inv_ptr, p_desc, mt_desc, wscale_ptr, bias_ptr, out_ptr,
    M, N, K, KP, K_PER_SPLIT,
    stride_xm, stride_om,
    HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    USE_PTX: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One [BLOCK_N weight rows, BLOCK_T input rows] tile of Cᵀ over one K split per program; with SPLIT > 1 the
    fp32 partial sums are added atomically into a zeroed output (the bias by split 0 only)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    off_n = pid_n * BLOCK_N
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rt < M
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(KP, k_lo + K_PER_SPLIT)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        w = _unpack_bf16(p_desc.load([off_n, k0 // 4]), mt_desc.load([k0 // 64, off_n]).T, BLOCK_N, BLOCK_K, USE_PTX)
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rt[:, None] * stride_xm + rk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        x = x.to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_ptr + rk, mask=kmask, other=0.0)[None, :]
        if DOT_FP32:  # the interpreter multiplies bf16 as raw bits; the same values in fp32 (exact products)
            acc = tl.dot(w.to(tl.float32), x.to(tl.bfloat16).to(tl.float32).T, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x.to(tl.bfloat16).T, acc)
    rn = off_n + tl.arange(0, BLOCK_N)
    nmask = rn < N
    y = acc * tl.load(wscale_ptr + rn, mask=nmask, other=0.0)[:, None]
    if HAS_BIAS:
        if pid_s == 0:
            y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + rt[None, :] * stride_om + rn[:, None]
    omask = nmask[:, None] & tmask[None, :]
    if SPLIT > 1:
        tl.atomic_add(ptrs, y, mask=omask, sem="relaxed")
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)


MAX_M = 64  # one to four 16-row tiles; above that the W4A4-style GEMMs are the better fit


def default_tile(m: int, n: int) -> dict:
    """Weight rows × K per program, the H100 winners (``bench/packed_gemm_probe.py --w4a16``): 64 × 256 for wide
    layers (N ≥ 12288) up to 16 rows, 128 × 128 for N ≥ 6144 or more than 16 rows, else 64 × 128; four stages."""
    bn, bk = (64, 256) if n >= 12288 and m <= 16 else ((128, 128) if n >= 6144 or m > 16 else (64, 128))
    return {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": 4, "num_warps": 4}


def w4a16_packed(x2: torch.Tensor, qweight: torch.Tensor, mult_t: torch.Tensor, wscale: torch.Tensor,
                 inv_smooth: torch.Tensor | None, in_features: int, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32, config: dict | None = None) -> torch.Tensor:
    """[M, N] = (x2 · inv_smooth) · (codes · mult · wscale)ᵀ + bias, from the packed codes ``qweight`` [N, Kp/2]
    and ``mult_t`` = ``gemm_w4a4_packed.transposed_multipliers(wmult)``; fp32 where the K split adds partial sums
    atomically, else ``out_dtype``."""
    m, k = x2.shape
    n, half = qweight.shape
    kp = half * 2
    if k != in_features or kp < k or kp % 64:
        raise ValueError(f"input of {k} features does not fit a layer of {in_features} (packed {tuple(qweight.shape)})")
    if m > MAX_M:
        raise ValueError(f"the packed W4A16 kernel takes at most {MAX_M} rows, not {m}")
    check_packed(qweight, mult_t)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    cfg = {**default_tile(m, n), **(config or {})}
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    bt = 16 if m <= 16 else (32 if m <= 32 else 64)
    blocks_n, blocks_t = triton.cdiv(n, bn), triton.cdiv(m, bt)
    steps = triton.cdiv(kp, bk)
    programs = 2 * (sm_count(x2.device) if x2.is_cuda else 2)
    split = cfg.get("SPLIT") or max(1, min(steps, programs // (blocks_n * blocks_t)))
    per_split = triton.cdiv(steps, split) * bk
    split = triton.cdiv(kp, per_split)
    out = (torch.zeros(m, n, dtype=torch.float32, device=x2.device) if split > 1
           else torch.empty(m, n, dtype=out_dtype, device=x2.device))
    if m == 0:
        return out
    p_desc, mt_desc = weight_descriptors(qweight, mult_t, bn, bk)
    launch(_w4a16_packed_kernel, (blocks_n, split, blocks_t), (
        x2, inv_smooth if inv_smooth is not None else wscale, p_desc, mt_desc, wscale,
        bias if bias is not None else wscale, out, m, n, k, kp, per_split, x2.stride(0), out.stride(0)),
        HAS_SMOOTH=inv_smooth is not None, HAS_BIAS=bias is not None, SPLIT=split, BLOCK_N=bn, BLOCK_T=bt,
        BLOCK_K=bk, STAGES=cfg["STAGES"], USE_PTX=int(not interpreting()), DOT_FP32=interpreting(),
        num_warps=cfg["num_warps"])
    return out
