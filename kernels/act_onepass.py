"""Activation kernel in one launch that reads x from DRAM once: each row block's codes written while its input is in L2.

Reference: ``quant.formats.quantize_int4_activation`` (codes) and ``kernels.reference.lowrank_down``; the two-pass
kernels (``act_quant``) give the same codes and scales bit for bit.

Why: the per-token scale needs the row's maximum over all of K before any code can be written, so the two-pass
kernels read x twice (pass 1: maxima and ``x · L1``; pass 2: codes), 29-33 µs at 4608 × 3072 against a 14.4 µs floor
for one read and one write (BENCHMARKS.md), and at K = 12288 / 15360 the second read comes from DRAM: pass 1 has read
all of x (113 / 141 MB, past the 50 MB L2) before pass 2 starts.

Here one launch interleaves the two kinds of task. A row block's G = ⌈K / BLOCK_K⌉ *stats* tasks each publish one
slice's row maxima and ``x · L1`` partial and count themselves in at the row block's counter; its G *quantize* tasks
come LAG row blocks later in the launch order, wait at the counter for the G stats (usually already there), then read
the row block's maxima, and their slice of x again (from L2: LAG row blocks of input, a few MB, were read since), and
write its codes; the first few also sum the branch partials of some rows (a fixed order: deterministic).

Order, not luck: each program draws a ticket (an atomic counter) and takes the task of that number, so a quantize
task only ever waits for stats tasks that hold earlier tickets, that is, programs already running, which never wait.
There is no assumption about how many programs fit on the GPU (a first version that kept each slice in registers
while a row block's programs met needed them all resident, and measured slower: BENCHMARKS.md, session 21). Counters
are left at zero (the last quantize task out resets its row block's, the last ticket the ticket counter), so a buffer
made zero once serves every call, CUDA-graph replays included. The interpreter runs programs in ticket order, where a
quantize task never has to wait.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import _branch_partial, _load_smoothed, _quantize_store, _row_offsets
from .autotune_cache import fp32_dots, interpreting, sm_count
from .launch import launch, pdl_end, pdl_start
from .settings import getenv


@triton.jit
def _task_of(ticket, G, NRB, LAG):
    """(quantize?, row block, slice) of a ticket. The launch order, in blocks of G tasks: stats of row blocks 0 …
    LAG - 1, then pairs (stats of row block LAG + i, quantize of row block i), then the last LAG row blocks'
    quantize tasks."""
    j = ticket // G
    k = j - LAG
    npair = NRB - LAG
    in_pairs = (k >= 0) & (k < 2 * npair)
    odd = (k % 2) == 1
    quant = (in_pairs & odd) | (k >= 2 * npair)
    rb = tl.where(k < 0, j, tl.where(in_pairs, tl.where(odd, k // 2, LAG + k // 2), k - npair))
    return quant, rb, ticket % G


@triton.jit
def _act_interleaved_kernel(
    x_ptr, inv_ptr, down_ptr, out_ptr, scale_ptr, gmax_ptr, part_ptr, lora_ptr, sync_ptr,
    M, K, KP, R, G, NRB, LAG, NPROG, SEG,
    stride_xb, stride_xm, stride_dk, stride_om, stride_lm,
    shift,
    QMAX: tl.constexpr, UMAX: tl.constexpr, QMIN: tl.constexpr,
    UNSIGNED: tl.constexpr, HAS_SMOOTH: tl.constexpr, INT8_MODE: tl.constexpr, USE_RINT: tl.constexpr,
    HAS_LORA: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, G_POW2: tl.constexpr, SUM_ROWS: tl.constexpr,
    SEGMENTED: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """One task on one [BLOCK_M, GROUPS*64] slice: stats (row maxima and ``x · L1`` partial, then count in at the
    row block's counter) or quantize (wait for the row block's G stats, per-token scale from their maxima, this
    slice's codes; tasks ``s < BLOCK_M / SUM_ROWS`` also sum SUM_ROWS rows' branch partials and write their scales)."""
    BLOCK_K: tl.constexpr = GROUP * GROUPS
    pdl_start(PDL)
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == NPROG - 1:  # every ticket is drawn: back to zero for the next launch
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
    quant, pid_m, pid_s = _task_of(ticket, G, NRB, LAG)
    count_ptr = sync_ptr + 1 + pid_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    k = pid_s * BLOCK_K + tl.arange(0, BLOCK_K)
    roff = _row_offsets(rows, SEG, stride_xb, stride_xm, SEGMENTED)
    rcols = tl.arange(0, BLOCK_R)
    if quant:
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        while arrived < G:
            arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
        # the stats tasks' results, past this SM's L1 (written by other SMs)
        ga = tl.arange(0, G_POW2)
        maxima = tl.load(gmax_ptr + rows[:, None] * G + ga[None, :], mask=rmask[:, None] & (ga[None, :] < G),
                         other=0.0, cache_modifier=".cg")
        row_max = tl.max(maxima, axis=1)
        scale = tl.where(row_max > 0, tl.math.div_rn(row_max, tl.full([BLOCK_M], QMAX * UMAX, tl.float32)), 1.0)
        if pid_s < BLOCK_M // SUM_ROWS:
            srows = pid_m * BLOCK_M + pid_s * SUM_ROWS + tl.arange(0, SUM_ROWS)
            smask = srows < M
            smax = tl.max(tl.load(gmax_ptr + srows[:, None] * G + ga[None, :], mask=smask[:, None] & (ga[None, :] < G),
                                  other=0.0, cache_modifier=".cg"), axis=1)
            tl.store(scale_ptr + srows,
                     tl.where(smax > 0, tl.math.div_rn(smax, tl.full([SUM_ROWS], QMAX * UMAX, tl.float32)), 1.0),
                     mask=smask)
            if HAS_LORA:
                m3 = (ga[:, None, None] < G) & smask[None, :, None] & (rcols[None, None, :] < R)
                parts = tl.load(part_ptr + (ga[:, None, None] * M + srows[None, :, None]) * R + rcols[None, None, :],
                                mask=m3, other=0.0, cache_modifier=".cg")
                tl.store(lora_ptr + srows[:, None] * stride_lm + rcols[None, :], tl.sum(parts, axis=0),
                         mask=smask[:, None] & (rcols[None, :] < R))
        _, xf = _load_smoothed(x_ptr, inv_ptr, roff, rmask, k, K, shift, UNSIGNED, HAS_SMOOTH, BLOCK_K)
        _quantize_store(xf, scale, out_ptr, rows, rmask, k, KP, stride_om, QMAX, UMAX, QMIN, INT8_MODE, USE_RINT,
                        BLOCK_M, GROUP, GROUPS)
        # leave: the last of the row block's G quantize tasks (count 2G - 1 before its add) sets it back to zero
        if tl.atomic_add(count_ptr, 1, sem="relaxed", scope="gpu") == 2 * G - 1:
            tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    else:
        x, xf = _load_smoothed(x_ptr, inv_ptr, roff, rmask, k, K, shift, UNSIGNED, HAS_SMOOTH, BLOCK_K)
        tl.store(gmax_ptr + rows * G + pid_s, tl.max(tl.abs(xf), axis=1), mask=rmask)
        if HAS_LORA:
            part = _branch_partial(x, tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32), down_ptr, k, (k < K)[:, None],
                                   R, rcols, stride_dk, DOT_FP32)
            tl.store(part_ptr + (pid_s * M + rows[:, None]) * R + rcols[None, :], part,
                     mask=rmask[:, None] & (rcols[None, :] < R))
        tl.debug_barrier()  # every thread's results before the count (released at GPU scope)
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
    pdl_end(PDL)


def slices(k_padded: int, groups: int) -> int:
    """G: the programs that share a row block (one per ``groups`` 64-groups of K)."""
    return triton.cdiv(k_padded, 64 * groups)


def sum_rows(block_m: int, g: int) -> int:
    """Rows of the branch partials one program sums: the fewest that leave no more summing programs than G."""
    rows = 1
    while block_m // rows > g:
        rows *= 2
    return min(rows, block_m)


def onepass_choice() -> str:
    """``SVDQ_ACT_ONEPASS``: ``0`` never, ``1`` wherever it can run, ``auto`` (default) where measured faster."""
    choice = getenv("SVDQ_ACT_ONEPASS", "auto")
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"SVDQ_ACT_ONEPASS takes 0, 1 or auto, not {choice!r}")
    return choice


def default_tile(k_padded: int, rank: int) -> tuple[int, int, int]:
    """(rows, 64-groups, warps) of a task's slice."""
    if interpreting():
        return 16, 2, 4
    return 32, 4, 4


def default_lag(nrb: int, g: int, device: torch.device) -> int:
    """Row blocks between a row block's stats and its quantize tasks: about as many as the GPU's running programs
    cover (~4 an SM), so a quantize task rarely waits, and no more (their input must still be in L2)."""
    if interpreting() or device.type != "cuda":
        return min(nrb, 1)
    return max(1, min(nrb, triton.cdiv(4 * sm_count(device), g)))


def quantize_activation_onepass(
    x2: torch.Tensor, seg: int, nb: int, k_padded: int, inv: torch.Tensor | None, proj_down: torch.Tensor | None,
    shift: float, unsigned: bool, qmax: int, umax: int, qmin: int, int8_mode: bool, out: torch.Tensor,
    f32: torch.Tensor, sync: torch.Tensor | None, block_m: int | None = None, groups: int | None = None,
    num_warps: int | None = None, lag: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``_act_interleaved_kernel`` over ``x2`` ([M, K], or [B, L, K] batches of rows as ``act_quant.batched_rows``
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
    nprog = 2 * m_blocks * g
    lag = min(m_blocks, lag or default_lag(m_blocks, g, x2.device))
    scale = f32[:m]
    gmax = f32[m : m + m * g]
    lora = f32[m + m * g : m + m * g + m * r].view(m, r) if r else None
    parts = f32[m + m * g + m * r : m + m * g + m * r + g * m * r] if r else gmax
    if sync is None:
        sync = torch.zeros(sync_ints(m, bm), dtype=torch.int32, device=x2.device)
    block_r = max(16, triton.next_power_of_2(r)) if r else 16
    launch(_act_interleaved_kernel, (nprog,), (
        x2, inv if inv is not None else x2, proj_down if r else x2, out, scale, gmax, parts, lora if r else gmax, sync,
        m, k, k_padded, r, g, m_blocks, lag, nprog, seg,
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
    """Why the one-launch kernel cannot run here, or None where it can (a CUDA GPU, or the interpreter)."""
    if interpreting() or x2.is_cuda:
        return None
    return f"it runs on CUDA GPUs (or Triton's interpreter), not {x2.device}"
