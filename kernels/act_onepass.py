"""Activation kernel in one launch and one read of x: a row block's K slices quantized by programs that meet.

Reference: ``quant.formats.quantize_int4_activation`` (codes) and ``kernels.reference.lowrank_down``; the two-pass
kernels (``act_quant``) give the same codes and scales bit for bit.

Why: the per-token scale needs the row's maximum over all of K before any code can be written, so the two-pass
kernels read x twice (pass 1: maxima and ``x · L1``; pass 2: codes), 29 µs at 4608 × 3072 against a 14.4 µs floor for
one read and one write (BENCHMARKS.md). Here a row block's G = ⌈K / BLOCK_K⌉ slices are G programs that each hold
their slice in registers, publish their row maxima and branch partial, wait at the row block's counter until all G
have, and then write their codes from the registers: x crosses the memory bus once.

Waiting programs must not keep their siblings off the GPU. Each program draws a ticket (an atomic counter) and takes
row block ``ticket // G``: a program only waits for siblings with tickets, which are already running or will be as
soon as any running program exits, and every row block below the newest is complete. So the launch makes progress
whenever the GPU can hold G programs at once (``fits``); the programs let the next kernel launch (PDL) only at their
end, so it cannot take the slots the last row block still needs. Counters are left at zero (the last program out
resets them), so a buffer made zero once serves every call, CUDA-graph replays included. The interpreter runs programs
one after another, so there G must be 1 (one slice as wide as K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import _branch_partial, _load_smoothed, _quantize_store, _row_offsets
from .autotune_cache import fp32_dots, interpreting, sm_count
from .launch import gdc_launch_dependents, gdc_wait, launch
from .settings import getenv


@triton.jit
def _wait_for_siblings(count_ptr, G):
    """Arrive at the row block's counter and wait until its G programs have. The barrier before makes every
    thread's stores part of what the arrival releases at GPU scope (one thread performs a scalar atomic)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < G:
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    # leave: the last of the G to leave (count 2G - 1 before its add) sets the counter back to zero; every other has
    # left its wait loop by then
    if tl.atomic_add(count_ptr, 1, sem="relaxed", scope="gpu") == 2 * G - 1:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _act_onepass_kernel(
    x_ptr, inv_ptr, down_ptr, out_ptr, scale_ptr, gmax_ptr, part_ptr, lora_ptr, sync_ptr,
    M, K, KP, R, G, NPROG, SEG,
    stride_xb, stride_xm, stride_dk, stride_om, stride_lm,
    shift,
    QMAX: tl.constexpr, UMAX: tl.constexpr, QMIN: tl.constexpr,
    UNSIGNED: tl.constexpr, HAS_SMOOTH: tl.constexpr, INT8_MODE: tl.constexpr, USE_RINT: tl.constexpr,
    HAS_LORA: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, G_POW2: tl.constexpr, SUM_ROWS: tl.constexpr,
    SEGMENTED: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """One [BLOCK_M, GROUPS*64] slice: row maxima and ``x · L1`` partial published, the row block's G programs met,
    then the per-token scale from their G maxima and this slice's codes. Programs ``s < BLOCK_M / SUM_ROWS`` also sum
    SUM_ROWS rows of the G branch partials (a fixed order: deterministic) and write those rows' scales."""
    BLOCK_K: tl.constexpr = GROUP * GROUPS
    if PDL > 0:
        gdc_wait()  # never launch dependents here: they could take the slots a waiting row block needs
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == NPROG - 1:  # every ticket is drawn: back to zero for the next launch
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
    pid_m = ticket // G
    pid_s = ticket % G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    k = pid_s * BLOCK_K + tl.arange(0, BLOCK_K)
    roff = _row_offsets(rows, SEG, stride_xb, stride_xm, SEGMENTED)
    x, xf = _load_smoothed(x_ptr, inv_ptr, roff, rmask, k, K, shift, UNSIGNED, HAS_SMOOTH, BLOCK_K)
    tl.store(gmax_ptr + rows * G + pid_s, tl.max(tl.abs(xf), axis=1), mask=rmask)
    rcols = tl.arange(0, BLOCK_R)
    if HAS_LORA:
        part = _branch_partial(x, tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32), down_ptr, k, (k < K)[:, None], R,
                               rcols, stride_dk, DOT_FP32)
        tl.store(part_ptr + (pid_s * M + rows[:, None]) * R + rcols[None, :], part,
                 mask=rmask[:, None] & (rcols[None, :] < R))
    _wait_for_siblings(sync_ptr + 1 + pid_m, G)
    # the siblings' results, past this SM's L1 (which never held them: written by other SMs)
    ga = tl.arange(0, G_POW2)
    maxima = tl.load(gmax_ptr + rows[:, None] * G + ga[None, :], mask=rmask[:, None] & (ga[None, :] < G), other=0.0,
                     cache_modifier=".cg")
    row_max = tl.max(maxima, axis=1)
    scale = tl.where(row_max > 0, tl.math.div_rn(row_max, tl.full([BLOCK_M], QMAX * UMAX, tl.float32)), 1.0)
    if pid_s < BLOCK_M // SUM_ROWS:
        srows = pid_m * BLOCK_M + pid_s * SUM_ROWS + tl.arange(0, SUM_ROWS)
        smask = srows < M
        smax = tl.load(gmax_ptr + srows[:, None] * G + ga[None, :], mask=smask[:, None] & (ga[None, :] < G),
                       other=0.0, cache_modifier=".cg")
        srow_max = tl.max(smax, axis=1)
        sscale = tl.where(srow_max > 0, tl.math.div_rn(srow_max, tl.full([SUM_ROWS], QMAX * UMAX, tl.float32)), 1.0)
        tl.store(scale_ptr + srows, sscale, mask=smask)
        if HAS_LORA:
            m3 = (ga[:, None, None] < G) & smask[None, :, None] & (rcols[None, None, :] < R)
            parts = tl.load(part_ptr + (ga[:, None, None] * M + srows[None, :, None]) * R + rcols[None, None, :],
                            mask=m3, other=0.0, cache_modifier=".cg")
            tl.store(lora_ptr + srows[:, None] * stride_lm + rcols[None, :], tl.sum(parts, axis=0),
                     mask=smask[:, None] & (rcols[None, :] < R))
    _quantize_store(xf, scale, out_ptr, rows, rmask, k, KP, stride_om, QMAX, UMAX, QMIN, INT8_MODE, USE_RINT,
                    BLOCK_M, GROUP, GROUPS)
    if PDL == 1 or PDL == 2:  # at the end only: see the module docstring
        gdc_launch_dependents()


def slices(k_padded: int, groups: int) -> int:
    """G: the programs that share a row block (one per ``groups`` 64-groups of K)."""
    return triton.cdiv(k_padded, 64 * groups)


def sum_rows(block_m: int, g: int) -> int:
    """Rows of the branch partials one program sums: the fewest that leave no more summing programs than G."""
    rows = 1
    while block_m // rows > g:
        rows *= 2
    return min(rows, block_m)


def fits(device: torch.device, g: int) -> bool:
    """Whether G programs of a row block surely run at once: one per SM is always possible (the programs are small),
    so G must not exceed the SM count."""
    return g <= sm_count(device)


def onepass_choice() -> str:
    """``SVDQ_ACT_ONEPASS``: ``0`` never, ``1`` wherever it can run, ``auto`` (default) where measured faster."""
    choice = getenv("SVDQ_ACT_ONEPASS", "auto")
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"SVDQ_ACT_ONEPASS takes 0, 1 or auto, not {choice!r}")
    return choice


def default_tile(k_padded: int, rank: int) -> tuple[int, int, int]:
    """(rows, 64-groups, warps) of a program's slice. Interpreter: one slice as wide as K (G = 1)."""
    if interpreting():
        return 16, triton.next_power_of_2(triton.cdiv(k_padded, 64)), 4
    return 64, 4, 8


def quantize_activation_onepass(
    x2: torch.Tensor, seg: int, nb: int, k_padded: int, inv: torch.Tensor | None, proj_down: torch.Tensor | None,
    shift: float, unsigned: bool, qmax: int, umax: int, qmin: int, int8_mode: bool, out: torch.Tensor,
    f32: torch.Tensor, sync: torch.Tensor | None, block_m: int | None = None, groups: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``_act_onepass_kernel`` over ``x2`` ([M, K], or [B, L, K] batches of rows as ``act_quant.batched_rows``
    describes them). ``out``: the int8 operand [M, k_padded]; ``f32``: fp32 scratch of at least ``scratch_floats``;
    ``sync``: int32 zeros of at least ``sync_ints`` (left zero), or None for fresh ones. Returns (scale, lora)."""
    m, k = seg * nb, x2.shape[-1]
    segmented = nb > 1
    stride_xb, stride_xm = (x2.stride(0), x2.stride(1)) if segmented else (0, x2.stride(0))
    r = 0 if proj_down is None else proj_down.shape[1]
    bm0, groups0, warps0 = default_tile(k_padded, r)
    bm, groups, warps = block_m or bm0, groups or groups0, num_warps or warps0
    g = slices(k_padded, groups)
    m_blocks = triton.cdiv(m, bm)
    nprog = m_blocks * g
    scale = f32[:m]
    gmax = f32[m : m + m * g]
    lora = f32[m + m * g : m + m * g + m * r].view(m, r) if r else None
    parts = f32[m + m * g + m * r : m + m * g + m * r + g * m * r] if r else gmax
    if sync is None:
        sync = torch.zeros(sync_ints(m, bm), dtype=torch.int32, device=x2.device)
    block_r = max(16, triton.next_power_of_2(r)) if r else 16
    launch(_act_onepass_kernel, (nprog,), (
        x2, inv if inv is not None else x2, proj_down if r else x2, out, scale, gmax, parts, lora if r else gmax, sync,
        m, k, k_padded, r, g, nprog, seg,
        stride_xb, stride_xm, proj_down.stride(0) if r else 0, out.stride(0), lora.stride(0) if r else 0,
        float(shift)),
        QMAX=qmax, UMAX=umax, QMIN=qmin, UNSIGNED=bool(unsigned), HAS_SMOOTH=inv is not None,
        INT8_MODE=int8_mode, USE_RINT=not interpreting(), HAS_LORA=r > 0, DOT_FP32=fp32_dots(x2), BLOCK_R=block_r,
        BLOCK_M=bm, GROUP=64, GROUPS=groups, G_POW2=max(2, triton.next_power_of_2(g)), SUM_ROWS=sum_rows(bm, g),
        SEGMENTED=segmented, num_warps=warps, pdl=True,
    )
    return scale, lora


def scratch_floats(m: int, k_padded: int, rank: int, groups: int) -> int:
    """fp32 scratch of one call: scales, every slice's row maxima, the branch result and its partials."""
    g = slices(k_padded, groups)
    return m + m * g + (m * rank + g * m * rank if rank else 0)


def sync_ints(m: int, block_m: int) -> int:
    """int32 counters of one call: the ticket and one per row block."""
    return 1 + triton.cdiv(m, block_m)


def faster_here(x2: torch.Tensor, k_padded: int, rank: int) -> bool:
    """``auto``'s rule: not yet measured on a GPU, so never (``SVDQ_ACT_ONEPASS=1`` turns it on)."""
    return False


def why_not(x2: torch.Tensor, k_padded: int, groups: int) -> str | None:
    """Why the one-pass kernel cannot run here, or None where it can: a CUDA GPU that holds a row block's programs at
    once, or the interpreter with one slice a row block."""
    g = slices(k_padded, groups)
    if interpreting():
        return None if g == 1 else (f"the interpreter runs programs one at a time, so it needs one slice a row block "
                                    f"(K = {k_padded} makes {g} of {64 * groups})")
    if not x2.is_cuda:
        return f"it runs on CUDA GPUs, not {x2.device}"
    if not fits(x2.device, g):
        return (f"a row block's {g} slices of {64 * groups} (K = {k_padded}) may not all fit on this GPU's "
                f"{sm_count(x2.device)} SMs at once")
    return None
