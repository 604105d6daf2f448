"""Linear-layer speed on the GPU: svdq fused kernels against cuBLAS bf16, fp8 and int8 baselines, in one run.

    python bench/linear.py [--json] [--quick | --w4a16]

Rows per shape (times in µs, medians of triton.testing.do_bench; ratios are bf16 time / row time):
  bf16        cuBLAS F.linear
  fp8 row     per-row fp8 quantization of x + torch._scaled_mm with row-wise scales (quantization included)
  int8 mm     torch._int_mm on pre-quantized int8 operands (GEMM alone: a ceiling, not a full layer)
  unfused     the SVDQuant layer as separate PyTorch ops (act quant, low-rank down/up, weight expand, _int_mm)
  svdq r0     fused Triton kernels, rank 0
  svdq r32    fused Triton kernels, rank 32 (the default)
  svdq r32 a8 the Hopper A8 mode (4-bit weights, int8 per-token activations), rank 32
  svdq r96    rank 96: the default branch widened by a rank-64 LoRA (what an attached LoRA costs a layer)
and a breakdown of the r32 layer under CUDA-graph replay (activation kernels / weight expansion / int8 GEMM / the
GEMM on packed weights that replaces expansion + int8 GEMM for M <= 1024: GPU time, no launch overhead). W4A16 rows at M = 1, 2, 16:
eager, CUDA-graph replay, and graph replay with L2 flushed before each call (``bench_graph_cold``), by a 256 MB write (as
``triton.testing.do_bench`` flushes) and by a 256 MB read (no dirty lines left to write back during the call).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401  (makes `import svdq` work from a plain checkout)

from svdq.kernels.reference import QuantizedLinearWeights  # noqa: E402
from svdq.quant.formats import pack_int4, quantize_int4_weight  # noqa: E402

M4608 = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]
M_SWEEP = [(256, 3072, 12288), (1024, 3072, 12288), (16384, 3072, 12288)]


def make_layer(n, k, rank, act="int4", kind="w4a4", dev="cuda"):
    g = torch.Generator(device=dev).manual_seed(n * 7 + k)
    w = torch.randn(n, k, device=dev, generator=g) * 0.05
    q = quantize_int4_weight(w)
    dt = torch.bfloat16
    return QuantizedLinearWeights(
        in_features=k, out_features=n, kind=kind, precision="int4", act_precision=act if kind == "w4a4" else "none",
        qweight=pack_int4(q.codes), wmult=q.mult, wscale=q.scale,
        smooth=(torch.rand(k, device=dev, generator=g) + 0.5).to(dt),
        proj_down=(torch.randn(k, rank, device=dev, generator=g) * 0.05).to(dt) if rank else None,
        proj_up=(torch.randn(n, rank, device=dev, generator=g) * 0.05).to(dt) if rank else None,
        bias=(torch.randn(n, device=dev, generator=g) * 0.1).to(dt),
    )


def unfused_svdq(x, w: QuantizedLinearWeights):
    """The SVDQuant layer as separate PyTorch ops (what a pack without fused kernels runs)."""
    xf = x.float() / w.smooth.float()
    g = xf.view(x.shape[0], -1, 64)
    amax = g.abs().amax(-1)
    s = amax.amax(-1) / 105.0
    v = torch.ceil(amax / (7 * s[:, None])).clamp(1, 15)
    a = (torch.round(g / (v * s[:, None])[..., None]).clamp(-7, 7) * v[..., None]).view(x.shape[0], -1).to(torch.int8)
    p = w.qweight.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    codes = torch.stack([lo, hi], -1).view(w.out_features, -1)
    codes = torch.where(codes >= 8, codes - 16, codes)
    w8 = (codes * w.wmult.to(torch.int16).repeat_interleave(64, 1)).to(torch.int8)
    acc = torch._int_mm(a, w8.T)
    y = acc.float() * s[:, None] * w.wscale[None, :]
    if w.proj_down is not None:
        y = y + ((x @ w.proj_down) @ w.proj_up.T).float()
    return (y + w.bias.float()).to(x.dtype)


def fp8_rowwise(x, w8t, wscale):
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    sa = amax / 448.0
    xq = (x.float() / sa).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w8t, scale_a=sa, scale_b=wscale, out_dtype=torch.bfloat16)


def bench(fn, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # µs


def bench_graph(fn):
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    except Exception as exc:  # capture can fail for reasons worth seeing, but must not kill the run
        print(f"graph capture failed: {exc}", file=sys.stderr)
        return float("nan")


_FLUSH: list = []


def bench_graph_cold(fn, reps: int = 20, flush_by: str = "write") -> float:
    """GPU µs of ``fn`` with L2 cold: a CUDA graph of ``reps`` × (256 MB flush, ``fn``) minus one of the flushes alone
    (median of five replays each). Why: replaying ``fn`` back to back can leave part of a working set smaller than
    L2 cached (a 4-bit 3072×18432 weight is 29 MB; L2 holds 50), which a bf16 weight (113 MB) never is; inside a
    model other layers' traffic evicts it between calls. A write flush (``flush_by="write"``) has an after-effect of
    its own (its dirty lines are written back while ``fn`` runs: an additive cost that slows bf16 too); a read flush
    (``"read"``, a sum over the buffer) leaves clean lines."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    flush = _FLUSH[0]
    fn()
    graphs = (torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        flush.zero_()
        torch.cuda.synchronize()
        for g, with_fn in zip(graphs, (False, True)):
            with torch.cuda.graph(g):
                for _ in range(reps):
                    if flush_by == "write":
                        flush.zero_()
                    else:
                        flush.view(torch.int64).sum()
                    if with_fn:
                        fn()
    torch.cuda.current_stream().wait_stream(side)

    def replay_ms(g):
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        return sorted(times)[2]

    return (replay_ms(graphs[1]) - replay_ms(graphs[0])) * 1e3 / reps


def launch_overhead_us(fn, calls=300):
    """Host time per call of a tiny problem: what Python and the launches cost when the GPU is not the limit."""
    import time

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def run_shape(m, k, n, quick=False):
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.dispatch import svdq_linear, weight_workspace
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers, w4a4_gemm_packed

    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, device=dev, dtype=torch.bfloat16)
    r = {"M": m, "K": k, "N": n}
    r["bf16"] = bench(lambda: torch.nn.functional.linear(x, wb, b))
    w8t = wb.float().to(torch.float8_e4m3fn).T
    ws8 = torch.ones(1, n, device=dev)
    r["fp8_row"] = bench(lambda: fp8_rowwise(x, w8t, ws8))
    xi = torch.randint(-100, 100, (m, k), device=dev, dtype=torch.int8)
    wi = torch.randint(-100, 100, (n, k), device=dev, dtype=torch.int8)
    r["int8_mm"] = bench(lambda: torch._int_mm(xi, wi.T))
    l32 = make_layer(n, k, 32)
    l0 = make_layer(n, k, 0)
    la8 = make_layer(n, k, 32, act="int8")
    r["unfused"] = bench(lambda: unfused_svdq(x, l32))
    r["svdq_r0"] = bench(lambda: svdq_linear(x, l0))
    r["svdq_r32"] = bench(lambda: svdq_linear(x, l32))
    r["svdq_r32_a8"] = bench(lambda: svdq_linear(x, la8))
    l96 = make_layer(n, k, 96)
    r["svdq_r96"] = bench(lambda: svdq_linear(x, l96))
    # the same under CUDA-graph replay: GPU time without Python launch overhead
    r["bf16_graph"] = bench_graph(lambda: torch.nn.functional.linear(x, wb, b))
    r["svdq_r32_graph"] = bench_graph(lambda: svdq_linear(x, l32))
    # breakdown of the r32 layer
    a8, sa, lora = quantize_activation(x, l32.k_padded, l32.smooth, l32.proj_down)
    wsp = weight_workspace(n, l32.k_padded, x.device)
    w8 = expand_weight(l32.qweight, l32.wmult, out=wsp)
    inv = torch.reciprocal(l32.smooth.float())  # as the layer keeps it (dispatch's cached 1/λ)
    r["part_act"] = bench_graph(lambda: quantize_activation(x, l32.k_padded, l32.smooth, l32.proj_down, inv_smooth=inv))
    r["part_expand"] = bench_graph(lambda: expand_weight(l32.qweight, l32.wmult, out=wsp))
    r["part_gemm"] = bench_graph(lambda: w4a4_gemm(a8, sa, w8, l32.wscale, lora, l32.proj_up, l32.bias, torch.bfloat16))
    mt = transposed_multipliers(l32.wmult)  # the GEMM on packed weights (no expansion; dispatch's pick for M <= 1024)
    r["part_packed"] = bench_graph(lambda: w4a4_gemm_packed(a8, sa, l32.qweight, mt, l32.wscale, lora, l32.proj_up,
                                                            l32.bias, torch.bfloat16))
    # where a rank-64 LoRA's cost goes: the rank-96 layer and its kernels under graph replay
    a8_96, sa_96, lora_96 = quantize_activation(x, l96.k_padded, l96.smooth, l96.proj_down)
    inv96 = torch.reciprocal(l96.smooth.float())
    r["svdq_r96_graph"] = bench_graph(lambda: svdq_linear(x, l96))
    r["part_act_r96"] = bench_graph(lambda: quantize_activation(x, l96.k_padded, l96.smooth, l96.proj_down,
                                                                inv_smooth=inv96))
    # w8: l32's expanded weight, the same as l96's (make_layer seeds the weight by its shape alone)
    r["part_gemm_r96"] = bench_graph(lambda: w4a4_gemm(a8_96, sa_96, w8, l96.wscale, lora_96, l96.proj_up, l96.bias,
                                                       torch.bfloat16))
    r["weight_bytes_ratio_r32"] = sum(t.numel() * t.element_size() for t in l32.tensors().values() if t is not l32.bias) / (n * k * 2)
    return r


def run_gemv(m, k, n):
    from svdq.kernels.dispatch import svdq_linear

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    layer = make_layer(n, k, 0, kind="w4a16")
    r = {"M": m, "K": k, "N": n}
    r["bf16"] = bench(lambda: torch.nn.functional.linear(x, wb, b))
    r["svdq_w4a16"] = bench(lambda: svdq_linear(x, layer))
    r["bf16_graph"] = bench_graph(lambda: torch.nn.functional.linear(x, wb, b))
    r["svdq_w4a16_graph"] = bench_graph(lambda: svdq_linear(x, layer))
    r["bf16_cold"] = bench_graph_cold(lambda: torch.nn.functional.linear(x, wb, b))
    r["svdq_w4a16_cold"] = bench_graph_cold(lambda: svdq_linear(x, layer))
    r["bf16_cold_read"] = bench_graph_cold(lambda: torch.nn.functional.linear(x, wb, b), flush_by="read")
    r["svdq_w4a16_cold_read"] = bench_graph_cold(lambda: svdq_linear(x, layer), flush_by="read")
    return r


def w4a16_line(g: dict) -> str:
    return (f"bf16 {g['bf16']:.1f} µs, svdq {g['svdq_w4a16']:.1f} µs ({g['bf16'] / g['svdq_w4a16']:.2f}x); graph replay: "
            f"bf16 {g['bf16_graph']:.1f}, svdq {g['svdq_w4a16_graph']:.1f} µs ({g['bf16_graph'] / g['svdq_w4a16_graph']:.2f}x); "
            f"L2 cold (write flush): bf16 {g['bf16_cold']:.1f}, svdq {g['svdq_w4a16_cold']:.1f} µs "
            f"({g['bf16_cold'] / g['svdq_w4a16_cold']:.2f}x); L2 cold (read flush): bf16 {g['bf16_cold_read']:.1f}, "
            f"svdq {g['svdq_w4a16_cold_read']:.1f} µs ({g['bf16_cold_read'] / g['svdq_w4a16_cold_read']:.2f}x)")


def geomean(v):
    return math.exp(sum(math.log(a) for a in v) / len(v))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--w4a16", action="store_true", help="only the W4A16 rows (M = 1, 2, 16)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/linear.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    gemv = [run_gemv(m, 3072, n) for n in (18432, 9216) for m in (1, 2, 16)]
    if args.w4a16:
        for g in gemv:
            print(f"W4A16 M={g['M']} {g['K']}->{g['N']}: " + w4a16_line(g))
        return 0
    rows = [run_shape(4608, k, n) for k, n in M4608]
    if not args.quick:
        rows += [run_shape(m, k, n) for m, k, n in M_SWEEP]
    cols = ["bf16", "fp8_row", "int8_mm", "unfused", "svdq_r0", "svdq_r32", "svdq_r32_a8", "svdq_r96"]
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}")
    print(f"{'M':>6} {'K':>6} {'N':>6} | " + " | ".join(f"{c:>11}" for c in cols) + " | graph: bf16 / r32 | graph µs: act expand gemm packed | r32 vs unfused | branch cost"
          + " | r96 graph µs: layer act gemm")
    for r in rows:
        cells = [f"{r['bf16']:7.1f}    "] + [f"{r[c]:6.1f} {r['bf16'] / r[c]:4.2f}x" for c in cols[1:]]
        print(f"{r['M']:>6} {r['K']:>6} {r['N']:>6} | " + " | ".join(cells)
              + f" | {r['bf16_graph']:6.1f} / {r['svdq_r32_graph']:6.1f} {r['bf16_graph'] / r['svdq_r32_graph']:4.2f}x"
              + f" | {r['part_act']:5.1f} {r['part_expand']:5.1f} {r['part_gemm']:6.1f} {r['part_packed']:6.1f}"
              + f" | {r['unfused'] / r['svdq_r32']:5.2f}x"
              + f" | {100 * (r['svdq_r32'] / r['svdq_r0'] - 1):+.1f}%"
              + f" | {r['svdq_r96_graph']:6.1f} {r['part_act_r96']:5.1f} {r['part_gemm_r96']:6.1f}")
    main_rows = [r for r in rows if r["M"] == 4608]
    summary = {
        "geomean_r32_vs_bf16": geomean([r["bf16"] / r["svdq_r32"] for r in main_rows]),
        "geomean_r0_vs_bf16": geomean([r["bf16"] / r["svdq_r0"] for r in main_rows]),
        "geomean_a8_vs_bf16": geomean([r["bf16"] / r["svdq_r32_a8"] for r in main_rows]),
        "geomean_r96_vs_bf16": geomean([r["bf16"] / r["svdq_r96"] for r in main_rows]),
        "geomean_lora64_cost": geomean([r["svdq_r96"] / r["svdq_r32"] for r in main_rows]) - 1,
        "geomean_fp8_vs_bf16": geomean([r["bf16"] / r["fp8_row"] for r in main_rows]),
        "geomean_r32_vs_unfused": geomean([r["unfused"] / r["svdq_r32"] for r in main_rows]),
        "geomean_branch_cost": geomean([r["svdq_r32"] / r["svdq_r0"] for r in main_rows]) - 1,
        "weight_bytes_ratio_r32_3072x3072": main_rows[0]["weight_bytes_ratio_r32"],
        "geomean_r32_vs_bf16_cudagraph": geomean([r["bf16_graph"] / r["svdq_r32_graph"] for r in main_rows]),
        "geomean_lora64_cost_cudagraph": geomean([r["svdq_r96_graph"] / r["svdq_r32_graph"] for r in main_rows]) - 1,
    }
    from svdq.kernels.dispatch import svdq_linear

    tiny = make_layer(256, 256, 32)
    xt = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    summary["host_us_per_call_svdq"] = launch_overhead_us(lambda: svdq_linear(xt, tiny))
    summary["host_us_per_call_bf16"] = launch_overhead_us(lambda: torch.nn.functional.linear(xt, wt))
    print("W4A16 GEMV:")
    for g in gemv:
        print(f"  M={g['M']:>3} {g['K']}->{g['N']}: " + w4a16_line(g))
    print("summary (M=4608 geomeans): " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if args.json:
        print(json.dumps({"env": env, "rows": rows, "gemv": gemv, "summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
