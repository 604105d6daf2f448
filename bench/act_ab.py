"""Same-run A/B of the activation kernels against an earlier version of ``kernels/act_quant.py``.

    git show REV:kernels/act_quant.py > /tmp/act_quant_old.py
    python bench/act_ab.py --old /tmp/act_quant_old.py [--json OUT]

The old file is loaded as a module of the package (``svdq.kernels.act_quant_old``), so its kernels run beside the
current ones in one process; each is called as dispatch calls it (the current one with the layer's cached 1/λ,
an older one that takes only λ without). CUDA-graph µs, the better of two alternating rounds; codes, scales and
the branch product compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401

from linear import make_layer  # noqa: E402

SHAPES = [(4608, 3072, 32), (4096, 3072, 32), (9216, 3072, 32), (4096, 12288, 32), (8192, 12288, 32),
          (4608, 15360, 32), (9216, 15360, 32), (512, 3072, 32), (1024, 3072, 32), (512, 12288, 32),
          (4608, 3072, 96), (4608, 15360, 96), (4608, 3072, 0)]  # M, K, rank: FLUX's calls at batch 1 and 2


def load_old(path: str):
    import svdq.kernels

    name = "svdq.kernels.act_quant_old"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = svdq.kernels.__name__
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="a copy of an earlier kernels/act_quant.py")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    from svdq.kernels import act_quant as new

    old = load_old(args.old)
    old_takes_inv = "inv_smooth" in inspect.signature(old.quantize_activation).parameters
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for m, k, r in SHAPES:
        layer = make_layer(64, k, r)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        down = layer.proj_down if r else None
        inv = torch.reciprocal(layer.smooth.float())
        extra = {"inv_smooth": inv} if old_takes_inv else {}

        def f_old():
            return old.quantize_activation(x, layer.k_padded, layer.smooth, down, **extra)

        def f_new():
            return new.quantize_activation(x, layer.k_padded, layer.smooth, down, inv_smooth=inv)

        (a0, s0, l0), (a1, s1, l1) = f_old(), f_new()
        same = torch.equal(a0, a1) and torch.equal(s0, s1)
        lrel = float((l1 - l0).norm() / l0.norm()) if r else 0.0
        t: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(2):  # alternating rounds: old, new, old, new
            t["old"].append(triton.testing.do_bench_cudagraph(f_old, rep=50) * 1e3)
            t["new"].append(triton.testing.do_bench_cudagraph(f_new, rep=50) * 1e3)
        to, tn = min(t["old"]), min(t["new"])
        rows.append(dict(M=m, K=k, rank=r, old_us=to, new_us=tn, ratio=to / tn, same_codes=same, lora_rel=lrel))
        print(f"M={m} K={k} r={r}: old {to:.1f} µs, new {tn:.1f} µs, {to / tn:.3f}x; codes equal {same}, "
              f"branch rel {lrel:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": triton.__version__}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
