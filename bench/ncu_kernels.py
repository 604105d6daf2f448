"""Hardware evidence for the kernels: what the compiler made of them and what Nsight Compute measures.

    python bench/ncu_kernels.py                       # compiled-kernel report (registers, spills, shared memory,
                                                      # tensor-core instructions in PTX and SASS)
    ncu --profile-from-start off --section SpeedOfLight ... python bench/ncu_kernels.py --profile

Layers at FLUX shapes (M = 4608) are called a few times first (tuning and compiling outside the profiled range),
then once each between cudaProfilerStart/Stop, so ncu sees exactly one launch of every kernel of each layer.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401

from linear import make_layer  # noqa: E402

SHAPES = [(4608, 3072, 12288, 32), (4608, 15360, 3072, 32), (4608, 3072, 3072, 96)]  # M, K, N, rank


def kernel_report() -> None:
    from svdq.kernels import launch

    seen = set()
    for (kernel, *_), (compiled, _) in launch._cache.items():
        name = getattr(kernel, "__name__", str(kernel))
        md = compiled.metadata
        ptx = compiled.asm.get("ptx", "")
        wgmma = re.findall(r"wgmma\.mma_async\.[\w.]+", ptx)
        try:
            sass = compiled.asm["sass"]
        except Exception as exc:  # needs cuobjdump/nvdisasm
            sass = f"(no sass: {exc})"
        counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("IGMMA", "HGMMA", "HMMA", "IMMA", "LDL", "STL")}
        key = (name, md.num_warps, md.num_stages, md.shared, compiled.n_regs)
        if key in seen:
            continue
        seen.add(key)
        print(f"{name}: warps {md.num_warps}, stages {md.num_stages}, shared {md.shared} B, registers {compiled.n_regs}, "
              f"spills {compiled.n_spills}; PTX wgmma {len(wgmma)} {sorted(set(wgmma))[:3]}; SASS {counts}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true", help="bracket one call per layer with cudaProfilerStart/Stop")
    args = ap.parse_args()
    from svdq.kernels.dispatch import svdq_linear

    calls = []
    for m, k, n, r in SHAPES:
        layer = make_layer(n, k, r)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            svdq_linear(x, layer)
        calls.append((layer, x))
    torch.cuda.synchronize()
    if args.profile:
        torch.cuda.cudart().cudaProfilerStart()
        for layer, x in calls:
            svdq_linear(x, layer)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    else:
        kernel_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
