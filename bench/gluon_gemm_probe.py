"""Does the warp-specialized Gluon GEMM (``kernels/gemm_w4a4_gluon.py``) beat the Triton TMA kernel on Hopper?

    python bench/gluon_gemm_probe.py [--json OUT]

At the FLUX shapes (M = 4608), rank 0 (scales + bias epilogue): the tuned Triton schedule, each Gluon tile config
given explicitly, and cuBLAS bf16; CUDA-graph µs, same run, with a bit-for-bit comparison of the outputs.
(The first version of this script carried its own copy of the kernel: results in BENCHMARKS.md.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from _results import write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# BM, BN, BK, stages, ping-pong (BM rows per warpgroup) or cooperative (BM rows split over two warpgroups),
# the ping-pong producer's registers (None: the kernel's default; 24 leaves the consumers 240, fewer epilogue spills)
CONFIGS = [(128, 256, 128, 4, False, None), (128, 128, 128, 5, False, None),
           (64, 256, 128, 4, True, None), (64, 256, 64, 6, True, None), (128, 128, 128, 4, True, None),
           (128, 128, 128, 5, True, None), (128, 128, 128, 4, True, 24)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rank", type=int, default=0, help="low-rank branch width (the epilogue's extra work)")
    ap.add_argument("--shapes", default=None, help="K:N,K:N... (default: the five M = 4608 FLUX shapes)")
    args = ap.parse_args()
    import _path  # noqa: F401
    import triton.testing
    from linear import M4608, make_layer
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    rows = []
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else M4608
    r = args.rank
    print(f"# rank {r}", flush=True)
    for k, n in shapes:
        m = 4608
        layer = make_layer(n, k, r)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down if r else None)
        up = layer.proj_up if r else None
        w8 = expand_weight(layer.qweight, layer.wmult)
        def triton_gemm():
            return w4a4_gemm(a8, sa, w8, layer.wscale, lora, up, layer.bias, torch.bfloat16, schedule="tma")

        ref = triton_gemm()
        row = {"K": k, "N": n,
               "bf16": triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb), rep=50) * 1e3,
               "triton": triton.testing.do_bench_cudagraph(triton_gemm, rep=50) * 1e3}
        for bm, bn, bk, st, pp, regs in CONFIGS:
            name = f"{'pingpong' if pp else 'gluon'}_{bm}x{bn}x{bk}_s{st}" + (f"_p{regs}" if regs else "")
            kw = {"SCHEDULE": "gluon", "PINGPONG": pp, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st,
                  "GROUP_M": 8}
            if regs:
                kw["PRODUCER_REGS"] = regs
            cfg = {"kwargs": kw, "num_warps": 4 if pp else 8, "num_stages": 1}

            def fn(cfg=cfg):
                return w4a4_gemm(a8, sa, w8, layer.wscale, lora, up, layer.bias, torch.bfloat16, config=cfg)

            try:
                y = fn()
                row[name + "_exact"] = bool(torch.equal(y, ref))
                row[name + "_maxdiff"] = float((y.float() - ref.float()).abs().max())
                row[name] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
            except Exception as exc:
                print(f"{name} failed: {str(exc)[-1500:]}", flush=True)
        print("probe", {a: (round(b, 1) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
        rows.append(row)
    if args.json:
        write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
