"""Warp-specialized Hopper schedule of the W4A4 GEMM, written in Gluon (Triton's explicit-layout dialect).

Reference: ``kernels.reference.svdq_linear_reference`` (INT4 path); same product and epilogue as
``gemm_w4a4._w4a4_gemm_tma_kernel``, bit-identical output.

Why a second Hopper kernel: Triton 3.6 does not warp-specialize on sm_90 (its automatic pass is Blackwell-only),
so the Triton kernel's warps wait on their own TMA loads between wgmma groups. Here one producer warp only issues
TMA loads into a ring of shared-memory stages (``ready``/``empty`` mbarriers) and runs ahead, across tiles, while
the default partition (two warpgroups, 64 rows each) issues asynchronous int8 wgmma with one group in flight and
runs the epilogue. H100: 12-13% faster than the Triton kernel at K = 12288 / 15360, even with it or slower at K = 3072
(``bench/gluon_gemm_probe.py``); the shape-keyed tuner offers both, so each shape gets the faster one.

Epilogue as in the Triton kernel: per-token × per-channel scales, the low-rank branch ``lora_act · proj_upᵀ``
taken R_CHUNK ranks at a time on bf16 wgmma (proj_up chunk staged in shared memory, lora_act from registers),
bias, GELU, optional accumulate into the output, one 16-bit store. In the ping-pong kernel a branch of one chunk
(rank ≤ 64) may be issued in the warpgroup's own turn instead, right after its tile's int8 MMAs: a bf16 wgmma
issued from the epilogue while the other warpgroup streams its int8 MMAs held that stream back (H100, session 12:
the branch cost 10-14% of the GEMM at K = 3072 that way, 4-6% in the turn). Since tiles are stored by TMA the
epilogue placement is 2-4% faster again at K = 3072 and the turn leads at K >= 12288, so the tuner offers both per
shape (``branch_in_turn``; ``bench/gemm_epilogue_ab.py``, ``bench/retune_shipped.py``). A branch of several chunks
(rank > 64: a LoRA-widened one) is staged whole in the warpgroup's output tile and its chunks' MMAs issued back to
back (``branch_staged``; H100: the rank-96 GEMM up to 10% faster). The ping-pong kernel also
writes each output tile through shared memory with one TMA bulk store (``store_by_tma``) instead of scattered
4-byte stores from the MMA layout (H100: up to 1.14x the GEMM's speed at K = 3072 and small M,
``bench/gemm_store_ab.py``).

Tiles are whole, even where the last wave is partial (at M = 4608, N = 3072: 864 tiles on 132 SMs, 6-7% of the GEMM at
K = 12288 / 15360, ``bench/wave_tail_probe.py``): splitting that wave by K over every program (stream-K, and chunked
variants) measured even at best, the exchange of int32 partials costing what the split saves (BENCHMARKS.md,
session 21).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

from .autotune_cache import capability_major, sm_count
from .settings import getenv
from .launch import launch


_GDC_WAIT = gl.constexpr("griddepcontrol.wait; // dummy $0")
_GDC_LAUNCH = gl.constexpr("griddepcontrol.launch_dependents; // dummy $0")


@gluon.jit
def _pdl_start(PDL: gl.constexpr):
    """``launch.pdl_start`` for Gluon: before any partition touches the previous kernels' outputs (or the buffers
    they read), wait for the previous kernel; then let the next one launch."""
    if PDL > 0:
        gl.inline_asm_elementwise(_GDC_WAIT, "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    if PDL == 1:
        gl.inline_asm_elementwise(_GDC_LAUNCH, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _pdl_end(PDL: gl.constexpr):
    """``launch.pdl_end`` for Gluon (after every partition has finished)."""
    if PDL == 2:
        gl.inline_asm_elementwise(_GDC_LAUNCH, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
    """Grouped order (GROUP_M row blocks share weight tiles in L2), as the Triton kernels."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@gluon.jit
def _schedule(M, N, KP, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    """(row blocks, column blocks, K steps): producer and consumers must walk the same tiles in the same order."""
    return gl.cdiv(M, BM), gl.cdiv(N, BN), gl.cdiv(KP, BK)


@gluon.jit
def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, KP,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """One warp: TMA loads of both operands into the stage ring, as far ahead as the free stages allow."""
    num_m, num_n, k_tiles = _schedule(M, N, KP, BM, BN, BK)
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        for ki in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [pid_m * BM, ki * BK], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [pid_n * BN, ki * BK], ready.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _mainloop(a_bufs, b_bufs, ready, empty, acc, it, k_tiles, STAGES: gl.constexpr):
    """One tile's K loop over the stage ring from global stage count ``it``: int8 wgmma with one group in flight
    (the last one is left in flight for the caller), each stage released as soon as the MMA after it is issued."""
    for ki in range(k_tiles):
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=ki > 0)  # the MMA before this one is done
        it += 1
    return acc, it


@gluon.jit
def _gelu_tanh(y):
    c = 0.7978845608028654  # the Triton kernel's expression, term for term: the same bits
    u = c * (y + 0.044715 * y * y * y)
    t = 1.0 - 2.0 / (gl.exp(2.0 * u) + 1.0)
    return 0.5 * y * (1.0 + t)


@gluon.jit
def _tile_scales(pid_m, pid_n, ascale_ptr, wscale_ptr, M, N, BM: gl.constexpr, BN: gl.constexpr,
                 y_layout: gl.constexpr):
    """Per-token and per-channel scales of a tile, in the epilogue's row and column layouts."""
    rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, y_layout))
    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, y_layout))
    sa = gl.load(ascale_ptr + rm, mask=rm < M, other=0.0)
    sw = gl.load(wscale_ptr + rn, mask=rn < N, other=0.0)
    return sa, sw


@gluon.jit
def _branch_chunk(r0, pid_m, pid_n, up_smem, lora_ptr, up_ptr, M, N, R, stride_lm, stride_un, BM: gl.constexpr,
                  BN: gl.constexpr, R_CHUNK: gl.constexpr, y_layout: gl.constexpr, WARPS: gl.constexpr):
    """Ranks r0 … r0 + R_CHUNK of the branch: lora_act rows as the MMA's register operand (bf16), the proj_up chunk
    staged in ``up_smem`` (stored, fenced and synced for wgmma). Returns the register operand."""
    la_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=y_layout, k_width=2)
    up_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (R_CHUNK // 8), R_CHUNK // 8],
                                               warps_per_cta=[WARPS, 1], order=[1, 0])
    lm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, la_layout))
    un = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, up_layout))
    lr = r0 + gl.arange(0, R_CHUNK, layout=gl.SliceLayout(0, la_layout))
    la = gl.load(lora_ptr + lm[:, None] * stride_lm + lr[None, :],
                 mask=(lm < M)[:, None] & (lr < R)[None, :], other=0.0).to(gl.bfloat16)
    ur = r0 + gl.arange(0, R_CHUNK, layout=gl.SliceLayout(0, up_layout))
    up = gl.load(up_ptr + un[:, None] * stride_un + ur[None, :],
                 mask=(un < N)[:, None] & (ur < R)[None, :], other=0.0)
    gl.thread_barrier()  # the previous chunk's (or tile's) MMA has finished reading up_smem
    up_smem.store(up.to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()
    return la


@gluon.jit
def _stage_branch(pid_m, pid_n, up_chunks, lora_ptr, up_ptr, M, N, R, stride_lm, stride_un, BM: gl.constexpr,
                  BN: gl.constexpr, BLOCK_R: gl.constexpr, R_CHUNK: gl.constexpr, y_layout: gl.constexpr):
    """A branch of several chunks staged at once: every proj_up chunk goes into ``up_chunks`` (the warpgroup's
    output staging tile, free until the tile is stored; fenced and synced for wgmma), every lora_act chunk into
    registers (returned, a tuple). Why: one chunk at a time paid a global-load latency, two barriers and an MMA
    wait per chunk, serialized (H100, session 18: the rank-96 branch cost the ping-pong GEMM +28% at batch 2)."""
    la_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=y_layout, k_width=2)
    up_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (R_CHUNK // 8), R_CHUNK // 8],
                                               warps_per_cta=[4, 1], order=[1, 0])
    lm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, la_layout))
    un = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, up_layout))
    las = ()
    for r0 in gl.static_range(0, BLOCK_R, R_CHUNK):
        ur = r0 + gl.arange(0, R_CHUNK, layout=gl.SliceLayout(0, up_layout))
        up = gl.load(up_ptr + un[:, None] * stride_un + ur[None, :],
                     mask=(un < N)[:, None] & (ur < R)[None, :], other=0.0)
        lr = r0 + gl.arange(0, R_CHUNK, layout=gl.SliceLayout(0, la_layout))
        las = las + (gl.load(lora_ptr + lm[:, None] * stride_lm + lr[None, :],
                             mask=(lm < M)[:, None] & (lr < R)[None, :], other=0.0).to(gl.bfloat16),)
        up_chunks.index(r0 // R_CHUNK).store(up.to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()
    return las


@gluon.jit
def _branch_mmas(y, las, up_chunks, CHUNKS: gl.constexpr):
    """The staged branch's bf16 wgmmas, issued back to back, in ``_branch_chunk``'s chunk order (so the same
    bits); left in flight for the caller's wait."""
    for c in gl.static_range(CHUNKS):
        y = warpgroup_mma(las[c], up_chunks.index(c).permute((1, 0)), y, is_async=True)
    return y


@gluon.jit
def _tile_left():
    """The warpgroup's previous output tile has left its staging tile: the thread that issued the TMA copy waits
    for it, the others wait for that thread."""
    tma.store_wait(0)
    gl.thread_barrier()


@gluon.jit
def _stage_branch_in_tile(c_smem, pid_m, pid_n, lora_ptr, up_ptr, M, N, R, stride_lm, stride_un, BM: gl.constexpr,
                          BN: gl.constexpr, BLOCK_R: gl.constexpr, R_CHUNK: gl.constexpr, y_layout: gl.constexpr):
    """``_stage_branch`` into a warpgroup's output staging tile ``c_smem`` (which the warpgroup's previous tile must
    have left: ``_tile_left``), seen as BM / R_CHUNK proj_up chunks of [BN, R_CHUNK] bf16. Returns (lora_act chunks,
    the chunks' view)."""
    up_chunks = c_smem._reinterpret(gl.bfloat16, [BM // R_CHUNK, BN, R_CHUNK],
                                    gl.NVMMASharedLayout.get_default_for([BN, R_CHUNK], gl.bfloat16))
    las = _stage_branch(pid_m, pid_n, up_chunks, lora_ptr, up_ptr, M, N, R, stride_lm, stride_un, BM, BN, BLOCK_R,
                        R_CHUNK, y_layout)
    return las, up_chunks


@gluon.jit
def _bias_gelu(y, pid_n, bias_ptr, N, BN: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr,
               y_layout: gl.constexpr):
    """The tile's bias and GELU (both stores take them from here: the same bits either way)."""
    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, y_layout))
    if HAS_BIAS:
        y += gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[None, :]
    if GELU:
        y = _gelu_tanh(y)
    return y


@gluon.jit
def _tile_finish(y, pid_m, pid_n, bias_ptr, c_ptr, M, N, stride_cm, BM: gl.constexpr, BN: gl.constexpr,
                 HAS_BIAS: gl.constexpr, GELU: gl.constexpr, ACCUMULATE: gl.constexpr, y_layout: gl.constexpr):
    """Bias, GELU, optional accumulation into the output, one 16-bit store."""
    y = _bias_gelu(y, pid_n, bias_ptr, N, BN, HAS_BIAS, GELU, y_layout)
    rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, y_layout))
    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, y_layout))
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    cmask = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        y += gl.load(c_ptrs, mask=cmask, other=0.0).to(gl.float32)
    gl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=cmask)


@gluon.jit
def _tile_store_tma(y, pid_m, pid_n, bias_ptr, c_desc, c_smem, N, BM: gl.constexpr, BN: gl.constexpr,
                    HAS_BIAS: gl.constexpr, GELU: gl.constexpr, y_layout: gl.constexpr):
    """Bias, GELU, then the tile through shared memory and one TMA bulk store (which clips rows and columns past
    the output), instead of 64 scattered 4-byte stores a thread in the MMA layout."""
    y = _bias_gelu(y, pid_n, bias_ptr, N, BN, HAS_BIAS, GELU, y_layout)
    _tile_left()
    c_smem.store(y.to(c_desc.block_type.element_ty))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(c_desc, [pid_m * BM, pid_n * BN], c_smem)


@gluon.jit
def _tile_result(acc, pid_m, pid_n, up_smem, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, M, N, R, stride_lm, stride_un,
                 BM: gl.constexpr, BN: gl.constexpr, INSTR_N: gl.constexpr, HAS_LORA: gl.constexpr,
                 BLOCK_R: gl.constexpr, R_CHUNK: gl.constexpr, WARPS: gl.constexpr):
    """Scales and the low-rank branch on bf16 wgmma (proj_up chunks staged in ``up_smem``): the Triton kernel's
    epilogue term for term, so outputs are bit-identical."""
    y_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, INSTR_N, 16])
    sa, sw = _tile_scales(pid_m, pid_n, ascale_ptr, wscale_ptr, M, N, BM, BN, y_layout)
    y = gl.convert_layout(acc.to(gl.float32), y_layout) * sa[:, None] * sw[None, :]
    if HAS_LORA:
        for r0 in gl.static_range(0, BLOCK_R, R_CHUNK):
            la = _branch_chunk(r0, pid_m, pid_n, up_smem, lora_ptr, up_ptr, M, N, R, stride_lm, stride_un, BM, BN,
                               R_CHUNK, y_layout, WARPS)
            y = warpgroup_mma(la, up_smem.permute((1, 0)), y, is_async=True)
            y = warpgroup_mma_wait(num_outstanding=0, deps=(y,))
    return y


@gluon.jit
def _tile_epilogue(acc, pid_m, pid_n, up_smem, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr, M, N, R,
                   stride_lm, stride_un, stride_cm, BM: gl.constexpr, BN: gl.constexpr, INSTR_N: gl.constexpr,
                   HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, ACCUMULATE: gl.constexpr,
                   BLOCK_R: gl.constexpr, R_CHUNK: gl.constexpr, WARPS: gl.constexpr):
    """Scales, the branch, bias, GELU, one store (``_tile_result`` then ``_tile_finish``)."""
    y_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, INSTR_N, 16])
    y = _tile_result(acc, pid_m, pid_n, up_smem, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, M, N, R, stride_lm,
                     stride_un, BM, BN, INSTR_N, HAS_LORA, BLOCK_R, R_CHUNK, WARPS)
    _tile_finish(y, pid_m, pid_n, bias_ptr, c_ptr, M, N, stride_cm, BM, BN, HAS_BIAS, GELU, ACCUMULATE, y_layout)


@gluon.jit
def _consumer(a_bufs, b_bufs, up_smem, ready, empty, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr,
              M, N, KP, R, stride_lm, stride_un, stride_cm,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
              INSTR_N: gl.constexpr, HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr,
              ACCUMULATE: gl.constexpr, BLOCK_R: gl.constexpr, R_CHUNK: gl.constexpr, WARPS: gl.constexpr):
    """Two warpgroups: int8 wgmma over the stage ring (one group in flight; a stage is released as soon as the
    MMA after it has been issued), then the epilogue of the tile."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    num_m, num_n, k_tiles = _schedule(M, N, KP, BM, BN, BK)
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = gl.zeros([BM, BN], gl.int32, layout=acc_layout)
        acc, it = _mainloop(a_bufs, b_bufs, ready, empty, acc, it, k_tiles, STAGES)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))

        _tile_epilogue(acc, pid_m, pid_n, up_smem, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr, M, N, R,
                       stride_lm, stride_un, stride_cm, BM, BN, INSTR_N, HAS_LORA, HAS_BIAS, GELU, ACCUMULATE, BLOCK_R,
                       R_CHUNK, WARPS)


@gluon.jit
def _w4a4_gemm_ws_kernel(a_desc, b_desc, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr,
                         M, N, KP, R, stride_lm, stride_un, stride_cm,
                         HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, ACCUMULATE: gl.constexpr,
                         BLOCK_R: gl.constexpr, R_CHUNK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                         INSTR_N: gl.constexpr, WARPS: gl.constexpr, PDL: gl.constexpr = False):
    _pdl_start(PDL)
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], b_desc.layout)
    up_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, R_CHUNK],
                                        gl.NVMMASharedLayout.get_default_for([BN, R_CHUNK], gl.bfloat16))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (a_bufs, b_bufs, up_smem, ready, empty, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr,
                     M, N, KP, R, stride_lm, stride_un, stride_cm, BM, BN, BK, STAGES, GROUP_M, INSTR_N, HAS_LORA,
                     HAS_BIAS, GELU, ACCUMULATE, BLOCK_R, R_CHUNK, WARPS)),
        (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, KP, BM, BN, BK, STAGES, GROUP_M)),
    ], [1], [40])
    _pdl_end(PDL)


@gluon.jit
def _pingpong_consumer(a_bufs, b_bufs, up_smem, ready, empty, turn, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr,
                       c_ptr, M, N, KP, R, stride_lm, stride_un, stride_cm,
                       BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                       GROUP_M: gl.constexpr, INSTR_N: gl.constexpr, HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr,
                       GELU: gl.constexpr, ACCUMULATE: gl.constexpr, BLOCK_R: gl.constexpr, R_CHUNK: gl.constexpr,
                       BRANCH_IN_TURN: gl.constexpr, WG: gl.constexpr, c_desc, c_smem, STORE_TMA: gl.constexpr,
                       BRANCH_STAGED: gl.constexpr):
    """One warpgroup taking every other tile of its program (``WG`` = 0 or 1), its main loops alternating with the
    other warpgroup's: it waits on ``turn[WG]`` until the other has issued every MMA of the tile before, and passes
    the turn back once its own are issued. So one warpgroup's epilogue runs under the other's MMAs, and the two walk
    the stage ring in the producer's order (which also keeps mbarrier phases within one of each other).
    ``BRANCH_IN_TURN``: the branch MMA goes in the turn, after this tile's int8 MMAs have completed and before the
    turn passes (its operands and the scales are loaded before the turn, under the other warpgroup's MMAs)."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    y_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, INSTR_N, 16])
    num_m, num_n, k_tiles = _schedule(M, N, KP, BM, BN, BK)
    j = WG  # this tile's place in the program's tile sequence (the producer's order)
    for tile in range(gl.program_id(0) + WG * gl.num_programs(0), num_m * num_n, 2 * gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        if BRANCH_IN_TURN:  # the branch operands and scales are fetched before the turn, under the other's MMAs
            if BRANCH_STAGED:
                _tile_left()
                las, up_chunks = _stage_branch_in_tile(c_smem.index(WG), pid_m, pid_n, lora_ptr, up_ptr, M, N, R,
                                                       stride_lm, stride_un, BM, BN, BLOCK_R, R_CHUNK, y_layout)
            else:
                la = _branch_chunk(0, pid_m, pid_n, up_smem.index(WG), lora_ptr, up_ptr, M, N, R, stride_lm,
                                   stride_un, BM, BN, R_CHUNK, y_layout, 4)
            sa, sw = _tile_scales(pid_m, pid_n, ascale_ptr, wscale_ptr, M, N, BM, BN, y_layout)
        mbarrier.wait(turn.index(WG), ((j - 1) // 2) & 1, pred=j > 0)
        it = j * k_tiles
        acc = gl.zeros([BM, BN], gl.int32, layout=acc_layout)
        acc, it = _mainloop(a_bufs, b_bufs, ready, empty, acc, it, k_tiles, STAGES)
        if not BRANCH_IN_TURN:
            mbarrier.arrive(turn.index(1 - WG))  # every MMA of this tile is issued: the other warpgroup's turn
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        if BRANCH_IN_TURN:
            # The branch MMA right behind this tile's own int8 MMAs, before the turn passes: issued from the
            # epilogue while the other warpgroup streams its main loop, it held that warpgroup's MMAs back
            # (H100: +10-14% at K = 3072, bench/gluon_epilogue_probe.py).
            y = gl.convert_layout(acc.to(gl.float32), y_layout) * sa[:, None] * sw[None, :]
            if BRANCH_STAGED:
                y = _branch_mmas(y, las, up_chunks, BLOCK_R // R_CHUNK)
            else:
                y = warpgroup_mma(la, up_smem.index(WG).permute((1, 0)), y, is_async=True)
            mbarrier.arrive(turn.index(1 - WG))
            y = warpgroup_mma_wait(num_outstanding=0, deps=(y,))
        elif BRANCH_STAGED:
            _tile_left()
            sa, sw = _tile_scales(pid_m, pid_n, ascale_ptr, wscale_ptr, M, N, BM, BN, y_layout)
            y = gl.convert_layout(acc.to(gl.float32), y_layout) * sa[:, None] * sw[None, :]
            las, up_chunks = _stage_branch_in_tile(c_smem.index(WG), pid_m, pid_n, lora_ptr, up_ptr, M, N, R,
                                                   stride_lm, stride_un, BM, BN, BLOCK_R, R_CHUNK, y_layout)
            y = _branch_mmas(y, las, up_chunks, BLOCK_R // R_CHUNK)
            y = warpgroup_mma_wait(num_outstanding=0, deps=(y,))
        else:
            y = _tile_result(acc, pid_m, pid_n, up_smem.index(WG), ascale_ptr, wscale_ptr, lora_ptr, up_ptr, M, N, R,
                             stride_lm, stride_un, BM, BN, INSTR_N, HAS_LORA, BLOCK_R, R_CHUNK, 4)
        if STORE_TMA:
            _tile_store_tma(y, pid_m, pid_n, bias_ptr, c_desc, c_smem.index(WG), N, BM, BN, HAS_BIAS, GELU, y_layout)
        else:
            _tile_finish(y, pid_m, pid_n, bias_ptr, c_ptr, M, N, stride_cm, BM, BN, HAS_BIAS, GELU, ACCUMULATE,
                         y_layout)
        j += 2
    if STORE_TMA:
        tma.store_wait(0)


@gluon.jit
def _w4a4_gemm_pingpong_kernel(a_desc, b_desc, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr,
                               M, N, KP, R, stride_lm, stride_un, stride_cm, c_desc,
                               HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr,
                               ACCUMULATE: gl.constexpr, BLOCK_R: gl.constexpr, R_CHUNK: gl.constexpr,
                               STAGES: gl.constexpr, GROUP_M: gl.constexpr, INSTR_N: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                               BRANCH_IN_TURN: gl.constexpr = False, STORE_TMA: gl.constexpr = False,
                               BRANCH_STAGED: gl.constexpr = False, PDL: gl.constexpr = False):
    """Ping-pong schedule: a producer warp and two consumer warpgroups, each with whole tiles of its own (BM rows
    per warpgroup), whose main loops take turns (``_pingpong_consumer``). The cooperative kernel above runs its
    epilogue with the tensor cores idle; here the other warpgroup's MMAs fill that time."""
    _pdl_start(PDL)
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], b_desc.layout)
    up_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BN, R_CHUNK],
                                        gl.NVMMASharedLayout.get_default_for([BN, R_CHUNK], gl.bfloat16))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    if STORE_TMA:  # one output tile per warpgroup
        c_smem = gl.allocate_shared_memory(c_desc.block_type.element_ty, [2, BM, BN], c_desc.layout)
    else:
        c_smem = up_smem
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    gl.warp_specialize([
        (_pingpong_consumer, (a_bufs, b_bufs, up_smem, ready, empty, turn, ascale_ptr, wscale_ptr, lora_ptr, up_ptr,
                              bias_ptr, c_ptr, M, N, KP, R, stride_lm, stride_un, stride_cm, BM, BN, BK, STAGES, GROUP_M,
                              INSTR_N, HAS_LORA, HAS_BIAS, GELU, ACCUMULATE, BLOCK_R, R_CHUNK, BRANCH_IN_TURN, 0,
                              c_desc, c_smem, STORE_TMA, BRANCH_STAGED)),
        (_pingpong_consumer, (a_bufs, b_bufs, up_smem, ready, empty, turn, ascale_ptr, wscale_ptr, lora_ptr, up_ptr,
                              bias_ptr, c_ptr, M, N, KP, R, stride_lm, stride_un, stride_cm, BM, BN, BK, STAGES, GROUP_M,
                              INSTR_N, HAS_LORA, HAS_BIAS, GELU, ACCUMULATE, BLOCK_R, R_CHUNK, BRANCH_IN_TURN, 1,
                              c_desc, c_smem, STORE_TMA, BRANCH_STAGED)),
        (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, KP, BM, BN, BK, STAGES, GROUP_M)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    _pdl_end(PDL)


def launch_ws(cfg_kwargs: dict, num_warps: int, args: tuple, flags: dict, m: int, n: int) -> None:
    """Launch with the ``w4a4_gemm`` argument tuple (see ``gemm_w4a4._GemmTuned``): descriptors for this tile
    shape, one program per SM (at most one per tile); ``PINGPONG`` picks the ping-pong kernel."""
    bm, bn, bk = cfg_kwargs["BLOCK_M"], cfg_kwargs["BLOCK_N"], cfg_kwargs["BLOCK_K"]
    a8, w8, kp = args[0], args[1], args[10]
    a_desc = GluonDescriptor(a8, [m, kp], [a8.stride(0), 1], [bm, bk],
                             gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8))
    b_desc = GluonDescriptor(w8, [n, kp], [w8.stride(0), 1], [bn, bk],
                             gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
    programs = min(triton.cdiv(m, bm) * triton.cdiv(n, bn), sm_count(a8.device))
    flags = {k: v for k, v in flags.items() if k != "DOT_FP32"}  # bf16 branch only (the tuner offers this for 16-bit)
    if cfg_kwargs.get("PINGPONG"):  # BLOCK_M rows per warpgroup; the default partition is one warpgroup
        in_turn = branch_in_turn(cfg_kwargs, flags)
        c = args[7]
        staged_if_tma = branch_staged(cfg_kwargs, flags, True, in_turn)
        tma_store = store_by_tma(cfg_kwargs, flags, c, staged_if_tma)
        c_desc = GluonDescriptor(c, [m, n], [c.stride(0), 1], [bm, bn], gl.NVMMASharedLayout.get_default_for(
            [bm, bn], gl.bfloat16 if c.dtype == torch.bfloat16 else gl.float16)) if tma_store else b_desc
        staged = staged_if_tma and tma_store  # the staging tile is the TMA store's
        launch(_w4a4_gemm_pingpong_kernel, (programs,), (a_desc, b_desc) + args[2:12] + args[14:17] + (c_desc,),
               num_warps=4, **flags, STAGES=cfg_kwargs["STAGES"], GROUP_M=cfg_kwargs["GROUP_M"],
               INSTR_N=min(bn, 128), **pingpong_registers(cfg_kwargs.get("PRODUCER_REGS", 40)),
               BRANCH_IN_TURN=in_turn or (staged and staged_in_turn(cfg_kwargs)), STORE_TMA=tma_store,
               BRANCH_STAGED=staged, pdl=True)
        return
    launch(_w4a4_gemm_ws_kernel, (programs,), (a_desc, b_desc) + args[2:12] + args[14:17],
           num_warps=num_warps, **flags, STAGES=cfg_kwargs["STAGES"], GROUP_M=cfg_kwargs["GROUP_M"],
           INSTR_N=min(bn, 128), WARPS=num_warps, pdl=True)


def _switch(cfg_kwargs: dict, key: str, variable: str, choices: tuple) -> str:
    """A ping-pong kernel option: the environment ``variable`` where set (so an A/B run can force one way over the
    tuned choice), else the config's ``key`` (the tuner's per-shape pick), else the first choice; anything else is
    refused by name."""
    choice = (getenv(variable) or cfg_kwargs.get(key) or choices[0]).lower()
    if choice not in choices:
        raise ValueError(f"{variable} must be " + " or ".join(repr(c) for c in choices) + f", not {choice!r}")
    return choice


def branch_in_turn(cfg_kwargs: dict, flags: dict) -> bool:
    """Whether the ping-pong kernel issues the branch MMA in its warpgroup's turn, right after the tile's int8 MMAs
    (``turn``, the default), or in the epilogue (``epilogue``): ``SVDQ_BRANCH``, else config key ``BRANCH``. The
    tuner offers both (H100, session 16: the epilogue was 2-4% faster at K = 3072 once tiles were stored by TMA, the
    turn ahead or even at K >= 12288; ``bench/gemm_epilogue_ab.py``). Only
    a branch of one chunk (``R_CHUNK`` = ``BLOCK_R``: rank ≤ 64) goes in the turn; wider ones keep the epilogue's
    chunks. A third way measured and dropped: the branch as rank-one updates on the CUDA cores in the epilogue,
    2.7× slower (BENCHMARKS.md, session 12)."""
    choice = _switch(cfg_kwargs, "BRANCH", "SVDQ_BRANCH", ("turn", "epilogue"))
    one_chunk = flags.get("HAS_LORA") and flags.get("BLOCK_R") == flags.get("R_CHUNK")
    return bool(one_chunk and choice == "turn")


def branch_staged(cfg_kwargs: dict, flags: dict, store_tma: bool, in_turn: bool) -> bool:
    """Whether the ping-pong kernel's epilogue takes a branch of several chunks (rank > 64: a LoRA-widened one) in
    one go, every proj_up chunk staged in the warpgroup's output tile first (``_stage_branch``), instead of one
    chunk at a time through ``up_smem``: config key ``UP``, ``SVDQ_BRANCH_UP`` over it, ``staged`` (the default),
    ``turn`` (staged, its MMAs in the turn: ``staged_in_turn``) or ``chunked``. Only where that tile exists
    (``store_tma``) and holds the branch (rank ≤ BLOCK_M). A one-chunk branch staged the same way (which frees
    ``up_smem`` for a fifth stage) measured no faster at rank 32, and slower with the fifth stage (H100, session 20,
    BENCHMARKS.md); it keeps ``up_smem``."""
    choice = _switch(cfg_kwargs, "UP", "SVDQ_BRANCH_UP", ("staged", "chunked", "turn"))
    several = flags.get("HAS_LORA") and flags.get("BLOCK_R", 0) > flags.get("R_CHUNK", 0)
    return bool(choice != "chunked" and several and store_tma and not in_turn
                and flags["BLOCK_R"] <= cfg_kwargs["BLOCK_M"])


def staged_in_turn(cfg_kwargs: dict) -> bool:
    """``UP`` = ``turn`` (opt-in): the staged branch of several chunks is loaded before the warpgroup's turn and its
    MMAs issued in the turn, as a one-chunk branch's (``branch_in_turn``); its lora_act chunks stay in registers
    across the main loop (rank 96: 48 more a thread)."""
    return _switch(cfg_kwargs, "UP", "SVDQ_BRANCH_UP", ("staged", "chunked", "turn")) == "turn"


def store_by_tma(cfg_kwargs: dict, flags: dict, c: torch.Tensor, staged: bool | None = None) -> bool:
    """Whether the ping-pong kernel writes its tiles through shared memory and one TMA bulk store (config key
    ``STORE``, ``SVDQ_STORE`` over it: ``tma``, the default, | ``pointer``): where the output is 16-bit, a TMA descriptor
    can address it (16-byte aligned base and row pitch) and it is not added to. H100, same run: 1.00-1.14x the
    GEMM's speed with the scattered 4-byte stores of the MMA layout, most at K = 3072 and small M
    (``bench/gemm_store_ab.py``); same bits. The cooperative kernel keeps pointer stores (its 128 x 256 tile leaves
    no shared memory for a staged output)."""
    choice = _switch(cfg_kwargs, "STORE", "SVDQ_STORE", ("tma", "pointer"))
    if staged is None:  # whether the branch would be staged in the tile (the caller may know already)
        staged = branch_staged(cfg_kwargs, flags, True, branch_in_turn(cfg_kwargs, flags))
    return (choice == "tma" and not flags.get("ACCUMULATE") and c.dtype in (torch.bfloat16, torch.float16)
            and c.data_ptr() % 16 == 0 and (c.stride(0) * c.element_size()) % 16 == 0
            and pingpong_shared_bytes(cfg_kwargs, flags, True, staged) <= shared_limit(c.device))


def pingpong_shared_bytes(cfg_kwargs: dict, flags: dict, store_tma: bool, staged: bool = False) -> int:
    """Shared memory the ping-pong kernel allocates: the stage ring, two warpgroups' branch up-projection chunks
    (none where there is no branch or it is ``staged`` in the output tile: the compiler drops the unused buffer),
    with the TMA store two staged output tiles, plus 1 KB for barriers and alignment. Why: a 64 x 256 tile with four
    stages, a branch and the store needs 262 KB, past the H100's 227 KB; such a config keeps pointer stores."""
    bm, bn, bk, stages = (cfg_kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "STAGES"))
    ring = stages * (bm + bn) * bk
    branch = 0 if staged or not flags.get("HAS_LORA") else 2 * bn * flags.get("R_CHUNK", 16) * 2
    return ring + branch + (2 * bm * bn * 2 if store_tma else 0) + 1024


@functools.lru_cache(maxsize=None)
def _shared_limit(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


H100_SHARED = 232448


def shared_limit(device: torch.device) -> int:
    """Shared memory one program may opt into on ``device`` (the H100's for a CPU tensor: the choice's unit tests)."""
    if device.type != "cuda":
        return H100_SHARED
    return _shared_limit(device.index if device.index is not None else torch.cuda.current_device())


def pingpong_registers(producer: int) -> dict:
    """Registers per thread of the ping-pong partitions: the producer warp's (padded to a warpgroup; 24 is
    setmaxnreg's least) and, from the 64 K of an SM less that, each consumer warpgroup's (multiples of 8, at most 240:
    the default partition's own share must stay at least as large)."""
    consumers = min(240, (65536 // 128 - producer) // 2 // 8 * 8)
    return {"CONSUMER_REGS": consumers, "PRODUCER_REGS": producer}


def ws_configs() -> list[tuple[dict, int]]:
    """(config kwargs, warps) candidates (each adds tuning time on the first call of a shape); the tuner drops any
    that do not fit (a wide branch needs more shared memory). The H100 probes' winners: cooperative 128 x 256 and
    128 x 128 (session 5; 128 x 256 x 64 and three stages never won), ping-pong 128 x 128 x 128 with four stages
    (session 7: 64 x 256 tiles and five or six stages were slower, ``bench/gluon_gemm_probe.py``), the latter with
    its branch in the turn or in the epilogue (``branch_in_turn``: which is faster depends on the shape)."""
    coop = [({"SCHEDULE": "gluon", "BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "GROUP_M": 8}, 8)
            for bn, bk, st in [(256, 128, 4), (128, 128, 5)]]
    pingpong = {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 4,
                "GROUP_M": 8}
    return coop + [(pingpong, 4), (dict(pingpong, BRANCH="epilogue"), 4)]


def usable(a8: torch.Tensor, proj_up: torch.Tensor | None) -> bool:
    """NVIDIA sm_90 with a 16-bit (or no) branch: the kernel uses Hopper wgmma and a bf16 branch MMA."""
    return a8.is_cuda and torch.version.hip is None and capability_major(a8.device) == 9 and (
        proj_up is None or proj_up.dtype == torch.bfloat16)
