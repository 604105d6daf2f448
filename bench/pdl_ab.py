"""Programmatic dependent launch (PDL) off and on, same process, alternating: svdq layers under CUDA-graph replay.

    python bench/pdl_ab.py [--json OUT] [--rounds 3] [--modes start,end,wait] [--lengths 100,500,2000,8000]

Why: a layer is a chain of dependent launches (activation passes, weight expansion, GEMM; W4A16's input
preparation and GEMM). Launched as programmatic dependents (``kernels/launch.py``), a kernel's programs become
resident while the kernel before it finishes, instead of the GPU idling through each launch. Each round times every
layer with ``SVDQ_PDL=0`` and each of ``--modes`` (``kernels/launch.pdl_start``: where a kernel lets the next one
launch: at its start, at its end, or never; the order rotates between rounds), checks that each gives the same bits
as ``0``, and prints the ratios; cuBLAS bf16 alongside for the layer's speedup.

``--lengths``: the M = 1 W4A16 layer (3072→18432) timed in graphs of that many calls, PDL off and on, and by
``triton.testing.do_bench_cudagraph`` as ``bench/linear.py`` times it. Why: its timing was bimodal across processes
in session 10 (16.0-16.6 or 18.1-18.7 µs); do_bench_cudagraph sizes its graph from a short eager estimate, so the
graph's length varies with what the process did before.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from _results import write_json  # noqa: E402

from linear import make_layer  # noqa: E402

W4A16_CASES = [(1, 3072, 18432), (2, 3072, 18432), (16, 3072, 18432), (1, 3072, 9216), (1, 3072, 3072)]
W4A4_CASES = [(4608, 3072, 3072), (4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072),
              (512, 3072, 12288), (1024, 3072, 12288), (4096, 3072, 3072)]


def graph_us(fn, calls: int, replays: int = 10) -> float:
    """µs per call: one CUDA graph of ``calls`` calls, median of ``replays`` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(side)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / calls)
    del g
    return statistics.median(times)


def set_pdl(mode: str) -> None:
    os.environ["SVDQ_PDL"] = mode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="start,end,wait")
    ap.add_argument("--lengths", default="100,500,2000,8000")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    from svdq.kernels.dispatch import svdq_linear
    from svdq.kernels.launch import pdl_mode

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    modes = ["0"] + args.modes.split(",")
    set_pdl(modes[1])
    print(f"# PDL mode here: {pdl_mode(torch.device('cuda', torch.cuda.current_device()))}", flush=True)
    cases = []
    for kind, table in (("w4a16", W4A16_CASES), ("w4a4", W4A4_CASES)):
        for m, k, n in table:
            layer = make_layer(n, k, 0 if kind == "w4a16" else 32, kind=kind)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            calls = 2000 if kind == "w4a16" else 50
            cases.append({"kind": kind, "M": m, "K": k, "N": n, "layer": layer, "x": x, "wb": wb, "calls": calls})
    out = {"env": env, "rows": [], "lengths": []}
    for c in cases:  # outputs with each mode: the same bits as without PDL
        outs = []
        for mode in modes:
            set_pdl(mode)
            outs.append(svdq_linear(c["x"], c["layer"]))
        torch.cuda.synchronize()
        c["same"] = all(torch.equal(outs[0], o) for o in outs[1:])
        c["bf16"] = graph_us(lambda c=c: torch.nn.functional.linear(c["x"], c["wb"]), c["calls"])
        for mode in modes:
            c[mode] = []
    for r in range(args.rounds):
        for i in range(len(modes)):
            mode = modes[(i + r) % len(modes)]
            set_pdl(mode)
            for c in cases:
                c[mode].append(graph_us(lambda c=c: svdq_linear(c["x"], c["layer"]), c["calls"]))
    print("| kind | M | K→N | bf16 µs | PDL off µs | " + " | ".join(f"{m} µs (/ off)" for m in modes[1:]) +
          " | bf16 / best | same bits |")
    print("|---|---|---|---|---|" + "---|" * (len(modes) - 1) + "---|---|")
    for c in cases:
        t = {m: statistics.median(c[m]) for m in modes}
        print(f"| {c['kind']} | {c['M']} | {c['K']}→{c['N']} | {c['bf16']:.1f} | {t['0']:.1f} | " +
              " | ".join(f"{t[m]:.1f} ({t[m] / t['0']:.3f})" for m in modes[1:]) +
              f" | {c['bf16'] / min(t.values()):.2f}× | {c['same']} |", flush=True)
        out["rows"].append({k: v for k, v in c.items() if k not in ("layer", "x", "wb")})
    one = next(c for c in cases if c["kind"] == "w4a16" and c["M"] == 1 and c["N"] == 18432)
    for calls in (int(v) for v in args.lengths.split(",") if v):
        row = {"calls": calls}
        for mode in modes:
            set_pdl(mode)
            row[mode] = graph_us(lambda: svdq_linear(one["x"], one["layer"]), calls)
        out["lengths"].append(row)
        print(f"W4A16 M=1 3072→18432, graph of {calls} calls: " + ", ".join(f"PDL {m} {row[m]:.1f} µs" for m in modes),
              flush=True)
    for mode in modes:
        set_pdl(mode)
        t = triton.testing.do_bench_cudagraph(lambda: svdq_linear(one["x"], one["layer"]), rep=100,
                                              return_mode="median") * 1e3
        out["do_bench_cudagraph_" + mode] = t
        print(f"W4A16 M=1 3072→18432, do_bench_cudagraph: PDL {mode} {t:.1f} µs", flush=True)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
