"""Activation kernel in one pass over the input, for K up to 3,584 on sm_90 (Gluon: explicit shared memory).

Reference: ``quant.formats.quantize_int4_activation`` (codes) and ``kernels.reference.lowrank_down``; the same
arithmetic as ``act_quant``'s two launches, term for term, so codes and scales are bit-identical to theirs (the
low-rank product sums K in another order: equal to fp32 rounding).

Why: the per-token scale needs a row's maximum before any of its codes can be written, so ``act_quant`` reads the
input twice (two launches, the second hoping for L2). Here one program keeps its 16 rows × all of K in shared memory
(96 KB at K = 3072, two programs per SM): every 64-column tile of the row block is requested by TMA at once, then
read from shared memory twice: first for the row maxima and ``x · L1`` (mma.sync, 16 rows), then for the codes. The
input leaves DRAM once. At larger K the row block does not fit (480 KB at K = 15360), and the two launches stay.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

from .autotune_cache import capability_major
from .gemm_w4a4_gluon import _pdl_end, _pdl_start
from .launch import launch

BLOCK_M = 16  # rows per program: one mma.sync row tile
GROUP = 64  # columns per shared-memory tile: one quantization group
UNROLL = 2  # 64-column tiles per loop step (independent work whose loads overlap)
WARPS = 16  # warps per program: the row block's elements spread over 512 threads
MAX_K = 3584  # 16 rows x 3584 x 2 bytes = 112 KB (tiles rounded up to the unroll): two programs per SM
_RINT = gl.constexpr("cvt.rni.f32.f32 $0, $1;")  # round half to even, apart from the multiply (no FMA contraction)


@gluon.jit
def _smoothed(x, cols, rmask, inv_ptr, K, shift, UNSIGNED: gl.constexpr, HAS_SMOOTH: gl.constexpr):
    """``act_quant._load_smoothed``'s arithmetic on a tile already in registers: (x + shift) · 1/λ, zero outside
    the rows and columns, clamped at 0 for unsigned codes."""
    kmask = cols < K
    xf = x.to(gl.float32) + shift
    if HAS_SMOOTH:
        xf = xf * gl.load(inv_ptr + cols, mask=kmask, other=1.0)[None, :]
    xf = gl.where(rmask[:, None] & kmask[None, :], xf, 0.0)
    if UNSIGNED:
        xf = gl.maximum(xf, 0.0)
    return xf


@gluon.jit
def _act_onepass_kernel(x_desc, inv_ptr, down_ptr, out_ptr, scale_ptr, lora_ptr,
                        M, K, KP, R, stride_dk, stride_om, stride_lm, shift,
                        QMAX: gl.constexpr, UMAX: gl.constexpr, QMIN: gl.constexpr, UNSIGNED: gl.constexpr,
                        HAS_SMOOTH: gl.constexpr, INT8_MODE: gl.constexpr, HAS_LORA: gl.constexpr,
                        BLOCK_R: gl.constexpr, NK: gl.constexpr, U: gl.constexpr, W: gl.constexpr,
                        PDL: gl.constexpr = 0):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    _pdl_start(PDL)
    row0 = gl.program_id(0) * BM
    NKU: gl.constexpr = (NK + U - 1) // U * U  # tiles past NK are never loaded: masked as columns past K
    tiles = gl.allocate_shared_memory(x_desc.dtype, [NKU, BM, BK], x_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar.index(0), count=1)
    mbarrier.expect(bar.index(0), NK * x_desc.block_type.nbytes)
    for i in gl.static_range(NK):  # the whole row block in flight at once (columns past K arrive as zeros)
        tma.async_copy_global_to_shared(x_desc, [row0, i * BK], bar.index(0), tiles.index(i))

    blk: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 2], threads_per_warp=[1, 32], warps_per_cta=[W, 1],
                                         order=[1, 0])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, W], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
    rmask = rows < M
    lk = gl.arange(0, BK, layout=gl.SliceLayout(0, blk))
    dk = gl.arange(0, BK, layout=gl.SliceLayout(1, b_layout))
    dr = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, b_layout))
    rmax = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, blk))
    part = gl.zeros([BM, BLOCK_R], gl.float32, layout=mma)
    mbarrier.wait(bar.index(0), 0)
    for i0 in range(0, NK, U):  # row maxima of the smoothed input, and the raw input times L1 (act_quant's pass 1),
        for j in gl.static_range(U):  # U tiles per step: independent work whose loads overlap
            ta = i0 + j
            x = tiles.index(ta).load(blk)
            cols = ta * BK + lk
            xf = _smoothed(x, cols, rmask, inv_ptr, K, shift, UNSIGNED, HAS_SMOOTH)
            rmax = gl.maximum(rmax, gl.max(gl.abs(xf), axis=1))
            if HAS_LORA:
                kk = ta * BK + dk
                d = gl.load(down_ptr + kk[:, None] * stride_dk + dr[None, :],
                            mask=(kk[:, None] < K) & (dr[None, :] < R), other=0.0)
                x = gl.where((cols < K)[None, :], x, 0.0)  # a tile past NK holds whatever shared memory held
                part = mma_v2(gl.convert_layout(x, a_layout), d.to(x.dtype), part)
    mbarrier.invalidate(bar.index(0))
    scale = gl.where(rmax > 0, gl.div_rn(rmax, gl.full([BM], QMAX * UMAX, gl.float32, layout=gl.SliceLayout(1, blk))),
                     1.0)
    gl.store(scale_ptr + rows, scale, mask=rmask)
    if HAS_LORA:
        lm = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        lr = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, mma))
        gl.store(lora_ptr + lm[:, None] * stride_lm + lr[None, :], part, mask=(lm < M)[:, None] & (lr < R)[None, :])
    for i0 in range(0, NK, U):  # codes, one 64-group per tile (as act_quant's pass 2 / _quantize_store)
        for j in gl.static_range(U):
            tb = i0 + j
            x = tiles.index(tb).load(blk)
            cols = tb * BK + lk
            xf = _smoothed(x, cols, rmask, inv_ptr, K, shift, UNSIGNED, HAS_SMOOTH)
            if INT8_MODE:
                inv_scale = gl.div_rn(gl.full([BM], 1.0, gl.float32, layout=gl.SliceLayout(1, blk)), scale)
                q = gl.inline_asm_elementwise(_RINT, "=r,r", [xf * inv_scale[:, None]], dtype=gl.float32,
                                              is_pure=True, pack=1)
                q = gl.minimum(gl.maximum(q, -127.0), 127.0)
            else:
                amax = gl.max(gl.abs(xf), axis=1)
                v = gl.ceil(gl.div_rn(amax, scale * QMAX))
                v = gl.minimum(gl.maximum(v, 1.0), UMAX * 1.0)
                inv_step = gl.div_rn(gl.full([BM], 1.0, gl.float32, layout=gl.SliceLayout(1, blk)), v * scale)
                q = gl.inline_asm_elementwise(_RINT, "=r,r", [xf * inv_step[:, None]], dtype=gl.float32,
                                              is_pure=True, pack=1)
                q = gl.minimum(gl.maximum(q, QMIN * 1.0), QMAX * 1.0)
                q = q * v[:, None]
            gl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], q.to(gl.int8),
                     mask=rmask[:, None] & (cols < KP)[None, :])
    _pdl_end(PDL)


def usable(x2: torch.Tensor, k_padded: int, proj_down: torch.Tensor | None) -> bool:
    """sm_90, a 16-bit input whose rows TMA can address, K within the shared memory of two programs per SM, and a
    16-bit branch (mma.sync on the input's type)."""
    m, k = x2.shape
    return (x2.is_cuda and torch.version.hip is None and capability_major(x2.device) == 9
            and x2.dtype in (torch.bfloat16, torch.float16) and x2.stride(1) == 1 and k_padded <= MAX_K
            and (x2.stride(0) * x2.element_size()) % 16 == 0 and x2.data_ptr() % 16 == 0 and m > 0
            and (proj_down is None or proj_down.dtype in (torch.bfloat16, torch.float16)))


def quantize_activation_onepass(x2: torch.Tensor, k_padded: int, inv: torch.Tensor | None,
                                proj_down: torch.Tensor | None, shift: float, unsigned: bool, qmax: int, umax: int,
                                qmin: int, int8_mode: bool, out: torch.Tensor, scale: torch.Tensor,
                                lora: torch.Tensor | None, num_warps: int | None = None,
                                unroll: int | None = None) -> None:
    """Fill ``out`` [M, Kp] int8, ``scale`` [M] and ``lora`` [M, R] (fp32) from x2 [M, K] in one launch (see
    ``act_quant.quantize_activation``, which calls this where ``usable``)."""
    m, k = x2.shape
    r = 0 if proj_down is None else proj_down.shape[1]
    num_warps = num_warps or WARPS
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, GROUP], gl.bfloat16 if x2.dtype == torch.bfloat16
                                                  else gl.float16)
    x_desc = GluonDescriptor(x2, [m, k], [x2.stride(0), 1], [BLOCK_M, GROUP], layout)
    launch(_act_onepass_kernel, (triton.cdiv(m, BLOCK_M),), (
        x_desc, inv if inv is not None else scale, proj_down if r else x2, out, scale, lora if r else scale,
        m, k, k_padded, r, proj_down.stride(0) if r else 0, out.stride(0), lora.stride(0) if r else 0, float(shift)),
        QMAX=qmax, UMAX=umax, QMIN=qmin, UNSIGNED=bool(unsigned), HAS_SMOOTH=inv is not None,
        INT8_MODE=bool(int8_mode), HAS_LORA=r > 0, BLOCK_R=max(8 * num_warps, triton.next_power_of_2(r)),
        NK=triton.cdiv(k_padded, GROUP), U=unroll or UNROLL, W=num_warps, num_warps=num_warps, pdl=True)
