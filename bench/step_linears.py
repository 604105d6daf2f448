"""Where a FLUX.1-dev step's linear-layer time goes, shape by shape, svdq against bf16 (same run).

    python3 bench/step_linears.py [--batch 1,2] [--alts] [--json OUT]

Every linear of one denoising step at 1024 × 1024 (4096 image + 512 text tokens per image; 19 double blocks, 38
single blocks), at the row counts the model gives it (batch × tokens), with the count per step. Per shape: cuBLAS
bf16 ``F.linear`` and the svdq layer through ``dispatch.svdq_linear`` (rank 32, GELU fused where the loader fuses
it), both as CUDA-graph replays (GPU µs, no host time), then µs × count per step. The svdq layer is split into its
kernels (activation passes, weight expansion, GEMM or packed GEMM). The last columns give the GEMM's tile count
and how full its last wave is (132 SMs, 128 × 128 tiles): the share of a step that wave quantization costs.

``--alts`` also times, per W4A4 shape, the other GEMM paths the dispatcher could take (expansion + ping-pong
Gluon GEMM, the cooperative Gluon 128 × 256 tile, the packed-weight kernel), to check the shipped picks at the real
row counts (the tuned configs are keyed by a power-of-two bucket of M).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import _path  # noqa: F401
from _results import write_json  # noqa: E402

from linear import bench_graph, make_layer  # noqa: E402

# (name, tokens per image (0: one row per image), K, N, count per step, GELU fused in the epilogue)
STEP = [
    ("double img qkv", 4096, 3072, 9216, 19, False),
    ("double img proj", 4096, 3072, 3072, 19, False),
    ("double img mlp.0", 4096, 3072, 12288, 19, True),
    ("double img mlp.2", 4096, 12288, 3072, 19, False),
    ("double txt qkv", 512, 3072, 9216, 19, False),
    ("double txt proj", 512, 3072, 3072, 19, False),
    ("double txt mlp.0", 512, 3072, 12288, 19, True),
    ("double txt mlp.2", 512, 12288, 3072, 19, False),
    ("single linear1", 4608, 3072, 21504, 38, False),
    ("single linear2", 4608, 15360, 3072, 38, False),
    ("double mod (img, txt)", 0, 3072, 18432, 38, False),
    ("single mod", 0, 3072, 9216, 38, False),
]

PINGPONG = {"kwargs": {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128,
                       "STAGES": 4, "GROUP_M": 8}, "num_warps": 4, "num_stages": 1}
COOP256 = {"kwargs": {"SCHEDULE": "gluon", "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "STAGES": 4,
                      "GROUP_M": 8}, "num_warps": 8, "num_stages": 1}


def waves(m: int, n: int, sms: int) -> tuple[int, float]:
    tiles = math.ceil(m / 128) * math.ceil(n / 128)
    full = tiles / sms
    return tiles, full / math.ceil(full)


def run(name, rows, k, n, count, gelu, alts, sms):
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.dispatch import packed_gemm, svdq_linear, weight_workspace
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers, w4a4_gemm_packed

    w4a16 = rows <= 64
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    layer = make_layer(n, k, 0 if w4a16 else 32, kind="w4a16" if w4a16 else "w4a4")
    gelu_fn = (lambda y: torch.nn.functional.gelu(y, approximate="tanh")) if gelu else (lambda y: y)
    r = {"name": name, "M": rows, "K": k, "N": n, "count": count, "gelu": gelu}
    r["bf16"] = bench_graph(lambda: gelu_fn(torch.nn.functional.linear(x, wb, b)))
    r["svdq"] = bench_graph(lambda: svdq_linear(x, layer, gelu=gelu))
    if not w4a16:
        r["tiles"], r["last_wave_fill"] = waves(rows, n, sms)
        inv = torch.reciprocal(layer.smooth.float())
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, inv_smooth=inv)
        r["act"] = bench_graph(lambda: quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down,
                                                           inv_smooth=inv))
        r["packed_pick"] = packed_gemm(x, layer.qweight)
        wsp = weight_workspace(n, layer.k_padded, x.device)
        w8 = expand_weight(layer.qweight, layer.wmult, out=wsp)
        mt = transposed_multipliers(layer.wmult)

        def gemm(config=None):
            return w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, gelu=gelu,
                             config=config)

        def packed():
            return w4a4_gemm_packed(a8, sa, layer.qweight, mt, layer.wscale, lora, layer.proj_up, layer.bias,
                                    torch.bfloat16, gelu=gelu)

        if r["packed_pick"]:
            r["gemm"] = bench_graph(packed)
        else:
            r["expand"] = bench_graph(lambda: expand_weight(layer.qweight, layer.wmult, out=wsp))
            r["gemm"] = bench_graph(gemm)
        if alts:
            r.setdefault("expand", bench_graph(lambda: expand_weight(layer.qweight, layer.wmult, out=wsp)))
            r["alt_pingpong"] = bench_graph(lambda: gemm(PINGPONG))
            r["alt_coop256"] = bench_graph(lambda: gemm(COOP256))
            if rows <= 2048:
                r["alt_packed"] = bench_graph(packed)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--alts", action="store_true", help="also time the other GEMM paths at each W4A4 shape")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/step_linears.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "sms": sms}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    out = {"env": env, "batches": {}}
    for batch in (int(v) for v in args.batch.split(",")):
        rows = []
        for name, tokens, k, n, count, gelu in STEP:
            rows.append(run(name, max(1, tokens) * batch, k, n, count, gelu, args.alts, sms))
            torch.cuda.empty_cache()
            r = rows[-1]
            parts = " ".join(f"{p} {r[p]:.1f}" for p in ("act", "expand", "gemm") if p in r)
            alt = " | alts: " + " ".join(f"{p[4:]} {r[p]:.1f}" for p in r if p.startswith("alt_")) if args.alts else ""
            fill = f" | tiles {r['tiles']}, last wave {100 * r['last_wave_fill']:.0f}% full" if "tiles" in r else ""
            print(f"b{batch} {name:<22} M={r['M']:>5} {k:>5}->{n:<5} x{count}: bf16 {r['bf16']:7.1f} svdq "
                  f"{r['svdq']:7.1f} µs ({r['bf16'] / r['svdq']:.2f}x) step {r['bf16'] * count / 1e3:6.2f} / "
                  f"{r['svdq'] * count / 1e3:6.2f} ms | {parts}{fill}{alt}", flush=True)
        tb = sum(r["bf16"] * r["count"] for r in rows) / 1e3
        ts = sum(r["svdq"] * r["count"] for r in rows) / 1e3
        print(f"b{batch} linear layers per step: bf16 {tb:.2f} ms, svdq {ts:.2f} ms ({tb / ts:.3f}x)", flush=True)
        out["batches"][batch] = {"rows": rows, "bf16_ms": tb, "svdq_ms": ts}
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
