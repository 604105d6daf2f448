"""A linear on a batched token slice (the double blocks' attention-output halves at batch 2), read in place by the
activation kernels against the copy-then-linear path it replaced, and bf16 ``F.linear`` on the same slice; CUDA-graph
µs, same run. Needs a CUDA GPU.

    python3 bench/token_slice.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from linear import bench_graph, make_layer  # noqa: E402

from svdq.kernels.dispatch import svdq_linear  # noqa: E402

print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
for batch, txt, img, k, n in ((2, 512, 4096, 3072, 3072), (1, 512, 4096, 3072, 3072)):
    layer = make_layer(n, k, 32)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    attn = torch.randn(batch, txt + img, k, device="cuda", dtype=torch.bfloat16)
    for name, part in (("image", attn[:, txt:]), ("text", attn[:, :txt])):
        assert torch.equal(svdq_linear(part, layer), svdq_linear(part.contiguous(), layer))
        t_place = bench_graph(lambda: svdq_linear(part, layer))
        t_copy = bench_graph(lambda: svdq_linear(part.reshape(-1, k), layer))
        t_bf16 = bench_graph(lambda: torch.nn.functional.linear(part, wb))
        print(f"batch {batch} {name:5s} [{batch}, {part.shape[1]}, {k}]→{n}: in place {t_place:7.1f} µs, "
              f"copy first {t_copy:7.1f} µs ({t_copy / t_place:.3f}×), bf16 F.linear {t_bf16:7.1f} µs "
              f"(svdq {t_bf16 / t_place:.2f}× bf16)", flush=True)
