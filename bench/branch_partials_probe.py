"""Which activation-kernel path computes the low-rank down-projection ``x · L1`` right: each pass-1 variant's branch
product against the fp32 product, repeated (a race shows up as a result that changes between runs). Needs a GPU.

Why: at 8192 × 3072, rank 96, the unrolled pass 1 and the TMA stream disagreed by 2e-3 on the H100 (session 17),
where both should be within ~1e-6 of the fp32 product (bf16 inputs, fp32 accumulation). The stream's one wide
branch MMA was wrong (1e-3 to 1e-2, changing from run to run); it now runs the branch as 32-wide MMAs.

    python3 bench/branch_partials_probe.py [--sweep | --small-m]

``--sweep``: only the TMA stream's knobs at rank 96 (stages, rows per tile), each checked against the fp32 product
and timed under CUDA graphs, with each compiled variant's shared memory and registers. (Session 18 also swept the
branch weights by TMA instead of pointer loads: 1-4% slower everywhere, removed.)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from linear import bench_graph, make_layer  # noqa: E402

from svdq.kernels.act_quant import quantize_activation  # noqa: E402


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
if "--small-m" in sys.argv:  # the text tokens' row counts at rank 96: the default pass-1 tiles against 1 a program
    for m in (512, 1024):
        layer = make_layer(64, 3072, 96)
        x = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ layer.proj_down.float()
        for name, kw in (("default", {}), ("1 tile a program", dict(k_per_program=1))):
            errs = [rel(quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, **kw)[2], ref)
                    for _ in range(3)]
            us = bench_graph(lambda: quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, **kw))
            print(f"M {m} K 3072 r 96 {name:18s} {us:6.1f} µs, rel {max(errs):.1e}", flush=True)
    sys.exit(0)
if "--sweep" in sys.argv:
    for m, k in ((4608, 3072), (4608, 15360), (9216, 3072), (4608, 12288)):
        layer = make_layer(64, k, 96)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ layer.proj_down.float()
        for bm in (64, 128):
            for stages in (2, 3, 4):
                kw = dict(stream=True, block_m=bm, stream_stages=stages)
                try:
                    errs = [rel(quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, **kw)[2],
                                ref) for _ in range(3)]
                    us = bench_graph(lambda: quantize_activation(x, layer.k_padded, layer.smooth,
                                                                 layer.proj_down, **kw))
                except Exception as exc:  # a tile that does not fit shared memory, say
                    print(f"M {m} K {k} bm {bm} stages {stages}: failed {str(exc)[:80]}", flush=True)
                    continue
                flag = "  <-- WRONG" if max(errs) > 1e-4 else ""
                print(f"M {m} K {k} bm {bm} stages {stages}: {us:7.1f} µs, rel "
                      f"{max(errs):.1e}{flag}", flush=True)
    from svdq.kernels.act_quant import _act_stats_stream_kernel

    try:  # shared memory and registers of every compiled variant: what limits programs per SM
        for cache in _act_stats_stream_kernel.device_caches.values():
            for key, kern in cache[0].items():
                print(f"compiled: shared {kern.metadata.shared} B, {kern.n_regs} regs, {str(key)[-160:]}")
    except Exception as exc:
        print(f"no compiled-kernel metadata: {exc}")
    sys.exit(0)
for m, k, r in ((4608, 3072, 96), (8192, 3072, 96), (9216, 3072, 96), (8192, 3072, 32), (8192, 12288, 96)):
    layer = make_layer(64, k, r)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    ref = x.float() @ layer.proj_down.float()  # the branch reads the unsmoothed input (the reference does)
    variants = [(f"unrolled ksub {s}{' ew' if ew else ''}{' w' + str(w) if w else ''}",
                 dict(stream=False, k_per_program=s, ew_max=ew, num_warps=w))
                for s in (1, 2, 3, 4) for ew in (False, True) for w in (None, 4)]
    variants += [(f"stream tiles {t}", dict(stream=True, k_per_program=t)) for t in (2, 4, 8, 12, 16)]
    variants += [("auto", {})]
    for name, kw in variants:
        errs = []
        try:
            for _ in range(3):
                _, _, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, **kw)
                errs.append(rel(lora, ref))
        except ValueError as exc:  # the stream refuses a branch wider than STREAM_MAX_RANK
            print(f"M {m} K {k} r {r} {name:28s} refused: {str(exc)[:60]}", flush=True)
            continue
        flag = "  <-- WRONG" if max(errs) > 1e-4 else ""
        print(f"M {m} K {k} r {r} {name:28s} rel {' '.join(f'{e:.1e}' for e in errs)}{flag}", flush=True)


# speed of both passes under CUDA graphs at the FLUX shapes: rank 96 (rank 32 plus a LoRA of 64) by the unrolled
# pass 1 and by the stream at its default stages and at 4 (the default up to session 17), with twice the default K
# tiles a program (half the partials to write and sum); rank 32 and rank 0 for scale
import triton  # noqa: E402

from svdq.kernels.act_quant import stream_tiles_per_program  # noqa: E402

print("graph µs, both passes | r96: unrolled, stream default stages, 4 stages, 2x tiles | r32 | r0", flush=True)
for m, k in ((4608, 3072), (4608, 12288), (4608, 15360), (9216, 3072), (9216, 15360), (1024, 3072), (512, 3072)):
    tiles = stream_tiles_per_program(triton.cdiv(m, 64), k // 128, 96, torch.device("cuda"))
    row = []
    for r, kw in ((96, dict(stream=False)), (96, {}), (96, dict(stream_stages=4)),
                  (96, dict(k_per_program=min(16, 2 * tiles))), (32, {}), (0, {})):
        layer = make_layer(64, k, r)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row.append(bench_graph(lambda: quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, **kw)))
    print(f"M {m} K {k}: r96 {row[0]:.1f} / {row[1]:.1f} / {row[2]:.1f} / {row[3]:.1f} | r32 {row[4]:.1f} | "
          f"r0 {row[5]:.1f}", flush=True)
