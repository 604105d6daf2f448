"""The W4A16 layer at one row (3072→18432) under CUDA-graph replay after different process histories.

    python bench/w4a16_history.py graph       # straight to the graph measurement
    python bench/w4a16_history.py bf16eager   # cuBLAS bf16 and the eager layer timed first, as bench/linear.py does

Why: the same kernel with the same launch measured 16.0-16.6 µs in some processes and 18.1-18.7 in others
(BENCHMARKS.md, session 10); this reproduces the two states. Each mode must run in its own process.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401

from linear import bench, bench_graph, make_layer  # noqa: E402


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "graph"
    if mode not in ("graph", "eager", "bf16", "bf16eager") or not torch.cuda.is_available():
        print(__doc__, file=sys.stderr)
        return 2
    from svdq.kernels.dispatch import svdq_linear

    m, k, n = 1, 3072, 18432
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    layer = make_layer(n, k, 0, kind="w4a16")
    if "bf16" in mode:
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        print(f"bf16 eager {bench(lambda: torch.nn.functional.linear(x, wb, b)):.1f} µs")
    if "eager" in mode:
        print(f"svdq eager {bench(lambda: svdq_linear(x, layer)):.1f} µs")
    if "bf16" in mode:
        print(f"bf16 graph {bench_graph(lambda: torch.nn.functional.linear(x, wb, b)):.1f} µs")
    for _ in range(2):
        print(f"{mode}: svdq graph {bench_graph(lambda: svdq_linear(x, layer)):.1f} µs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
