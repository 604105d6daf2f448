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
    ap.add_argument("--w4a16", action="store_true", help="the W4A16 kernels at one and two rows, 3072->18432, instead: "
                    "the word kernel, the tensor-core kernels on 16-bit words and on 32-bit words (pairs)")
    args = ap.parse_args()
    from svdq.kernels.dispatch import svdq_linear

    if args.w4a16:
        return w4a16_profile(args.profile)
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


def w4a16_profile(profile: bool) -> int:
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers
    from svdq.kernels.gemm_w4a16_packed import w4a16_packed
    from svdq.kernels.gemv_w4a16 import _w4a16_gemv_one_row

    from svdq.kernels.dispatch import arena

    scratch = arena(torch.device("cuda", torch.cuda.current_device())).get  # the pair kernel at its default tile
    k, n = 3072, 18432
    layer = make_layer(n, k, 0, kind="w4a16")
    inv = torch.reciprocal(layer.smooth.float())
    mt = transposed_multipliers(layer.wmult)
    calls = []
    for m in (1, 2):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        calls += [lambda x=x: _w4a16_gemv_one_row(x, layer.qweight, layer.wmult, layer.wscale, layer.smooth, inv,
                                                  layer.bias, torch.bfloat16),
                  lambda x=x: w4a16_packed(x, layer.qweight, mt, layer.wscale, inv, k, layer.bias, torch.bfloat16,
                                           config={"WORDS": 16}),
                  lambda x=x: w4a16_packed(x, layer.qweight, mt, layer.wscale, inv, k, layer.bias, torch.bfloat16,
                                           scratch=scratch)]
    for fn in calls:
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    if profile:
        torch.cuda.cudart().cudaProfilerStart()
        for fn in calls:
            fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    else:
        kernel_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
