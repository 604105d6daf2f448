"""Activation kernel in one launch that reads x from DRAM once: each row block's codes written while its input is in L2.

Reference: ``quant.formats.quantize_int4_activation`` (codes) and ``kernels.reference.lowrank_down``; the two-pass
kernels (``act_quant``) give the same codes and scales bit for bit.

Why: the per-token scale needs the row's maximum over all of K before any code can be written, so the two-pass
kernels read x twice (pass 1: maxima and ``x · L1``; pass 2: codes), and at K = 12288 / 15360 the second read comes
from DRAM: pass 1 has read all of x (113 / 141 MB at 4608 rows, past the 50 MB L2) before pass 2 starts.

Here one launch interleaves the two passes' work as tasks. A row block's GP *stats* tasks are pass 1's programs (a
TMA stream over TILES K tiles: row maxima and ``x · L1`` partial, ``act_quant._stream_stats``), each counting itself
in at the row block's counter when done; its GQ *quantize* tasks (one [BLOCK_M, 64·GROUPS] tile each, as pass 2's
programs) come LAG row blocks later in the launch order, wait at the counter for the GP stats (usually already
there), and read their slice of x again, from L2: only LAG row blocks of input, a few MB, were read since.

Order, not luck: each program draws a ticket (an atomic counter) and takes the task of that number, so a quantize
task only ever waits for stats tasks that hold earlier tickets, that is, programs already running, which never wait.
There is no assumption about how many programs fit on the GPU at once. Counters are left at zero (the last quantize
task out resets its row block's, the last ticket the ticket counter), so a buffer made zero once serves every call,
CUDA-graph replays included. The interpreter runs programs in ticket order, where a quantize task never waits.

Measured first, and slower (H100, BENCHMARKS.md session 21): a row block's slices held in registers by programs that
all met at the counter (0.3-0.8× the two passes), then single-tile stats tasks (0.65-0.98×).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import _load_smoothed, _quantize_store, _row_offsets, _stream_stats
from .autotune_cache import fp32_dots, interpreting, sm_count
from .launch import TensorDescriptor, launch, pdl_end, pdl_start
from .settings import getenv


@triton.jit
def _task_of(ticket, GP, GQ, NRB, LAG):
    """(quantize?, row block, task within the row block) of a ticket. The launch order: the stats tasks of row
    blocks 0 … LAG - 1, then pairs (stats of row block LAG + i, then quantize of row block i), then the quantize
    tasks of the last LAG row blocks."""
    pre = LAG * GP
    npair = NRB - LAG
    pair = GP + GQ
    u = ticket - pre
    in_pairs = (u >= 0) & (u < npair * pair)
    i = u // pair
    v = u % pair
    w = u - npair * pair
    quant = (in_pairs & (v >= GP)) | (u >= npair * pair)
    rb = tl.where(u < 0, ticket // GP, tl.where(in_pairs, tl.where(v >= GP, i, LAG + i), npair + w // GQ))
    sub = tl.where(u < 0, ticket % GP, tl.where(in_pairs, tl.where(v >= GP, v - GP, v), w % GQ))
    return quant, rb, sub


@triton.jit
def _act_interleaved_kernel(
    x_desc, x_ptr, inv_ptr, down_ptr, out_ptr, scale_ptr, gmax_ptr, part_ptr, lora_ptr, sync_ptr,
    M, K, KP, R, GP, GQ, NRB, LAG, NPROG, NSUB, TILES, SEG, SEG_PITCH,
    stride_xb, stride_xm, stride_dk, stride_om, stride_lm,
    shift,
    QMAX: tl.constexpr, UMAX: tl.constexpr, QMIN: tl.constexpr,
    UNSIGNED: tl.constexpr, HAS_SMOOTH: tl.constexpr, INT8_MODE: tl.constexpr, USE_RINT: tl.constexpr,
    HAS_LORA: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, QGROUPS: tl.constexpr, STAGES: tl.constexpr,
    GP_POW2: tl.constexpr, SUM_ROWS: tl.constexpr, SEGMENTED: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """One task: stats (pass 1's program ``sub`` of the row block, then count in at its counter) or quantize (wait
    for the row block's GP stats, per-token scale from their maxima, the codes of [BLOCK_M, 64·QGROUPS] tile
    ``sub``; tasks ``sub < BLOCK_M / SUM_ROWS`` also sum SUM_ROWS rows' branch partials and write their scales)."""
    BLOCK_KQ: tl.constexpr = GROUP * QGROUPS
    pdl_start(PDL)
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == NPROG - 1:  # every ticket is drawn: back to zero for the next launch
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
    quant, pid_m, sub = _task_of(ticket, GP, GQ, NRB, LAG)
    count_ptr = sync_ptr + 1 + pid_m
    if quant:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rcols = tl.arange(0, BLOCK_R)
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        while arrived < GP:
            arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
        # the stats tasks' results, past this SM's L1 (written by other SMs)
        ga = tl.arange(0, GP_POW2)
        maxima = tl.load(gmax_ptr + rows[:, None] * GP + ga[None, :], mask=rmask[:, None] & (ga[None, :] < GP),
                         other=0.0, cache_modifier=".cg")
        row_max = tl.max(maxima, axis=1)
        scale = tl.where(row_max > 0, tl.math.div_rn(row_max, tl.full([BLOCK_M], QMAX * UMAX, tl.float32)), 1.0)
        if sub < BLOCK_M // SUM_ROWS:
            srows = pid_m * BLOCK_M + sub * SUM_ROWS + tl.arange(0, SUM_ROWS)
            smask = srows < M
            smax = tl.max(tl.load(gmax_ptr + srows[:, None] * GP + ga[None, :],
                                  mask=smask[:, None] & (ga[None, :] < GP), other=0.0, cache_modifier=".cg"), axis=1)
            tl.store(scale_ptr + srows,
                     tl.where(smax > 0, tl.math.div_rn(smax, tl.full([SUM_ROWS], QMAX * UMAX, tl.float32)), 1.0),
                     mask=smask)
            if HAS_LORA:  # the GP partials in a fixed order: deterministic
                tot = tl.zeros([SUM_ROWS, BLOCK_R], dtype=tl.float32)
                m2 = smask[:, None] & (rcols[None, :] < R)
                for t in range(0, GP):
                    tot += tl.load(part_ptr + (t * M + srows[:, None]) * R + rcols[None, :], mask=m2, other=0.0,
                                   cache_modifier=".cg")
                tl.store(lora_ptr + srows[:, None] * stride_lm + rcols[None, :], tot, mask=m2)
        k = sub * BLOCK_KQ + tl.arange(0, BLOCK_KQ)
        roff = _row_offsets(rows, SEG, stride_xb, stride_xm, SEGMENTED)
        _, xf = _load_smoothed(x_ptr, inv_ptr, roff, rmask, k, K, shift, UNSIGNED, HAS_SMOOTH, BLOCK_KQ)
        _quantize_store(xf, scale, out_ptr, rows, rmask, k, KP, stride_om, QMAX, UMAX, QMIN, INT8_MODE, USE_RINT,
                        BLOCK_M, GROUP, QGROUPS)
        # leave: the last of the row block's GQ quantize tasks (count GP + GQ - 1 before its add) resets it
        if tl.atomic_add(count_ptr, 1, sem="relaxed", scope="gpu") == GP + GQ - 1:
            tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    else:
        first = sub * TILES
        _stream_stats(x_desc, inv_ptr, down_ptr, gmax_ptr, part_ptr, pid_m * BLOCK_M, first,
                      tl.minimum(first + TILES, NSUB), sub, M, K, R, SEG, SEG_PITCH, stride_dk, GP, shift,
                      UNSIGNED, HAS_SMOOTH, HAS_LORA, DOT_FP32, BLOCK_M, BLOCK_R, GROUP, GROUPS, STAGES, SEGMENTED,
                      CHUNKS)
        tl.debug_barrier()  # every thread's results before the count (released at GPU scope)
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
    pdl_end(PDL)


def sum_rows(block_m: int, gq: int) -> int:
    """Rows of the branch partials one quantize task sums: the fewest that leave no more summing tasks than GQ."""
    rows = 1
    while block_m // rows > gq:
        rows *= 2
    return min(rows, block_m)


def onepass_choice() -> str:
    """``SVDQ_ACT_ONEPASS``: ``0`` never, ``1`` wherever it can run, ``auto`` (default) where measured faster."""
    choice = getenv("SVDQ_ACT_ONEPASS", "auto")
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"SVDQ_ACT_ONEPASS takes 0, 1 or auto, not {choice!r}")
    return choice


def faster_here(x2: torch.Tensor, k_padded: int, rank: int) -> bool:
    """``auto``'s rule: not yet measured faster, so never (``SVDQ_ACT_ONEPASS=1`` turns it on)."""
    return False


class Plan:
    """A call's task layout: rows a block, stats tasks (TMA streams of ``tiles`` 128-column tiles) and quantize tasks
    ([rows, 64·qgroups] tiles) a row block, and the lag between a row block's two kinds."""

    def __init__(self, m: int, k_padded: int, rank: int, device: torch.device, block_m: int | None = None,
                 tiles: int | None = None, qgroups: int | None = None, lag: int | None = None):
        from .act_quant import stream_stages_for, stream_tiles_per_program

        wide = k_padded >= 8192 or rank > 32
        self.block_m = block_m or (64 if wide else 32)  # pass 1's tiles (act_quant.quantize_activation)
        self.groups = 2 if (k_padded // 64) % 2 == 0 else 1  # the stream's K tiles: 128 columns where K allows
        self.nsub = k_padded // (64 * self.groups)
        self.nrb = triton.cdiv(m, self.block_m)
        self.tiles = tiles or stream_tiles_per_program(self.nrb, self.nsub, rank, device)
        self.stages = stream_stages_for(rank, self.tiles)
        self.gp = triton.cdiv(self.nsub, self.tiles)
        self.qgroups = qgroups or (4 if (k_padded // 64) % 4 == 0 else 2 if (k_padded // 64) % 2 == 0 else 1)
        self.gq = triton.cdiv(k_padded, 64 * self.qgroups)
        if lag is None:  # about as many row blocks as the running programs cover (~4 an SM), so a quantize task
            # rarely waits, and no more: their input must still be in L2
            lag = 1 if interpreting() or device.type != "cuda" else triton.cdiv(4 * sm_count(device), self.gp + self.gq)
        self.lag = max(1, min(self.nrb, lag))
        self.nprog = self.nrb * (self.gp + self.gq)


def quantize_activation_onepass(
    x2: torch.Tensor, seg: int, nb: int, k_padded: int, inv: torch.Tensor | None, proj_down: torch.Tensor | None,
    shift: float, unsigned: bool, qmax: int, umax: int, qmin: int, int8_mode: bool, out: torch.Tensor,
    f32: torch.Tensor, sync: torch.Tensor | None, plan: Plan,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``_act_interleaved_kernel`` over ``x2`` ([M, K], or [B, L, K] batches of rows as ``act_quant.batched_rows``
    describes them; ``why_not`` must have said yes). ``out``: the int8 operand [M, k_padded]; ``f32``: fp32 scratch of
    at least ``scratch_floats``; ``sync``: int32 zeros of at least ``sync_ints`` (left zero), or None for fresh ones.
    Returns (scale, lora)."""
    m, k = seg * nb, x2.shape[-1]
    segmented = nb > 1
    stride_xb, stride_xm = (x2.stride(0), x2.stride(1)) if segmented else (0, x2.stride(0))
    r = 0 if proj_down is None else proj_down.shape[1]
    gp = plan.gp
    scale = f32[:m]
    gmax = f32[m : m + m * gp]
    lora = f32[m + m * gp : m + m * gp + m * r].view(m, r) if r else None
    parts = f32[m + m * gp + m * r : m + m * gp + m * r + gp * m * r] if r else gmax
    if sync is None:
        sync = torch.zeros(sync_ints(plan), dtype=torch.int32, device=x2.device)
    pitch = stride_xb // stride_xm if segmented else seg
    rows_spanned = (nb - 1) * pitch + seg  # the batches and the rows between them
    x_desc = TensorDescriptor(x2, [rows_spanned, k], [stride_xm, 1], [plan.block_m, 64 * plan.groups])
    block_r = max(16, triton.next_power_of_2(r)) if r else 16
    launch(_act_interleaved_kernel, (plan.nprog,), (
        x_desc, x2, inv if inv is not None else x2, proj_down if r else x2, out, scale, gmax, parts,
        lora if r else gmax, sync,
        m, k, k_padded, r, gp, plan.gq, plan.nrb, plan.lag, plan.nprog, plan.nsub, plan.tiles, seg, pitch,
        stride_xb, stride_xm, proj_down.stride(0) if r else 0, out.stride(0), lora.stride(0) if r else 0,
        float(shift)),
        QMAX=qmax, UMAX=umax, QMIN=qmin, UNSIGNED=bool(unsigned), HAS_SMOOTH=inv is not None,
        INT8_MODE=int8_mode, USE_RINT=not interpreting(), HAS_LORA=r > 0, DOT_FP32=fp32_dots(x2), BLOCK_R=block_r,
        CHUNKS=triton.cdiv(r, 32) if r > 32 else 0, BLOCK_M=plan.block_m, GROUP=64, GROUPS=plan.groups,
        QGROUPS=plan.qgroups, STAGES=plan.stages, GP_POW2=max(2, triton.next_power_of_2(gp)),
        SUM_ROWS=sum_rows(plan.block_m, plan.gq), SEGMENTED=segmented, num_warps=4, pdl=True,
    )
    return scale, lora


def scratch_floats(m: int, rank: int, plan: Plan) -> int:
    """fp32 scratch of one call: scales, every stats task's row maxima, the branch result and its partials."""
    return m + m * plan.gp + (m * rank + plan.gp * m * rank if rank else 0)


def sync_ints(plan: Plan) -> int:
    """int32 counters of one call: the ticket and one per row block."""
    return 1 + plan.nrb


def why_not(x2: torch.Tensor, seg: int, nb: int, rank: int, block_m: int) -> str | None:
    """Why the one-launch kernel cannot take this input, or None where it can: its stats tasks are the TMA stream's
    (a 16-bit input a descriptor can address, a branch of at most ``STREAM_MAX_RANK``, row batches of whole row
    blocks), on a CUDA GPU or in the interpreter."""
    from .act_quant import STREAM_MAX_RANK, descriptor_addressable

    if not (interpreting() or x2.is_cuda):
        return f"it runs on CUDA GPUs (or Triton's interpreter), not {x2.device}"
    if not descriptor_addressable(x2):
        return (f"its TMA stream cannot address this input ({x2.dtype}, strides {tuple(x2.stride())} elements, base "
                f"{x2.data_ptr() % 16} bytes past 16)")
    if rank > STREAM_MAX_RANK:
        return f"its TMA stream takes a branch of at most {STREAM_MAX_RANK} ranks, not {rank}"
    if nb > 1 and (seg % block_m or x2.stride(0) % x2.stride(1)):
        return f"a row block of {block_m} would straddle two of the input's batches of {seg} rows"
    return None
