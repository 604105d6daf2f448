"""Same-run A/B of the GELU fusions on the full FLUX.1-dev model (generated weights): one svdq model, timed with
its GELUs in the GEMM epilogues and with them handed back to ComfyUI's own modules, alternating, so host and GPU
drift between runs does not enter the ratio.

    python bench/gelu_ab.py [--rounds 3] [--batch 1,2] [--json OUT]

Variants: ``fused`` (what the loader does: Flux's MLP GELU and the single blocks' MLP GELU in the epilogues),
``mlp_only`` (the single blocks' GELU back in ComfyUI's ``mlp_act``), ``none`` (both back in ComfyUI's modules).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import e2e  # the full-size model, its loader and the step timing of bench/e2e.py


def set_variant(dm: torch.nn.Module, variant: str) -> None:
    """Put each GELU where ``variant`` says (the loader's fusion undone per block where asked)."""
    for block in dm.double_blocks:
        for seq in (block.img_mlp, block.txt_mlp):
            fused = variant != "none"
            seq[0].svdq_gelu = fused
            seq[1] = torch.nn.Identity() if fused else torch.nn.GELU(approximate="tanh")
    for block in dm.single_blocks:
        fused = variant == "fused"
        block.linear1.svdq_gelu, block.linear1.svdq_gelu_from = fused, (3 * block.hidden_size if fused else 0)
        block.mlp_act = torch.nn.Identity() if fused else torch.nn.GELU(approximate="tanh")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--json", default=None)
    ap.add_argument("--config", choices=["flux-dev", "tiny"], default="flux-dev", help="tiny: a CPU smoke run")
    args = ap.parse_args()
    if args.config == "tiny":
        cfg = e2e.UNET_CONFIG = dict(e2e.TINY_FLUX, context_in_dim=4096, vec_in_dim=768)
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    else:
        cfg = e2e.FLUX_DEV
    import triton

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "config": args.config}
    e2e.log(f"{env}")
    patcher = e2e.load_svdq(e2e.svdq_checkpoint(e2e.generate_state_dict(cfg), cfg))
    dm = patcher.model.diffusion_model
    variants = ["fused", "mlp_only", "none"]
    times: dict = {v: {} for v in variants}
    outs = {}
    for b in (int(x) for x in args.batch.split(",")):
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                set_variant(dm, v)
                ms, _, out = e2e.time_step(patcher, cfg, b, reps=5 if args.config == "flux-dev" else 1, warmup=1)
                times[v].setdefault(b, []).append(ms)
                if b == 1 and r == 0:
                    outs[v] = out
                e2e.log(f"batch {b} round {r}: {v:8s} {ms:7.1f} ms")
    result = {"env": env, "ms": {v: {b: statistics.median(t) for b, t in tb.items()} for v, tb in times.items()},
              "raw": times,
              "out_rel_diff_vs_none": {v: float((outs[v] - outs["none"]).norm() / outs["none"].norm()) for v in outs}}
    for b in result["ms"]["none"]:
        n = result["ms"]["none"][b]
        e2e.log(f"batch {b}: " + ", ".join(f"{v} {result['ms'][v][b]:.1f} ms ({n / result['ms'][v][b]:.3f}x none)"
                                          for v in variants))
    e2e.log(f"output vs none: {result['out_rel_diff_vs_none']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
