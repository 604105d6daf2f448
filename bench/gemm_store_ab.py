"""Same-run A/B of the ping-pong GEMM's output store: 64 scattered 4-byte stores a thread from the MMA layout
(``pointer``) against the tile written to shared memory and stored by one TMA bulk copy (``tma``, the default
since session 13, which this measured).

    python3 bench/gemm_store_ab.py [--shapes M:K:N[:gelu],...] [--json OUT]

CUDA-graph µs of the GEMM alone (rank 32 + bias, the branch in the turn), at FLUX's row counts for batch 1 and 2,
the two variants alternating over two rounds, and whether their outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import sys

import torch

import _path  # noqa: F401
from _results import write_json  # noqa: E402

from linear import bench_graph, make_layer  # noqa: E402

SHAPES = ("4608:3072:21504,9216:3072:21504,4096:3072:9216,8192:3072:9216,4096:3072:12288:gelu,8192:3072:12288:gelu,"
          "4096:3072:3072,8192:3072:3072,4608:15360:3072,9216:15360:3072,4096:12288:3072,512:3072:9216,1024:3072:12288")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gemm_store_ab.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for spec in args.shapes.split(","):
        parts = spec.split(":")
        m, k, n = (int(v) for v in parts[:3])
        gelu = len(parts) > 3 and parts[3] == "gelu"
        layer = make_layer(n, k, 32)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
        w8 = expand_weight(layer.qweight, layer.wmult)

        def gemm(store):
            cfg = {"kwargs": {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128,
                              "STAGES": 4, "GROUP_M": 8, "STORE": store}, "num_warps": 4, "num_stages": 1}
            return w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, gelu=gelu,
                             config=cfg)

        same = torch.equal(gemm("pointer"), gemm("tma"))
        t = {"pointer": [], "tma": []}
        for _ in range(2):
            for store in ("pointer", "tma"):
                t[store].append(bench_graph(lambda: gemm(store)))
        p, q = min(t["pointer"]), min(t["tma"])
        r = {"M": m, "K": k, "N": n, "gelu": gelu, "pointer_us": t["pointer"], "tma_us": t["tma"], "identical": same}
        rows.append(r)
        print(f"M={m:>5} {k:>5}->{n:<5}{' GELU' if gelu else '     '}: pointer store {p:7.1f} µs, TMA store {q:7.1f} µs "
              f"({p / q:.3f}x); identical: {same}", flush=True)
    if args.json:
        write_json(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
