"""Is the GEMM's last partial wave real? CUDA-graph µs of the W4A4 GEMM (expanded weights, shipped configs) at row
counts whose tile count divides evenly among the SMs and at FLUX's, same run. Needs a GPU.

    python3 bench/wave_tail_probe.py [--stream-k]

Why: at M = 4608 and N = 3072 the 128 x 128 tiles number 864, 6.55 per SM of an H100 (132): 72 programs run 7 tiles,
60 run 6, so ~6.5% of the GEMM has idle SMs. If the GEMM's time goes with the most tiles a program runs, M = 4224
(792 tiles, 6 each) takes 6/7 of M = 4608's time, not 4224/4608 of it.

``--stream-k``: instead, the GEMM with the tail split over every program by K steps (``SVDQ_STREAM_K``, the
ping-pong kernel) against whole tiles, same run, at FLUX's shapes for batch 1 and 2, and whole layers (``svdq_linear``,
rank 32) against bf16 at the issue's M = 4608 shapes: what it does to the geomean.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from linear import bench_graph, make_layer  # noqa: E402

from svdq.kernels.act_quant import quantize_activation  # noqa: E402
from svdq.kernels.dispatch import weight_workspace  # noqa: E402
from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm  # noqa: E402


def stream_k_rows() -> None:
    import math

    import triton.testing

    from svdq.kernels.dispatch import svdq_linear

    shapes = ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072))
    for m in (4608, 9216):
        for k, n in shapes:
            layer = make_layer(n, k, 32)
            w8 = expand_weight(layer.qweight, layer.wmult, out=weight_workspace(n, layer.k_padded, torch.device("cuda")))
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
            line = f"GEMM M {m} K {k:5d} N {n:5d}:"
            outs, times = [], []
            for v in ("0", "1"):
                os.environ["SVDQ_STREAM_K"] = v
                outs.append(w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16).clone())
                times.append(bench_graph(lambda: w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias,
                                                           torch.bfloat16)))
            os.environ.pop("SVDQ_STREAM_K")
            print(f"{line} whole tiles {times[0]:7.1f} | stream-K tail {times[1]:7.1f} µs ({times[0] / times[1]:.3f}x) | "
                  f"same bits {torch.equal(outs[0], outs[1])}", flush=True)
    ratios = {"0": [], "1": []}
    for k, n in shapes:
        layer = make_layer(n, k, 32)
        x = torch.randn(4608, k, device="cuda", dtype=torch.bfloat16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        b16 = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        bf = triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, w16, b16), rep=100) * 1e3
        line = f"layer 4608 x {k}->{n}: bf16 {bf:7.1f}"
        for v in ("0", "1"):
            os.environ["SVDQ_STREAM_K"] = v
            us = bench_graph(lambda: svdq_linear(x, layer))
            ratios[v].append(bf / us)
            line += f" | SVDQ_STREAM_K={v} {us:7.1f} ({bf / us:.3f}x)"
        os.environ.pop("SVDQ_STREAM_K")
        print(line, flush=True)
    for v, r in ratios.items():
        print(f"geomean r32 under CUDA graphs, M = 4608, SVDQ_STREAM_K={v}: "
              f"{math.exp(sum(map(math.log, r)) / len(r)):.3f}x bf16", flush=True)


def main() -> int:
    import triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)} ({sms} SMs), torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    if "--stream-k" in sys.argv:
        stream_k_rows()
        return 0
    for k, n in ((3072, 3072), (12288, 3072), (15360, 3072), (3072, 12288), (3072, 9216)):
        layer = make_layer(n, k, 32)
        w8 = expand_weight(layer.qweight, layer.wmult, out=weight_workspace(n, layer.k_padded, torch.device("cuda")))
        line = f"K {k:5d} N {n:5d}:"
        base = None
        for m in (4224, 4352, 4608, 4736, 5280):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
            us = bench_graph(lambda: w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias,
                                               torch.bfloat16))
            tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
            per = us / m
            base = base or per
            line += f" | M {m} {us:6.1f} µs ({tiles} tiles, {tiles / sms:.2f}/SM, {per / base:.3f}x per row)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
