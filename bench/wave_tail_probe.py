"""Is the GEMM's last partial wave real? CUDA-graph µs of the W4A4 GEMM (expanded weights, shipped configs) at row
counts whose tile count divides evenly among the SMs and at FLUX's, same run. Needs a GPU.

    python3 bench/wave_tail_probe.py

Why: at M = 4608 and N = 3072 the 128 x 128 tiles number 864, 6.55 per SM of an H100 (132): 72 programs run 7 tiles,
60 run 6, so ~6.5% of the GEMM has idle SMs. If the GEMM's time goes with the most tiles a program runs, M = 4224
(792 tiles, 6 each) takes 6/7 of M = 4608's time, not 4224/4608 of it.
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


def main() -> int:
    import triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)} ({sms} SMs), torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
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
