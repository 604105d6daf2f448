"""Activation kernel: smooth + per-token INT4 group quantization + low-rank down-projection, from one input.

Reference: ``quant.formats.quantize_int4_activation`` (codes) and ``kernels.reference.lowrank_down``.

Two launches over a (token block × K tile) grid, so every SM has work whatever M is. Pass 1 writes, per program
(one or a few K tiles), each row's absmax and an ``x · L1`` partial product (tensor cores). Pass 2 derives the
per-token scale from those few maxima (re-deriving the group maxima from its own tile), writes the int8 operand
``code * multiplier`` and sums the low-rank partials in a fixed order (deterministic, no atomics), visiting
tiles in reverse so that it starts on the input pass 1 left in L2. The two passes have their own tiles (they
exchange only per-row results). On sm_90+ pass 1 is a TMA stream where it has two or more K tiles a program to
pipeline (``_act_stats_stream_kernel``, ``stream_pass1``): the same results as the unrolled kernel, both passes up
to 10% faster at the FLUX shapes with M ≥ 4096, 1.1-1.5× with a LoRA-widened branch (which it runs as 32-wide MMAs:
``STREAM_MAX_RANK``). Input rows may come in batches at their own stride (``batched_rows``: a token slice at batch
> 1 is read in place). The kernels multiply by 1/λ in fp32, made once per layer by ``torch.reciprocal`` as in the
reference (not divided per tile); per-group reciprocals are IEEE (``div_rn``) and rounding is round-half-even, so
codes equal the reference's bit for bit.

Why two launches that each read x, not one: three one-launch forms (a row block's slices held in registers while its
programs meet at a counter; stats and quantize tasks interleaved so the second read comes from L2; these two passes'
own programs as tasks of one launch) gave the same codes and measured 0.3-0.98x these kernels on the H100 (one kernel
holds both kinds of program's registers, so the quantize work runs at a fraction of pass 2's occupancy; BENCHMARKS.md,
session 21).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import HAS_HOST_DESCRIPTORS, TensorDescriptor, launch, pdl_end, pdl_start
from .autotune_cache import capability_major, fp32_dots, interpreting, sm_count
from .settings import getenv

MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _round_half_even(q, USE_RINT: tl.constexpr):
    # On the GPU a separate rint: the magic-number add would be contracted into an FMA with the preceding
    # multiply (one rounding instead of two) and codes would differ from the reference at ties.
    if USE_RINT:
        return libdevice.rint(q)
    else:
        return (q + MAGIC) - MAGIC


@triton.jit
def _smoothed(x, inv_ptr, rmask, k, K, shift, UNSIGNED: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """x (shifted) times 1/λ in fp32, zero outside the input (and below zero for unsigned codes)."""
    kmask = k < K
    xf = x.to(tl.float32) + shift
    if HAS_SMOOTH:  # 1/λ in fp32, made once per layer by torch.reciprocal as in the reference (no division here)
        inv = tl.load(inv_ptr + k, mask=kmask, other=1.0)
        xf = xf * inv[None, :]
    xf = tl.where(rmask[:, None] & kmask[None, :], xf, 0.0)
    if UNSIGNED:
        xf = tl.maximum(xf, 0.0)
    return xf


@triton.jit
def _row_offsets(rows, SEG, stride_xb, stride_xm, SEGMENTED: tl.constexpr):
    """Where each row starts in the input: ``rows * stride_xm``, or for batched rows (``SEGMENTED``: batches of SEG
    rows, each batch ``stride_xb`` apart) ``(row // SEG) * stride_xb + (row % SEG) * stride_xm``."""
    if SEGMENTED:
        return (rows // SEG) * stride_xb + (rows % SEG) * stride_xm
    return rows * stride_xm


@triton.jit
def _load_smoothed(x_ptr, inv_ptr, roff, rmask, k, K, shift, UNSIGNED: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """A [rows, BLOCK_K] input tile (``roff``: each row's start, ``_row_offsets``) and its smoothed fp32 values."""
    x = tl.load(x_ptr + roff[:, None] + k[None, :], mask=rmask[:, None] & (k < K)[None, :], other=0.0)
    return x, _smoothed(x, inv_ptr, rmask, k, K, shift, UNSIGNED, HAS_SMOOTH)


@triton.jit
def _branch_partial(x, part, down_ptr, k, k_in, R, rcols, stride_dk, DOT_FP32: tl.constexpr):
    """``part + x · L1[k]`` for one K tile (tensor cores; fp32 dots where the data or the interpreter need them);
    ``k_in`` [BLOCK_K, 1]: which of the tile's K rows exist."""
    d = tl.load(down_ptr + k[:, None] * stride_dk + rcols[None, :], mask=k_in & (rcols[None, :] < R), other=0.0)
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), d.to(tl.float32), part, input_precision="ieee")
    return tl.dot(x, d.to(x.dtype), part)


@triton.jit
def _store_pass1(gmax_ptr, lora_ptr, rows, rmask, rcols, pid_p, rmax, part, M, R, stride_gm, HAS_LORA: tl.constexpr):
    """A pass-1 program's results: its row maxima into [M, n_parts] and its branch partial into [n_parts, M, R] (only
    the real rank travels through memory, not its power-of-two pad)."""
    tl.store(gmax_ptr + rows * stride_gm + pid_p, rmax, mask=rmask)
    if HAS_LORA:
        base = lora_ptr + pid_p * M * R
        tl.store(base + rows[:, None] * R + rcols[None, :], part, mask=rmask[:, None] & (rcols[None, :] < R))


@triton.jit
def _store_chunk(base, c0, part, rmask, c32, R):
    """Ranks c0 … c0 + 31 of a program's branch partial (``base``: its rows' starts in the [n_parts, M, R] buffer)."""
    tl.store(base + c0 + c32[None, :], part, mask=rmask[:, None] & (c32[None, :] < R - c0))


@triton.jit
def _act_stats_kernel(
    x_ptr, inv_ptr, down_ptr, gmax_ptr, lora_ptr,
    M, K, R, NSUB, SEG,
    stride_xb, stride_xm, stride_dk, stride_gm,
    shift,
    UNSIGNED: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, KSUB: tl.constexpr,
    EW_MAX: tl.constexpr, SEGMENTED: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Pass 1, KSUB [BLOCK_M, GROUPS*64] tiles per program: each row's absmax over those tiles, and their x·L1
    partial product (one of each per program: KSUB times fewer partials to write and sum at large K)."""
    BLOCK_K: tl.constexpr = GROUP * GROUPS
    pdl_start(PDL)
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    roff = _row_offsets(rows, SEG, stride_xb, stride_xm, SEGMENTED)
    rcols = tl.arange(0, BLOCK_R)
    part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if EW_MAX:
        amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # elementwise over the tiles: one row reduction at the end
    else:
        rmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in tl.static_range(KSUB):
        sub = pid_p * KSUB + s
        if sub < NSUB:
            k = sub * BLOCK_K + tl.arange(0, BLOCK_K)
            x, xf = _load_smoothed(x_ptr, inv_ptr, roff, rmask, k, K, shift, UNSIGNED, HAS_SMOOTH, BLOCK_K)
            if EW_MAX:
                amax = tl.maximum(amax, tl.abs(xf))
            else:
                rmax = tl.maximum(rmax, tl.max(tl.abs(xf), axis=1))
            if HAS_LORA:
                part = _branch_partial(x, part, down_ptr, k, k[:, None] < K, R, rcols, stride_dk, DOT_FP32)
    if EW_MAX:
        rmax = tl.max(amax, axis=1)
    _store_pass1(gmax_ptr, lora_ptr, rows, rmask, rcols, pid_p, rmax, part, M, R, stride_gm, HAS_LORA)
    pdl_end(PDL)


@triton.jit
def _act_stats_stream_kernel(
    x_desc, inv_ptr, down_ptr, gmax_ptr, lora_ptr,
    M, K, R, NSUB, TILES, SEG, SEG_PITCH,
    stride_dk, stride_gm,
    shift,
    UNSIGNED: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, STAGES: tl.constexpr,
    SEGMENTED: tl.constexpr = False, CHUNKS: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """Pass 1 as a TMA stream: ``_act_stats_kernel``'s results (each program's row maxima and x·L1 partial over
    TILES consecutive K tiles, in the same order), but the tiles come by TMA through a ``tl.range`` loop of STAGES
    buffers, so the next tiles are in flight while this one is reduced. Why: the unrolled kernel waits on each
    tile's load in turn, and ran at 61% of DRAM bandwidth at K = 15360 (this one: 2.5 TB/s, −9% for both passes at
    9216 × 15360; BENCHMARKS.md, session 15). One warpgroup only: the same loop on pointer loads (cp.async) gave
    wrong branch partials with 8 warps on Triton 3.6 (relative error 1e-3 to 1e-1), and this one did once with 8
    warps and 128-row tiles, though the PTX puts a CTA barrier between each stage's wgmma wait and its refill (not
    diagnosed); with 4 warps every H100 run matched. So there is no pointer version and no 8-warp launch.
    ``SEGMENTED``: batches of SEG rows whose starts are SEG_PITCH rows of the descriptor apart (a 2-D descriptor over
    every row from the first batch's first to the last batch's last, those between the batches included); SEG is a
    multiple of BLOCK_M, so a tile stays in one batch (the same 2-D loads as one batch, nothing reshaped).
    ``CHUNKS``: a branch wider than 32 as that many 32-wide MMAs with their own accumulators (``STREAM_MAX_RANK``
    says why not one wide MMA)."""
    BLOCK_K: tl.constexpr = GROUP * GROUPS
    pdl_start(PDL)
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rcols = tl.arange(0, BLOCK_R)
    part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    c32 = tl.arange(0, 32)
    p0 = tl.zeros([BLOCK_M, 32], dtype=tl.float32)
    p1 = tl.zeros([BLOCK_M, 32], dtype=tl.float32)
    p2 = tl.zeros([BLOCK_M, 32], dtype=tl.float32)
    p3 = tl.zeros([BLOCK_M, 32], dtype=tl.float32)
    rmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    first = pid_p * TILES
    last = tl.minimum(first + TILES, NSUB)
    for sub in tl.range(first, last, num_stages=STAGES):
        k = sub * BLOCK_K + tl.arange(0, BLOCK_K)
        if SEGMENTED:
            x = x_desc.load([(row0 // SEG) * SEG_PITCH + row0 % SEG, sub * BLOCK_K])
        else:
            x = x_desc.load([row0, sub * BLOCK_K])  # rows and columns past the input come back as zeros
        xf = _smoothed(x, inv_ptr, rmask, k, K, shift, UNSIGNED, HAS_SMOOTH)
        rmax = tl.maximum(rmax, tl.max(tl.abs(xf), axis=1))
        if HAS_LORA:
            if CHUNKS > 0:
                kin = (k < K)[:, None]
                p0 = _branch_partial(x, p0, down_ptr, k, kin, R, c32, stride_dk, DOT_FP32)
                if CHUNKS > 1:
                    p1 = _branch_partial(x, p1, down_ptr + 32, k, kin, R - 32, c32, stride_dk, DOT_FP32)
                if CHUNKS > 2:
                    p2 = _branch_partial(x, p2, down_ptr + 64, k, kin, R - 64, c32, stride_dk, DOT_FP32)
                if CHUNKS > 3:
                    p3 = _branch_partial(x, p3, down_ptr + 96, k, kin, R - 96, c32, stride_dk, DOT_FP32)
            else:
                part = _branch_partial(x, part, down_ptr, k, (k < K)[:, None], R, rcols, stride_dk, DOT_FP32)
    if CHUNKS > 0:
        _store_pass1(gmax_ptr, lora_ptr, rows, rmask, rcols, pid_p, rmax, part, M, R, stride_gm, False)
        if HAS_LORA:
            base = lora_ptr + pid_p * M * R + rows[:, None] * R
            _store_chunk(base, 0, p0, rmask, c32, R)
            if CHUNKS > 1:
                _store_chunk(base, 32, p1, rmask, c32, R)
            if CHUNKS > 2:
                _store_chunk(base, 64, p2, rmask, c32, R)
            if CHUNKS > 3:
                _store_chunk(base, 96, p3, rmask, c32, R)
    else:
        _store_pass1(gmax_ptr, lora_ptr, rows, rmask, rcols, pid_p, rmax, part, M, R, stride_gm, HAS_LORA)
    pdl_end(PDL)


@triton.jit
def _quantize_store(xf, scale, out_ptr, rows, rmask, k, KP, stride_om, QMAX: tl.constexpr, UMAX: tl.constexpr,
                    QMIN: tl.constexpr, INT8_MODE: tl.constexpr, USE_RINT: tl.constexpr, BLOCK_M: tl.constexpr,
                    GROUP: tl.constexpr, GROUPS: tl.constexpr):
    """Codes of one smoothed tile given the per-token scale, stored as the int8 operand (code * multiplier)."""
    BLOCK_K: tl.constexpr = GROUP * GROUPS
    if INT8_MODE:
        inv_scale = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)
        q = _round_half_even(xf * inv_scale[:, None], USE_RINT)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    else:
        g = tl.reshape(xf, [BLOCK_M, GROUPS, GROUP])
        amax = tl.max(tl.abs(g), axis=2)  # [BM, GROUPS]
        v = tl.math.ceil(tl.math.div_rn(amax, (scale * QMAX)[:, None]))
        v = tl.minimum(tl.maximum(v, 1.0), UMAX * 1.0)
        inv_step = tl.math.div_rn(tl.full([BLOCK_M, GROUPS], 1.0, tl.float32), v * scale[:, None])
        q = _round_half_even(g * inv_step[:, :, None], USE_RINT)
        q = tl.minimum(tl.maximum(q, QMIN * 1.0), QMAX * 1.0)
        q = tl.reshape(q * v[:, :, None], [BLOCK_M, BLOCK_K])
    tl.store(out_ptr + rows[:, None] * stride_om + k[None, :], q.to(tl.int8), mask=rmask[:, None] & (k[None, :] < KP))


@triton.jit
def _act_quant_kernel(
    x_ptr, inv_ptr, gmax_ptr, out_ptr, scale_ptr, part_ptr, lora_ptr,
    M, K, KP, R, NPARTS, SEG,
    stride_xb, stride_xm, stride_om, stride_gm, stride_lm,
    shift,
    QMAX: tl.constexpr, UMAX: tl.constexpr, QMIN: tl.constexpr,
    UNSIGNED: tl.constexpr, HAS_SMOOTH: tl.constexpr, INT8_MODE: tl.constexpr, USE_RINT: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, NP_POW2: tl.constexpr, REVERSE: tl.constexpr,
    SEGMENTED: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Pass 2: per-token scale from pass 1's row maxima (a handful per row), then this tile's codes (int8
    operand = code * mult).

    Tiles are visited in the reverse of pass 1's order, so the first ones read the input pass 1 touched last,
    while it is still in L2."""
    BLOCK_K: tl.constexpr = GROUP * GROUPS
    pdl_start(PDL)
    if REVERSE:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_k = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    pa = tl.arange(0, NP_POW2)
    maxima = tl.load(gmax_ptr + rows[:, None] * stride_gm + pa[None, :], mask=rmask[:, None] & (pa[None, :] < NPARTS),
                     other=0.0)
    row_max = tl.max(maxima, axis=1)
    scale = tl.where(row_max > 0, tl.math.div_rn(row_max, tl.full([BLOCK_M], QMAX * UMAX, tl.float32)), 1.0)
    if pid_k == tl.num_programs(1) - 1:  # one tile per row block (the first to run, in reverse) writes per-row results
        tl.store(scale_ptr + rows, scale, mask=rmask)
        if HAS_LORA:  # sum the partials in a fixed order: deterministic, no atomics, no memset
            rcols = tl.arange(0, BLOCK_R)
            m2 = rmask[:, None] & (rcols[None, :] < R)
            tot = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for t in range(0, NPARTS):
                tot += tl.load(part_ptr + t * M * R + rows[:, None] * R + rcols[None, :], mask=m2, other=0.0)
            tl.store(lora_ptr + rows[:, None] * stride_lm + rcols[None, :], tot, mask=m2)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    roff = _row_offsets(rows, SEG, stride_xb, stride_xm, SEGMENTED)
    _, xf = _load_smoothed(x_ptr, inv_ptr, roff, rmask, k, K, shift, UNSIGNED, HAS_SMOOTH, BLOCK_K)
    _quantize_store(xf, scale, out_ptr, rows, rmask, k, KP, stride_om, QMAX, UMAX, QMIN, INT8_MODE, USE_RINT,
                    BLOCK_M, GROUP, GROUPS)
    pdl_end(PDL)


def _groups_per_tile(ng: int, k_padded: int, groups: int, which: str) -> int:
    """A tile's 64-groups: a power of two (Triton's ranges are) that divides K's groups."""
    if ng % groups or groups & (groups - 1):
        raise ValueError(f"{which} takes a power of two of 64-groups per tile dividing the {ng} of K = {k_padded}, "
                         f"not {groups}")
    return groups


def tiles_per_program(m_blocks: int, tiles: int, rank: int, device: torch.device) -> int:
    """K tiles one pass-1 program covers: 1 without a branch, else up to 4 while the grid keeps ~8 programs per
    SM (rank ≤ 32) or ~2 (a wider, LoRA-extended branch, whose partials cost more than the lost parallelism), and
    at least 2 for the wider branch. Fewer partials to write and sum (H100 tile sweep in BENCHMARKS.md: −15 to −20%
    at K = 15360; rank 96 at 512 / 1024 rows × 3072, the text tokens: 21.1 → 14.1 / 23.8 → 17.3 µs with 2 tiles
    instead of 1, session 18)."""
    if rank == 0 or interpreting() or device.type != "cuda" or tiles < 2:
        return 1
    per_sm = 8 if rank <= 32 else 2
    return max(1 if rank <= 32 else 2, min(4, m_blocks * tiles // (per_sm * sm_count(device))))


STREAM_MAX_RANK = 128
"""The widest branch the TMA stream takes, as up to four 32-wide MMAs with their own accumulators (``CHUNKS``). As
one MMA as wide as the branch (a LoRA-extended branch: BLOCK_R 128), its partials came out wrong on the H100
(Triton 3.6): 1e-3 to 1e-2 off the fp32 product, changing from run to run, with 4 or more K tiles a program. In
32-wide chunks they are within 2e-6 run after run, as the unrolled kernel is, and both passes run 1.10-1.51× faster
than with the unrolled pass 1 at rank 96 (``bench/branch_partials_probe.py``, BENCHMARKS.md session 17). Wider
branches take the unrolled kernel."""


def stream_tiles_per_program(m_blocks: int, tiles: int, rank: int, device: torch.device) -> int:
    """K tiles one TMA-stream pass-1 program covers: as many as keep ~4 programs per SM, at most 16."""
    if interpreting() or device.type != "cuda":
        return 2
    return max(1, min(16, m_blocks * tiles // (4 * sm_count(device))))


def stream_stages_for(rank: int, tiles: int) -> int:
    """Buffers of the stream's pipeline: 4 up to rank 32; for a wider (LoRA-extended) branch 2, or 3 where a program
    has more than 8 K tiles. Why: each stage holds x's tile and the tile's L1 rows, so at rank 96 four stages take
    107 KB of shared memory and leave one program per SM; with 3 (82 KB) two fit, with 2 (66 KB) three. H100, both
    passes, graph µs, rank 96 (``bench/branch_partials_probe.py --sweep``, BENCHMARKS.md session 18): 4608 × 3072
    56.8 → 42.9 (2 stages), 4608 × 15360 198.8 → 160.4 (3 stages), 4608 × 12288 161.1 → 129.9 (3)."""
    if rank <= 32:
        return 4
    return 2 if tiles <= 8 else 3


def descriptor_addressable(x2: torch.Tensor) -> bool:
    """A 16-bit input with a 16-byte aligned base, row pitch (and batch pitch, for batched rows), what a TMA
    descriptor needs, and a Triton that has host descriptors."""
    return (HAS_HOST_DESCRIPTORS and x2.dtype in (torch.bfloat16, torch.float16) and x2.stride(-1) == 1
            and x2.data_ptr() % 16 == 0 and all((s * x2.element_size()) % 16 == 0 for s in x2.stride()[:-1]))


def batched_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The activation kernels' view of their input: ``(x, rows per batch, batch count)``. A [M, K] input, or a
    [B, L, K] one that a [M, K] view can describe, is one batch of M rows; a [B, L, K] input whose batches are not
    one row pitch apart stays 3-D (B batches of L rows, each batch at its own stride) and is read in place.

    Why: at batch 2 the double blocks' attention output is split into text and image tokens by slicing the token
    axis, so each half is two row-contiguous blocks with a gap; flattening it copied 50 MB per image projection
    (~1.5 ms of a 12B model's batch-2 step, BENCHMARKS.md session 17)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x, x.shape[0], 1
    if x.dim() != 3:
        raise ValueError(f"the activation kernels take [M, K] or [B, L, K] input, not {x.dim()}-D")
    nb, seg, k = x.shape
    if nb <= 1 or seg <= 1 or x.stride(0) == seg * x.stride(1):  # one row pitch throughout: a [M, K] view
        return x.view(nb * seg, k), nb * seg, 1
    return x, seg, nb


def stream_pass1(x2: torch.Tensor, m_blocks: int, tiles: int, rank: int) -> bool:
    """Whether pass 1 takes the TMA stream: on NVIDIA sm_90+ (TMA) with host descriptors, a 16-bit input TMA can
    address (16-byte aligned base and row pitch), a branch of at most ``STREAM_MAX_RANK`` ranks, and at least two K
    tiles a program to pipeline. ``SVDQ_ACT_STREAM=0``: never; ``1``: wherever a descriptor can address the input
    and the branch allows (the interpreter included). Below two tiles a program
    (512-1024 rows at K = 3072) the unrolled kernel measured faster (7.6 against 9.0 µs at 512 rows)."""
    choice = getenv("SVDQ_ACT_STREAM", "auto")
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"SVDQ_ACT_STREAM takes 0, 1 or auto, not {choice!r}")
    if choice == "0" or rank > STREAM_MAX_RANK or not descriptor_addressable(x2):
        return False
    if choice == "1":
        return True
    if interpreting() or torch.version.hip is not None or capability_major(x2.device) < 9:  # NVIDIA sm_90+ (cached)
        return False
    return stream_tiles_per_program(m_blocks, tiles, rank, x2.device) >= 2


def quantize_activation(
    x2: torch.Tensor,
    k_padded: int,
    smooth: torch.Tensor | None,
    proj_down: torch.Tensor | None,
    shift: float = 0.0,
    unsigned: bool = False,
    mode: str = "int4",
    block_m: int | None = None,
    scratch=None,
    k_per_program: int | None = None,
    groups: int | None = None,
    num_warps: int | None = None,
    reverse: bool = True,
    inv_smooth: torch.Tensor | None = None,
    pass2_block_m: int | None = None,
    pass2_warps: int | None = None,
    pass2_groups: int | None = None,
    ew_max: bool | None = None,
    stream: bool | None = None,
    stream_stages: int | None = None,
):
    """Launch the activation kernels on x2 [M, K], or on [B, L, K] rows in batches (``batched_rows``: a token slice
    at batch > 1, read in place, M = B·L). Returns (int8 [M, Kp], scale [M], lora [M, R] fp32 | None).

    ``scratch(name, numel, dtype)``, where given, supplies reused buffers instead of fresh allocations (the
    dispatcher's per-device arena: the results live until the next call). ``inv_smooth``: the fp32
    ``torch.reciprocal`` of ``smooth``, where the caller keeps one (else it is made here, one more small launch).

    Tile knobs (``bench/kernel_variants.py`` measures them): ``block_m``, ``groups`` (64-groups per K tile, a power
    of two), ``num_warps`` and ``k_per_program`` (K tiles per program, default ``tiles_per_program``) are pass 1's;
    ``ew_max`` makes pass 1 keep the absolute maximum elementwise across its K tiles and reduce rows once;
    ``pass2_block_m`` / ``pass2_warps`` / ``pass2_groups`` are pass 2's own tile (the passes exchange only per-row
    results, so the tiles may differ); ``reverse`` is pass 2's reverse visiting order. ``stream``: pass 1 by TMA
    stream (True; an input no descriptor can address is then a ValueError), the unrolled kernel (False), or
    ``stream_pass1``'s choice (None); ``stream_stages`` its buffer count (default ``stream_stages_for``),
    ``k_per_program`` its K tiles a program (default ``stream_tiles_per_program``)."""
    x2, seg, nb = batched_rows(x2)
    m, k = seg * nb, x2.shape[-1]
    segmented = nb > 1
    stride_xb, stride_xm = (x2.stride(0), x2.stride(1)) if segmented else (0, x2.stride(0))
    r = 0 if proj_down is None else proj_down.shape[1]
    if mode == "int4":
        qmax, umax, qmin = (15, 8, 0) if unsigned else (7, 15, -7)
    elif mode == "int8":
        qmax, umax, qmin = 127, 1, -127
        unsigned = False
    else:
        raise ValueError(f"activation kernel supports int4 and int8, not {mode!r}")
    ng = k_padded // 64
    block_r = max(16, triton.next_power_of_2(r)) if r else 16
    # H100 tile sweeps (bench/kernel_variants.py, BENCHMARKS.md): pass 1 on 128-column tiles, 32 rows x 4 warps at
    # K = 3072, rank 32, else 64 rows x 8 warps (its dot and row maxima over more K tiles), the row
    # maximum kept elementwise across its K tiles for a branch wider than 32 (-11% at rank 96; slower at 32); the
    # TMA stream on the same tiles with 4 warps (1-10% faster than 8 there) and 4 stages;
    # pass 2 on 16 rows x 256 columns x 4 warps (54 registers a thread; 64 x 128 took 101; 16 x 128 within 1%, but
    # 4% slower at rank 96)
    wide = k_padded >= 8192 or r > 32
    if ew_max is None:
        ew_max = r > 32
    groups = _groups_per_tile(ng, k_padded, groups or (2 if ng % 2 == 0 else 1), "pass 1")
    bm = block_m or (64 if wide else 32)
    nsub = ng // groups
    m_blocks = triton.cdiv(m, bm)
    # a stream tile must not straddle two batches, whose starts must be whole rows apart
    tiles_in_batch = not segmented or (seg % bm == 0 and stride_xb % stride_xm == 0)
    if stream is None:  # a caller's warp count other than one warpgroup's picks the unrolled kernel
        stream = num_warps in (None, 4) and tiles_in_batch and stream_pass1(x2, m_blocks, nsub, r)
    elif stream and not (descriptor_addressable(x2) and tiles_in_batch):
        raise ValueError(f"the TMA stream cannot address this input ({x2.dtype}, strides {tuple(x2.stride())} "
                         f"elements, base at {x2.data_ptr() % 16} past 16 bytes, {seg} rows a batch for {bm}-row "
                         "tiles): pass stream=None to fall back")
    if stream and r > STREAM_MAX_RANK:
        raise ValueError(f"the TMA stream takes a branch of at most {STREAM_MAX_RANK} ranks, not {r}: wider, its branch "
                         "partials came out wrong on the H100 (BENCHMARKS.md, session 17); pass stream=None")
    if stream and num_warps not in (None, 4):
        raise ValueError(f"the TMA stream runs one warpgroup (4 warps), not {num_warps}: with two, pipelined branch "
                         "partials came out wrong on the H100 (Triton 3.6; BENCHMARKS.md, session 15)")
    if stream:
        ksub = k_per_program or stream_tiles_per_program(m_blocks, nsub, r, x2.device)
    else:
        ksub = k_per_program or tiles_per_program(m_blocks, nsub, r, x2.device)
    nparts = triton.cdiv(nsub, ksub)
    # one allocation for the fp32 outputs and scratch (scale, group maxima, low-rank result and partials)
    nf = m + m * nparts + (m * r + nparts * m * r if r else 0)
    if scratch is None:
        f32 = torch.empty(nf, dtype=torch.float32, device=x2.device)
        out = torch.empty(m, k_padded, dtype=torch.int8, device=x2.device)
    else:
        f32 = scratch("act_f32", nf, torch.float32)
        out = scratch("act_i8", m * k_padded, torch.int8).view(m, k_padded)
    scale = f32[:m]
    gmax = f32[m : m + m * nparts].view(m, nparts)  # each pass-1 program's row maxima
    lora = f32[m + m * nparts : m + m * nparts + m * r].view(m, r) if r else None
    parts = f32[m + m * nparts + m * r :].view(nparts, m, r) if r else None
    inv = inv_smooth
    if smooth is not None and inv is None:
        inv = torch.reciprocal(smooth.float())
    bm2 = pass2_block_m or 16
    warps2 = pass2_warps or 4
    groups2 = _groups_per_tile(ng, k_padded, pass2_groups or (4 if ng % 4 == 0 else groups), "pass 2")
    if stream:
        pitch = stride_xb // stride_xm if segmented else seg
        rows_spanned = (nb - 1) * pitch + seg  # the batches and the rows between them
        x_desc = TensorDescriptor(x2, [rows_spanned, k], [stride_xm, 1], [bm, 64 * groups])
        launch(_act_stats_stream_kernel, (m_blocks, nparts), (
            x_desc, inv if inv is not None else x2, proj_down if r else x2, gmax, parts if r else gmax,
            m, k, r, nsub, ksub, seg, pitch,
            proj_down.stride(0) if r else 0, gmax.stride(0),
            float(shift)),
            UNSIGNED=bool(unsigned), HAS_SMOOTH=inv is not None, HAS_LORA=r > 0, DOT_FP32=fp32_dots(x2),
            BLOCK_M=bm, BLOCK_R=block_r, GROUP=64, GROUPS=groups, STAGES=stream_stages or stream_stages_for(r, ksub),
            SEGMENTED=segmented,
            CHUNKS=triton.cdiv(r, 32) if r > 32 else 0, num_warps=4, pdl=True,
        )
    else:
        launch(_act_stats_kernel, (m_blocks, nparts), (
            x2, inv if inv is not None else x2, proj_down if r else x2, gmax, parts if r else gmax,
            m, k, r, nsub, seg,
            stride_xb, stride_xm, proj_down.stride(0) if r else 0, gmax.stride(0),
            float(shift)),
            UNSIGNED=bool(unsigned), HAS_SMOOTH=inv is not None, HAS_LORA=r > 0, DOT_FP32=fp32_dots(x2),
            BLOCK_M=bm, BLOCK_R=block_r, GROUP=64, GROUPS=groups, KSUB=ksub, EW_MAX=bool(ew_max), SEGMENTED=segmented,
            num_warps=num_warps or (8 if wide else 4), pdl=True,
        )
    launch(_act_quant_kernel, (triton.cdiv(m, bm2), ng // groups2), (
        x2, inv if inv is not None else x2, gmax, out, scale, parts if r else gmax, lora if r else gmax,
        m, k, k_padded, r, nparts, seg,
        stride_xb, stride_xm, out.stride(0), gmax.stride(0), lora.stride(0) if r else 0,
        float(shift)),
        QMAX=qmax, UMAX=umax, QMIN=qmin,
        UNSIGNED=bool(unsigned), HAS_SMOOTH=inv is not None, INT8_MODE=mode == "int8", USE_RINT=not interpreting(),
        HAS_LORA=r > 0, BLOCK_R=block_r,
        BLOCK_M=bm2, GROUP=64, GROUPS=groups2, NP_POW2=max(2, triton.next_power_of_2(nparts)), REVERSE=reverse,
        SEGMENTED=segmented, num_warps=warps2, pdl=True,
    )
    return out, scale, lora
