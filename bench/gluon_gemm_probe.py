"""Probe: does a warp-specialized Gluon int8 GEMM beat the Triton TMA kernel's main loop on Hopper?

    python bench/gluon_gemm_probe.py [--json OUT]

One producer warp issues the TMA loads into a ring of shared-memory stages (ready/empty mbarriers); the default
partition (two warpgroups) issues asynchronous wgmma, keeps one in flight, frees each stage as the next MMA
starts, and runs the epilogue (per-token and per-channel scales, bias, 16-bit store) while the producer already
loads the next tile. Compared at the FLUX shapes with ``w4a4_gemm`` (rank 0, the same epilogue) and cuBLAS bf16,
CUDA-graph µs, same run. A measurement tool, not a shipped kernel: results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@gluon.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@gluon.jit
def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, KP,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(KP, BK)
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
def _consumer(a_bufs, b_bufs, ready, empty, ascale_ptr, wscale_ptr, bias_ptr, c_ptr, M, N, KP, stride_cm,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
              INSTR_N: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr):
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, INSTR_N, 32])
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(KP, BK)
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = gl.zeros([BM, BN], gl.int32, layout=layout)
        for ki in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=ki > 0)  # the previous MMA is done
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
        rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        sa = gl.load(ascale_ptr + rm, mask=rm < M, other=0.0)
        sw = gl.load(wscale_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(gl.float32) * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            y += gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        gl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def gluon_w8a8_gemm_kernel(a_desc, b_desc, ascale_ptr, wscale_ptr, bias_ptr, c_ptr, M, N, KP, stride_cm,
                           STAGES: gl.constexpr, GROUP_M: gl.constexpr, INSTR_N: gl.constexpr, HAS_BIAS: gl.constexpr,
                           num_warps: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (a_bufs, b_bufs, ready, empty, ascale_ptr, wscale_ptr, bias_ptr, c_ptr, M, N, KP, stride_cm,
                     BM, BN, BK, STAGES, GROUP_M, INSTR_N, HAS_BIAS, num_warps)),
        (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, KP, BM, BN, BK, STAGES, GROUP_M)),
    ], [1], [40])


def gluon_w8a8_gemm(a8, ascale, w8, wscale, bias, out_dtype=torch.bfloat16, bm=128, bn=256, bk=128, stages=4,
                    warps=8, programs=None):
    m, kp = a8.shape
    n = w8.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a8.device)
    a_desc = TensorDescriptor.from_tensor(a8, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8))
    b_desc = TensorDescriptor.from_tensor(w8, [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (min(tiles, programs or torch.cuda.get_device_properties(a8.device).multi_processor_count),)
    gluon_w8a8_gemm_kernel[grid](a_desc, b_desc, ascale, wscale, bias if bias is not None else wscale, out, m, n, kp,
                                 out.stride(0), STAGES=stages, GROUP_M=8, INSTR_N=min(bn, 128),
                                 HAS_BIAS=bias is not None, num_warps=warps)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    import _path  # noqa: F401
    import triton.testing
    from linear import M4608, make_layer
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    rows = []
    for k, n in M4608:
        m = 4608
        layer = make_layer(n, k, 0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, _ = quantize_activation(x, layer.k_padded, layer.smooth, None)
        w8 = expand_weight(layer.qweight, layer.wmult)
        ref = w4a4_gemm(a8, sa, w8, layer.wscale, None, None, layer.bias, torch.bfloat16)
        row = {"K": k, "N": n,
               "bf16": triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb), rep=50) * 1e3,
               "triton": triton.testing.do_bench_cudagraph(
                   lambda: w4a4_gemm(a8, sa, w8, layer.wscale, None, None, layer.bias, torch.bfloat16), rep=50) * 1e3}
        for bm, bn, bk, st, w in [(128, 256, 128, 4, 8), (128, 256, 64, 6, 8), (128, 128, 128, 5, 8), (128, 256, 128, 3, 8)]:
            name = f"gluon_{bm}x{bn}x{bk}_s{st}_w{w}"
            try:
                y = gluon_w8a8_gemm(a8, sa, w8, layer.wscale, layer.bias, bm=bm, bn=bn, bk=bk, stages=st, warps=w)
                row[name + "_exact"] = bool(torch.equal(y, ref))
                row[name + "_maxdiff"] = float((y.float() - ref.float()).abs().max())
                row[name] = triton.testing.do_bench_cudagraph(
                    lambda: gluon_w8a8_gemm(a8, sa, w8, layer.wscale, layer.bias, bm=bm, bn=bn, bk=bk, stages=st, warps=w),
                    rep=50) * 1e3
            except Exception as exc:
                print(f"{name} failed: {str(exc)[-1500:]}", flush=True)
        print("probe", {a: (round(b, 1) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
