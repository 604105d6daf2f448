"""W4A16: 4-bit weights × 16-bit activations for small M (adaLN modulation: M = batch size).

Reference: ``kernels.reference.svdq_linear_reference`` with ``act_precision == "none"``.

Memory-bound, so the goal is reading the packed weights once: ~0.53 bytes per weight (codes + multipliers)
instead of 2. Each program owns BLOCK_N output channels and a K slice (split-K with fp32 atomics when N alone
cannot fill the GPU).

Three kernels: for M ≤ 2 a CUDA-core kernel on 32-bit words with threads along K, three instructions per weight
(BENCHMARKS.md), the next step's words prefetched, a second row (batch 2 with CFG) sharing each unpacked weight;
for 3 ≤ M ≤ 4 one that reads 16-bit words, shares each weight load between the rows, turns nibbles into floats
with the mantissa trick, prefetches the next step and reduces across threads once at the end; above that a
tensor-core kernel where even input columns multiply the low nibbles and odd columns the high ones
(``code * mult``, |·| ≤ 120, is exact in 16 bit), M padded to 16.

On sm_90 dispatch runs ``gemm_w4a16_packed``'s pair kernel instead, for 1-64 rows (faster at every FLUX width,
BENCHMARKS.md); these kernels serve other GPUs, weights not on a 16-byte boundary, and ``SVDQ_W4A16=gemv``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, zeros
from .autotune_cache import fp32_dots, interpreting, sm_count
from .settings import getenv


@triton.jit
def _store_rows(y, rm, rn, mmask, nmask, pid_s, wscale_ptr, bias_ptr, out_ptr, stride_om, SPLIT: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """Channel scale, bias (added by the first K split only), then a store in the output dtype or, split over K,
    an fp32 atomic add."""
    ws = tl.load(wscale_ptr + rn, mask=nmask, other=0.0)
    y = y * ws[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        y += tl.where(pid_s == 0, bias, 0.0)[None, :]
    optrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if SPLIT > 1:
        tl.atomic_add(optrs, y, mask=mmask[:, None] & nmask[None, :])
    else:
        tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _w4a16_kernel(
    x_ptr, p_ptr, mult_ptr, wscale_ptr, smooth_ptr, bias_ptr, out_ptr,
    M, N, K, KP, K_PER_SPLIT,
    stride_xm, stride_p, stride_mult, stride_om,
    HAS_SMOOTH: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rn_c = tl.where(nmask, rn, 0)
    j = tl.arange(0, BLOCK_K // 2)
    gi = tl.arange(0, BLOCK_K // 64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        jj = k0 // 2 + j  # packed byte index
        ke = 2 * jj  # even input column
        jmask = ke < KP
        p = tl.load(p_ptr + rn_c[:, None] * stride_p + jj[None, :], mask=jmask[None, :], other=0).to(tl.int32)
        g = k0 // 64 + gi
        u = tl.load(mult_ptr + rn_c[:, None] * stride_mult + g[None, :], mask=(g * 64 < KP)[None, :], other=0).to(tl.int32)
        lo = p & 0xF
        hi = (p >> 4) & 0xF
        lo = tl.where(lo >= 8, lo - 16, lo)
        hi = tl.where(hi >= 8, hi - 16, hi)
        # each 64-group is 32 bytes: broadcast the multiplier over them without a gather
        lo = tl.reshape(tl.reshape(lo, [BLOCK_N, BLOCK_K // 64, 32]) * u[:, :, None], [BLOCK_N, BLOCK_K // 2])
        hi = tl.reshape(tl.reshape(hi, [BLOCK_N, BLOCK_K // 64, 32]) * u[:, :, None], [BLOCK_N, BLOCK_K // 2])
        xe = tl.load(x_ptr + rm[:, None] * stride_xm + ke[None, :], mask=mmask[:, None] & (ke[None, :] < K), other=0.0)
        xo = tl.load(x_ptr + rm[:, None] * stride_xm + (ke + 1)[None, :], mask=mmask[:, None] & ((ke + 1)[None, :] < K), other=0.0)
        if HAS_SMOOTH:
            se = tl.load(smooth_ptr + ke, mask=ke < K, other=1.0).to(tl.float32)
            so = tl.load(smooth_ptr + ke + 1, mask=(ke + 1) < K, other=1.0).to(tl.float32)
            xe = (xe.to(tl.float32) / se[None, :]).to(x_ptr.dtype.element_ty)
            xo = (xo.to(tl.float32) / so[None, :]).to(x_ptr.dtype.element_ty)
        if DOT_FP32:
            acc += tl.dot(xe.to(tl.float32), tl.trans(lo.to(tl.float32)), input_precision="ieee")
            acc += tl.dot(xo.to(tl.float32), tl.trans(hi.to(tl.float32)), input_precision="ieee")
        else:  # code * mult (|.| <= 105) is exact in 16 bit: tensor cores, M padded to 16
            acc += tl.dot(xe, tl.trans(lo.to(x_ptr.dtype.element_ty)))
            acc += tl.dot(xo, tl.trans(hi.to(x_ptr.dtype.element_ty)))
    _store_rows(acc, rm, rn, mmask, nmask, pid_s, wscale_ptr, bias_ptr, out_ptr, stride_om, SPLIT, HAS_BIAS)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, p_ptr, mult_ptr, wscale_ptr, inv_smooth_ptr, bias_ptr, out_ptr,
    N, K, G, G_PER_SPLIT,
    stride_xm, stride_p, stride_mult, stride_om,
    NIB_MASK, ONE_XOR,
    HAS_SMOOTH: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr, TWO_ROWS: tl.constexpr,
):
    """M = 1 on the CUDA cores: three instructions per weight (shift, one logic op, FMA).

    The packed weights are read as 32-bit words (8 codes, one 64-group = 8 words); threads run along K and each
    holds several output rows, so every input value it loads serves all of them. A nibble (c = code + 8 after
    flipping its sign bit) is turned into the float 1 + c/16 by placing it in the mantissa of 1.0 (no conversion
    instruction, no subtraction); since code = c - 8, Σ x·code = 16·Σ x·(1 + c/16) - 24·Σ x, and Σ x does not depend on the row. The group
    multiplier is applied once per word and step; the cross-thread reduction happens once, at the end.
    TWO_ROWS: a second input row (batch 2 with CFG) shares every unpacked weight, with its own accumulators."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rn_c = tl.where(nmask, rn, 0)
    gi = tl.arange(0, BLOCK_G)
    wi = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_N, BLOCK_G, 8], dtype=tl.float32)
    if TWO_ROWS:
        acc1 = tl.zeros([BLOCK_N, BLOCK_G, 8], dtype=tl.float32)
    g_start = pid_s * G_PER_SPLIT
    g_end = tl.minimum(g_start + G_PER_SPLIT, G)
    w_ptrs = p_ptr + rn_c[:, None, None] * stride_p + wi[None, None, :]
    u_ptrs = mult_ptr + rn_c[:, None] * stride_mult
    if PREFETCH:  # the next step's words are requested before this step's arithmetic: two steps in flight
        g = g_start + gi
        p_next = tl.load(w_ptrs + (g * 8)[None, :, None], mask=(g < g_end)[None, :, None], other=0)
        u_next = tl.load(u_ptrs + g[None, :], mask=(g < g_end)[None, :], other=0)
    for g0 in range(g_start, g_end, BLOCK_G):
        g = g0 + gi
        gm = g < g_end
        if PREFETCH:
            p = p_next
            u = u_next.to(tl.int32)
            gn = g + BLOCK_G
            p_next = tl.load(w_ptrs + (gn * 8)[None, :, None], mask=(gn < g_end)[None, :, None], other=0)
            u_next = tl.load(u_ptrs + gn[None, :], mask=(gn < g_end)[None, :], other=0)
        else:
            p = tl.load(w_ptrs + (g * 8)[None, :, None], mask=gm[None, :, None], other=0)
            u = tl.load(u_ptrs + g[None, :], mask=gm[None, :], other=0).to(tl.int32)
        uf = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # small integer to float, no cvt
        part = tl.zeros([BLOCK_N, BLOCK_G, 8], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_G, 8], dtype=tl.float32)
        if TWO_ROWS:
            part1 = tl.zeros([BLOCK_N, BLOCK_G, 8], dtype=tl.float32)
            xsum1 = tl.zeros([BLOCK_G, 8], dtype=tl.float32)
        for j in tl.static_range(8):  # nibble j of word w is input column 8w + j
            col = (g * 64)[:, None] + wi[None, :] * 8 + j
            cm = gm[:, None] & (col < K)
            xv = tl.load(x_ptr + col, mask=cm, other=0.0).to(tl.float32)
            if TWO_ROWS:
                xv1 = tl.load(x_ptr + stride_xm + col, mask=cm, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                inv = tl.load(inv_smooth_ptr + col, mask=cm, other=0.0)
                xv = xv * inv
                if TWO_ROWS:
                    xv1 = xv1 * inv
            xsum += xv
            # the nibble holds the code in two's complement: XOR with 8 gives c = code + 8. Mask and constant
            # come in as runtime values (registers), so AND and XOR compile to one LOP3 (it takes one immediate)
            if 4 * j <= 19:
                bits = ((p << (19 - 4 * j)) & NIB_MASK) ^ ONE_XOR
            else:
                bits = ((p >> (4 * j - 19)) & NIB_MASK) ^ ONE_XOR
            bf = bits.to(tl.float32, bitcast=True)
            part += xv[None, :, :] * bf
            if TWO_ROWS:
                xsum1 += xv1
                part1 += xv1[None, :, :] * bf
        acc += (part * 16.0 - xsum[None, :, :] * 24.0) * uf[:, :, None]
        if TWO_ROWS:
            acc1 += (part1 * 16.0 - xsum1[None, :, :] * 24.0) * uf[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    rm = tl.arange(0, 1)
    _store_rows(y[None, :], rm, rn, rm < 1, nmask, pid_s, wscale_ptr, bias_ptr, out_ptr, stride_om, SPLIT, HAS_BIAS)
    if TWO_ROWS:
        y1 = tl.sum(tl.sum(acc1, axis=2), axis=1)
        _store_rows(y1[None, :], rm + 1, rn, rm < 1, nmask, pid_s, wscale_ptr, bias_ptr, out_ptr, stride_om, SPLIT,
                    HAS_BIAS)


@triton.jit
def _w4a16_rows_kernel(
    x_ptr, p_ptr, mult_ptr, wscale_ptr, smooth_ptr, bias_ptr, out_ptr,
    M, N, K, W16, W_PER_SPLIT,
    stride_xm, stride_p, stride_mult, stride_om,
    HAS_SMOOTH: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """2 <= M <= 4 on the CUDA cores (the rows share each weight load), reading the packed weights as 16-bit words (4 codes each, 8 words = one 16-byte
    load a thread). Products accumulate elementwise in a [BLOCK_M, BLOCK_N, BLOCK_W] register tile and are
    reduced across threads once at the end, not every K step."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rn_c = tl.where(nmask, rn, 0)
    wi = tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_W], dtype=tl.float32)
    w_start = pid_s * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, W16)
    # software prefetch: the next step's words are requested before this step's arithmetic (loads that feed
    # no dot are not pipelined by the compiler), so two steps of weights are in flight per program
    wmask = (w_start + wi) < w_end
    p_next = tl.load(p_ptr + rn_c[:, None] * stride_p + (w_start + wi)[None, :], mask=wmask[None, :], other=0)
    u_next = tl.load(mult_ptr + rn_c[:, None] * stride_mult + ((w_start + wi) // 16)[None, :], mask=wmask[None, :], other=0)
    for w0 in range(w_start, w_end, BLOCK_W):
        w = w0 + wi  # word index: input columns 4w .. 4w+3
        p = p_next.to(tl.int32)
        u = u_next.to(tl.int32)
        wn = w + BLOCK_W
        wn_mask = wn < w_end
        p_next = tl.load(p_ptr + rn_c[:, None] * stride_p + wn[None, :], mask=wn_mask[None, :], other=0)
        u_next = tl.load(mult_ptr + rn_c[:, None] * stride_mult + (wn // 16)[None, :], mask=wn_mask[None, :], other=0)
        # integers to floats without conversion instructions (a quarter-rate unit): OR the value into the
        # mantissa of 2^23 and subtract. Nibble XOR 8 is the code + 8, so 2^23 + 8 is taken off.
        uf = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        part = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_W], dtype=tl.float32)
        for i in tl.static_range(4):
            code = (((p >> (4 * i)) & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
            kc = 4 * w + i
            xv = tl.load(x_ptr + rm[:, None] * stride_xm + kc[None, :], mask=mmask[:, None] & (kc[None, :] < K), other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                lam = tl.load(smooth_ptr + kc, mask=kc < K, other=1.0).to(tl.float32)
                xv = xv / lam[None, :]
            part += xv[:, None, :] * code[None, :, :]
        acc += part * uf[None, :, :]  # the group multiplier once per word, not per code
    _store_rows(tl.sum(acc, axis=2), rm, rn, mmask, nmask, pid_s, wscale_ptr, bias_ptr, out_ptr, stride_om, SPLIT, HAS_BIAS)


SMALL_M = 4  # up to this many rows the CUDA-core kernel runs (measured faster than padding M to 16 for MMA)


def w4a16_linear(x2: torch.Tensor, qweight: torch.Tensor, wmult: torch.Tensor, wscale: torch.Tensor,
                 smooth: torch.Tensor | None, in_features: int, bias: torch.Tensor | None = None,
                 block_n: int = 128, block_k: int = 512, split: int | None = None,
                 out_dtype: torch.dtype = torch.float32, inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N] = (x2 / smooth) · (codes · mult · wscale)ᵀ + bias in fp32, or directly in ``out_dtype`` where the
    kernel needs no split-K atomics; low-rank terms are added by the caller."""
    m, k = x2.shape
    n = qweight.shape[0]
    kp = qweight.shape[1] * 2
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    impl = getenv("SVDQ_W4A16", "auto").lower()
    if m <= SMALL_M and impl in ("gemv", "auto", "packed"):
        return _w4a16_gemv(x2, qweight, wmult, wscale, smooth, inv_smooth, bias, out_dtype)
    while block_k > 64 and kp % block_k:
        block_k //= 2
    if interpreting():
        block_n = 32
    blocks_n = triton.cdiv(n, block_n)
    if split is None:
        sms = sm_count(x2.device)
        split = max(1, min(kp // block_k, (3 * sms) // max(blocks_n, 1)))
    k_per_split = triton.cdiv(triton.cdiv(kp, split), block_k) * block_k
    split = triton.cdiv(kp, k_per_split)
    out = zeros((m, n), torch.float32, x2.device) if split > 1 else torch.empty(m, n, dtype=torch.float32,
                                                                                 device=x2.device)
    bm = 16
    grid = (blocks_n, split, triton.cdiv(m, bm))
    launch(_w4a16_kernel, grid, (
        x2, qweight, wmult, wscale, smooth if smooth is not None else wscale, bias if bias is not None else wscale, out,
        m, n, k, kp, k_per_split,
        x2.stride(0), qweight.stride(0), wmult.stride(0), out.stride(0)),
        HAS_SMOOTH=smooth is not None, SPLIT=split, DOT_FP32=fp32_dots(x2), HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8, num_stages=3,
    )
    return out


def _w4a16_gemv(x2, qweight, wmult, wscale, smooth, inv_smooth, bias, out_dtype):
    if x2.shape[0] <= 2:  # M = 2: 36.8 vs 41.5 µs for the rows kernel at 3072->18432 (bf16 42.3), H100
        return _w4a16_gemv_one_row(x2, qweight, wmult, wscale, smooth, inv_smooth, bias, out_dtype)
    return _w4a16_gemv_rows(x2, qweight, wmult, wscale, smooth, bias, out_dtype)


def _split_k(units: int, block: int, blocks_n: int, per_sm: int, device: torch.device,
             split: int | None = None) -> tuple[int, int]:
    """(K splits, K units per split, a multiple of ``block``): enough programs for ``per_sm`` per SM."""
    if split is None:
        split = max(1, min(triton.cdiv(units, block), (per_sm * sm_count(device)) // max(blocks_n, 1)))
    per_split = triton.cdiv(triton.cdiv(units, split), block) * block
    return triton.cdiv(units, per_split), per_split


def _gemv_output(m: int, n: int, split: int, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Split over K, programs add fp32 partial sums atomically into zeros; otherwise one store in ``out_dtype``."""
    if split > 1:
        return zeros((m, n), torch.float32, device)
    return torch.empty(m, n, dtype=out_dtype, device=device)


def one_row_tile(n: int, m: int = 1) -> tuple[int, int, int]:
    """(output rows, 64-groups, warps) per program of the word kernel, by output width and row count (H100 sweeps,
    ``bench/kernel_variants.py --only w4a16tile``, BENCHMARKS.md). M = 1: one-warp programs over 16 rows x 4 groups
    at FLUX's 18432 (20.6 vs 25.6 µs for the earlier 32 x 16 x 4 warps), 16 x 8 x 2 warps at 9216, 8 x 8 x 2 below.
    M = 2 (twice the accumulators): 16 x 8 x 2 at 18432, 8 x 4 x 1 at 9216, 8 x 8 x 2 below. Small programs and the
    prefetched next step keep more loads in flight per SM than a few large programs."""
    if m == 2:
        return (16, 8, 2) if n >= 12288 else ((8, 4, 1) if n >= 6144 else (8, 8, 2))
    if n >= 12288:
        return 16, 4, 1
    if n >= 6144:
        return 16, 8, 2
    return 8, 8, 2


ONE_ROW_PREFETCH = True  # request the next K step's words before this step's arithmetic


def _w4a16_gemv_one_row(x2, qweight, wmult, wscale, smooth, inv_smooth, bias, out_dtype,
                        block_n: int | None = None, block_g: int | None = None, split: int | None = None,
                        prefetch: bool | None = None, num_warps: int | None = None):
    """The word kernel for one input row, or two (``TWO_ROWS``: each unpacked weight serves both)."""
    m, k = x2.shape
    if m > 2:
        raise ValueError(f"the word kernel takes 1 or 2 rows, not {m}")
    n = qweight.shape[0]
    groups = qweight.shape[1] // 32  # 64 codes = 32 bytes = 8 words per group
    p32 = qweight.view(torch.int32)  # [N, Kp/8]: Kp is a multiple of 64, so rows stay whole words
    tile_n, tile_g, warps = one_row_tile(n, m)
    block_n, block_g, num_warps = block_n or tile_n, block_g or tile_g, num_warps or warps
    if interpreting():
        block_n, block_g = 8, 2
    blocks_n = triton.cdiv(n, block_n)
    split, g_per_split = _split_k(groups, block_g, blocks_n, 2, x2.device, split)
    out = _gemv_output(m, n, split, out_dtype, x2.device)
    if smooth is not None and inv_smooth is None:
        inv_smooth = torch.reciprocal(smooth.float())
    launch(_w4a16_gemv_kernel, (blocks_n, split), (
        x2, p32, wmult, wscale, inv_smooth if smooth is not None else wscale, bias if bias is not None else wscale, out,
        n, k, groups, g_per_split,
        x2.stride(0), p32.stride(0), wmult.stride(0), out.stride(0), 0x00780000, 0x3FC00000),
        HAS_SMOOTH=smooth is not None, SPLIT=split, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_G=block_g, PREFETCH=ONE_ROW_PREFETCH if prefetch is None else prefetch, TWO_ROWS=m == 2,
        num_warps=num_warps, num_stages=3,
    )
    return out


def _w4a16_gemv_rows(x2, qweight, wmult, wscale, smooth, bias, out_dtype):
    m, k = x2.shape
    n = qweight.shape[0]
    words = qweight.shape[1] // 2
    p16 = qweight.view(torch.int16)  # [N, Kp/4]: Kp is a multiple of 64, so rows stay whole words
    bm = 2 if m == 2 else 4  # dispatch sends M = 3-4 here; M = 2 stays for kernel_variants' A/B with the word kernel
    block_n, block_w = {2: (16, 128), 4: (16, 64)}[bm]
    if interpreting():
        block_w = 32
    blocks_n = triton.cdiv(n, block_n)
    split, w_per_split = _split_k(words, block_w, blocks_n, 4, x2.device)
    out = _gemv_output(m, n, split, out_dtype, x2.device)
    launch(_w4a16_rows_kernel, (blocks_n, split), (
        x2, p16, wmult, wscale, smooth if smooth is not None else wscale, bias if bias is not None else wscale, out,
        m, n, k, words, w_per_split,
        x2.stride(0), p16.stride(0), wmult.stride(0), out.stride(0)),
        HAS_SMOOTH=smooth is not None, SPLIT=split, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_W=block_w, num_warps=4, num_stages=3,
    )
    return out
