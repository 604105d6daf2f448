"""Same-run A/B of the activation kernels and the weight expansion against earlier versions of their files.

    git show REV:kernels/act_quant.py > /tmp/act_quant_old.py
    git show REV:kernels/gemm_w4a4.py > /tmp/gemm_w4a4_old.py
    python bench/old_kernels_ab.py [--act /tmp/act_quant_old.py] [--expand /tmp/gemm_w4a4_old.py] [--json OUT]

An old file is loaded as a module of the package (``svdq.kernels.<name>_old``), so its kernels run beside the
current ones in one process; each is called as dispatch calls it (the current activation kernels with the layer's
cached 1/λ, an older version that takes only λ without). CUDA-graph µs, the better of two alternating rounds;
outputs compared (codes, scales and branch product; the expanded int8 weight).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from _results import write_json  # noqa: E402

from linear import make_layer  # noqa: E402

ACT_SHAPES = [(4608, 3072, 32), (4096, 3072, 32), (9216, 3072, 32), (4096, 12288, 32), (8192, 12288, 32),
              (4608, 15360, 32), (9216, 15360, 32), (512, 3072, 32), (1024, 3072, 32), (512, 12288, 32),
              (4608, 3072, 96), (4608, 15360, 96), (4608, 3072, 0)]  # M, K, rank: FLUX's calls at batch 1 and 2
EXPAND_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (3072, 15360), (18432, 3072), (21504, 3072)]


def load_old(path: str, module: str):
    import svdq.kernels

    name = f"svdq.kernels.{module}_old"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = svdq.kernels.__name__
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def best_of_two(f_old, f_new) -> tuple[float, float]:
    import triton.testing

    t: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(2):  # alternating rounds: old, new, old, new
        t["old"].append(triton.testing.do_bench_cudagraph(f_old, rep=50) * 1e3)
        t["new"].append(triton.testing.do_bench_cudagraph(f_new, rep=50) * 1e3)
    return min(t["old"]), min(t["new"])


def act_rows(path: str) -> list[dict]:
    from svdq.kernels import act_quant as new

    old = load_old(path, "act_quant")
    old_takes_inv = "inv_smooth" in inspect.signature(old.quantize_activation).parameters
    rows = []
    for m, k, r in ACT_SHAPES:
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
        to, tn = best_of_two(f_old, f_new)
        rows.append(dict(M=m, K=k, rank=r, old_us=to, new_us=tn, ratio=to / tn, same_codes=same, lora_rel=lrel))
        print(f"act M={m} K={k} r={r}: old {to:.1f} µs, new {tn:.1f} µs, {to / tn:.3f}x; codes equal {same}, "
              f"branch rel {lrel:.1e}", flush=True)
    return rows


def expand_rows(path: str) -> list[dict]:
    from svdq.kernels import gemm_w4a4 as new

    old = load_old(path, "gemm_w4a4")
    rows = []
    for n, k in EXPAND_SHAPES:
        layer = make_layer(n, k, 0)
        o_old = torch.empty(n, layer.k_padded, dtype=torch.int8, device="cuda")
        o_new = torch.empty_like(o_old)

        def f_old():
            return old.expand_weight(layer.qweight, layer.wmult, out=o_old)

        def f_new():
            return new.expand_weight(layer.qweight, layer.wmult, out=o_new)

        f_old(), f_new()
        same = torch.equal(o_old, o_new)
        to, tn = best_of_two(f_old, f_new)
        tbps = (n * layer.k_padded * 1.5 + layer.wmult.numel()) / tn / 1e6  # bytes read + written per µs -> TB/s
        rows.append(dict(N=n, K=k, old_us=to, new_us=tn, ratio=to / tn, same=same, new_tbps=tbps))
        print(f"expand N={n} K={k}: old {to:.1f} µs, new {tn:.1f} µs, {to / tn:.3f}x (new {tbps:.2f} TB/s); "
              f"equal {same}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--act", help="a copy of an earlier kernels/act_quant.py")
    ap.add_argument("--expand", help="a copy of an earlier kernels/gemm_w4a4.py (its expand_weight)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not (args.act or args.expand):
        ap.error("give --act and/or --expand")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    out: dict = {"env": env}
    if args.act:
        out["act"] = act_rows(args.act)
    if args.expand:
        out["expand"] = expand_rows(args.expand)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
