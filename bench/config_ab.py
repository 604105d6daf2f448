"""Same-run A/B of two pre-tuned GEMM config files on the full FLUX.1-dev model (generated weights): one svdq
model, its step timed under each file in turn, alternating, so host and GPU drift between runs (and a second
process finding Inductor's caches warm) does not enter the ratio.

    python bench/config_ab.py --a OLD.json --b NEW.json [--rounds 3] [--batch 1,2] [--compile] [--profile] [--json OUT]
    python bench/config_ab.py --a SVDQ_PACKED_MAX_M=0 --b SVDQ_PACKED_MAX_M=1024 ...

A variant that is not a file is a list of ``NAME=VALUE`` environment settings (comma-separated), switched the same
way: any variable in ``kernels.dispatch._ENV`` re-records the call plans.

Each switch sets ``SVDQ_TUNED_CONFIGS`` and calls ``autotune_cache.reload_tuned_configs()``; call plans are keyed by
that variable, so every layer re-records its launches with the other file's configs. ``--compile`` also times the
model under ``torch.compile`` (one compiled module per block, as ``bench/e2e.py``'s ``svdq_compile`` row);
``--profile`` adds the GPU time of one profiled eager step per file (a, b, b, a), split by kernel class, to see
whether a difference in the kernels reaches the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from _results import write_json

import e2e  # the full-size model, its loader and the step timing of bench/e2e.py


def is_settings(spec: str) -> bool:
    return "=" in spec and not os.path.exists(spec)


def use(spec: str) -> None:
    from svdq.kernels import autotune_cache

    if is_settings(spec):
        for item in spec.split(","):
            name, value = item.split("=", 1)
            os.environ[name.strip()] = value.strip()
        return
    os.environ["SVDQ_TUNED_CONFIGS"] = os.path.abspath(spec)
    autotune_cache.reload_tuned_configs()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="pre-tuned config file A (e.g. the previous kernels/tuned_configs.json), "
                    "or NAME=VALUE settings")
    ap.add_argument("--b", required=True, help="pre-tuned config file B, or NAME=VALUE settings")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--compile", action="store_true", help="also time the per-block torch.compile model")
    ap.add_argument("--profile", action="store_true", help="GPU time by kernel class of one eager step per file")
    ap.add_argument("--json", default=None)
    ap.add_argument("--config", choices=["flux-dev", "tiny"], default="flux-dev", help="tiny: a CPU smoke run")
    args = ap.parse_args()
    for p in (args.a, args.b):
        if not is_settings(p):
            json.loads(open(p).read())  # a clear error now rather than a silent fall back to tuning
    if args.config == "tiny":
        cfg = dict(e2e.TINY_FLUX, context_in_dim=4096, vec_in_dim=768)
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    else:
        cfg = e2e.FLUX_DEV
    import triton

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "config": args.config,
           "a": args.a, "b": args.b}
    e2e.log(f"{env}")
    patcher = e2e.load_svdq(e2e.svdq_checkpoint(e2e.generate_state_dict(cfg), cfg))
    models = {"eager": patcher}
    if args.compile:
        models["compile"] = e2e.compiled(patcher, cfg)
    reps = 5 if args.config == "flux-dev" else 1
    times: dict = {}
    for b in (int(x) for x in args.batch.split(",")):
        for mode, p in models.items():
            if mode == "compile":  # compile once per batch size before timing (not part of either variant)
                use(args.a)
                e2e.time_step(p, cfg, b, reps=1, warmup=1)
            for r in range(args.rounds):
                for v in (("a", "b") if r % 2 == 0 else ("b", "a")):
                    use(getattr(args, v))
                    ms = e2e.time_step(p, cfg, b, reps=reps, warmup=1)[0]
                    times.setdefault(f"{mode}_b{b}", {}).setdefault(v, []).append(ms)
                    e2e.log(f"{mode} batch {b} round {r}: {v} {ms:7.1f} ms")
    profiles: dict = {}
    if args.profile:
        b = int(args.batch.split(",")[-1])
        for v in ("a", "b", "b", "a"):
            use(getattr(args, v))
            prof = e2e.profile_step(patcher, cfg, b)
            gpu_ms = prof["gpu_ms"]
            ms = {k: round(f * gpu_ms, 2) for k, f in prof["shares"].items()}
            profiles.setdefault(v, []).append({"gpu_ms": gpu_ms, "class_ms": ms, "top": prof["top_kernels"],
                                               "timeline_ms": prof["timeline_ms"]})
            e2e.log(f"profile batch {b} {v}: GPU {gpu_ms:.1f} ms; " + ", ".join(f"{k} {x:.1f}" for k, x in ms.items()))
    result = {"env": env, "raw": times, "profiles": profiles,
              "median_ms": {k: {v: statistics.median(t) for v, t in d.items()} for k, d in times.items()}}
    for k, d in result["median_ms"].items():
        e2e.log(f"{k}: a {d['a']:.1f} ms, b {d['b']:.1f} ms, b/a {d['b'] / d['a']:.3f}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
