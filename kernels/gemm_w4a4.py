"""4-bit GEMM on int8 tensor cores with the low-rank up-projection, bias and GELU fused into the epilogue.

Reference: ``kernels.reference.svdq_linear_reference`` (INT4 path).

Hopper has no 4-bit MMA, and consuming the dot result per 64-group inside the K loop serialises the wgmma
pipeline (measured 0.4× bf16). With integer group multipliers both operands are plain int8 (``code * mult``),
so the main loop is one exact int32 accumulation over all of K, and only the per-token and per-channel float
scales remain, applied once in the epilogue together with ``lora_act · proj_upᵀ`` and the bias.

The 4-bit weights stay 4-bit in memory; ``expand_weight`` unpacks them to int8 just in time into a reused
per-device workspace (a bandwidth-bound pass over 16-bit words of four codes, 3–10% of the GEMM). For at most
``dispatch.PACKED_MAX_M`` rows, where that pass is a large share of the layer, ``gemm_w4a4_packed`` multiplies the
packed codes directly instead.

Schedules of the same product, picked per shape by one tuner (configs name their kernel): a grouped
one-tile-per-program kernel with pointer loads (any GPU Triton supports), on sm_90+ a persistent kernel fed by
TMA (bulk tensor copies), 10–14% faster on the H100 at FLUX shapes, and on sm_90 the warp-specialized Gluon
kernel of ``gemm_w4a4_gluon`` (another 12–13% at K = 12288 / 15360).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune_cache import TunedKernel, capability_major, fp32_dots, interpreting, sm_count
from .settings import getenv
from .launch import (HAS_HOST_DESCRIPTORS, TensorDescriptor, gdc_launch_dependents, gdc_wait, launch, pdl_end,
                     pdl_start)

try:  # Gluon (Triton >= 3.5): the warp-specialized Hopper schedule
    from . import gemm_w4a4_gluon

    HAS_GLUON = True
except Exception:  # pragma: no cover - depends on the Triton version
    HAS_GLUON = False


@triton.jit
def _expand_words_kernel(p_ptr, mult_ptr, out_ptr, N, W16, stride_p, stride_mult, stride_o,
                         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr = False):
    """16-bit words of 4 codes [N, Kp/4] × mult [N, Kp/64] → int32 words of 4 int8 operands [N, Kp/4].

    Purely elementwise (no interleave), so loads and stores are 16-byte vectors. Each multiplier is loaded once
    and broadcast over its group's 16 words (a byte gather per word, staged through shared memory, made the
    kernel 1.13-1.39x slower on the H100: ``bench/results-expand-ab-session9-h100.log``)."""
    if PDL == 1:  # the next kernel (the GEMM) may launch now; this one's loads (constant weights) need no wait
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    g = pid_w * (BLOCK_W // 16) + tl.arange(0, BLOCK_W // 16)  # a 64-group is 16 words: one multiplier each
    m2 = (n < N)[:, None] & (w < W16)[None, :]
    p = tl.load(p_ptr + n[:, None] * stride_p + w[None, :], mask=m2, other=0).to(tl.int32)
    u = tl.load(mult_ptr + n[:, None] * stride_mult + g[None, :], mask=(n < N)[:, None] & (g * 16 < W16)[None, :],
                other=0).to(tl.int32)
    p = tl.reshape(p, [BLOCK_N, BLOCK_W // 16, 16])
    u = u[:, :, None]  # broadcast over the group's words, not one byte load per word
    b0 = ((((p << 28) >> 28) * u) & 0xFF)
    b1 = ((((p << 24) >> 28) * u) & 0xFF) << 8
    b2 = ((((p << 20) >> 28) * u) & 0xFF) << 16
    b3 = (((p << 16) >> 28) * u) << 24
    if PDL > 0:  # the workspace may still be read by the kernel before (the previous layer's GEMM)
        gdc_wait()
    tl.store(out_ptr + n[:, None] * stride_o + w[None, :], tl.reshape(b0 | b1 | b2 | b3, [BLOCK_N, BLOCK_W]), mask=m2)
    pdl_end(PDL)


def expand_weight(qweight: torch.Tensor, wmult: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """INT4 codes × group multipliers as the int8 [N, Kp] GEMM operand (``reference.int8_weight_operand``)."""
    n, half = qweight.shape
    kp = half * 2
    if out is None:
        out = torch.empty(n, kp, dtype=torch.int8, device=qweight.device)
    elif not out.is_contiguous() or out.shape != (n, kp) or out.dtype != torch.int8:
        raise ValueError(f"expand_weight needs a contiguous int8 [{n}, {kp}] output, got {out.dtype} {tuple(out.shape)}")
    qweight = qweight if qweight.is_contiguous() else qweight.contiguous()
    p16, o32 = qweight.view(torch.int16), out.view(torch.int32)  # Kp is a multiple of 64: whole words
    words = kp // 4
    bn, bw = 16, 256
    grid = (triton.cdiv(n, bn), triton.cdiv(words, bw))
    launch(_expand_words_kernel, grid, (p16, wmult, o32, n, words, p16.stride(0), wmult.stride(0), o32.stride(0)),
           BLOCK_N=bn, BLOCK_W=bw, num_warps=4, pdl=True)
    return out


@triton.jit
def _gelu_tanh(y):
    c = 0.7978845608028654
    u = c * (y + 0.044715 * y * y * y)
    t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    return 0.5 * y * (1.0 + t)


@triton.jit
def _epilogue(acc, rm, rn, M, N, R, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr, stride_lm, stride_un,
              stride_cm, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, DOT_FP32: tl.constexpr,
              BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Scales, low-rank up-projection (accumulated into the same registers), bias, GELU, one 16-bit store.

    The branch is taken R_CHUNK ranks at a time, so a LoRA-widened branch (rank 96 = 32 + 64, say) is neither
    padded to a power of two nor staged in shared memory all at once (which pushed the best tiles out)."""
    mmask = rm < M
    nmask = rn < N
    sa = tl.load(ascale_ptr + rm, mask=mmask, other=0.0)
    sw = tl.load(wscale_ptr + rn, mask=nmask, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_LORA:
        for r0 in tl.static_range(0, BLOCK_R, R_CHUNK):
            rr = r0 + tl.arange(0, R_CHUNK)
            la = tl.load(lora_ptr + rm[:, None] * stride_lm + rr[None, :], mask=mmask[:, None] & (rr[None, :] < R),
                         other=0.0)
            up = tl.load(up_ptr + rn[None, :] * stride_un + rr[:, None], mask=nmask[None, :] & (rr[:, None] < R),
                         other=0.0)
            if DOT_FP32:
                y = tl.dot(la, up.to(tl.float32), y, input_precision="ieee")
            else:
                y = tl.dot(la.to(up.dtype), up, y)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        y += bias[None, :]
    if GELU:
        y = _gelu_tanh(y)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    cmask = mmask[:, None] & nmask[None, :]
    if ACCUMULATE:  # add to what the output holds (the other half of a layer split by input columns)
        y += tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _w4a4_gemm_kernel(
    a_ptr, b_ptr, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr,
    M, N, KP, R,
    stride_am, stride_bn, stride_lm, stride_un, stride_cm,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, DOT_FP32: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm_c = tl.where(rm < M, rm, 0)  # clamped rows/cols keep loads in bounds without masks in the main loop
    rn_c = tl.where(rn < N, rn, 0)
    a_ptrs = a_ptr + rm_c[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn_c[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, KP, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = (k0 + rk) < KP
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    _epilogue(acc, rm, rn, M, N, R, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr, stride_lm, stride_un,
              stride_cm, HAS_LORA, HAS_BIAS, GELU, DOT_FP32, BLOCK_R, R_CHUNK, ACCUMULATE)
    pdl_end(PDL)


@triton.jit
def _w4a4_gemm_tma_kernel(
    a_desc, b_desc, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr,
    M, N, KP, R,
    stride_lm, stride_un, stride_cm, NUM_PROGRAMS,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, DOT_FP32: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, PDL: tl.constexpr = False,
):
    """Hopper schedule of the same product: one program per SM walks the output tiles (grouped order), operands
    arrive by TMA (bulk tensor copies, out-of-range rows and columns zero-filled), and the flattened tile loop
    lets the compiler overlap one tile's epilogue with the next tile's loads."""
    pdl_start(PDL)
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(KP, BLOCK_K)
    num_tiles = num_m * num_n
    group = GROUP_M * num_n
    for tile in tl.range(start, num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        gid = tile // group
        first_m = gid * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + ((tile % group) % size_m)
        pid_n = (tile % group) // size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            b = b_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        _epilogue(acc, rm, rn, M, N, R, ascale_ptr, wscale_ptr, lora_ptr, up_ptr, bias_ptr, c_ptr, stride_lm,
                  stride_un, stride_cm, HAS_LORA, HAS_BIAS, GELU, DOT_FP32, BLOCK_R, R_CHUNK, ACCUMULATE)
    pdl_end(PDL)


def _pointer_configs():
    out = []
    for bm, bn, bk, w, s in [
        (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
        (128, 256, 128, 8, 4), (256, 128, 128, 8, 4), (128, 128, 256, 8, 3), (64, 256, 128, 4, 4),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 3), (32, 64, 128, 4, 3),
    ]:
        out.append(triton.Config({"SCHEDULE": "pointer", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=w, num_stages=s))
    return out


def _tma_configs():
    out = []
    for bm, bn, bk, w, s in [
        (128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (256, 128, 128, 8, 4),
        (128, 128, 128, 8, 4), (128, 128, 256, 8, 3), (128, 128, 128, 4, 4), (128, 256, 64, 8, 5),
        (128, 256, 256, 8, 2), (256, 128, 256, 8, 2),
    ]:
        for flat in (True, False):
            out.append(triton.Config({"SCHEDULE": "tma", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                                      "FLATTEN": flat}, num_warps=w, num_stages=s))
    # Two programs per SM (80-96 KB shared memory each): one program's epilogue overlaps the other's main loop,
    # and the finer tiles leave less idle in the last wave at N = 3072 (H200 sweep, bench/kernel_variants.py).
    for bm, bn, bk, w, s in [(128, 128, 64, 4, 4), (64, 256, 64, 4, 4)]:
        out.append(triton.Config({"SCHEDULE": "tma", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                                  "FLATTEN": True, "PER_SM": 2}, num_warps=w, num_stages=s))
    return out


def _ws_configs():
    return [triton.Config(kw, num_warps=w, num_stages=1) for kw, w in gemm_w4a4_gluon.ws_configs()] if HAS_GLUON else []


class _GemmTuned(TunedKernel):
    """The GEMM schedules under one shape-keyed tuner: each config names its kernel (``SCHEDULE``), so the
    cached winner per shape may be any of them. TMA and Gluon configs get descriptors for their tile shape at
    launch; Gluon configs are candidates only where that kernel can run (sm_90, a bf16 or no branch)."""

    def _default_order(self, configs: list, args: tuple) -> list:
        """Untuned calls (``SVDQ_AUTOTUNE=0``, CUDA-graph capture before tuning) start from the measured winners:
        the ping-pong Gluon kernel for large layers, then the 128 × 256 × 128 four-stage TMA tile; the two-per-SM
        128 × 128 × 64 tile for small M or N, where the ping-pong kernel leads only at K ≥ 8192 (H100/H200 sweeps in
        BENCHMARKS.md)."""
        m, n, kp = args[8], args[9], args[10]
        small = m <= 1024 or n <= 3072
        key = (small, kp >= 8192, len(configs))  # configs: this tuner's list, less the ones the call cannot take
        hit = self.__dict__.setdefault("_orders", {}).get(key)
        if hit is not None:
            return hit
        pingpong = ("pingpong", 128, 128, 128)
        if kp >= 8192:
            want = [pingpong, ("gluon", 128, 256, 128)]
        else:
            want = [] if small else [pingpong]
        want += [("tma", 128, 128, 64), ("tma", 128, 256, 128)] if small else [("tma", 128, 256, 128), ("tma", 128, 128, 64)]

        def rank(c):
            kw = c.kwargs
            key = ("pingpong" if kw.get("PINGPONG") else kw.get("SCHEDULE"), kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"])
            stages_ok = kw.get("SCHEDULE") != "tma" or c.num_stages == 4  # the four-stage variants won
            return want.index(key) if key in want and stages_ok and kw.get("FLATTEN", True) else len(want)

        self._orders[key] = order = sorted(configs, key=rank)  # stable: everything else keeps its order
        return order

    def _candidates(self, args: tuple, flags: dict) -> list:
        ws_ok = HAS_GLUON and not flags.get("DOT_FP32") and gemm_w4a4_gluon.usable(args[0], args[5] if flags.get("HAS_LORA") else None)
        return [c for c in self.configs if ws_ok or c.kwargs.get("SCHEDULE") != "gluon"]

    def _tuning_args(self, args: tuple, flags: dict) -> tuple[tuple, dict]:
        """Candidates must not add into the real output again and again: an accumulating call is tuned as a
        plain one on scratch output (the extra load in the epilogue does not change which tile wins)."""
        if not flags.get("ACCUMULATE"):
            return args, flags
        m, n = args[8], args[9]
        scratch = torch.empty(m, n, dtype=args[7].dtype, device=args[7].device)
        return args[:7] + (scratch,) + args[8:16] + (scratch.stride(0),), {**flags, "ACCUMULATE": False}

    def _launch(self, cfg: dict, args: tuple, flags: dict, m: int, n: int) -> None:
        kw = dict(cfg["kwargs"])
        bm, bn = kw["BLOCK_M"], kw["BLOCK_N"]
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        schedule = kw.pop("SCHEDULE")
        if schedule == "gluon":
            gemm_w4a4_gluon.launch_ws(kw, cfg["num_warps"], args, flags, m, n)
        elif schedule == "tma":
            a8, w8, kp = args[0], args[1], args[10]
            a_desc = TensorDescriptor(a8, [m, kp], [a8.stride(0), 1], [bm, kw["BLOCK_K"]])
            b_desc = TensorDescriptor(w8, [n, kp], [w8.stride(0), 1], [bn, kw["BLOCK_K"]])
            programs = min(tiles, sm_count(a8.device) * kw.pop("PER_SM", 1))
            launch(_w4a4_gemm_tma_kernel, (programs,), (a_desc, b_desc) + args[2:12] + args[14:17] + (programs,),
                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], pdl=True, **flags, **kw)
        else:
            kw["EVEN_K"] = args[10] % kw["BLOCK_K"] == 0
            launch(_w4a4_gemm_kernel, (tiles,), args, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                   pdl=True, **flags, **kw)


_TUNERS = {
    "pointer": _GemmTuned("w4a4_gemm_pointer", _pointer_configs()),
    "tma": _GemmTuned("w4a4_gemm_tma", _tma_configs()),
    "gluon": _GemmTuned("w4a4_gemm_gluon", _ws_configs()),
    "auto": _GemmTuned("w4a4_gemm_auto_ws", _pointer_configs() + _tma_configs() + _ws_configs()),
}


def gemm_schedule(device: torch.device) -> str:
    """Which configs the tuner may pick from: ``auto`` (every kernel on sm_90+, where TMA exists), ``tma``,
    ``gluon`` (the warp-specialized Hopper kernel) or ``pointer``; ``SVDQ_GEMM`` overrides."""
    choice = getenv("SVDQ_GEMM", "auto").lower()
    if choice in ("tma", "pointer") or (choice == "gluon" and HAS_GLUON):
        return choice
    if HAS_HOST_DESCRIPTORS and not interpreting() and torch.version.hip is None and capability_major(device) >= 9:
        return "auto"  # NVIDIA sm_90+ (ROCm reports gfx94x as capability 9 too, without TMA)
    return "pointer"


def branch_chunks(rank: int) -> tuple[int, int]:
    """(ranks the epilogue covers, ranks per dot): the rank rounded up to 16, taken 64, 32 or 16 at a time."""
    padded = max(16, -(-rank // 16) * 16)
    return padded, next(c for c in (64, 32, 16) if padded % c == 0)


def gemm_output(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, device: torch.device,
                accumulate: bool) -> torch.Tensor:
    """The GEMM's [M, N] output: a new tensor, or the given one checked (any row stride, unit column stride)."""
    if out is None:
        if accumulate:
            raise ValueError("accumulate needs an output to add to")
        return torch.empty(m, n, dtype=dtype, device=device)
    if out.shape != (m, n) or out.stride(1) != 1 or out.dtype != dtype or out.device != device:
        raise ValueError(f"output must be {dtype} [{m}, {n}] with unit column stride on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    return out


def w4a4_gemm(
    a8: torch.Tensor,
    ascale: torch.Tensor,
    w8: torch.Tensor,
    wscale: torch.Tensor,
    lora_act: torch.Tensor | None,
    proj_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    gelu: bool = False,
    config: dict | None = None,
    schedule: str | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """y [M, N] = (a8 · w8ᵀ) · ascale · wscale + lora_act · proj_upᵀ + bias (then GELU).

    ``out``: an [M, N] tensor (any row stride, unit column stride) to write into, e.g. a column slice of a wider
    output; with ``accumulate`` y is added to what it holds."""
    m, kp = a8.shape
    n = w8.shape[0]
    r = 0 if proj_up is None else proj_up.shape[1]
    out = gemm_output(out, m, n, out_dtype, a8.device, accumulate)
    block_r, r_chunk = branch_chunks(r)
    args = (
        a8, w8, ascale, wscale, lora_act if r else ascale, proj_up if r else ascale, bias if bias is not None else ascale, out,
        m, n, kp, r,
        a8.stride(0), w8.stride(0), lora_act.stride(0) if r else 0, proj_up.stride(0) if r else 0, out.stride(0),
    )
    flags = dict(HAS_LORA=r > 0, HAS_BIAS=bias is not None, GELU=gelu, BLOCK_R=block_r, R_CHUNK=r_chunk,
                 DOT_FP32=fp32_dots(a8, proj_up), ACCUMULATE=bool(accumulate))
    _TUNERS[schedule or gemm_schedule(a8.device)](args, flags, config=config)
    return out
