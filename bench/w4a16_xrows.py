"""The W4A16 pair kernel's prepared input: TMA descriptor over M rows (the rest of the 16-row tile zero-filled by the
copy engine) against whole row tiles (no row read past the tensor); programmatic dependent launch off and "end".

    python bench/w4a16_xrows.py

Why: at 3072→18432 the M = 1 layer measured 16.0-16.6 or 18.1-18.7 µs depending on the process (session 10), and in
session 11 M = 2 turned slow in a process where M = 1 was fast. Both states belong to the descriptor over M rows;
over whole tiles every row count measured the fast time (BENCHMARKS.md, session 11). Same process, three rounds,
CUDA graphs of 2,000 calls, cuBLAS bf16 alongside; the layer through dispatch (its defaults) as the last column.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401

from linear import make_layer  # noqa: E402
from pdl_ab import graph_us  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from svdq.kernels import dispatch
    from svdq.kernels.gemm_w4a16_packed import w4a16_packed

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    layer = make_layer(18432, 3072, 0, kind="w4a16")
    scratch = dispatch.arena(torch.device("cuda")).get
    wb = torch.randn(18432, 3072, device="cuda", dtype=torch.bfloat16)
    res: dict = {}
    for r in range(3):
        for m in (1, 2, 16):
            x = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16)
            if r == 0:
                res[(m, "bf16")] = [graph_us(lambda: torch.nn.functional.linear(x, wb), 2000)]
            outs = {}
            for rows in ("m", "tile"):
                for mode in ("0", "end"):
                    os.environ["SVDQ_PDL"] = mode

                    def fn(rows=rows):
                        return w4a16_packed(x, layer.qweight, dispatch._mult_t(layer), layer.wscale,
                                            dispatch._inv_smooth(layer), 3072, layer.bias, torch.bfloat16,
                                            config={"X_ROWS": rows}, scratch=scratch)

                    outs[rows] = fn()
                    res.setdefault((m, f"rows={rows} PDL={mode}"), []).append(graph_us(fn, 2000))
            res.setdefault((m, "same bits"), []).append(torch.equal(outs["m"], outs["tile"]))
            os.environ.pop("SVDQ_PDL", None)
            res.setdefault((m, "dispatch (defaults)"), []).append(graph_us(lambda: dispatch.svdq_linear(x, layer), 2000))
    for (m, name), v in res.items():
        if isinstance(v[0], bool):
            print(f"M={m} {name}: {all(v)}")
        else:
            print(f"M={m} {name:22s}: {statistics.median(v):.1f} µs ({', '.join(f'{t:.1f}' for t in v)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
