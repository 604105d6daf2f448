"""The one-pass activation kernel (``kernels/act_onepass.py``) against the two passes, same run. Needs a GPU.

    python3 bench/act_onepass_probe.py [--tiles] [--layers] [--chunks] [--only-chunks] [--repeat N]

For each shape: codes and scales must equal the two passes' bit for bit and the branch product agree within 1e-5
(and the fp32 product within 2e-4), repeated (a missing fence or a race in the row block's meeting shows up as a
result that changes between runs); then CUDA-graph µs of both, and the floor (x read once, codes written once, at
this GPU's device-to-device copy rate). ``--tiles``: the one-launch kernel at other row blocks, stats tasks' K tiles
and quantize tasks' widths, and at several lags (row blocks between a row block's two kinds of task) around the
default.
``--layers``: whole layer calls (``svdq_linear``, rank 32) with ``SVDQ_ACT_ONEPASS`` 0 and 1, and bf16 ``F.linear``,
at the M = 4608 shapes of ``bench/linear.py``: what the change does to the issue's ratio. ``--chunks``
(``--only-chunks``: nothing else): the two passes over row chunks in turn, against one call over all rows.
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from linear import bench_graph, make_layer  # noqa: E402

from svdq.kernels.act_quant import quantize_activation  # noqa: E402

SHAPES = [  # (M, K, rank)
    (4608, 3072, 32), (4608, 12288, 32), (4608, 15360, 32), (9216, 3072, 32), (8192, 12288, 32),
    (9216, 15360, 32), (4608, 3072, 96), (4608, 15360, 96), (1024, 3072, 32), (512, 3072, 32), (4096, 3072, 0),
    (77, 12288, 32), (1000, 3072, 128),
]
VARIANTS = [dict(k_per_program=4), dict(k_per_program=8), dict(k_per_program=16), dict(pass2_groups=2),
            dict(block_m=32), dict(block_m=64)]
LAGS = (0.25, 0.5, 2, 4)  # times the default lag


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def check(x, layer, repeat: int, **kw) -> str:
    args = (x, layer.k_padded, layer.smooth, layer.proj_down)
    a1, s1, l1 = (t.clone() if t is not None else None for t in quantize_activation(*args, onepass=False))
    ref = x.float() @ layer.proj_down.float() if layer.proj_down is not None else None
    worst = 0.0
    for _ in range(repeat):
        a, s, lora = quantize_activation(*args, onepass=True, **kw)
        torch.cuda.synchronize()
        if not (torch.equal(a, a1) and torch.equal(s, s1)):
            return f"WRONG codes ({(a != a1).sum().item()} differ) or scales ({(s != s1).sum().item()} differ)"
        if ref is not None:
            worst = max(worst, rel(lora, l1))
            if rel(lora, l1) > 1e-5 or rel(lora, ref) > 2e-4:
                return f"WRONG branch: rel {rel(lora, l1):.1e} to the two passes, {rel(lora, ref):.1e} to fp32"
    return f"ok x{repeat} (branch within {worst:.1e})"


def copy_rate() -> float:
    import triton.testing

    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median") * 1e3)


def layer_rows() -> None:
    import triton.testing

    from svdq.kernels.dispatch import svdq_linear

    ratios = {"0": [], "1": []}
    for k, n in ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)):
        layer = make_layer(n, k, 32)
        x = torch.randn(4608, k, device="cuda", dtype=torch.bfloat16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        b16 = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        bf = triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, w16, b16), rep=100) * 1e3
        line = f"layer 4608 x {k}->{n}: bf16 {bf:7.1f}"
        outs = {}
        for v in ("0", "1"):
            os.environ["SVDQ_ACT_ONEPASS"] = v
            outs[v] = svdq_linear(x, layer).clone()
            us = bench_graph(lambda: svdq_linear(x, layer))
            ratios[v].append(bf / us)
            line += f" | onepass={v} {us:7.1f} ({bf / us:.3f}x)"
        os.environ.pop("SVDQ_ACT_ONEPASS")
        line += f" | outputs equal: {torch.equal(outs['0'], outs['1'])} (rel {rel(outs['1'], outs['0']):.1e})"
        print(line, flush=True)
    for v, r in ratios.items():
        print(f"geomean over the M = 4608 shapes, onepass={v}: {math.exp(sum(map(math.log, r)) / len(r)):.3f}x bf16",
              flush=True)


def chunk_rows() -> None:
    """The two passes run on row chunks one after the other (pass 1 then pass 2 of each chunk): does pass 2 then read
    its chunk from L2? CUDA-graph µs of all the chunks' launches against one call over every row."""
    for m, k in ((4608, 3072), (4608, 12288), (4608, 15360), (9216, 15360), (8192, 12288)):
        layer = make_layer(64, k, 32)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        args = (layer.k_padded, layer.smooth, layer.proj_down)
        whole = bench_graph(lambda: quantize_activation(x, *args, onepass=False))
        line = f"chunks M {m} K {k}: whole {whole:6.1f}"
        for rows in (256, 512, 1024, 2048):
            def run(rows=rows):
                for c in range(0, m, rows):
                    quantize_activation(x[c:c + rows], *args, onepass=False)
            line += f" | {rows} rows {bench_graph(run):6.1f}"
        print(line, flush=True)


def main() -> int:
    import triton

    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 5
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rate = copy_rate()
    print(f"copy rate {rate / 1e6:.2f} TB/s (read + write)", flush=True)
    if "--only-chunks" in sys.argv:
        chunk_rows()
        return 0
    for m, k, r in SHAPES:
        layer = make_layer(64, k, r)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
        args = (x, layer.k_padded, layer.smooth, layer.proj_down)
        floor = (m * k * 2 + m * layer.k_padded) / rate
        two = bench_graph(lambda: quantize_activation(*args, onepass=False))
        one = bench_graph(lambda: quantize_activation(*args, onepass=True))
        print(f"M {m:5d} K {k:5d} r {r:3d}: floor {floor:6.1f} | two passes {two:6.1f} | one pass {one:6.1f} "
              f"({two / one:.2f}x) | {check(x, layer, repeat)}", flush=True)
        if "--tiles" in sys.argv and r <= 32 and m >= 4096:
            from svdq.kernels.act_onepass import Plan

            plan = Plan(m, layer.k_padded, r, x.device)
            variants = VARIANTS + [dict(lag=max(1, round(plan.lag * f))) for f in LAGS]
            print(f"    default: {plan.block_m} rows, stats {plan.gp} x {plan.tiles} tiles of {64 * plan.groups}, "
                  f"quantize {plan.gq} x {64 * plan.qgroups}, lag {plan.lag}", flush=True)
            for kw in variants:
                try:
                    us = bench_graph(lambda: quantize_activation(*args, onepass=True, **kw))
                    print(f"    {kw}: {us:6.1f} µs | {check(x, layer, 2, **kw)}", flush=True)
                except Exception as exc:
                    print(f"    {kw} failed: {str(exc)[-300:]}", flush=True)
    # a [B, L, K] token slice read in place (batch 2's image tokens of a double block)
    xb = torch.randn(2, 4608, 3072, device="cuda", dtype=torch.bfloat16)[:, 512:]
    layer = make_layer(64, 3072, 32)
    args = (xb, layer.k_padded, layer.smooth, layer.proj_down)
    a1, s1, l1 = quantize_activation(*args, onepass=False)
    a1, s1, l1 = a1.clone(), s1.clone(), l1.clone()
    a, s, lora = quantize_activation(*args, onepass=True)
    print(f"batched slice 2 x 4096 x 3072: same codes {torch.equal(a, a1)}, scales {torch.equal(s, s1)}, "
          f"branch rel {rel(lora, l1):.1e}; two passes {bench_graph(lambda: quantize_activation(*args, onepass=False)):.1f}"
          f" µs, one pass {bench_graph(lambda: quantize_activation(*args, onepass=True)):.1f} µs", flush=True)
    if "--layers" in sys.argv:
        layer_rows()
    if "--chunks" in sys.argv:
        chunk_rows()
    return 0


if __name__ == "__main__":
    sys.exit(main())
