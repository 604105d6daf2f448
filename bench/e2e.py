"""One denoising step of a full-size FLUX.1-dev model through ComfyUI's own model, for every weight format, in one run.

    python bench/e2e.py [--config flux-dev|tiny] [--rows bf16,fp8,nf4,svdq,svdq_lora,svdq_fbc] [--cap-gb 16]
                        [--batch 1,2] [--reps 5] [--rounds 1] [--profile] [--host-profile] [--json OUT]

The model is ComfyUI's Flux class at the FLUX.1-dev configuration (19 double + 38 single blocks, hidden 3072) with
generated weights (heavy tails, outlier modulation channels: ``svdq.synthetic``), built on the GPU; no download.
Each row loads the model the way ComfyUI does (its loader, dtype choice, model management and attention) and
times ``apply_model`` on 1024x1024 inputs (4096 image + 512 text tokens):

  bf16        core loader, bf16 weights
  fp8         core loader, float8_e4m3fn weights with ``fp8_optimizations`` (UNETLoader "fp8_e4m3fn_fast")
  nf4         bitsandbytes NF4 weight-only linears (block 64, bf16 compute) through ``custom_operations``
  svdq        svdq INT4 W4A4 rank 32 (+ W4A16 modulation), our loader and kernels
  svdq_lora   svdq with a rank-64 LoRA on every quantized linear (extends the low-rank branch)
  svdq_fbc    svdq with the first-block cache at threshold 0.12: a 20-step sampler run against svdq without it
  *_compile   (bf16_compile, fp8_compile, svdq_compile, svdq_lora_compile) the same model under ``torch.compile``
              (Inductor), set up the way ComfyUI's TorchCompileModel node does (``set_torch_compile_wrapper``), one
              compiled module per transformer block; compile time is reported apart from the step time
  *_cudagraphs, *_wholecompile, *_wholero   the whole diffusion model compiled as ComfyUI's TorchCompileModel node
              does, with its backend "cudagraphs" (Dynamo graphs replayed as CUDA graphs, eager numerics), with
              "inductor", and with Inductor in mode reduce-overhead (its CUDA graphs)
  ROW+VAR=VALUE  any row with environment variables set for it alone (e.g. ``svdq_compile+SVDQ_PDL=0``: a
              same-run A/B of a runtime switch; the summary compares it with ROW)
``--rounds N`` runs the rows N times, every other round in reverse order, and pools each row's rounds: svdq against
bf16 (and fp8, and a LoRA against svdq, and a switched row against its plain one) as the ratio of medians over every
step, with a 95% bootstrap interval that resamples whole rounds (``bench/_stats.py``): one row's step moves by ±5%
from round to round at the H100's power cap, so a single pair of medians cannot settle a target like 1.3×.
Each timed row also records the SM clock, board power and power-cap throttling over its timed steps (``nvidia-smi``
samples; nothing without it): at the H100's power cap the clock, not only the code, sets a row's time. It also records
every timed step (``step_ms``), the host's part of each (``host_ms``: until ``apply_model`` returns, every launch
queued) and the full garbage collections that ran while timed; ``+E2E_GC=freeze`` freezes the heap first
(``gc.freeze``), a diagnostic for host stalls. ``--host-profile`` adds a cProfile of one step's host part per row:
own time by part of the stack (svdq, Triton, Dynamo/Inductor, ComfyUI, other torch, other) and the top functions.
With ``--cap-gb`` the ``--cap-rows`` (bf16 and svdq; fp8 and nf4 on request) run again with ComfyUI believing the
card has that much memory (``EXTRA_RESERVED_VRAM`` + a per-process memory fraction), so ComfyUI's own partial
loading/offloading kicks in.
Each capped row also reports the bytes of weights left off the GPU and the profiled host-to-device copy time of a
step; from those the capped bf16 step is *projected* (labelled so, not measured) on the slower host links of 16 GB
laptop cards (``--link-gbps``), where svdq, which fits whole, streams nothing.
The svdq weights are quantized round-to-nearest with a random rank-32 branch: step time depends only on the
shapes and the format (``bench/quantize_time.py`` times the real quantizer).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from _results import write_json  # noqa: E402
from _gpu_clocks import GpuClocks  # noqa: E402
from _stats import base_row, busy_and_gaps, speedup, with_rounds  # noqa: E402

from svdq.comfy_runtime import import_comfy  # noqa: E402

import_comfy()

import comfy.model_detection  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402

from svdq.synthetic import FLUX_DEV, TINY_FLUX, fill_flux_weights_  # noqa: E402

GIB = 2**30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- model sources
def generate_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The 16-bit FLUX state dict (ComfyUI key names), generated on the GPU, kept in host memory."""
    mc = comfy.model_detection.model_config_from_unet_config(dict(cfg))
    mc.set_inference_dtype(torch.bfloat16, None)
    dev = mm.get_torch_device()
    model = mc.get_model({}, "", device=dev)
    fill_flux_weights_(model.diffusion_model, cfg["hidden_size"], seed)
    sd = {k: v.detach().to("cpu", copy=True) for k, v in model.diffusion_model.state_dict().items()}
    del model
    gc.collect()
    mm.soft_empty_cache(True)
    return sd


UNET_CONFIG = None  # set for --config tiny: the generated model's config (ComfyUI's detection assumes FLUX's heads)


def load_diffusion_model(sd, opts: dict):
    """ComfyUI's own loader. For the tiny config its architecture detection, which infers FLUX's 24 heads from the
    tensor names, is handed the generated model's config, as the svdq rows get it from the checkpoint metadata."""
    if UNET_CONFIG is None:
        return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=opts)
    import comfy.model_detection as detection

    detect = detection.model_config_from_unet
    detection.model_config_from_unet = lambda s, *a, **k: detection.model_config_from_unet_config(dict(UNET_CONFIG), s)
    try:
        return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=opts)
    finally:
        detection.model_config_from_unet = detect


def load_core(sd, dtype=None, fp8_fast=False):
    opts = {}
    if dtype is not None:
        opts["dtype"] = dtype
    if fp8_fast:
        opts["fp8_optimizations"] = True
    return load_diffusion_model(sd, opts)


def nf4_ops():
    """ComfyUI ``custom_operations`` whose Linears hold bitsandbytes NF4 weights (weight-only, bf16 compute)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    class NF4Ops(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            def _load_from_state_dict(self, sd, prefix, *args, **kwargs):
                w = sd.get(prefix + "weight")
                if w is None or w.dim() != 2 or min(w.shape) < 256:
                    return super()._load_from_state_dict(sd, prefix, *args, **kwargs)
                q, state = bnbf.quantize_4bit(w.to(mm.get_torch_device(), torch.bfloat16), blocksize=64, quant_type="nf4")
                self.nf4 = (q, state)
                self.weight = torch.nn.Parameter(q, requires_grad=False)  # counted by ComfyUI's memory management
                b = sd.get(prefix + "bias")
                self.bias = None if b is None else torch.nn.Parameter(b.to(torch.bfloat16), requires_grad=False)

            def forward(self, x, *args, **kwargs):
                if not hasattr(self, "nf4"):
                    return super().forward(x, *args, **kwargs)
                state = self.nf4[1]
                y = bnb.matmul_4bit(x.to(torch.bfloat16), self.weight.t(), quant_state=state)
                return y + self.bias.to(y.device) if self.bias is not None else y

    return NF4Ops


def load_fp8(sd):
    """ComfyUI's UNETLoader with "fp8_e4m3fn_fast": float8_e4m3fn weights and fast fp8 matmul."""
    return load_core(sd, torch.float8_e4m3fn, fp8_fast=True)


def load_nf4(sd):
    return load_diffusion_model(sd, {"custom_operations": nf4_ops(), "dtype": torch.bfloat16})


def svdq_checkpoint(sd, cfg: dict, rank: int = 32):
    """An svdq checkpoint in memory: the same layers the quantizer plans (rules), RTN INT4 + a random branch."""
    from svdq.kernels.reference import QuantizedLinearWeights
    from svdq.quant.checkpoint import Checkpoint
    from svdq.quant.formats import pack_int4, quantize_int4_weight
    from svdq.quant.layer import GELU_SHIFT
    from svdq.quant.rules import classify

    dev = mm.get_torch_device()
    layers, tensors = {}, {}
    g = torch.Generator(device=dev).manual_seed(1)
    for key, t in sd.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        kind = classify(name, "flux") if (name and t.dim() == 2) else "skip"
        if kind == "skip" or min(t.shape) < 256:
            if not (key.endswith(".bias") and key[: -len(".bias")] in layers):
                tensors[key] = t
            continue
        w = t.to(dev, torch.float32)
        q = quantize_int4_weight(w)
        n, k = w.shape
        fc2 = name.endswith(("mlp.2", "linear2"))
        r = rank if kind == "w4a4" else 0
        layers[name] = QuantizedLinearWeights(
            in_features=k, out_features=n, kind=kind, act_precision="int4" if kind == "w4a4" else "none",
            qweight=pack_int4(q.codes).cpu(), wmult=q.mult.cpu(), wscale=q.scale.cpu(),
            smooth=torch.ones(k, dtype=torch.bfloat16),
            proj_down=(torch.randn(k, r, device=dev, generator=g) * 0.02).to(torch.bfloat16).cpu() if r else None,
            proj_up=(torch.randn(n, r, device=dev, generator=g) * 0.02).to(torch.bfloat16).cpu() if r else None,
            bias=sd.get(name + ".bias"), act_unsigned=fc2 and kind == "w4a4", act_shift=GELU_SHIFT if fc2 and kind == "w4a4" else 0.0,
        )
        tensors.pop(name + ".bias", None)
    return Checkpoint(layers=layers, tensors=tensors, config={"precision": "int4", "act_precision": "int4", "rank": rank},
                      metadata={"comfy_unet_config": cfg, "model_family": "flux"})


def nunchaku_layout(ckpt, hidden: int = 3072):
    """The same layers with every single block's linear1 / linear2 split the way Nunchaku files store them
    (composite layers: linear1 = [qkv; mlp_fc1] by output rows, linear2 = [out_proj | mlp_fc2] by input columns,
    the MLP half with unsigned shifted activations). Measures what the composite forward costs at full size."""
    import dataclasses

    from svdq.quant.checkpoint import Checkpoint

    def part(layer, base, idx, full, **kw):
        p = dataclasses.replace(layer, **kw)
        p.extra = {"part_of": base, "full_shape": list(full), **p.extra}
        return p

    layers = {}
    for name, layer in ckpt.layers.items():
        full = (layer.out_features, layer.in_features)
        if name.startswith("single_blocks.") and name.endswith(".linear1"):
            for i, (lo, hi) in enumerate([(0, 3 * hidden), (3 * hidden, layer.out_features)]):
                layers[f"{name}.parts.{i}"] = part(
                    layer, name, i, full, qweight=layer.qweight[lo:hi], wmult=layer.wmult[lo:hi],
                    wscale=layer.wscale[lo:hi], proj_up=layer.proj_up[lo:hi], bias=layer.bias[lo:hi],
                    out_features=hi - lo, extra={"out_range": [lo, hi]})
        elif name.startswith("single_blocks.") and name.endswith(".linear2"):
            for i, (lo, hi) in enumerate([(0, hidden), (hidden, layer.in_features)]):
                layers[f"{name}.parts.{i}"] = part(
                    layer, name, i, full, qweight=layer.qweight[:, lo // 2: hi // 2], wmult=layer.wmult[:, lo // 64: hi // 64],
                    smooth=layer.smooth[lo:hi], proj_down=layer.proj_down[lo:hi], bias=layer.bias if i == 0 else None,
                    act_unsigned=i == 1, act_shift=layer.act_shift if i == 1 else 0.0, in_features=hi - lo,
                    extra={"in_range": [lo, hi]})
        else:
            layers[name] = layer
    return Checkpoint(layers=layers, tensors=ckpt.tensors, config=ckpt.config, metadata=ckpt.metadata)


def load_svdq(ckpt):
    from svdq.nodes.loading import build_model_patcher, logical_state_dict

    p = build_model_patcher(logical_state_dict(ckpt), ckpt.metadata, ckpt.layer_meta(), path="generated")
    p.model.svdq_info = ckpt.summary()
    return p


def random_lora(ckpt, rank: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name, layer in ckpt.layers.items():
        if layer.kind != "w4a4":
            continue
        lora[f"diffusion_model.{name}.lora_up.weight"] = (torch.randn(layer.out_features, rank, generator=g) * 0.01).to(torch.bfloat16)
        lora[f"diffusion_model.{name}.lora_down.weight"] = (torch.randn(rank, layer.in_features, generator=g) * 0.01).to(torch.bfloat16)
    return lora


# ----------------------------------------------------------------------------------------------- measuring
def inputs(cfg, batch, image_px=1024, text_tokens=512, seed=0):
    dev = mm.get_torch_device()
    g = torch.Generator(device=dev).manual_seed(seed)
    lat = image_px // 8
    x = torch.randn(batch, cfg["in_channels"], lat, lat, device=dev, generator=g)
    ctx = torch.randn(batch, text_tokens, cfg["context_in_dim"], device=dev, generator=g)
    y = torch.randn(batch, cfg["vec_in_dim"], device=dev, generator=g)
    return x, ctx, y


def model_bytes(patcher) -> int:
    from svdq.nodes.patcher import is_fake

    return sum(t.numel() * t.element_size() for t in patcher.model.diffusion_model.state_dict().values() if not is_fake(t))


CUDA = torch.cuda.is_available()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def step_options(patcher) -> dict:
    """The transformer_options a sampler would pass: the patcher's own plus its wrappers (torch.compile's
    among them), merged the way ComfyUI's sampler helpers merge them before sampling."""
    import comfy.patcher_extension as pe

    opts = dict(patcher.model_options.get("transformer_options", {}))
    opts["wrappers"] = pe.merge_nested_dicts(opts.get("wrappers", {}), patcher.wrappers)
    return opts


def step_fn(patcher, cfg, batch, image_px=1024):
    """One denoising step of the loaded model on fixed inputs, as a function (what every timing calls)."""
    mm.load_models_gpu([patcher])
    x, ctx, y = inputs(cfg, batch, image_px)
    t = torch.full((batch,), 0.7, device=x.device)
    guid = torch.full((batch,), 3.5, device=x.device)
    opts = step_options(patcher)

    def step():
        return patcher.model.apply_model(x, t, c_crossattn=ctx, y=y, guidance=guid, transformer_options=opts)

    return step


HOST_GROUPS = (("triton", ("/triton/",)),
               ("torch._dynamo / _inductor / _functorch", ("torch/_dynamo", "torch/_inductor", "torch/_functorch")),
               ("comfy", ("/comfy/", "/comfy_extras/", "/comfy_api/")), ("torch (other)", ("/torch/",)))


def host_group(path: str, svdq_root: str) -> str:
    """Which part of the stack a profiled function's source file belongs to (Inductor's generated code and C
    functions: "other")."""
    path = path.replace("\\", "/")
    if path.startswith(svdq_root):  # the package's own modules (a checkout may hold ComfyUI in a cache folder)
        rest = path[len(svdq_root):]
        if "/" not in rest or rest.split("/", 1)[0] in ("kernels", "nodes", "quant"):
            return "svdq"
    return next((g for g, keys in HOST_GROUPS if any(k in path for k in keys)), "other")


def host_profile_step(step, top: int = 15) -> dict:
    """cProfile over the host's part of one step (until every launch is queued): own time by group of source files
    and the functions with the most own time. Why: a compiled svdq step's host queues in 90-155 ms against bf16's
    32-50 (session 16), several times what ~300 calls at ``bench/linear.py``'s host cost per call would take."""
    import cProfile
    import pstats

    with torch.no_grad():
        step()
        sync()
        prof = cProfile.Profile()
        prof.enable()
        step()
        prof.disable()
        sync()
    import svdq

    root = os.path.dirname(os.path.abspath(svdq.__file__)).replace("\\", "/") + "/"
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    groups: dict = {}
    for (path, _, _), (_, _, own, _, _) in stats.items():
        name = host_group(path, root)
        groups[name] = groups.get(name, 0.0) + own * 1000
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {"own_ms_by_group": groups, "total_ms": sum(groups.values()),
            "top": [{"function": f"{os.path.basename(path)}:{line} {fn}", "calls": calls, "own_ms": own * 1000,
                     "cumulative_ms": cum * 1000} for (path, line, fn), (_, calls, own, cum, _) in rows]}


def time_step(patcher, cfg, batch, reps=5, warmup=2, image_px=1024, clocks=None):
    """(median ms a step, peak GPU bytes, the last output, detail): detail holds every timed step, the host's part
    of each and the full garbage collections while timed."""
    step = step_fn(patcher, cfg, batch, image_px)
    freeze = os.environ.get("E2E_GC") == "freeze"  # a row '+E2E_GC=freeze': no collection scans the model's objects
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(warmup):
            out = step()
        times, hosts = [], []
        if freeze:
            gc.collect()
            gc.freeze()
        full_before = gc.get_stats()[2]["collections"]
        if clocks is not None:
            clocks.begin()
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            out = step()
            hosts.append((time.perf_counter() - t0) * 1000)  # the host's part: until every launch is queued
            sync()
            times.append((time.perf_counter() - t0) * 1000)
        if clocks is not None:
            clocks.end()
    full = gc.get_stats()[2]["collections"] - full_before  # full (generation 2) collections while timed
    if freeze:
        gc.unfreeze()
    detail = {"step_ms": times, "host_ms": hosts, "gc_full_collections": full}
    return statistics.median(times), (torch.cuda.max_memory_allocated() if CUDA else 0), out.float(), detail


def unload():
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache(True)


def profiled_warm_step(patcher, cfg, batch=1):
    """The torch profiler (CUDA activity) over one step, after one unprofiled step."""
    from torch.profiler import ProfilerActivity, profile

    step = step_fn(patcher, cfg, batch)
    with torch.no_grad():
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    return prof


def profile_step(patcher, cfg, batch=1):
    """Share of GPU time by kernel class in one svdq step (where the next speedup is)."""
    prof = profiled_warm_step(patcher, cfg, batch)
    classes = {"4-bit GEMM (w4a4)": 0.0, "activation quant + low-rank down": 0.0, "weight expansion": 0.0,
               "W4A16 GEMV": 0.0, "attention": 0.0, "other GEMM (cuBLAS)": 0.0, "rest": 0.0}
    kernels = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us <= 0 or ev.key.startswith(("cudaLaunch", "cuLaunch")):
            continue
        name = ev.key.lower()
        if "_w4a4_gemm" in name or "w4a4" in name:
            c = "4-bit GEMM (w4a4)"
        elif "_act_" in name:
            c = "activation quant + low-rank down"
        elif "expand" in name:
            c = "weight expansion"
        elif "w4a16" in name or "gemv" in name:
            c = "W4A16 GEMV"
        elif "flash" in name or "fmha" in name or "attention" in name or "sdpa" in name:
            c = "attention"
        elif "gemm" in name or "cutlass" in name or "sm90_xmma" in name or "nvjet" in name:
            c = "other GEMM (cuBLAS)"
        else:
            c = "rest"
        classes[c] += us
        kernels[ev.key] = kernels.get(ev.key, 0) + us
    total = sum(classes.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {"shares": {k: v / total for k, v in classes.items()}, "top_kernels": [(k[:90], v / total) for k, v in top],
            "gpu_ms": total / 1000, "timeline_ms": gpu_busy(prof)}


def gpu_busy(prof) -> dict:
    """The profiled step's kernels on the GPU's timeline (ms): busy, span, idle between kernels, largest gaps.
    The profiler adds host time per launch, so idle here is an upper bound of an unprofiled step's."""
    from torch.autograd import DeviceType

    spans = [(ev.time_range.start / 1000, ev.time_range.end / 1000) for ev in prof.events()
             if ev.device_type == DeviceType.CUDA and ev.time_range.end > ev.time_range.start]
    return busy_and_gaps(spans)


TOP_KERNELS = 20  # kernels listed per profile


def host_link_step(patcher, cfg, batch=1) -> dict:
    """What a capped row moves over the host link in one step: the bytes of the weights ComfyUI left off the GPU
    (streamed to it on every forward under lowvram), and the time the profiler's host-to-device copies took
    (``Memcpy HtoD`` events, their union on the timeline, so overlapped copies count once)."""
    from torch.autograd import DeviceType

    model = patcher.model.diffusion_model
    off = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
              if t.device.type != "cuda")
    prof = profiled_warm_step(patcher, cfg, batch)
    spans = [(ev.time_range.start / 1000, ev.time_range.end / 1000) for ev in prof.events()
             if ev.device_type == DeviceType.CUDA and "htod" in ev.name.lower().replace(" ", "")]
    copies = busy_and_gaps(spans)["busy"] if spans else 0.0
    return {"offloaded_gib": off / GIB, "htod_ms": copies, "htod_copies": len(spans)}


def link_projection(capped: dict, link_gbps: list[float]) -> dict:
    """A capped bf16 row's step on a slower host link, projected (not measured): its measured step with the copies'
    measured time replaced by the offloaded bytes at ``link_gbps`` GB/s: the compute that did not overlap the copies
    here is assumed not to overlap them there either, and the rest to hide under the longer copies. Why: on the
    H100's host link ComfyUI streams bf16's offloaded third in a fraction of the step; a 16 GB laptop card's link
    (PCIe 4.0 x16, ~25 GB/s, or x8) is several times slower, and that is the scenario the paper's 16 GB figures come
    from."""
    out = {}
    for gbps in link_gbps:
        out[f"{gbps:g}"] = capped["ms"] - capped["htod_ms"] + capped["offloaded_gib"] * GIB / (gbps * 1e9) * 1e3
    return out


def log_profile(label: str, prof: dict) -> None:
    total_ms, line = prof["gpu_ms"], prof["timeline_ms"]
    log(f"profile ({label}, GPU {total_ms:.2f} ms): " + ", ".join(f"{k} {v:.1%} ({v * total_ms:.2f} ms)"
                                                               for k, v in prof["shares"].items()))
    log(f"   timeline: span {line['span']:.2f} ms, busy {line['busy']:.2f}, idle {line['idle']:.2f} in {line['gaps']} "
        "gaps, largest " + ", ".join(f"{g['length']:.2f} at {g['at']:.1f}" for g in line["largest_gaps"]))
    for k, v in prof["top_kernels"]:
        log(f"   {v:6.1%} {v * total_ms:7.2f} ms  {k}")


COMPILE_BACKEND = "inductor"
COMPILE_MODE = None  # torch.compile mode of the *_compile rows (reduce-overhead: Inductor's CUDA graphs)


# Row suffixes: how a row's model is compiled (backend, mode, scope); "compile" takes the command-line settings.
# ComfyUI's own TorchCompileModel node compiles the whole diffusion model with backend inductor or cudagraphs.
VARIANTS = {
    "compile": None,
    "cudagraphs": ("cudagraphs", None, "model"),  # Dynamo graphs replayed as CUDA graphs, no Inductor
    "wholecompile": ("inductor", None, "model"),
    "wholero": ("inductor", "reduce-overhead", "model"),  # Inductor plus its CUDA graphs
}


def split_variant(label: str) -> tuple[str, str | None]:
    """'svdq_lora_wholero' -> ('svdq_lora', 'wholero'); an eager row -> (label, None); an environment suffix
    ('svdq_compile+SVDQ_PDL=0', see ``row_env``) is not part of either."""
    label = label.split("+", 1)[0]
    for v in VARIANTS:
        if label.endswith("_" + v):
            return label[: -len(v) - 1], v
    return label, None


@contextlib.contextmanager
def row_env(row: str):
    """A row named 'ROW+VAR=VALUE[+VAR=VALUE...]' runs with those environment variables set (restored after): a
    same-process A/B of a runtime switch such as ``SVDQ_PDL``."""
    pairs = [kv.split("=", 1) for kv in row.split("+")[1:]]
    before = {k: os.environ.get(k) for k, _ in pairs}
    os.environ.update({k: v for k, v in pairs})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compiled(patcher, cfg, variant="compile"):
    """The patcher under torch.compile the way the SVDQ Compile Model node does it (``svdq.nodes.compile``, through
    ComfyUI's own ``set_torch_compile_wrapper``, what its TorchCompileModel node applies): each transformer block
    (blocks of one class share compiled code) or the whole diffusion model, per ``VARIANTS``. ``cfg`` is unused
    (the blocks are found in the model)."""
    from svdq.nodes.compile import compile_model

    backend, mode, scope = VARIANTS.get(variant) or (COMPILE_BACKEND, COMPILE_MODE, "blocks")
    return compile_model(patcher, mode or "default", "whole model" if scope == "model" else "per block",
                         backend=backend)


def first_block_cache_runs(patcher, cfg, thresholds, steps=20):
    """A sampler run without the cache, then one per threshold, each against that same baseline."""
    from svdq.nodes.first_block_cache import apply_first_block_cache
    from svdq.nodes.pipeline import sample

    g = torch.Generator().manual_seed(5)
    cond = (torch.randn(1, 512, cfg["context_in_dim"], generator=g), torch.randn(1, cfg["vec_in_dim"], generator=g))
    size = 128 if cfg is FLUX_DEV else 16

    def timed(m):
        sample(m, cond, seed=1, steps=2, size=size)  # warm-up
        sync()
        t0 = time.perf_counter()
        lat = sample(m, cond, seed=1, steps=steps, size=size)
        sync()
        return time.perf_counter() - t0, lat.float()

    t_base, base = timed(patcher)
    out = []
    for threshold in thresholds:
        m = apply_first_block_cache(patcher, threshold)
        t_cache, lat = timed(m)
        out.append({"steps": steps, "threshold": threshold, "time_no_cache_s": t_base, "time_cache_s": t_cache,
                    "speedup": t_base / t_cache, "skipped_steps": m.svdq_first_block_cache.skipped_steps,
                    "latent_rel_diff": float((base - lat).norm() / base.norm())})
    return out


POOLED_PAIRS = (("svdq_compile", "bf16_compile"), ("svdq", "bf16"), ("svdq_compile", "fp8_compile"),
                ("svdq", "fp8"), ("svdq_lora_compile", "svdq_compile"), ("svdq_lora", "svdq"))


def pooled_summary(table: dict, batches: list[int]) -> dict:
    """Every row's rounds pooled (``_stats.base_row``), as same-run ratios with bootstrap intervals: the fixed
    comparisons (svdq against bf16, fp8, LoRA against svdq) and each row run with a switch against the row without
    it. Only where both sides have timed steps."""
    steps: dict = {}
    for label, by_batch in table.items():
        if "error" in by_batch:
            continue
        for b, entry in by_batch.items():
            if entry.get("step_ms"):
                steps.setdefault(base_row(label), {}).setdefault(b, []).append(entry["step_ms"])
    pairs = [p for p in POOLED_PAIRS if p[0] in steps and p[1] in steps]
    pairs += [(row, row.split("+", 1)[0]) for row in steps if "+" in row and row.split("+", 1)[0] in steps]
    out: dict = {}
    for fast, slow in pairs:
        for b in batches:
            if b in steps[fast] and b in steps[slow]:
                out.setdefault(f"{fast}_vs_{slow}", {})[b] = speedup(steps[slow][b], steps[fast][b])
    return out


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["flux-dev", "tiny"], default="flux-dev")
    ap.add_argument("--rows", default="bf16,fp8,nf4,svdq,svdq_lora,svdq_fbc",
                    help="also: svdq_nunchaku (single blocks split into Nunchaku's composite layers)")
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--cap-gb", type=float, default=16.0, help="0 disables the capped runs")
    ap.add_argument("--cap-rows", default="bf16,svdq",
                    help="rows run again under the cap: bf16, fp8, nf4, svdq, and bf16_compile, svdq_compile")
    ap.add_argument("--link-gbps", default="25,12",
                    help="host links (GB/s) the capped bf16 row is projected on from its measured streamed bytes and "
                         "copy time (PCIe 4.0 x16 ~25, x8 ~12: 16 GB laptop cards); '' for none")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile the host's part of one step per timed row: own time by group and the top functions")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the rows this many times (every other round in reverse order); the summary pools "
                         "each row's rounds into one ratio with a bootstrap interval")
    ap.add_argument("--image", type=int, default=1024, help="image side in pixels (1024: 4096 image tokens)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the *_compile rows (aot_eager: same numerics as eager, a check)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the *_compile rows (reduce-overhead: CUDA graphs, no host launch cost)")
    ap.add_argument("--fbc-thresholds", default="0.12", help="first-block cache thresholds (first = the reported one)")
    args = ap.parse_args()
    thresholds = [float(t) for t in args.fbc_thresholds.split(",")]
    global COMPILE_BACKEND, COMPILE_MODE, UNET_CONFIG
    COMPILE_BACKEND, COMPILE_MODE = args.compile_backend, args.compile_mode
    cfg = FLUX_DEV if args.config == "flux-dev" else dict(TINY_FLUX, context_in_dim=4096, vec_in_dim=768)
    UNET_CONFIG = None if args.config == "flux-dev" else cfg
    rows = with_rounds(args.rows.split(","), args.rounds)
    batches = [int(b) for b in args.batch.split(",")]
    import triton

    env = {"gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "config": args.config,
           "compile": {"backend": COMPILE_BACKEND, "mode": COMPILE_MODE}}
    log(f"{env}")
    results: dict = {"env": env, "rows": {}, "capped": {}}
    t0 = time.time()
    sd = generate_state_dict(cfg)
    log(f"generated {sum(v.numel() for v in sd.values()) / 1e9:.2f}B parameters in {time.time() - t0:.0f}s")
    ckpt = None
    ref_out = None

    def svdq_ckpt():
        """The svdq layers, built once for every svdq row (eager, compiled, capped)."""
        nonlocal ckpt
        if ckpt is None:
            t1 = time.time()
            ckpt = svdq_checkpoint(sd, cfg)
            log(f"svdq layers built in {time.time() - t1:.0f}s")
        return ckpt

    svdq_out = [None]

    def record(label, patcher, table, batch_sizes=batches):
        nonlocal ref_out
        mb = model_bytes(patcher)
        variant = split_variant(label)[1]
        is_compiled = variant is not None
        if is_compiled:
            patcher = compiled(patcher, cfg, variant)
        for b in batch_sizes:
            entry = {}
            if is_compiled:  # the first calls compile (one warm-up step per batch size, timed)
                t1 = time.perf_counter()
                time_step(patcher, cfg, b, reps=1, warmup=0, image_px=args.image)
                entry["compile_s"] = time.perf_counter() - t1
                log(f"{label} batch {b}: first step (compiling) {entry['compile_s']:.0f} s")
            with GpuClocks(torch.cuda.current_device() if CUDA else 0) as clocks:
                ms, peak, out, detail = time_step(patcher, cfg, b, reps=args.reps, image_px=args.image, clocks=clocks)
            entry.update({"ms": ms, "peak_gib": peak / GIB, "model_gib": mb / GIB, **detail},
                         **clocks.summary())
            if args.host_profile:
                hp = entry["host_profile"] = host_profile_step(step_fn(patcher, cfg, b, args.image))
                log(f"{label} batch {b}: host profile {hp['total_ms']:.1f} ms (cProfile's own overhead included): "
                    + ", ".join(f"{g} {v:.1f}" for g, v in sorted(hp["own_ms_by_group"].items(), key=lambda kv: -kv[1])))
                for r in hp["top"]:
                    log(f"    {r['own_ms']:7.2f} ms own, {r['cumulative_ms']:7.2f} cumulative, {r['calls']:6d} calls  "
                        f"{r['function']}")
            if b == 1 and table is results["rows"]:
                if label == "bf16":
                    ref_out = out
                elif ref_out is not None:
                    entry["out_rel_diff_vs_bf16"] = float((out - ref_out).norm() / ref_out.norm())
                if label == "svdq":
                    svdq_out[0] = out
                elif variant is not None and split_variant(label)[0] == "svdq" and svdq_out[0] is not None:  # compiled
                    entry["out_rel_diff_vs_svdq"] = float((out - svdq_out[0]).norm() / svdq_out[0].norm())
                elif label == "svdq_nunchaku" and svdq_out[0] is not None:  # same weights, split into parts
                    entry["out_rel_diff_vs_svdq"] = float((out - svdq_out[0]).norm() / svdq_out[0].norm())
            table.setdefault(label, {})[b] = entry
            clock = (f", SM {entry['sm_mhz_median']:.0f} MHz ({entry['sm_mhz_min']:.0f}-{entry['sm_mhz_max']:.0f}), "
                     f"{entry['power_w_median']:.0f} W, power-capped {entry['power_capped_share']:.0%} of "
                     f"{entry['clock_samples']} samples") if "sm_mhz_median" in entry else ""
            spread = (f", steps {min(entry['step_ms']):.1f}-{max(entry['step_ms']):.1f}, host queues a step in "
                      f"{statistics.median(entry['host_ms']):.1f} ms, {entry['gc_full_collections']} full GC")
            log(f"{label:10s} batch {b}: {ms:8.1f} ms/step, peak {peak / GIB:6.2f} GiB, model {mb / GIB:6.2f} GiB"
                f"{spread}{clock}")

    def profiled(row, patcher, key=None):
        """One profiled step per batch size of the run: GPU time by kernel class and the step's timeline."""
        for b in batches:
            prof = profile_step(patcher, cfg, b)
            results.setdefault(key or "profile_" + row, {})[b] = prof
            log_profile(f"{row}, batch {b}", prof)

    for row in rows:
        base, variant = split_variant(row)
        try:
            with row_env(row):
                if base == "bf16":
                    p = load_core(sd)
                    record(row, p, results["rows"])
                    if args.profile and variant == "compile":  # bf16's own split, to compare what is not a linear
                        profiled(row, compiled(p, cfg))
                elif base == "fp8":
                    record(row, load_fp8(sd), results["rows"])
                elif row == "nf4":
                    record("nf4", load_nf4(sd), results["rows"])
                elif base in ("svdq", "svdq_lora", "svdq_fbc", "svdq_nunchaku"):
                    ck = svdq_ckpt()
                    p = load_svdq(nunchaku_layout(ck, cfg["hidden_size"]) if row == "svdq_nunchaku" else ck)
                    if row == "svdq_nunchaku":
                        record("svdq_nunchaku", p, results["rows"])
                    elif row == "svdq":
                        record("svdq", p, results["rows"])
                        if args.profile:
                            profiled(row, p, "profile")
                    elif base == "svdq":  # a compiled svdq row
                        record(row, p, results["rows"])
                        if args.profile and variant == "compile":
                            profiled(row, compiled(p, cfg), "profile_compile")
                    elif base == "svdq_lora":
                        from svdq.nodes.lora import apply_lora

                        p = apply_lora(p, random_lora(ck), 1.0, "rank-64 LoRA")
                        record(row, p, results["rows"])
                        if args.profile and variant == "compile":  # where the LoRA's time goes, by kernel class
                            profiled(row, compiled(p, cfg), "profile_lora_compile")
                    else:
                        results["first_block_cache"] = first_block_cache_runs(p, cfg, thresholds)
                        for r_ in results["first_block_cache"]:
                            log(f"first-block cache: {r_}")
                unload()
        except Exception as exc:  # one row failing must not lose the others
            import traceback

            traceback.print_exc()
            results["rows"][row] = {"error": f"{type(exc).__name__}: {exc}"}
            unload()
    if args.cap_gb > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        mm.EXTRA_RESERVED_VRAM = max(0, int(total - args.cap_gb * GIB))
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * GIB / total))
        log(f"capped at {args.cap_gb} GiB (EXTRA_RESERVED_VRAM {mm.EXTRA_RESERVED_VRAM / GIB:.1f} GiB)")
        for row in args.cap_rows.split(","):
            try:
                base, variant = split_variant(row)
                if base == "bf16":
                    p = load_core(sd)
                elif base == "fp8":
                    p = load_fp8(sd)
                elif base == "nf4":
                    p = load_nf4(sd)
                elif base == "svdq":
                    p = load_svdq(svdq_ckpt())
                else:
                    raise ValueError(f"--cap-rows takes bf16, fp8, nf4 and svdq rows (and compiled forms), "
                                     f"not {row!r}")
                record(row, p, results["capped"], batch_sizes=[1])
                entry = results["capped"][row][1]
                if variant is None:  # eager rows (a compiled row would compile again here)
                    entry.update(host_link_step(p, cfg))
                    log(f"capped {row}: {entry['offloaded_gib']:.2f} GiB of weights off the GPU, host-to-device "
                        f"copies {entry['htod_ms']:.1f} ms of the step ({entry['htod_copies']} copies, profiled)")
            except Exception as exc:
                import traceback

                traceback.print_exc()
                results["capped"][row] = {"error": f"{type(exc).__name__}: {exc}"}
            unload()
    r = results["rows"]
    if "bf16" in r and "svdq" in r and "error" not in r["svdq"] and "error" not in r["bf16"]:
        results["summary"] = {
            "svdq_speedup_vs_bf16": {b: r["bf16"][b]["ms"] / r["svdq"][b]["ms"] for b in batches},
            "svdq_model_bytes_vs_bf16": r["svdq"][1]["model_gib"] / r["bf16"][1]["model_gib"],
        }
        if "fp8" in r and "error" not in r["fp8"]:
            results["summary"]["svdq_speedup_vs_fp8"] = {b: r["fp8"][b]["ms"] / r["svdq"][b]["ms"] for b in batches}
        if "nf4" in r and "error" not in r["nf4"]:
            results["summary"]["svdq_speedup_vs_nf4"] = {b: r["nf4"][b]["ms"] / r["svdq"][b]["ms"] for b in batches}
        if "svdq_lora" in r and "error" not in r["svdq_lora"]:
            results["summary"]["lora_r64_overhead"] = {b: r["svdq_lora"][b]["ms"] / r["svdq"][b]["ms"] - 1 for b in batches}
    ok = {k for k, v in r.items() if "error" not in v}
    for a, b_ in (("svdq_compile", "bf16_compile"), ("svdq_compile", "bf16"), ("svdq_compile", "fp8_compile"),
                  ("bf16_compile", "bf16"), ("svdq_compile", "svdq"), ("svdq_lora_compile", "svdq_compile")):
        if a in ok and b_ in ok:
            results.setdefault("summary", {})[f"{a}_vs_{b_}"] = {b: r[b_][b]["ms"] / r[a][b]["ms"] for b in batches}
    for row in ok:  # a row run with an environment switch against the same row without it
        plain = row.split("+", 1)[0]
        if plain != row and plain in ok:
            results.setdefault("summary", {})[f"{row}_vs_{plain}"] = {b: r[plain][b]["ms"] / r[row][b]["ms"]
                                                                        for b in batches}
    for row in ok:  # every other compiled variant against its eager row and against bf16 compiled the same way
        base, variant = split_variant(row)
        if variant is not None and variant != "compile":
            for other in (base, f"bf16_{variant}", "bf16"):
                if other in ok and other != row:
                    results.setdefault("summary", {})[f"{row}_vs_{other}"] = {b: r[other][b]["ms"] / r[row][b]["ms"]
                                                                               for b in batches}
    c = results["capped"]
    if "bf16" in c and "svdq" in c and "error" not in c["bf16"] and "error" not in c["svdq"]:
        results.setdefault("summary", {})["capped_svdq_speedup_vs_bf16"] = c["bf16"][1]["ms"] / c["svdq"][1]["ms"]
        if "htod_ms" in c["bf16"][1]:
            links = [float(g) for g in args.link_gbps.split(",") if g]
            proj = link_projection(c["bf16"][1], links)
            results["summary"]["capped_bf16_projected_ms_by_link_gbps"] = proj
            for a in ("svdq", "svdq_compile"):
                if a in c and "error" not in c[a]:  # svdq fits whole: no streaming, its measured step stands
                    results["summary"][f"capped_{a}_vs_bf16_projected_by_link_gbps"] = {
                        g: ms / c[a][1]["ms"] for g, ms in proj.items()}
            log("capped bf16 projected on slower host links (not measured; copies and compute overlapping as here): "
                + ", ".join(f"{g} GB/s {ms:.1f} ms" for g, ms in proj.items()))
    for a, b_ in (("svdq_compile", "bf16_compile"), ("svdq_compile", "bf16"), ("svdq", "nf4"), ("svdq", "fp8")):
        if a in c and b_ in c and "error" not in c[a] and "error" not in c[b_]:
            results.setdefault("summary", {})[f"capped_{a}_vs_{b_}"] = c[b_][1]["ms"] / c[a][1]["ms"]
    pooled = pooled_summary(results["rows"], batches)
    if pooled:
        results["pooled"] = pooled
        for name, by_batch in pooled.items():
            for b, st in by_batch.items():
                log(f"pooled {name} batch {b}: {st['ratio']:.3f}x ({st['level']:.0%} interval {st['low']:.3f}-"
                    f"{st['high']:.3f}; rounds {st['rounds'][0]} / {st['rounds'][1]})")
    log("summary: " + json.dumps(results.get("summary", {})))
    if args.json:
        write_json(args.json, results, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
