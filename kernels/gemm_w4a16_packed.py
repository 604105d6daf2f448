"""W4A16 on tensor cores for a few rows (M up to 64): packed 4-bit weights unpacked to bf16 in registers.

Reference: ``kernels.reference.svdq_linear_reference`` (W4A16 path: ``(x / λ) · (codes · mult · wscale)ᵀ + bias``).

Why: with 16-bit activations the layer is memory-bound at small M, so it should read the 4-bit weights once and do
little per weight. As in ``gemm_w4a4_packed``, the tile is computed transposed, ``Cᵀ = W · Xᵀ``: TMA brings the
packed codes and the transposed group multipliers, each thread turns its words into the bf16 operand
``code · mult`` (an exact small integer) in registers as wgmma's A operand, and the smoothed input rows ``x / λ``
(bf16) are the B operand, up to 64 rows padded to a 16-row tile. The per-row ``wscale`` and the bias are applied to
the fp32 result.

Two kernels; dispatch runs the first.

- ``_w4a16_pairs_kernel`` (32-bit words of eight codes; H100: 1.1-1.8× the kernels it replaced, BENCHMARKS.md).
  A pair of codes costs one logic op and one bf16x2 FMA: ``(word >> 4j) & 0x000F000F`` holds codes j and j + 4,
  16 bits apart, and XOR 0x43084308 puts each, offset by 8, in the mantissa of a bf16 128 (``lop3`` does both); the
  FMA ``(128 + code + 8)·mult − 136·mult`` gives ``code · mult`` exactly, with ``(mult, mult)`` and
  ``(−136·mult, −136·mult)`` made once per group. The operand's K order is permuted to fit: position
  32a + 8p + 2b + h holds code j + 4h of word 4a + b (j = p // 2 + 2·(p % 2)). In wgmma's A layout a thread holds
  pairs four apart, so it holds all four pairs of each word it reads: words go from shared memory to the thread that
  needs them, nothing moves between threads. The input columns are read in the same order: per step (load, smooth,
  permute on chip) or, for wide layers, prepared once per call by ``_smooth_permute_kernel`` into a buffer of whole
  16-row tiles and brought by TMA (no per-step work; rows past M are never written and reach only masked output
  rows). A descriptor over M rows, with the copy engine zero-filling the rest of the tile, measured 16.0-16.2 or
  18.1-18.5 µs at 3072→18432 depending on the process; over whole tiles 15.8-16.0 every time (H100,
  ``bench/w4a16_xrows.py``).
- ``_w4a16_packed_kernel`` (16-bit words of four codes), the earlier kernel, kept for A/B runs (``WORDS=16``): the
  same bf16x2 trick, but a pair is (k, k + 1) of one 16-bit word, so each pair needs its own shifts and masks and
  the multiplier is converted per pair (10 instructions a pair instead of 2).

The interpreter runs the same arithmetic in plain Triton; ``tests/ptx_model.py`` runs the inline PTX.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune_cache import interpreting, sm_count
from .gemm_w4a4_packed import check_packed, weight_descriptors
from .launch import TensorDescriptor, launch, pdl_end, pdl_start, zeros

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
def _tile_of_program(M, KP, K_PER_SPLIT, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Both W4A16 kernels' grid (weight-row blocks, K splits, input-row blocks): this program's block indices, its
    first weight row, its input rows and their mask, and its K range."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    k_lo = pid_s * K_PER_SPLIT
    return pid_n, pid_s, pid_t, pid_n * BLOCK_N, rt, rt < M, k_lo, tl.minimum(KP, k_lo + K_PER_SPLIT)


@triton.jit
def _scale_and_bias(acc, rn, nmask, pid_s, wscale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """The Cᵀ tile's per-channel scale, and the bias (added by the first K split only)."""
    y = acc * tl.load(wscale_ptr + rn, mask=nmask, other=0.0)[:, None]
    if HAS_BIAS:
        if pid_s == 0:
            y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    return y


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
    pid_n, pid_s, pid_t, off_n, rt, tmask, k_lo, k_hi = _tile_of_program(M, KP, K_PER_SPLIT, BLOCK_N, BLOCK_T)
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
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
    y = _scale_and_bias(acc, rn, nmask, pid_s, wscale_ptr, bias_ptr, HAS_BIAS)
    ptrs = out_ptr + rt[None, :] * stride_om + rn[:, None]
    omask = nmask[:, None] & tmask[None, :]
    if SPLIT > 1:
        tl.atomic_add(ptrs, y, mask=omask, sem="relaxed")
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)


# (word & 0x000F000F) ^ 0x43084308 in one logic op (0x6A = (a & b) ^ c): two nibbles 16 bits apart, each flipped to
# code + 8 in the mantissa of bf16 128; then (128 + code + 8)·mult − 136·mult = code·mult, exact, in one bf16x2 FMA
_PAIR_BF16_PTX = tl.constexpr("""{
.reg .b32 v;
lop3.b32 v, $1, 0x000F000F, 0x43084308, 0x6A;
fma.rn.bf16x2 $0, v, $3, $5;
}""")


@triton.jit
def _pair_operand(words, m2, k2, BN: tl.constexpr, BK: tl.constexpr, USE_PTX: tl.constexpr):
    """int32 words [BN, BK/8] (eight signed codes, lowest nibble first) and per-group bf16x2 constants
    (``m2`` = (mult, mult), ``k2`` = (-136·mult, -136·mult), int32 bit patterns [BN, BK/64]) → the bf16 A operand
    [BN, BK] in a permuted K order: position 32a + 8p + 2b + h holds code j + 4h of word 4a + b, where
    j = p // 2 + 2 (p % 2) (the order two joins leave the shifts in). A register pair
    (k, k + 1) is then one word shifted by 4j and masked to two nibbles 16 bits apart (no byte shuffles), and in
    wgmma's A layout (pairs 4 apart in one thread) a thread holds all four pairs of each word it reads, so words go
    from shared memory to the thread that needs them without moving between threads."""
    if USE_PTX:
        w3 = words.reshape(BN, BK // 32, 4)  # [n, a, b]: word 4a + b
        s = tl.join(w3, w3 >> 4)
        s = tl.join(s, s >> 8)  # [n, a, b, j0, j1]: shifted by 4·(j0 + 2·j1), three shifts a word
        s = tl.permute(s, (0, 1, 3, 4, 2)).reshape(BN, BK // 8, 4)  # [n, (a, p = 2·j0 + j1), b]
        s = tl.broadcast_to(s[:, :, :, None], [BN, BK // 8, 4, 2]).reshape(BN, BK)
        m = tl.broadcast_to(m2[:, :, None], [BN, BK // 64, 64]).reshape(BN, BK)
        k = tl.broadcast_to(k2[:, :, None], [BN, BK // 64, 64]).reshape(BN, BK)
        return tl.inline_asm_elementwise(_PAIR_BF16_PTX, "=r,r,r,r,r,r,r", [s, m, k], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    else:
        w3 = words.reshape(BN, BK // 32, 1, 4, 1)
        p = tl.arange(0, 4)
        sh = (((p >> 1) + 2 * (p & 1)) * 4)[None, None, :, None, None] + (tl.arange(0, 2) * 16)[None, None, None, None, :]
        codes = ((((w3 >> sh) & 15) ^ 8) - 8).reshape(BN, BK)
        mult = (m2 & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
        m = tl.broadcast_to(mult[:, :, None], [BN, BK // 64, 64]).reshape(BN, BK)
        return (codes.to(tl.float32) * m).to(tl.bfloat16)


@triton.jit
def _bf16x2(v):
    """fp32 [..] → int32 bit pattern of the bf16 pair (v, v)."""
    b = v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _smooth_permute_kernel(x_ptr, inv_ptr, xs_ptr, K, KP, stride_xm, stride_sm, HAS_SMOOTH: tl.constexpr,
                           BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """xs[m, l] = bf16(x[m, c(l)] / λ[c(l)]) in the pair kernel's operand order (c permutes within 32 columns; 0 past
    K): what every program of ``_w4a16_pairs_kernel`` would otherwise load, smooth, convert and permute per step."""
    pdl_start(PDL)
    m = tl.program_id(1)
    lk = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pp = (lk // 8) % 4
    col = (lk // 32) * 32 + ((lk // 2) % 4) * 8 + (pp >> 1) + 2 * (pp & 1) + (lk % 2) * 4
    cmask = col < K
    x = tl.load(x_ptr + m * stride_xm + col, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(inv_ptr + col, mask=cmask, other=0.0)
    tl.store(xs_ptr + m * stride_sm + lk, x.to(tl.bfloat16), mask=lk < KP)
    pdl_end(PDL)


@triton.jit
def _w4a16_pairs_kernel(
    x_ptr, inv_ptr, p_desc, mt_desc, x_desc, wscale_ptr, bias_ptr, out_ptr, sums_ptr, tickets_ptr,
    M, N, K, KP, K_PER_SPLIT,
    stride_xm, stride_om,
    HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    USE_PTX: tl.constexpr, DOT_FP32: tl.constexpr, X_DESC: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """As ``_w4a16_packed_kernel`` (one [BLOCK_N, BLOCK_T] tile of Cᵀ over one K split), on 32-bit words of eight
    codes: two instructions per pair of weights (mask + offset in one logic op, one bf16x2 FMA) plus three shifts
    a word, the group constants made once per group, and the input's columns read in the operand's permuted order.

    Split over K, each program stores its fp32 partial sums in ``sums`` and the tile's last program (by a ticket
    counter) adds them in a fixed order, writes the output in its dtype and sets its ticket back to zero: one
    launch, no memset, deterministic, and the output is the kernel's own (a call plan can replay it)."""
    pdl_start(PDL)
    pid_n, pid_s, pid_t, off_n, rt, tmask, k_lo, k_hi = _tile_of_program(M, KP, K_PER_SPLIT, BLOCK_N, BLOCK_T)
    lk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        mf = mt_desc.load([k0 // 64, off_n]).T.to(tl.float32)
        w = _pair_operand(p_desc.load([off_n, k0 // 8]), _bf16x2(mf), _bf16x2(mf * -136.0), BLOCK_N, BLOCK_K, USE_PTX)
        if X_DESC:  # smoothed and permuted once per call (``smooth_permute``): a bulk copy (rows past M masked at the store)
            xb = x_desc.load([pid_t * BLOCK_T, k0])
        else:  # read contiguously, then permuted on chip (measured as fast as reading in the operand's order)
            rk = k0 + lk
            kmask = rk < K
            x = tl.load(x_ptr + rt[:, None] * stride_xm + rk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
            x = x.to(tl.float32)
            if HAS_SMOOTH:
                x = x * tl.load(inv_ptr + rk, mask=kmask, other=0.0)[None, :]
            # column 32a + 8b + 4h + 2·j1 + j0 -> operand position 32a + 8·(2·j0 + j1) + 2b + h (``_pair_operand``)
            xb = tl.permute(x.to(tl.bfloat16).reshape(BLOCK_T, BLOCK_K // 32, 4, 2, 2, 2),
                            (0, 1, 5, 4, 2, 3)).reshape(BLOCK_T, BLOCK_K)
        if DOT_FP32:  # the interpreter multiplies bf16 as raw bits; the same values in fp32 (exact products)
            acc = tl.dot(w.to(tl.float32), xb.to(tl.float32).T, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xb.T, acc)
    rn = off_n + tl.arange(0, BLOCK_N)
    nmask = rn < N
    y = _scale_and_bias(acc, rn, nmask, pid_s, wscale_ptr, bias_ptr, HAS_BIAS)
    ptrs = out_ptr + rt[None, :] * stride_om + rn[:, None]
    omask = nmask[:, None] & tmask[None, :]
    if SPLIT > 1:
        part = rt[None, :] * N + rn[:, None]
        tl.store(sums_ptr + pid_s * M * N + part, y, mask=omask)
        tl.debug_barrier()  # every thread's partial sums before the ticket (released at GPU scope)
        ticket_ptr = tickets_ptr + pid_t * tl.num_programs(0) + pid_n
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == SPLIT - 1:
            tl.debug_barrier()
            tot = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
            for s in tl.static_range(SPLIT):  # a fixed order: the same bits every call
                tot += tl.load(sums_ptr + s * M * N + part, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(ptrs, tot.to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(ticket_ptr, 0)
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)
    pdl_end(PDL)


MAX_M = 64  # one to four 16-row tiles; above that the W4A4-style GEMMs are the better fit


def default_tile(m: int, n: int, words: int = 32) -> dict:
    """Weight rows × K per program, the H100 winners. The pair kernel (``bench/kernel_variants.py --only w4a16pairs``,
    BENCHMARKS.md): for wide layers (N ≥ 12288) up to 16 rows, 64 × 128 on two stages, K split in three (the
    tile's last program adds the parts), the input prepared once per call (3072→18432, M = 1: 16.6 µs against 19.5
    for 64 × 256 without a split); for more rows 64 × 256 on three stages, input prepared (M = 32: 20.5 µs against
    30.4 on four stages); else 128 × 128 on two warpgroups reading the input per step (M = 1 at 3072→9216: 11.4 µs;
    3072→3072: 6.8). The 16-bit-word kernel (``bench/packed_gemm_probe.py --w4a16``): 64 × 256 for N ≥ 12288 up to
    16 rows, 128 × 128 for N ≥ 6144 or more than 16 rows, else 64 × 128; four stages."""
    if words == 32:
        if m > 16:
            return {"BLOCK_N": 64, "BLOCK_K": 256, "STAGES": 3, "num_warps": 4, "X_DESC": True}
        if n >= 12288:
            return {"BLOCK_N": 64, "BLOCK_K": 128, "STAGES": 2, "num_warps": 4, "X_DESC": True, "SPLIT": 3}
        return {"BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 4, "num_warps": 8, "X_DESC": False}
    bn, bk = (64, 256) if n >= 12288 and m <= 16 else ((128, 128) if n >= 6144 or m > 16 else (64, 128))
    return {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": 4, "num_warps": 4}


def w4a16_packed(x2: torch.Tensor, qweight: torch.Tensor, mult_t: torch.Tensor, wscale: torch.Tensor,
                 inv_smooth: torch.Tensor | None, in_features: int, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32, config: dict | None = None, scratch=None) -> torch.Tensor:
    """[M, N] = (x2 · inv_smooth) · (codes · mult · wscale)ᵀ + bias, from the packed codes ``qweight`` [N, Kp/2]
    and ``mult_t`` = ``gemm_w4a4_packed.transposed_multipliers(wmult)``, in ``out_dtype``. ``config["WORDS"]``: 32
    (default: the pair kernel on 32-bit words of eight codes) or 16 (the earlier kernel on 16-bit words of four,
    kept for A/B runs; split over K it returns fp32 partial sums added atomically). ``scratch(name, numel, dtype,
    zeroed=False)``, where given, supplies the prepared input and the split-K sums and tickets (the dispatcher's
    arena, so that calls can be replayed)."""
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
    words = (config or {}).get("WORDS", 32)
    cfg = {**default_tile(m, n, words), **(config or {})}
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    bt = 16 if m <= 16 else (32 if m <= 32 else 64)
    blocks_n, blocks_t = triton.cdiv(n, bn), triton.cdiv(m, bt)
    steps = triton.cdiv(kp, bk)
    programs = 2 * (sm_count(x2.device) if x2.is_cuda else 2)
    split = cfg.get("SPLIT") or max(1, min(steps, programs // (blocks_n * blocks_t)))
    per_split = triton.cdiv(steps, split) * bk
    split = triton.cdiv(kp, per_split)
    if words == 16:
        out = (zeros((m, n), torch.float32, x2.device) if split > 1
               else torch.empty(m, n, dtype=out_dtype, device=x2.device))
    else:  # the pair kernel finishes a split itself (``_w4a16_pairs_kernel``)
        out = torch.empty(m, n, dtype=out_dtype, device=x2.device)
    if m == 0:
        return out
    inv = inv_smooth if inv_smooth is not None else wscale
    extra = {}
    if words == 32:
        kernel, (p_desc, mt_desc) = _w4a16_pairs_kernel, weight_descriptors(qweight, mult_t, bn, bk, 8)
        x_desc = p_desc  # a placeholder where the kernel reads x itself
        if cfg.get("X_DESC"):
            # whole row tiles by default, so the bulk copy never reads past the tensor's rows (rows past M hold
            # whatever the buffer held: they only reach output rows that are masked off); "m": M rows, the rest
            # zero-filled by TMA (kept for A/B runs)
            rows = m if cfg.get("X_ROWS") == "m" else blocks_t * bt
            xs = (torch.empty(rows * kp, dtype=torch.bfloat16, device=x2.device) if scratch is None
                  else scratch("w4a16_x", rows * kp, torch.bfloat16)).view(rows, kp)
            launch(_smooth_permute_kernel, (triton.cdiv(kp, 1024), m), (x2, inv, xs, k, kp, x2.stride(0), xs.stride(0)),
                   HAS_SMOOTH=inv_smooth is not None, BLOCK=1024, num_warps=4, pdl=True)
            x_desc = TensorDescriptor(xs, [rows, kp], [xs.stride(0), 1], [bt, bk])
        extra = {"X_DESC": bool(cfg.get("X_DESC")), "pdl": True}
        sums = tickets = out  # placeholders without a split
        if split > 1:  # tickets: zero now, zero again after the call (from the arena, made zero once)
            tiles = blocks_n * blocks_t
            if scratch is None:
                sums = torch.empty(split * m * n, dtype=torch.float32, device=x2.device)
                tickets = zeros((tiles,), torch.int32, x2.device)
            else:
                sums = scratch("w4a16_sums", split * m * n, torch.float32)
                # one 256 KB allocation (up to 65,536 tiles) made zero at the first split call, normally an eager
                # warm-up: a growth later, possibly under CUDA-graph capture, would need a fill outside the graph
                tickets = scratch("w4a16_tickets", max(tiles, 1 << 16), torch.int32, zeroed=True)[:tiles]
        head, after = (x2, inv, p_desc, mt_desc, x_desc), (out, sums, tickets)
    elif words == 16:
        kernel, (p_desc, mt_desc) = _w4a16_packed_kernel, weight_descriptors(qweight, mult_t, bn, bk)
        head, after = (x2, inv, p_desc, mt_desc), (out,)
    else:
        raise ValueError(f"WORDS is 16 or 32, not {words}")
    launch(kernel, (blocks_n, split, blocks_t), head + (wscale, bias if bias is not None else wscale) + after + (
        m, n, k, kp, per_split, x2.stride(0), out.stride(0)),
        HAS_SMOOTH=inv_smooth is not None, HAS_BIAS=bias is not None, SPLIT=split, BLOCK_N=bn, BLOCK_T=bt,
        BLOCK_K=bk, STAGES=cfg["STAGES"], USE_PTX=int(not interpreting()), DOT_FP32=interpreting(),
        num_warps=cfg["num_warps"], **extra)
    return out
