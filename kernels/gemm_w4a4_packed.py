"""W4A4 GEMM straight from the packed 4-bit weights: weights unpacked in registers as wgmma's A operand.

Reference: ``kernels.reference.svdq_linear_reference`` (INT4 path); same product and epilogue as
``gemm_w4a4._w4a4_gemm_tma_kernel``.

Why: the other schedules multiply an int8 copy of the weight that ``expand_weight`` writes just before each call
(one more pass over the layer, 6-33 µs on the H100 at FLUX shapes, and the GEMM then reads twice the weight bytes).
Hopper's wgmma may take its A operand from registers, so this kernel computes the transposed tile
``Cᵀ = W · Xᵀ``: the packed codes arrive by TMA, each thread turns its 16-bit words of four codes into the int8
operand ``code * multiplier`` in registers, and the activations (int8, from the activation kernel) are the
shared-memory B operand. The main loop stays a pure int32 accumulation; the epilogue is the transposed twin of
the other kernels' (scales, low-rank branch, bias, GELU, one 16-bit store).

Where it wins (H100, ``bench/packed_gemm_probe.py``, BENCHMARKS.md): at M = 256-1024, where the expansion pass is a
large share of the layer (M = 256, 3072→12288: 24.5 µs against 51.5 for expansion + int8 GEMM). At M = 4608 it is
5-18% slower than expansion + the ping-pong Gluon GEMM: Triton waits for each register-operand wgmma before the next
step's unpacking (no overlap inside a program), so dispatch uses it up to ``dispatch.PACKED_MAX_M`` rows only.

Unpacking a word of four codes (GPU, inline PTX, 9 instructions): its two bytes are spread into 16-bit lanes, the
even and odd nibbles offset by 8 (so they are 0..15), multiplied by the group's multiplier with ``256 - 8·mult``
added in the same multiply-add (each lane then holds ``code·mult + 256``, never borrowing from its neighbour), and
the four low bytes gathered into one word. The CPU interpreter runs the same arithmetic in plain Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune_cache import fp32_dots, interpreting, sm_count
from .launch import HAS_HOST_DESCRIPTORS, TensorDescriptor, launch, pdl_end, pdl_start
from .gemm_w4a4 import _gelu_tanh, branch_chunks, gemm_output

_UNPACK_PTX = tl.constexpr("""{
.reg .b32 x, y, e, o, k;
xor.b32 x, $1, 0x8888;
prmt.b32 y, x, 0, 0x4140;
and.b32 e, y, 0x000F000F;
shr.u32 o, y, 4;
and.b32 o, o, 0x000F000F;
mad.lo.u32 k, $5, 0xFFF7FFF8, 0x01000100;
mad.lo.u32 e, e, $5, k;
mad.lo.u32 o, o, $5, k;
prmt.b32 $0, e, o, 0x6240;
}""")
_COPY_PTX = tl.constexpr("mov.b32 $0, $1;")  # timing probe only: the kernel without the unpacking arithmetic


@triton.jit
def _unpack(words, mult, BN: tl.constexpr, BK: tl.constexpr, USE_PTX: tl.constexpr):
    """int16 words [BN, BK/4] (four signed codes each, lowest nibble first) × multipliers [BN, BK/64]
    → the int8 operand [BN, BK] (``code * mult``)."""
    if USE_PTX:
        w = tl.broadcast_to(words.to(tl.int32)[:, :, None], [BN, BK // 4, 4]).reshape(BN, BK)
        m = tl.broadcast_to(mult.to(tl.int32)[:, :, None], [BN, BK // 64, 64]).reshape(BN, BK)
        return tl.inline_asm_elementwise(_COPY_PTX if USE_PTX == 2 else _UNPACK_PTX, "=r,r,r,r,r,r,r,r,r", [w, m],
                                         dtype=tl.int8, is_pure=True, pack=4)
    else:
        w = words.to(tl.int32)
        shift = (tl.arange(0, 4) * 4)[None, None, :]
        codes = ((w[:, :, None] >> shift) & 15) ^ 8  # offset binary: code + 8
        codes = codes.reshape(BN, BK) - 8
        m = tl.broadcast_to(mult.to(tl.int32)[:, :, None], [BN, BK // 64, 64]).reshape(BN, BK)
        return (codes * m).to(tl.int8)


@triton.jit
def _w4a4_packed_kernel(
    a_desc, p_desc, mt_desc, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr,
    M, N, KP, R,
    stride_lm, stride_un, stride_cm,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, DOT_FP32: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr, GROUP_N: tl.constexpr, STAGES: tl.constexpr, USE_PTX: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One [BLOCK_N weight rows, BLOCK_T tokens] tile of Cᵀ per program, grouped so that GROUP_N weight blocks
    share each token block's activations in L2."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_t = tl.cdiv(M, BLOCK_T)
    group = GROUP_N * num_t
    first_n = (pid // group) * GROUP_N
    size_n = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % group) % size_n
    pid_t = (pid % group) // size_n
    off_n = pid_n * BLOCK_N
    off_t = pid_t * BLOCK_T
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.int32)
    for k0 in tl.range(0, KP, BLOCK_K, num_stages=STAGES):
        words = p_desc.load([off_n, k0 // 4])  # [BLOCK_N, BLOCK_K / 4] int16
        mult = mt_desc.load([k0 // 64, off_n]).T  # [BLOCK_N, BLOCK_K / 64] uint8
        a = a_desc.load([off_t, k0])  # [BLOCK_T, BLOCK_K] int8
        w = _unpack(words, mult, BLOCK_N, BLOCK_K, USE_PTX)
        acc = tl.dot(w, a.T, acc, out_dtype=tl.int32)

    rn = off_n + tl.arange(0, BLOCK_N)
    rt = off_t + tl.arange(0, BLOCK_T)
    nmask = rn < N
    tmask = rt < M
    sa = tl.load(ascale_ptr + rt, mask=tmask, other=0.0)
    sw = tl.load(wscale_ptr + rn, mask=nmask, other=0.0)
    y = acc.to(tl.float32) * sa[None, :] * sw[:, None]  # the other kernels' (acc · sa) · sw, transposed
    if HAS_LORA:
        for r0 in tl.static_range(0, BLOCK_R, R_CHUNK):
            rr = r0 + tl.arange(0, R_CHUNK)
            up = tl.load(up_ptr + rn[:, None] * stride_un + rr[None, :], mask=nmask[:, None] & (rr[None, :] < R),
                         other=0.0)
            la = tl.load(lora_ptr + rt[None, :] * stride_lm + rr[:, None], mask=tmask[None, :] & (rr[:, None] < R),
                         other=0.0)
            if DOT_FP32:
                y = tl.dot(up.to(tl.float32), la, y, input_precision="ieee")
            else:
                y = tl.dot(up, la.to(up.dtype), y)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    if GELU:
        y = _gelu_tanh(y)
    c_ptrs = c_ptr + rt[None, :] * stride_cm + rn[:, None]
    cmask = nmask[:, None] & tmask[None, :]
    if ACCUMULATE:
        y += tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=cmask)
    pdl_end(PDL)


def transposed_multipliers(wmult: torch.Tensor) -> torch.Tensor:
    """The group multipliers as [Kp/64, N'] (N' = N rounded up to 16: a TMA row must be a multiple of 16 bytes),
    so that one bulk copy brings a tile's multipliers along with its codes."""
    n, groups = wmult.shape
    wide = -(-n // 16) * 16
    out = torch.zeros(groups, wide, dtype=torch.uint8, device=wmult.device)
    out[:, :n] = wmult.T.to(torch.uint8)
    return out


def check_packed(qweight: torch.Tensor, mult_t: torch.Tensor) -> None:
    """Packed codes uint8 [N, Kp/2] (Kp a multiple of 64) and their ``transposed_multipliers``, or a clear error."""
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    if qweight.dtype != torch.uint8 or kp % 64:
        raise ValueError(f"packed weight {qweight.dtype} {tuple(qweight.shape)}: expected uint8 [N, Kp/2] with Kp a "
                         f"multiple of 64")
    if mult_t.dtype != torch.uint8 or mult_t.shape[0] != kp // 64 or mult_t.shape[1] < n or mult_t.stride(0) % 16:
        raise ValueError(f"multipliers {mult_t.dtype} {tuple(mult_t.shape)}: expected transposed_multipliers(wmult)")


def weight_descriptors(qweight: torch.Tensor, mult_t: torch.Tensor, bn: int, bk: int, codes_per_word: int = 4):
    """TMA descriptors of one [bn weight rows, bk] step: the codes as words (16-bit words of four, or 32-bit words
    of eight for the W4A16 pair kernel), and the multipliers. Shared by the packed-weight kernels (W4A4 here,
    W4A16 in ``gemm_w4a16_packed``)."""
    if bk % 64 or bk // 64 * bn % 128:  # each stage's multipliers are one TMA box: 128-byte aligned in shared memory
        raise ValueError(f"tile {bn} x {bk}: BLOCK_K must be a multiple of 64 and BLOCK_N * BLOCK_K / 64 of 128")
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    words = qweight.contiguous().view({4: torch.int16, 8: torch.int32}[codes_per_word])
    return (TensorDescriptor(words, [n, kp // codes_per_word], [words.stride(0), 1], [bn, bk // codes_per_word]),
            TensorDescriptor(mult_t, [kp // 64, n], [mult_t.stride(0), 1], [bk // 64, bn]))


def usable(a8: torch.Tensor) -> bool:
    """Either packed-weight kernel can run here: host-side TMA descriptors (Triton >= 3.4) on an NVIDIA GPU (measured
    on sm_90, where wgmma takes the register operand), or the interpreter."""
    return HAS_HOST_DESCRIPTORS and (interpreting() or (a8.is_cuda and torch.version.hip is None))


def default_config(m: int, n: int, programs: int) -> dict:
    """64 weight rows by 256 tokens (one warpgroup; two programs fit an SM), with fewer tokens per tile where
    that leaves fewer tiles than ``programs``: the H100 winners at M = 256-1024 (``bench/packed_gemm_probe.py
    --small``; e.g. M = 256, 3072→3072: 64 tokens 15.0 µs, 256 tokens 18.9)."""
    bt = next((t for t in (256, 128) if triton.cdiv(n, 64) * triton.cdiv(m, t) >= programs), 64)
    return {"BLOCK_N": 64, "BLOCK_T": bt, "BLOCK_K": 128, "GROUP_N": 8, "STAGES": 3 if bt == 256 else 4,
            "num_warps": 4}


def w4a4_gemm_packed(
    a8: torch.Tensor,
    ascale: torch.Tensor,
    qweight: torch.Tensor,
    mult_t: torch.Tensor,
    wscale: torch.Tensor,
    lora_act: torch.Tensor | None,
    proj_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    gelu: bool = False,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """y [M, N] = (a8 · (codes · mult)ᵀ) · ascale · wscale + lora_act · proj_upᵀ + bias (then GELU), from the
    packed codes ``qweight`` [N, Kp/2] and ``mult_t`` = ``transposed_multipliers(wmult)``."""
    m, kp = a8.shape
    n = qweight.shape[0]
    if qweight.shape[1] * 2 != kp:
        raise ValueError(f"packed weight {qweight.dtype} {tuple(qweight.shape)} does not match int8 activations of "
                         f"{kp} columns (uint8 [N, Kp/2] with Kp a multiple of 64)")
    check_packed(qweight, mult_t)
    r = 0 if proj_up is None else proj_up.shape[1]
    out = gemm_output(out, m, n, out_dtype, a8.device, accumulate)
    if m == 0:
        return out
    programs = sm_count(a8.device) if a8.is_cuda else 4
    cfg = dict(default_config(m, n, programs), **(config or {}))
    bn, bt, bk = cfg["BLOCK_N"], cfg["BLOCK_T"], cfg["BLOCK_K"]
    p_desc, mt_desc = weight_descriptors(qweight, mult_t, bn, bk)
    a_desc = TensorDescriptor(a8, [m, kp], [a8.stride(0), 1], [bt, bk])
    block_r, r_chunk = branch_chunks(r)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bt)
    launch(_w4a4_packed_kernel, (tiles,), (
        a_desc, p_desc, mt_desc, ascale, wscale, lora_act if r else ascale, proj_up if r else ascale,
        bias if bias is not None else ascale, out, m, n, kp, r,
        lora_act.stride(0) if r else 0, proj_up.stride(0) if r else 0, out.stride(0)),
        HAS_LORA=r > 0, HAS_BIAS=bias is not None, GELU=gelu, DOT_FP32=fp32_dots(a8, proj_up),
        ACCUMULATE=bool(accumulate), BLOCK_N=bn, BLOCK_T=bt, BLOCK_K=bk, BLOCK_R=block_r, R_CHUNK=r_chunk,
        GROUP_N=cfg["GROUP_N"], STAGES=cfg["STAGES"], USE_PTX=cfg.get("USE_PTX", int(not interpreting())),
        num_warps=cfg["num_warps"], pdl=True)
    return out
