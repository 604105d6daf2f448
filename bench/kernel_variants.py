"""A/B of the kernel choices dispatch makes, in one run: which schedule each default should take.

    python bench/kernel_variants.py [--json OUT] [--shapes all|first|none]

Same process, same data, same GPU for every pair; µs are medians of ``triton.testing.do_bench``:
  gemm     the int8 GEMM with the rank-32 epilogue: grouped pointer kernel vs persistent TMA kernel vs the tuner
           choosing from both (each autotuned from an empty cache), eager and CUDA-graph replay, the chosen
           configs, and ``torch._int_mm`` as a reference point
  w4a16    small-M W4A16: CUDA-core word kernel vs the tensor-core kernel (M padded to 16), cuBLAS bf16 alongside
  gemmcfg  every TMA GEMM tile config one by one (CUDA-graph µs), including configs that run two programs per SM
           (``PER_SM``: one program's epilogue overlaps the other's main loop, and finer tiles cut the last-wave loss
           at N = 3072), with bf16 alongside
  w4a16tile the M = 1 W4A16 kernel over its tile knobs (rows and groups per program, the next step's words
           prefetched or not, warps)
  w4a16pairs the tensor-core W4A16 kernel on 32-bit words (pairs of codes) over its tiles, against the word kernel
           and the 16-bit-word tensor-core kernel, M = 1, 2, 16
  w4a16cold the pair kernel's tiles warm (graph replay) and with L2 flushed before each call (by a read, by a write)
  actpass2 the activation kernels around their session-9 defaults: pass 2's tile (rows, warps, 64-groups) and
           pass 1's (rows, warps, 64-groups), 1/λ precomputed as dispatch passes it
  actstream pass 1 of the activation kernels by TMA stream (a pipelined loop of K tiles) against the unrolled
           kernel, with each pass's device time, at the batch-1 and batch-2 FLUX shapes
  act      the activation kernel pair under CUDA-graph replay over its tile knobs (rows per program, 64-groups
           per K tile, warps, K tiles per pass-1 program, pass 2's visiting order), rank 32 and a LoRA-widened
           rank 96, against its memory floor (x read twice, the int8 operand written once, at the copy rate)

Variants measured and removed (numbers in BENCHMARKS.md, raw runs in bench/results-*-variants-h100.*): the
byte-wise weight expansion, the CUDA-core W4A16 kernel with per-step reductions, a one-launch activation
kernel (2× slower than the split-K pair at M = 4608), the two passes in one launch chunk by chunk of rows with
counters between them (1.3-2.7× slower, session 9: bench/results-act-one-launch*-h100.log), a one-pass Gluon kernel
holding 16 rows × all of K in shared memory (2-7× slower, session 11, commit a046b40:
bench/results-act-onepass*-session11-h100.log), and the weight expansion launched together with pass 1 or
pass 2 of the activation kernels (those kernels 4–10% faster, the layer 2–6% slower: the GEMM then finds its
expanded weights only partly in L2; bench/results-fused-expansion-*-h200.log).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from _results import write_json  # noqa: E402

from linear import M4608, bench, make_layer  # noqa: E402


def gemm_rows(shapes, triton) -> list[dict]:
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import _TUNERS, expand_weight, w4a4_gemm

    rows = []
    for k, n in shapes:
        m = 4608
        layer = make_layer(n, k, 32)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
        w8 = expand_weight(layer.qweight, layer.wmult)
        row = {"M": m, "K": k, "N": n}
        ys = {}
        for sched in ("pointer", "tma", "auto"):
            def fn(s=sched):
                return w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, schedule=s)

            try:
                ys[sched] = fn()
                row[sched] = bench(fn)
                row[sched + "_graph"] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
                row[sched + "_cfg"] = str(next(iter(_TUNERS[sched]._fast.values()), None))
                _TUNERS[sched]._fast.clear()
            except Exception as exc:
                print(f"{sched} failed: {str(exc)[-1500:]}", flush=True)
                row[sched] = float("nan")
        if "tma" in ys and "pointer" in ys:
            row["max_rel_diff"] = float((ys["tma"].float() - ys["pointer"].float()).abs().max() / ys["pointer"].float().abs().max())
        row["int_mm"] = bench(lambda: torch._int_mm(a8, w8.T))
        rows.append(row)
        print("gemm", row, flush=True)
    return rows


GEMM_CANDIDATES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM)
    (128, 256, 256, 8, 2, 1), (128, 256, 128, 8, 3, 1), (256, 128, 256, 8, 2, 1), (128, 256, 128, 8, 4, 1),
    (64, 256, 128, 4, 4, 1), (64, 256, 256, 4, 2, 1), (64, 256, 128, 8, 3, 1), (128, 128, 256, 8, 2, 1),
    (128, 128, 128, 8, 2, 1), (128, 128, 128, 4, 2, 2), (128, 128, 64, 4, 4, 2), (64, 256, 128, 4, 2, 2),
    (64, 256, 64, 4, 4, 2), (128, 128, 128, 8, 2, 2),
]


def gemm_config_rows(triton) -> list[dict]:
    """One row per (shape, config): the TMA GEMM with the rank-32 epilogue under CUDA-graph replay."""
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    rows = []
    for m, k, n in [(4608, k, n) for k, n in M4608] + [(512, 3072, 12288), (1024, 3072, 12288)]:
        layer = make_layer(n, k, 32)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
        w8 = expand_weight(layer.qweight, layer.wmult)
        row = {"M": m, "K": k, "N": n,
               "bf16_graph": triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb), rep=50) * 1e3}
        ref = None
        for bm, bn, bk, w, st, per_sm in GEMM_CANDIDATES:
            for flat in ((True, False) if (bm, bn, bk, w, st, per_sm) in GEMM_CANDIDATES[:2] else (True,)):
                cfg = {"kwargs": {"SCHEDULE": "tma", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                                  "FLATTEN": flat, "PER_SM": per_sm}, "num_warps": w, "num_stages": st}
                name = f"{bm}x{bn}x{bk}_w{w}_s{st}_p{per_sm}_{'flat' if flat else 'nest'}"

                def fn(c=cfg):
                    return w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, config=c)

                try:
                    y = fn()
                    if ref is None:
                        ref = y
                    elif not torch.equal(y, ref):
                        row[name + "_differs"] = float((y.float() - ref.float()).abs().max())
                    row[name] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
                except Exception as exc:
                    row[name] = float("nan")
                    print(f"{name} failed: {str(exc)[-300:]}", flush=True)
        timed = {c: v for c, v in row.items() if "x" in c and isinstance(v, float) and not math.isnan(v) and not c.endswith("_differs")}
        best = min(timed, key=timed.get)
        row["best"], row["best_us"] = best, timed[best]
        print(f"gemmcfg M={m} {k}->{n}: bf16 {row['bf16_graph']:.1f} best {best} {timed[best]:.1f} (x{row['bf16_graph'] / timed[best]:.2f}); "
              + ", ".join(f"{c} {v:.1f}" for c, v in sorted(timed.items(), key=lambda t: t[1])), flush=True)
        rows.append(row)
    return rows


def w4a16_tile_rows(triton) -> list[dict]:
    """The word kernel over its tile knobs (rows and 64-groups per program, prefetch, warps), CUDA-graph µs: M = 1,
    and M = 2 (both rows sharing each unpacked weight) against the 16-bit-word rows kernel.

    A multi-row variant of it (one 4-D register tile for up to 4 rows) measured 1.9-30x slower than the kernels it
    was to replace (register spills; ``bench/results-w4a16-words-h100.log``) and was removed; so was a form with
    three shifts a word instead of eight (within ±3%, ``bench/results-w4a16-three-shifts-h100.log``), and a prefetch
    two K steps ahead (three in flight: no gain, 21.3 vs 20.5 µs at 3072->18432; ``bench/results-w4a16-prefetch2-h100.log``,
    its ``pf2`` columns, session 9)."""
    from svdq.kernels.gemv_w4a16 import _w4a16_gemv_one_row, _w4a16_gemv_rows

    rows = []
    for m, k, n in [(1, 3072, 18432), (1, 3072, 9216), (1, 3072, 3072), (2, 3072, 18432), (2, 3072, 9216), (2, 3072, 3072)]:
        layer = make_layer(n, k, 0, kind="w4a16")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        inv = torch.reciprocal(layer.smooth.float())
        row = {"M": m, "K": k, "N": n,
               "bf16_graph": triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb, layer.bias), rep=50) * 1e3}
        fns = {}  # (rows, 64-groups, prefetch, warps); M = 1: the first is the old default; M = 2: the word kernel
        # with both rows sharing each unpacked weight against the 16-bit-word rows kernel that served M = 2
        tiles = ([(32, 16, False, 4), (16, 8, False, 2), (16, 8, True, 2), (32, 8, True, 2), (8, 8, True, 2),
                  (16, 16, True, 2), (16, 8, True, 1), (32, 8, True, 1), (16, 4, True, 1), (32, 4, True, 2)] if m == 1 else
                 [(16, 4, True, 1), (8, 4, True, 1), (16, 8, True, 2), (8, 8, True, 2), (8, 8, True, 1), (16, 4, True, 2),
                  (32, 4, True, 2), (8, 4, True, 2)])
        if m == 2:
            fns["rows_kernel"] = lambda: _w4a16_gemv_rows(x, layer.qweight, layer.wmult, layer.wscale, layer.smooth,
                                                          layer.bias, torch.bfloat16)
        for bn, bg, pf, w in tiles:
            fns[f"n{bn}_g{bg}{'_pf' if pf else ''}_w{w}"] = (
                lambda bn=bn, bg=bg, pf=pf, w=w: _w4a16_gemv_one_row(x, layer.qweight, layer.wmult, layer.wscale, layer.smooth,
                                                                     inv, layer.bias, torch.bfloat16, bn, bg, None, pf, w))
        ref = None
        for name, fn in fns.items():
            try:
                y = fn().to(torch.bfloat16)
                ref = y if ref is None else ref
                row[name] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
                row[name + "_rel"] = float((y.float() - ref.float()).norm() / ref.float().norm())
            except Exception as exc:
                print(f"{name} failed: {str(exc)[-300:]}", flush=True)
        timed = {c: v for c, v in row.items() if c in fns}
        best = min(timed, key=timed.get)
        print(f"w4a16tile M={m} K={k} N={n}: bf16 {row['bf16_graph']:.1f}, best {best} {timed[best]:.1f} "
              f"(x{row['bf16_graph'] / timed[best]:.2f}); " + ", ".join(f"{c} {v:.1f}" for c, v in sorted(timed.items(), key=lambda t: t[1])),
              flush=True)
        rows.append(row)
    return rows


def w4a16_pairs_rows(triton) -> list[dict]:
    """The tensor-core W4A16 kernel on 32-bit words (``WORDS=32``: pairs of codes by one logic op and one bf16x2
    FMA, K permuted so nothing moves between threads) over its tile knobs, against the word kernel (M <= 2, the
    default there before), the 16-bit-word tensor-core kernel at its default tile (``mma16``), the pair kernel at
    its default tile (``default``) and cuBLAS bf16; CUDA-graph µs. The input is read contiguously and permuted on
    chip or prepared once per call (``xd``; a third way, reading it element by element in the operand's order, measured
    within 2% of the first and was removed: ``bench/results-w4a16-pairs-first-session10-h100.log``); ``kN``: split
    over K in N parts (finished by the tile's last program)."""
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers
    from svdq.kernels.gemm_w4a16_packed import w4a16_packed
    from svdq.kernels.dispatch import arena
    from svdq.kernels.gemv_w4a16 import _w4a16_gemv_one_row
    from svdq.kernels.reference import dequantize_weight

    scratch = arena(torch.device("cuda", torch.cuda.current_device())).get  # as dispatch passes it: split-K
    rows = []  # sums and tickets and the prepared input in reused buffers
    # (rows, K, stages, warps, K split, how x arrives: "xd" prepared once per call, "" permuted on chip)
    cfgs = [(64, 128, 3, 4, 3, "xd"), (64, 128, 2, 4, 3, "xd"), (64, 128, 4, 4, 3, "xd"), (64, 256, 3, 4, 3, "xd"),
            (64, 256, 2, 4, 3, "xd"), (64, 128, 3, 4, 6, "xd"), (64, 128, 3, 4, 3, ""), (64, 128, 3, 4, 2, "xd"),
            (64, 256, 3, 4, 2, "xd"), (128, 128, 3, 8, 3, "xd"), (128, 128, 4, 8, 3, ""), (64, 256, 3, 4, None, "xd"),
            (128, 128, 4, 8, None, ""), (64, 128, 3, 4, 4, "xd"), (64, 256, 3, 4, 4, "xd")]
    for m, k, n in [(1, 3072, 18432), (2, 3072, 18432), (16, 3072, 18432), (32, 3072, 18432), (1, 3072, 9216),
                    (2, 3072, 9216), (64, 3072, 9216), (1, 3072, 3072)]:
        layer = make_layer(n, k, 0, kind="w4a16")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        inv = torch.reciprocal(layer.smooth.float())
        mt = transposed_multipliers(layer.wmult)
        row = {"M": m, "K": k, "N": n,
               "bf16_graph": triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb, layer.bias), rep=50) * 1e3}
        fns = {}
        if m <= 2:
            fns["words_gemv"] = lambda: _w4a16_gemv_one_row(x, layer.qweight, layer.wmult, layer.wscale, layer.smooth, inv,
                                                            layer.bias, torch.bfloat16)
        fns["mma16"] = lambda: w4a16_packed(x, layer.qweight, mt, layer.wscale, inv, k, layer.bias, torch.bfloat16,
                                            config={"WORDS": 16})
        fns["default"] = lambda: w4a16_packed(x, layer.qweight, mt, layer.wscale, inv, k, layer.bias, torch.bfloat16,
                                              scratch=scratch)
        for bn, bk, st, w, sp, xmode in cfgs:
            cfg = {"WORDS": 32, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "num_warps": w,
                   "X_DESC": xmode == "xd", **({"SPLIT": sp} if sp else {})}
            fns[f"p{bn}x{bk}_s{st}_w{w}" + (f"_k{sp}" if sp else "") + (f"_{xmode}" if xmode else "")] = (
                lambda cfg=cfg: w4a16_packed(x, layer.qweight, mt, layer.wscale, inv, k, layer.bias, torch.bfloat16,
                                             config=cfg, scratch=scratch))
        ref = (x.float() * inv) @ dequantize_weight(layer).T + layer.bias.float()
        for name, fn in fns.items():
            try:
                y = fn().float()
                row[name + "_rel"] = float((y - ref).norm() / ref.norm())
                row[name] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
            except Exception as exc:
                print(f"{name} failed: {str(exc)[-300:]}", flush=True)
        timed = {c: v for c, v in row.items() if c in fns}
        best = min(timed, key=timed.get)
        print(f"w4a16pairs M={m} K={k} N={n}: bf16 {row['bf16_graph']:.1f}, best {best} {timed[best]:.1f} "
              f"(x{row['bf16_graph'] / timed[best]:.2f}); " + ", ".join(f"{c} {v:.1f} ({row[c + '_rel']:.1e})" for c, v in
                                                                   sorted(timed.items(), key=lambda t: t[1])), flush=True)
        rows.append(row)
    return rows


def w4a16_cold_rows(triton) -> list[dict]:
    """The pair kernel's tiles with L2 cold as well as warm: CUDA-graph µs back to back (``warm``: part of a 29 MB
    4-bit weight stays in the 50 MB L2 between replays) and with a 256 MB flush before each call, by a read (``read``:
    clean lines, what the DRAM stream alone costs) and by a write (``write``: its dirty lines are written back during
    the call). Why: inside a model other layers evict the weight between calls, so the cold rate is the one that
    counts there; more bytes in flight per program (wider K steps, more stages) may win cold while losing warm."""
    from linear import bench_graph_cold
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers
    from svdq.kernels.gemm_w4a16_packed import w4a16_packed
    from svdq.kernels.dispatch import arena

    scratch = arena(torch.device("cuda", torch.cuda.current_device())).get
    # (weight rows, K step, stages, warps, K split or None (the launcher's), x prepared once per call)
    cfgs = [(64, 128, 2, 4, 3, True), (64, 128, 4, 4, 3, True), (64, 256, 2, 4, 3, True), (64, 256, 3, 4, 3, True),
            (64, 256, 4, 4, 3, True), (64, 512, 2, 4, 3, True), (64, 512, 3, 4, 3, True), (128, 128, 3, 8, 3, True),
            (128, 256, 2, 8, 3, True), (128, 256, 3, 8, 3, True), (64, 256, 3, 4, 2, True), (64, 256, 3, 4, 6, True),
            (64, 128, 4, 4, 6, True), (64, 256, 3, 4, None, True), (128, 128, 4, 8, None, False),
            (128, 256, 3, 8, None, True),
            # fewer, longer programs with deeper pipelines (no split or two): more bytes in flight per program
            (64, 128, 6, 4, 1, True), (64, 128, 8, 4, 1, True), (64, 128, 6, 4, 2, True), (64, 128, 8, 4, 2, True),
            (64, 256, 4, 4, 1, True), (64, 256, 5, 4, 1, True), (128, 128, 6, 8, 1, True), (64, 128, 6, 4, 3, True)]
    rows = []
    for m, k, n in [(1, 3072, 18432), (2, 3072, 18432), (16, 3072, 18432), (1, 3072, 9216), (1, 3072, 3072)]:
        layer = make_layer(n, k, 0, kind="w4a16")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        inv = torch.reciprocal(layer.smooth.float())
        mt = transposed_multipliers(layer.wmult)

        def bf16():
            return torch.nn.functional.linear(x, wb, layer.bias)

        row = {"M": m, "K": k, "N": n, "bf16": {"warm": triton.testing.do_bench_cudagraph(bf16, rep=50) * 1e3,
                                                "read": bench_graph_cold(bf16, flush_by="read"),
                                                "write": bench_graph_cold(bf16)}}
        fns = {"default": lambda: w4a16_packed(x, layer.qweight, mt, layer.wscale, inv, k, layer.bias, torch.bfloat16,
                                               scratch=scratch)}
        for bn, bk, st, w, sp, xd in cfgs:
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "num_warps": w, "X_DESC": xd, "SPLIT": sp or 0}  # 0: auto
            fns[f"p{bn}x{bk}_s{st}_w{w}" + (f"_k{sp}" if sp else "") + ("_xd" if xd else "")] = (
                lambda cfg=cfg: w4a16_packed(x, layer.qweight, mt, layer.wscale, inv, k, layer.bias, torch.bfloat16,
                                             config=cfg, scratch=scratch))
        want = fns["default"]()
        for name, fn in fns.items():
            try:
                same = torch.equal(fn(), want)
                row[name] = {"warm": triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3,
                             "read": bench_graph_cold(fn, flush_by="read"), "write": bench_graph_cold(fn), "same": same}
            except Exception as exc:
                print(f"{name} failed: {str(exc)[-300:]}", flush=True)
        timed = {c: v for c, v in row.items() if c in fns}
        best = min(timed, key=lambda c: timed[c]["read"])
        b = row["bf16"]
        print(f"w4a16cold M={m} K={k} N={n}: bf16 warm/read/write {b['warm']:.1f}/{b['read']:.1f}/{b['write']:.1f}; "
              f"best cold (read) {best} {timed[best]['read']:.1f} (x{b['read'] / timed[best]['read']:.2f}); "
              + ", ".join(f"{c} {v['warm']:.1f}/{v['read']:.1f}/{v['write']:.1f}{'' if v['same'] else ' DIFFERS'}"
                          for c, v in sorted(timed.items(), key=lambda t: t[1]["read"])), flush=True)
        rows.append(row)
    return rows


def w4a16_rows(triton) -> list[dict]:
    from svdq.kernels.dispatch import svdq_linear

    rows = []
    for m, k, n in [(1, 3072, 18432), (1, 3072, 9216), (2, 3072, 18432), (4, 3072, 18432), (1, 3072, 3072)]:
        layer = make_layer(n, k, 0, kind="w4a16")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        g = {"M": m, "K": k, "N": n, "bf16": bench(lambda: torch.nn.functional.linear(x, wb, layer.bias))}
        g["bf16_graph"] = triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb, layer.bias), rep=50) * 1e3
        ref = None
        for impl in ("gemv", "mma"):
            os.environ["SVDQ_W4A16"] = impl
            y = svdq_linear(x, layer)
            ref = y if ref is None else ref
            g[impl + "_rel_vs_gemv"] = float((y.float() - ref.float()).norm() / ref.float().norm())
            g[impl] = bench(lambda: svdq_linear(x, layer))
            g[impl + "_graph"] = triton.testing.do_bench_cudagraph(lambda: svdq_linear(x, layer), rep=50) * 1e3
        os.environ.pop("SVDQ_W4A16")
        rows.append(g)
        print("w4a16", g, flush=True)
    return rows


ACT_VARIANTS = [  # (block_m, groups, num_warps, k_per_program, reverse); the first is the old default, None = default
    (32, 4, 4, 1, False), (None, None, None, None, True), (64, 4, 8, None, True), (64, 2, 4, None, True),
    # half the elements per thread (fewer registers, more programs resident: ncu measured 25% occupancy)
    (32, 4, 8, None, True), (16, 4, 4, None, True), (32, 2, 4, None, True), (64, 2, 8, None, True),
    (16, 2, 4, None, True), (32, 2, 8, None, True),
    # more K tiles per pass-1 program: fewer low-rank partials to write and sum (a LoRA-wide branch at large K)
    (64, 2, 4, 8, True), (64, 2, 4, 16, True), (64, 2, 8, 8, True), (64, 2, 8, 16, True), (64, 2, 8, 32, True),
    (32, 2, 4, 8, True), (32, 2, 8, 16, True),
]
# A one-launch kernel (both sweeps per row block, the second from L2) was measured 2.2-4.6x slower and removed:
# bench/results-act-fused-h100.log
ACT_SHAPES = [(4608, 3072, 32), (4608, 12288, 32), (4608, 15360, 32), (4608, 3072, 96), (4608, 12288, 96),
              (4608, 15360, 96), (1024, 3072, 32), (512, 3072, 32)]


def copy_rate_bytes_per_us() -> float:
    """Device-to-device copy rate (bytes read + written per µs): the floor's yardstick, measured here."""
    import triton.testing

    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median") * 1e3
    return 2 * a.numel() / t


def time_act_variant(triton, row: dict, name: str, fn, ref, tol: float, tag: str) -> None:
    """CUDA-graph µs of one activation-kernel variant into ``row[name]``, and whether it gave the reference's codes
    and scales and its branch product within ``tol`` (``row[name + "_ok"]``); a variant that fails is NaN."""
    try:
        a, s, lora = fn()
        same = torch.equal(a, ref[0]) and torch.equal(s, ref[1])
        lrel = float((lora - ref[2]).norm() / ref[2].norm())
        row[name] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
        row[name + "_ok"] = bool(same and lrel < tol)
        if not row[name + "_ok"]:
            print(f"{tag} {name} WRONG: same codes {same}, lora rel {lrel:.2e}", flush=True)
    except Exception as exc:
        print(f"{tag} {name} failed: {str(exc)[-800:]}", flush=True)
        row[name] = float("nan")


def act_rows(triton, around_defaults: bool = False) -> list[dict]:
    """The tile sweep, or (``around_defaults``) session 9's tiles around the defaults, 1/λ precomputed as dispatch
    passes it, at FLUX's shapes."""
    from svdq.kernels.act_quant import quantize_activation

    rate = copy_rate_bytes_per_us()
    rows = []
    for m, k, rank in (ACT_PASS2_SHAPES if around_defaults else ACT_SHAPES):
        layer = make_layer(64, k, rank)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        floor = (2 * x.numel() * 2 + m * layer.k_padded) / rate
        floor1 = (x.numel() * 2 + m * layer.k_padded) / rate
        row = {"M": m, "K": k, "rank": rank, "floor_us": floor, "one_read_floor_us": floor1}
        ref = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, k_per_program=1, reverse=False)
        if around_defaults:  # pass 2's tile apart from pass 1's
            inv = torch.reciprocal(layer.smooth.float())
            variants = [("inv_" + ("_".join(f"{n}{v}" for n, v in kw.items()) or "current"), dict(inv_smooth=inv, **kw))
                        for kw in ACT_TILES]
        else:
            variants = [(f"bm{bm or 'auto'}_g{groups or 'auto'}_w{warps or 'auto'}_k{kpp or 'auto'}_{'rev' if rev else 'fwd'}",
                         dict(block_m=bm, groups=groups, num_warps=warps, k_per_program=kpp, reverse=rev))
                        for bm, groups, warps, kpp, rev in ACT_VARIANTS]
        variants.append(("default", {}))
        for name, kw in variants:

            def fn(kw=kw):
                return quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, **kw)

            time_act_variant(triton, row, name, fn, ref, 1e-4, "act")
        rows.append(row)
        timed = {n: v for n, v in row.items() if (n.startswith(("bm", "inv")) or n == "default")
                 and not n.endswith("_ok") and not math.isnan(v)}
        best = min((v, n) for n, v in timed.items())
        print(f"act M={m} K={k} r={rank}: floors {floor:.1f} (two reads) / {floor1:.1f} (one) µs, old {row.get(ACT_NAME0, math.nan):.1f}, "
              f"best {best[1]} {best[0]:.1f}; " + ", ".join(f"{n} {v:.1f}" for n, v in timed.items()), flush=True)
    return rows


ACT_NAME0 = "bm32_g4_w4_k1_fwd"
ACT_TILES = [  # session 9, around the defaults (pass 1 32 x 4 warps at K = 3072, else 64 x 8; pass 2 16 x 4; 2 groups)
    {}, dict(pass2_groups=4), dict(pass2_groups=1, pass2_block_m=32), dict(pass2_groups=4, pass2_block_m=8),
    dict(pass2_groups=4, pass2_warps=8), dict(pass2_groups=1, pass2_block_m=64, pass2_warps=8),
    dict(groups=4), dict(groups=4, block_m=64, num_warps=8), dict(block_m=128, num_warps=8)]
ACT_PASS2_SHAPES = [(4608, 3072, 32), (4096, 12288, 32), (4608, 15360, 32), (9216, 15360, 32), (512, 3072, 32),
                    (4608, 15360, 96)]


STREAM_SHAPES = [(9216, 15360, 32), (8192, 12288, 32), (4608, 15360, 32), (4608, 12288, 32), (4608, 3072, 32),
                 (9216, 3072, 32), (1024, 3072, 32), (512, 3072, 32), (4608, 15360, 96), (4608, 3072, 96)]
STREAM_VARIANTS = [  # pass 1 by TMA stream against the unrolled kernel ("default" is the dispatch rule's choice)
    ("unrolled", dict(stream=False)), ("stream", dict(stream=True)), ("stream_s3", dict(stream=True, stream_stages=3)),
    ("stream_k8", dict(stream=True, k_per_program=8)), ("stream_k16", dict(stream=True, k_per_program=16)),
    ("stream_s2", dict(stream=True, stream_stages=2)), ("stream_bm32", dict(stream=True, block_m=32)),
]
# Measured and dropped in session 15 (bench/results-act-stream*-session15-h100.log): the same loop on pointer loads
# (slower, and wrong branch partials with 8 warps), 6 stages or 256-column tiles (past shared memory), 128-row
# tiles, 8 warps (slower, and once wrong with 128-row tiles: the stream now refuses it), the branch weights by TMA
# too (no gain), pass 2 as a stream of 2-8 tiles a program, by TMA or pointer
# loads (slower than one tile a program), and either pass's grid ordered so that a row block's programs run side by
# side (whole rows streamed at once; no gain: bench/results-act-stream-order-session15-h100.log).


def kernel_split(fn) -> dict:
    """Device µs per kernel name over 20 calls (torch profiler), to tell pass 1 from pass 2."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and "act_" in ev.key:
            out[ev.key] = ev.device_time_total / 20
    return out


def act_stream_rows(triton) -> list[dict]:
    """Pass 1 by TMA stream (``stream``, ``stream_stages``, tiles a program) against the unrolled kernel, CUDA-graph
    µs of both passes, and each pass's device time (profiler) for the default and the best; codes and scales must
    equal the default's, the low-rank result within 1e-5."""
    from svdq.kernels.act_quant import quantize_activation

    rate = copy_rate_bytes_per_us()
    rows = []
    for m, k, rank in STREAM_SHAPES:
        layer = make_layer(64, k, rank)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        inv = torch.reciprocal(layer.smooth.float())
        row = {"M": m, "K": k, "rank": rank, "floor_us": (2 * x.numel() * 2 + m * layer.k_padded) / rate,
               "read_amax_us": triton.testing.do_bench_cudagraph(lambda: x.abs().amax(dim=1), rep=50) * 1e3,
               "one_read_floor_us": (x.numel() * 2 + m * layer.k_padded) / rate}
        ref = [t.clone() if t is not None else None
               for t in quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, inv_smooth=inv)]
        for name, kw in [("default", {})] + STREAM_VARIANTS:
            def fn(kw=kw):
                return quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, inv_smooth=inv, **kw)

            time_act_variant(triton, row, name, fn, ref, 1e-5, "actstream")
        timed = {n: v for n, v in row.items() if n in dict(STREAM_VARIANTS) or n == "default"}
        best = min((v, n) for n, v in timed.items() if not math.isnan(v) and row.get(n + "_ok"))[1]
        for name in ("default", best):
            kw = dict(STREAM_VARIANTS).get(name, {})
            row[name + "_split"] = split = kernel_split(
                lambda kw=kw: quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, inv_smooth=inv, **kw))
            print(f"  {name}: " + ", ".join(f"{n} {v:.1f}" for n, v in split.items()), flush=True)
        rows.append(row)
        print(f"actstream M={m} K={k} r={rank}: floors {row['floor_us']:.1f} / {row['one_read_floor_us']:.1f} µs, "
              f"torch row amax (one read) {row['read_amax_us']:.1f}; "
              + ", ".join(f"{n} {v:.1f}" for n, v in timed.items()), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--shapes", default="all", help="'all', 'first' (one GEMM shape) or 'none' (W4A16 rows only)")
    ap.add_argument("--only", default="gemm,w4a16,act", help="which sections to run (comma-separated)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("SVDQ_CACHE", tempfile.mkdtemp())  # tune from scratch in this run
    import triton
    import triton.testing

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    shapes = {"all": M4608, "first": M4608[:1], "none": []}[args.shapes]
    only = set(args.only.split(","))
    out = {"env": env}
    if "act" in only:
        out["act"] = act_rows(triton)
    if "actstream" in only:
        out["actstream"] = act_stream_rows(triton)
    if "actpass2" in only:
        out["actpass2"] = act_rows(triton, around_defaults=True)
    if "gemm" in only:
        out["gemm"] = gemm_rows(shapes, triton)
    if "gemmcfg" in only:
        out["gemmcfg"] = gemm_config_rows(triton)
    if "w4a16" in only:
        out["w4a16"] = w4a16_rows(triton)
    if "w4a16tile" in only:
        out["w4a16tile"] = w4a16_tile_rows(triton)
    if "w4a16pairs" in only:
        out["w4a16pairs"] = w4a16_pairs_rows(triton)
    if "w4a16cold" in only:
        out["w4a16cold"] = w4a16_cold_rows(triton)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
