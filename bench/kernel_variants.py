"""A/B of kernel variants in one run: which schedule or layout each dispatch default should take.

    python bench/kernel_variants.py [--json OUT]

Same process, same data, same GPU for every pair; µs are medians of ``triton.testing.do_bench``:
  gemm     the int8 GEMM with the rank-32 epilogue: grouped pointer kernel vs persistent TMA kernel vs the tuner
           choosing from both (each autotuned from an empty cache), eager and CUDA-graph replay, the chosen
           configs, and ``torch._int_mm`` as a reference point
  expand   4-bit → int8 weight expansion: byte/interleave kernel vs 16-bit-word kernel
  w4a16    small-M W4A16: CUDA-core kernel with per-step reductions vs the word kernel, cuBLAS bf16 alongside
  layer    the whole svdq rank-32 layer with the old and new defaults, and bf16
  act      (--act) activation kernels: one fused launch per 16 tokens vs the split-K pair of launches
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--no-w4a16", action="store_true")
    ap.add_argument("--act", action="store_true", help="also compare the activation kernels (fused vs split-K)")
    ap.add_argument("--shapes", default="all", help="'all', 'first' (one GEMM shape) or 'none' (W4A16 rows only)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("SVDQ_CACHE", tempfile.mkdtemp())  # tune from scratch in this run
    import triton

    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.dispatch import svdq_linear
    from svdq.kernels.gemm_w4a4 import _TUNERS, expand_weight, w4a4_gemm

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    out = {"env": env, "gemm": [], "expand": [], "w4a16": [], "layer": [], "act": []}
    if args.act:
        from svdq.kernels.act_quant import quantize_activation as qa

        for m, k in [(4608, 3072), (4608, 12288), (4608, 15360), (512, 3072), (1024, 3072)]:
            layer = make_layer(256, k, 32)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a = {"M": m, "K": k, "floor_us_3TBps": (2 * x.numel() + m * layer.k_padded) / 3.0e6}
            res = {}
            for impl in ("split", "fused"):
                os.environ["SVDQ_ACT"] = impl
                res[impl] = [t.clone() for t in qa(x, layer.k_padded, layer.smooth, layer.proj_down)]
                a[impl] = bench(lambda: qa(x, layer.k_padded, layer.smooth, layer.proj_down))
                a[impl + "_graph"] = triton.testing.do_bench_cudagraph(lambda: qa(x, layer.k_padded, layer.smooth, layer.proj_down), rep=50) * 1e3
            os.environ.pop("SVDQ_ACT")
            a["codes_equal"] = bool(torch.equal(res["split"][0], res["fused"][0]) and torch.equal(res["split"][1], res["fused"][1]))
            a["lora_rel"] = float((res["split"][2] - res["fused"][2]).norm() / res["split"][2].norm())
            out["act"].append(a)
            print("act", a, flush=True)
        big = [a for a in out["act"] if a["M"] == 4608]
        out["act_best"] = "fused" if sum(a["fused_graph"] for a in big) < sum(a["split_graph"] for a in big) else "split"
        print("act_best", out["act_best"], flush=True)
    shapes = {"all": M4608, "first": M4608[:1], "none": []}[args.shapes]
    for k, n in shapes:
        m = 4608
        layer = make_layer(n, k, 32)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
        w8 = expand_weight(layer.qweight, layer.wmult)
        row = {"M": m, "K": k, "N": n}
        ys = {}
        for sched in ("pointer", "tma", "auto"):
            try:
                fn = lambda s=sched: w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, schedule=s)  # noqa: E731
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
        out["gemm"].append(row)
        print("gemm", row, flush=True)

        e = {"N": n, "K": k}
        ws = torch.empty_like(w8)
        for impl in ("bytes", "words"):
            os.environ["SVDQ_EXPAND"] = impl
            assert torch.equal(expand_weight(layer.qweight, layer.wmult, out=ws), w8)
            e[impl] = bench(lambda: expand_weight(layer.qweight, layer.wmult, out=ws))
        e["floor_us_3TBps"] = (layer.qweight.numel() + w8.numel()) / 3.0e6
        out["expand"].append(e)
        print("expand", e, flush=True)

        lr = {"M": m, "K": k, "N": n}
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        lr["bf16"] = bench(lambda: torch.nn.functional.linear(x, wb, layer.bias))
        for name, sched, exp in (("old", "pointer", "bytes"), ("new", "auto", "words")):
            os.environ["SVDQ_GEMM"], os.environ["SVDQ_EXPAND"] = sched, exp
            lr[name] = bench(lambda: svdq_linear(x, layer))
        os.environ.pop("SVDQ_GEMM")
        os.environ.pop("SVDQ_EXPAND")
        out["layer"].append(lr)
        print("layer", lr, {k2: round(lr["bf16"] / lr[k2], 3) for k2 in ("old", "new")}, flush=True)

    for m, k, n in [] if args.no_w4a16 else [(1, 3072, 18432), (1, 3072, 9216), (2, 3072, 18432), (4, 3072, 18432), (1, 3072, 3072)]:
        layer = make_layer(n, k, 0, kind="w4a16")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        g = {"M": m, "K": k, "N": n, "bf16": bench(lambda: torch.nn.functional.linear(x, wb, layer.bias))}
        ref = None
        for impl in ("small", "gemv"):
            os.environ["SVDQ_W4A16"] = impl
            y = svdq_linear(x, layer)
            ref = y if ref is None else ref
            g[impl + "_rel_vs_small"] = float((y.float() - ref.float()).norm() / ref.float().norm())
            g[impl] = bench(lambda: svdq_linear(x, layer))
            try:
                g[impl + "_graph"] = triton.testing.do_bench_cudagraph(lambda: svdq_linear(x, layer), rep=50) * 1e3
            except Exception as exc:
                print("graph failed", exc, flush=True)
        g["bf16_graph"] = triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb, layer.bias), rep=50) * 1e3
        os.environ.pop("SVDQ_W4A16")
        out["w4a16"].append(g)
        print("w4a16", g, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
