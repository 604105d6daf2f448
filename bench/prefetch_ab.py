"""Same-run A/B of the expansion chain (``kernels.prefetch``): each GEMM expanding the next layer's weight with
its spare warps (``SVDQ_PREFETCH=1``, the default) against a separate expansion pass per layer (``=0``).

    python3 bench/prefetch_ab.py [--double 3] [--single 6] [--batch 1,2] [--rounds 3] [--json OUT]

Builds ``--double`` FLUX double blocks' and ``--single`` single blocks' W4A4 linears (distinct weights, full size,
rank 32) and calls them in the model's order (``comfy/ldm/flux/layers.py``: img qkv, txt qkv, img proj, img mlp,
txt proj, txt mlp; linear1, linear2), eager, as ComfyUI does, with the inputs at the step's row counts. Times
ten passes over the sequence with CUDA events, the two settings alternating for ``--rounds`` rounds, and checks that
the last pass's outputs are bit-identical. The saving is also given per FLUX.1-dev step (19 double and 38 single
blocks). Eager on purpose: the chain switches itself off once a CUDA graph has been captured on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import _path  # noqa: F401

from linear import make_layer  # noqa: E402

DOUBLE = [("img qkv", 4096, 3072, 9216, False), ("txt qkv", 512, 3072, 9216, False),
          ("img proj", 4096, 3072, 3072, False), ("img mlp.0", 4096, 3072, 12288, True),
          ("img mlp.2", 4096, 12288, 3072, False), ("txt proj", 512, 3072, 3072, False),
          ("txt mlp.0", 512, 3072, 12288, True), ("txt mlp.2", 512, 12288, 3072, False)]
SINGLE = [("linear1", 4608, 3072, 21504, False), ("linear2", 4608, 15360, 3072, False)]


def profiled_pass(one_pass, flag: str, passes: int = 3) -> tuple[float, dict]:
    """GPU ms per pass (kernel time, host excluded) and its split by kernel, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    os.environ["SVDQ_PREFETCH"] = flag
    one_pass()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            one_pass()
        torch.cuda.synchronize()
    kinds: dict = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "device_time_total", 0):
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t:
                kinds[e.key[:40]] = kinds.get(e.key[:40], 0.0) + t / 1e3 / passes
    return sum(kinds.values()), kinds


def kernel_costs(seq, batches: str) -> list:
    """Each distinct GEMM alone, with its expander expanding the next layer's weight, and with the separate
    expansion pass instead (CUDA-graph µs, direct kernel calls: no chain involved)."""
    from linear import bench_graph
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.dispatch import PINGPONG_CONFIG
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    rows_out, seen = [], set()
    for batch in (int(v) for v in batches.split(",")):
        for i, (w, rows, k, gelu) in enumerate(seq):
            nxt = seq[(i + 1) % len(seq)][0]
            key = (batch, rows, k, w.out_features, nxt.out_features, nxt.in_features)
            if key in seen:
                continue
            seen.add(key)
            x = torch.randn(rows * batch, k, device="cuda", dtype=torch.bfloat16)
            a8, sa, lora = quantize_activation(x, w.k_padded, w.smooth, w.proj_down)
            w8 = expand_weight(w.qweight, w.wmult)
            out = torch.empty(nxt.out_features, nxt.k_padded, dtype=torch.int8, device="cuda")
            cfg = PINGPONG_CONFIG if rows * batch <= 1024 else None

            def gemm(pf=None):
                return w4a4_gemm(a8, sa, w8, w.wscale, lora, w.proj_up, w.bias, torch.bfloat16, gelu=gelu, config=cfg,
                                 prefetch=pf)

            r = {"batch": batch, "M": rows * batch, "K": k, "N": w.out_features,
                 "next": f"{nxt.in_features}->{nxt.out_features}",
                 "gemm": bench_graph(gemm),
                 "gemm_expanding_next": bench_graph(lambda: gemm((nxt.qweight, nxt.wmult, out))),
                 "expand_next_alone": bench_graph(lambda: expand_weight(nxt.qweight, nxt.wmult, out=out))}
            ok = torch.equal(out, expand_weight(nxt.qweight, nxt.wmult))
            print(f"M={r['M']:>5} {k:>5}->{w.out_features:<5} GEMM {r['gemm']:7.1f} µs, expanding {r['next']} beside it "
                  f"{r['gemm_expanding_next']:7.1f} (+{r['gemm_expanding_next'] - r['gemm']:.1f}); that expansion alone "
                  f"{r['expand_next_alone']:.1f}; expander output identical: {ok}", flush=True)
            r["identical"] = ok
            rows_out.append(r)
    return rows_out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=3)
    ap.add_argument("--single", type=int, default=6)
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/prefetch_ab.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from svdq.kernels import dispatch

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    seq = []  # (layer, rows per image, K, GELU)
    for b in range(args.double):
        for name, rows, k, n, gelu in DOUBLE:
            seq.append((make_layer(n, k, 32), rows, k, gelu))
    for b in range(args.single):
        for name, rows, k, n, gelu in SINGLE:
            seq.append((make_layer(n, k, 32), rows, k, gelu))
    out = {"env": env, "batches": {}}
    for batch in (int(v) for v in args.batch.split(",")):
        torch.cuda.empty_cache()
        xs = {(rows, k): torch.randn(rows * batch, k, device="cuda", dtype=torch.bfloat16) for _, rows, k, _ in seq}

        def one_pass():
            return [dispatch.svdq_linear(xs[(rows, k)], w, gelu=gelu) for w, rows, k, gelu in seq]

        times = {"1": [], "0": []}
        last = {}
        for _ in range(args.rounds):
            for flag in ("1", "0"):
                os.environ["SVDQ_PREFETCH"] = flag
                one_pass()
                one_pass()  # the chain learns the order on the first pass, plans are recorded on the second
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(args.passes):
                    ys = one_pass()
                e1.record()
                torch.cuda.synchronize()
                times[flag].append(e0.elapsed_time(e1) / args.passes)
                last[flag] = ys
        gpu = {flag: profiled_pass(one_pass, flag) for flag in ("1", "0")}
        for flag, (total, kinds) in gpu.items():
            print(f"batch {batch}, SVDQ_PREFETCH={flag}: GPU {total:.3f} ms per pass: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])), flush=True)
        same = all(torch.equal(a, b) for a, b in zip(last["1"], last["0"]))
        on, off = statistics.median(times["1"]), statistics.median(times["0"])
        per_step = (off - on) * (19 * 8 + 38 * 2) / len(seq)
        print(f"batch {batch}: {len(seq)} layers, ms per pass: chain {on:.3f} (rounds {', '.join(f'{t:.3f}' for t in times['1'])}), "
              f"separate expansion {off:.3f} ({', '.join(f'{t:.3f}' for t in times['0'])}): {off / on:.4f}x, "
              f"{off - on:.3f} ms saved per pass, ~{per_step:.2f} ms per FLUX.1-dev step; outputs identical: {same}",
              flush=True)
        out["batches"][batch] = {"on_ms": times["1"], "off_ms": times["0"], "identical": same, "per_step_ms": per_step,
                                 "gpu_ms": {f: g[0] for f, g in gpu.items()}, "gpu_kinds": {f: g[1] for f, g in gpu.items()}}
    os.environ.pop("SVDQ_PREFETCH", None)
    out["kernels"] = kernel_costs(seq[:len(DOUBLE)] + seq[len(DOUBLE) * args.double:][:len(SINGLE)], args.batch)  # captures
    # CUDA graphs: after this the chain is off on this device, so it runs last
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
