"""A/B of the kernel choices dispatch makes, in one run: which schedule each default should take.

    python bench/kernel_variants.py [--json OUT] [--shapes all|first|none]

Same process, same data, same GPU for every pair; µs are medians of ``triton.testing.do_bench``:
  gemm     the int8 GEMM with the rank-32 epilogue: grouped pointer kernel vs persistent TMA kernel vs the tuner
           choosing from both (each autotuned from an empty cache), eager and CUDA-graph replay, the chosen
           configs, and ``torch._int_mm`` as a reference point
  w4a16    small-M W4A16: CUDA-core word kernel vs the tensor-core kernel (M padded to 16), cuBLAS bf16 alongside

Variants measured and removed (numbers in BENCHMARKS.md, raw runs in bench/results-*-variants-h100.*): the
byte-wise weight expansion, the CUDA-core W4A16 kernel with per-step reductions, and a one-launch activation
kernel (2× slower than the split-K pair at M = 4608).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--shapes", default="all", help="'all', 'first' (one GEMM shape) or 'none' (W4A16 rows only)")
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
    out = {"env": env, "gemm": gemm_rows(shapes, triton), "w4a16": w4a16_rows(triton)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
