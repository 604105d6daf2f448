"""Does the GEMM that reads packed 4-bit weights (``kernels/gemm_w4a4_packed.py``) beat expand + int8 GEMM?

    python bench/packed_gemm_probe.py [--json OUT] [--rank 32] [--shapes K:N,...] [--m 4608]
    python bench/packed_gemm_probe.py --w4a16 [--json OUT]

``--w4a16``: the W4A16 layer (16-bit input, M = 1-64) on the packed-weight tensor-core kernel
(``kernels/gemm_w4a16_packed.py``) at several tiles, against cuBLAS bf16 and what ``svdq_linear`` runs now.

Same run, CUDA-graph µs: cuBLAS bf16; the ping-pong Gluon GEMM on the expanded int8 weight alone and together
with the weight expansion it needs (what a layer call runs now); the same with the schedule a layer call picks (shipped or tuned configs); the packed-weight kernel at each
tile config.
Its output is compared with the ping-pong kernel's (same integer accumulation; the branch MMA runs transposed, so
the last bits of the 16-bit output may differ).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from _results import write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# BLOCK_N (weight rows), BLOCK_T (tokens), BLOCK_K, stages, warps, GROUP_N, unpacking (1: PTX; 2: a plain copy,
# wrong numbers, the timing without the unpacking arithmetic)
CONFIGS = [(128, 128, 128, 4, 4, 8, 1), (64, 256, 128, 3, 4, 8, 1), (64, 256, 128, 3, 4, 16, 1), (64, 256, 128, 2, 4, 8, 1),
           (128, 128, 128, 4, 4, 8, 2), (64, 256, 128, 3, 4, 8, 2)]
# small M (the text stream's 512 / 1024 rows): fewer tokens per tile, so that the grid fills the GPU
SMALL_CONFIGS = [(64, 128, 128, 4, 4, 8, 1), (128, 128, 128, 4, 4, 8, 1), (64, 64, 128, 4, 4, 8, 1),
                 (128, 64, 128, 4, 4, 8, 1), (64, 256, 128, 3, 4, 8, 1), (128, 64, 256, 3, 4, 8, 1)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--m", type=int, default=4608)
    ap.add_argument("--shapes", default=None, help="K:N,K:N... (default: the five M = 4608 FLUX shapes)")
    ap.add_argument("--small", action="store_true", help="the tile configs for small M")
    ap.add_argument("--w4a16", action="store_true", help="the W4A16 kernels at M = 1-64 instead")
    args = ap.parse_args()
    import _path  # noqa: F401
    if args.w4a16:
        return w4a16_rows(args)
    import triton.testing
    from linear import M4608, make_layer
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers, w4a4_gemm_packed

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}, rank {args.rank}, M {args.m}", flush=True)
    rows = []
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else M4608
    r, m = args.rank, args.m
    pingpong = {"kwargs": {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128,
                           "STAGES": 4, "GROUP_M": 8}, "num_warps": 4, "num_stages": 1}
    for k, n in shapes:
        layer = make_layer(n, k, r)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down if r else None)
        up = layer.proj_up if r else None
        w8 = torch.empty(n, layer.k_padded, dtype=torch.int8, device="cuda")
        mt = transposed_multipliers(layer.wmult)

        def gemm():
            return w4a4_gemm(a8, sa, w8, layer.wscale, lora, up, layer.bias, torch.bfloat16, config=pingpong)

        def expand_gemm():
            expand_weight(layer.qweight, layer.wmult, out=w8)
            return gemm()

        def expand_tuned():  # what a layer call runs now: the shipped (or freshly tuned) schedule for this shape
            expand_weight(layer.qweight, layer.wmult, out=w8)
            return w4a4_gemm(a8, sa, w8, layer.wscale, lora, up, layer.bias, torch.bfloat16)

        ref = expand_gemm()
        expand_tuned()
        row = {"K": k, "N": n, "M": m,
               "bf16": triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb), rep=50) * 1e3,
               "pingpong_gemm": triton.testing.do_bench_cudagraph(gemm, rep=50) * 1e3,
               "expand_pingpong": triton.testing.do_bench_cudagraph(expand_gemm, rep=50) * 1e3,
               "expand_tuned": triton.testing.do_bench_cudagraph(expand_tuned, rep=50) * 1e3}
        for bn, bt, bk, st, w, gn, ptx in (SMALL_CONFIGS if args.small else CONFIGS):
            name = f"packed_{bn}x{bt}x{bk}_s{st}_w{w}_g{gn}" + ("_nounpack" if ptx == 2 else "")
            cfg = {"BLOCK_N": bn, "BLOCK_T": bt, "BLOCK_K": bk, "STAGES": st, "num_warps": w, "GROUP_N": gn,
                   "USE_PTX": ptx}

            def fn(cfg=cfg):
                return w4a4_gemm_packed(a8, sa, layer.qweight, mt, layer.wscale, lora, up, layer.bias, torch.bfloat16,
                                        config=cfg)

            try:
                y = fn()
                row[name + "_exact"] = bool(torch.equal(y, ref))
                row[name + "_rel"] = float((y.float() - ref.float()).norm() / ref.float().norm())
                row[name] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
            except Exception as exc:
                print(f"{name} failed: {str(exc)[-1500:]}", flush=True)
        timed = {c: v for c, v in row.items() if c.startswith("packed") and isinstance(v, float)
                 and not c.endswith(("_rel", "_nounpack"))}
        best = min(timed, key=timed.get) if timed else None
        print(f"packed K={k} N={n} M={m}: bf16 {row['bf16']:.1f}, ping-pong GEMM {row['pingpong_gemm']:.1f}, "
              f"expand + ping-pong {row['expand_pingpong']:.1f}, expand + tuned {row['expand_tuned']:.1f}"
              + (f", best packed {best} {timed[best]:.1f} (rel {row[best + '_rel']:.1e}, exact {row[best + '_exact']})"
                 if best else ""), flush=True)
        print("row", {a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
        rows.append(row)
    if args.json:
        write_json(args.json, {"env": env, "rows": rows})
    return 0


W4A16_TILES = [(64, 128, 4, 4), (64, 256, 4, 4), (128, 128, 4, 4), (64, 128, 6, 4), (64, 256, 3, 4)]


def w4a16_rows(args) -> int:
    import triton.testing
    from linear import make_layer
    from svdq.kernels.dispatch import svdq_linear
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers
    from svdq.kernels.gemm_w4a16_packed import w4a16_packed

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}, W4A16", flush=True)
    rows = []
    for k, n in [(3072, 18432), (3072, 9216), (3072, 3072)]:
        layer = make_layer(n, k, 0, kind="w4a16")
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        mt = transposed_multipliers(layer.wmult)
        inv = torch.reciprocal(layer.smooth.float())
        for m in (1, 2, 4, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = svdq_linear(x, layer)
            row = {"M": m, "K": k, "N": n,
                   "bf16": triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb, layer.bias), rep=50) * 1e3,
                   "current": triton.testing.do_bench_cudagraph(lambda: svdq_linear(x, layer), rep=50) * 1e3}
            for bn, bk, st, w in W4A16_TILES:
                name = f"packed_{bn}x{bk}_s{st}_w{w}"
                cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "num_warps": w, "WORDS": 16}  # the 16-bit-word kernel

                def fn(cfg=cfg):
                    y = w4a16_packed(x, layer.qweight, mt, layer.wscale, inv, k, layer.bias, torch.bfloat16, config=cfg)
                    return y if y.dtype == torch.bfloat16 else y.to(torch.bfloat16)

                try:
                    y = fn()
                    row[name + "_rel"] = float((y.float() - ref.float()).norm() / ref.float().norm())
                    row[name] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
                except Exception as exc:
                    print(f"{name} failed: {str(exc)[-800:]}", flush=True)
            timed = {c: v for c, v in row.items() if c.startswith("packed") and not c.endswith("_rel")}
            best = min(timed, key=timed.get) if timed else None
            print(f"w4a16 M={m} K={k} N={n}: bf16 {row['bf16']:.1f}, current {row['current']:.1f}"
                  + (f", best packed {best} {timed[best]:.1f} (x{row['bf16'] / timed[best]:.2f} bf16, rel {row[best + '_rel']:.1e})"
                     if best else "") + "; " + ", ".join(f"{c} {v:.1f}" for c, v in sorted(timed.items(), key=lambda t: t[1])),
                  flush=True)
            rows.append(row)
    if args.json:
        write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
