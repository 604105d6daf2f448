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
        same = all(torch.equal(a, b) for a, b in zip(last["1"], last["0"]))
        on, off = statistics.median(times["1"]), statistics.median(times["0"])
        per_step = (off - on) * (19 * 8 + 38 * 2) / len(seq)
        print(f"batch {batch}: {len(seq)} layers, ms per pass: chain {on:.3f} (rounds {', '.join(f'{t:.3f}' for t in times['1'])}), "
              f"separate expansion {off:.3f} ({', '.join(f'{t:.3f}' for t in times['0'])}): {off / on:.4f}x, "
              f"{off - on:.3f} ms saved per pass, ~{per_step:.2f} ms per FLUX.1-dev step; outputs identical: {same}",
              flush=True)
        out["batches"][batch] = {"on_ms": times["1"], "off_ms": times["0"], "identical": same, "per_step_ms": per_step}
    os.environ.pop("SVDQ_PREFETCH", None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
