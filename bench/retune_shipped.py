"""Re-time the shipped GEMM winners (``kernels/tuned_configs.json``) against newer candidate configs on this GPU.

    python bench/retune_shipped.py [--match PINGPONG | ALL] [--keys BLOCK_R=96] [--margin 0.02] [--rounds 3] [--eager]
                                   [--out PATH] [--json RESULTS]

Why: the shipped file spares users first-call tuning, so a new kernel schedule only reaches them once the file
names it where it wins. Re-tuning every key from scratch costs minutes of GPU time; this times, for each key of
this GPU in the file, the shipped winner against the tuner's configs whose kwargs contain ``--match``, on a call
of that key's shape (M: the FLUX size behind the bucket), and keeps the faster. ``--match ALL`` takes every tuner
config; ``--keys`` re-times only the keys that contain that text (``BLOCK_R=96``: the LoRA-widened branch's entries).

How it times: CUDA-graph replays (``do_bench_cudagraph``). ``--eager`` takes medians of ``do_bench`` instead (what
the tuner itself uses); on a host that needs 139 µs to launch a call, that times the host, not the kernel, below
~200 µs (session 16: 205 against 77 µs for the same kernel). Each config keeps its best of ``--rounds`` rounds; every
other round runs in reverse order, so no config is always first after a new shape is set up. A new config must beat
the shipped one by ``--margin`` (a fraction) to replace it, so run-to-run noise does not churn the file. ``--out``
writes the updated file atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from _results import write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

M_OF_BUCKET = {512: 512, 1024: 1024, 4096: 4096, 8192: 4608, 16384: 9216}  # FLUX: txt, img, both, batch 2


def gemm_call(m: int, n: int, kp: int, flags: dict):
    """``w4a4_gemm`` on random operands of one key's shape and flags, as a function of the config to launch."""
    from svdq.kernels.gemm_w4a4 import w4a4_gemm

    dev = "cuda"
    r = int(flags["BLOCK_R"]) if flags["HAS_LORA"] else 0
    a8 = torch.randint(-100, 100, (m, kp), dtype=torch.int8, device=dev)
    w8 = torch.randint(-100, 100, (n, kp), dtype=torch.int8, device=dev)
    sa, sw = torch.rand(m, device=dev) * 1e-3, torch.rand(n, device=dev) * 1e-3
    lora = torch.randn(m, r, device=dev) if r else None
    up = torch.randn(n, r, device=dev, dtype=torch.bfloat16) if r else None
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16) if flags["HAS_BIAS"] else None
    out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    return lambda cfg: w4a4_gemm(a8, sa, w8, sw, lora, up, bias, torch.bfloat16, flags["GELU"], config=cfg, out=out)


def parse_flag(v: str):
    return {"True": True, "False": False}.get(v, int(v) if v.isdigit() else v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--match", default="PINGPONG", help="time the tuner configs whose kwargs have this key (ALL: every one)")
    ap.add_argument("--keys", default="", help="re-time only the shipped keys that contain this text")
    ap.add_argument("--margin", type=float, default=0.0, help="a new config must be this much faster (fraction)")
    ap.add_argument("--rounds", type=int, default=1, help="time every config this many times, keep each one's best")
    ap.add_argument("--eager", action="store_true", help="time eager calls (the tuner's way) instead of graph replays")
    ap.add_argument("--out", default=None, help="write the updated shipped file here")
    ap.add_argument("--json", default=None, help="write every timing here")
    args = ap.parse_args()
    import _path  # noqa: F401
    import triton
    import triton.testing

    from svdq.kernels import gemm_w4a4
    from svdq.kernels.autotune_cache import shipped

    gpu = torch.cuda.get_device_name()
    tuner = gemm_w4a4._TUNERS["auto"]
    table = dict(shipped())
    news = [c for c in tuner.configs if args.match == "ALL" or args.match in c.kwargs]
    print(f"# {gpu}, torch {torch.__version__}, triton {triton.__version__}; {len(news)} candidates", flush=True)
    rows = []
    for key, old in sorted(table.items()):
        parts = key.split("|")
        if parts[0] != gpu or parts[1] != tuner.name or args.keys not in key:
            continue
        bucket, n, kp = (int(v) for v in parts[2:5])
        flags = {k: parse_flag(v) for k, v in (p.split("=") for p in parts[5:])}
        m = M_OF_BUCKET.get(bucket, bucket)
        run = gemm_call(m, n, kp, flags)
        cfgs = {"shipped": old, **{f"new{i}": tuner._cfg_dict(c) for i, c in enumerate(news)}}
        times = {}
        time_us = ((lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3)
                   if args.eager else (lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3))
        for cfg in cfgs.values():  # every config compiled before anything is timed
            try:
                run(cfg)
            except Exception:  # reported below, where it is timed
                pass
        for r in range(args.rounds):  # odd rounds in reverse: no config always runs first after the last key's
            for name, cfg in (list(cfgs.items())[::-1] if r % 2 else cfgs.items()):
                try:
                    t = time_us(lambda cfg=cfg: run(cfg))
                    times[name] = min(t, times.get(name, t))
                except Exception as exc:  # a config that does not fit this call (shared memory)
                    print(f"{key} {name} failed: {str(exc)[-300:]}", flush=True)
        best = min(times, key=times.get)
        if "shipped" in times and times[best] > times["shipped"] * (1.0 - args.margin):
            best = "shipped"
        winner = table[key] = cfgs[best]
        row = {"key": key, "m": m, "times_us": times, "winner": winner}
        rows.append(row)
        print(f"M={m} N={n} K={kp} {'+'.join(f'{k}={v}' for k, v in flags.items() if k in ('GELU', 'BLOCK_R'))}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f" -> {best}", flush=True)
    if args.json:
        write_json(args.json, {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "rows": rows})
    if args.out:
        write_json(args.out, table, indent=0, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
