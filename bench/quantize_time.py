"""Time whole-model quantization of the full-size FLUX.1-dev model on the GPU, as ``svdq quantize`` does it.

    python bench/quantize_time.py [--config flux-dev|tiny] [--prompts 16] [--steps 4] [--latent-size 32]
                                  [--time-limit 540] [--json OUT]

Same code path as the command (``nodes.pipeline.quantize_patcher`` with the command's default ``QuantConfig``:
smoothing grid search, rank 32, up to 100 refinement steps, calibration through ComfyUI's sampler on a bounded
sample), on a model generated on the GPU (``svdq.synthetic``) instead of one read from disk. Reports wall time,
per-phase times, peak host RSS and peak GPU memory. With ``--time-limit`` it stops after that many seconds and
reports the measured rate and the extrapolated total (say so when quoting it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from _results import write_json  # noqa: E402

from svdq.comfy_runtime import import_comfy  # noqa: E402

import_comfy()

import comfy.model_detection  # noqa: E402
import comfy.model_management as mm  # noqa: E402

from svdq.synthetic import FLUX_DEV, TINY_FLUX, fill_flux_weights_  # noqa: E402


class Stop(Exception):
    pass


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["flux-dev", "tiny"], default="flux-dev")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--latent-size", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from svdq.nodes.loading import build_model_patcher
    from svdq.nodes.pipeline import quantize_patcher, random_conditioning
    from svdq.quant.layer import QuantConfig

    cfg = FLUX_DEV if args.config == "flux-dev" else TINY_FLUX
    cuda = torch.cuda.is_available()
    t0 = time.time()
    mc = comfy.model_detection.model_config_from_unet_config(dict(cfg))
    mc.set_inference_dtype(torch.bfloat16, None)
    dev = mm.get_torch_device()
    model = mc.get_model({}, "", device=dev)
    fill_flux_weights_(model.diffusion_model, cfg["hidden_size"])
    sd = {k: v.detach() for k, v in model.diffusion_model.state_dict().items()}
    patcher = build_model_patcher(sd, {"comfy_unet_config": cfg}, {}, dtype=torch.bfloat16, path="generated")
    del model, sd
    t_gen = time.time() - t0
    print(f"model generated and loaded in {t_gen:.0f}s", flush=True)
    qcfg = QuantConfig(rank=32)  # the command's defaults (smooth_grid 20, refine_iters 100)
    conds = random_conditioning(patcher, args.prompts, tokens=512 if args.config == "flux-dev" else 16)
    state = {"t_calib_done": None, "layers": 0, "total": 0}
    t1 = time.time()

    def on_layer(i, total, name):
        if state["t_calib_done"] is None:
            state["t_calib_done"] = time.time()
        state["layers"], state["total"] = i, total
        if i % 20 == 0 or i == total:
            el = time.time() - t1
            print(f"  {i}/{total} layers, {el:.0f}s, host peak {rss_gib():.1f} GiB", flush=True)
        if args.time_limit and time.time() - t0 > args.time_limit:
            raise Stop()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    finished = True
    try:
        quantize_patcher(patcher, qcfg, conds, steps=args.steps, size=args.latent_size, progress=on_layer)
    except Stop:
        finished = False
    t_end = time.time()
    calib = (state["t_calib_done"] or t_end) - t1
    quant = t_end - (state["t_calib_done"] or t_end)
    rate = state["layers"] / quant if quant > 0 else 0.0
    out = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "config": args.config,
        "finished": finished, "layers_done": state["layers"], "layers_total": state["total"],
        "generate_s": t_gen, "calibration_s": calib, "quantize_s": quant, "total_s": t_end - t1,
        "extrapolated_total_s": calib + (state["total"] / rate if rate else 0.0),
        "peak_host_gib": rss_gib(), "peak_gpu_gib": (torch.cuda.max_memory_allocated() / 2**30) if cuda else 0.0,
        "calibration": {"prompts": args.prompts, "steps": args.steps, "latent_size": args.latent_size},
    }
    print(json.dumps(out), flush=True)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
