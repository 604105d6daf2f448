"""What the ping-pong GEMM's epilogue costs, and how far its main loop is from the int8 peak (same run).

The shipped Hopper GEMM keeps the tensor pipe 73% busy at K = 3072 and 82% at K = 15360 (ncu). In a ping-pong
schedule one warpgroup's epilogue should hide under the other's main loop; if it does, dropping the branch, bias and
GELU from the epilogue changes nothing. This runs the ping-pong kernel alone (CUDA-graph µs) with the full epilogue
(rank 32 + bias), with GELU added, without the branch, without the branch and bias, and with other pipeline knobs,
next to the time the int8 work would take at the datasheet peak (1979 TOPS dense).

    python3 bench/gemm_epilogue_ab.py [--json OUT] [--rank 96]

``--rank 96`` times a LoRA-widened branch (rank 32 + 64, as a LoRA node makes it) instead: its chunks staged
together in the output tile (the default; or with its MMAs in the warpgroup's turn, ``UP=turn``) or one at a time,
against the same layer's first 32 ranks and no branch. The ``5 stages`` rows use the shared memory a staged branch
(or no branch) leaves free for a fifth stage beside the TMA store.
"""

from __future__ import annotations

import argparse

import torch

import _path  # noqa: F401
from _results import write_json  # noqa: E402

from linear import make_layer  # noqa: E402

PEAK_INT8_OPS = 1979e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--knobs", action="store_true", help="also GROUP_M, stages and register-split variants")
    ap.add_argument("--shapes", default="4608:3072:12288,4608:3072:21504,4096:3072:12288,4608:15360:3072,9216:15360:3072,4096:12288:3072")
    ap.add_argument("--rank", type=int, default=32, help="the branch's rank; above 64 the wide-branch variants")
    args = ap.parse_args()
    import triton

    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    base = {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 4,
            "GROUP_M": 8}
    variants = [  # name, config changes, rank, bias, gelu
        ("shipped (r32, bias)", {}, 32, True, False),
        ("branch in the epilogue", {"BRANCH": "epilogue"}, 32, True, False),
        ("+ GELU", {}, 32, True, True),
        ("+ GELU, branch in the epilogue", {"BRANCH": "epilogue"}, 32, True, True),
        ("no branch", {}, 0, True, False),
        ("no branch, no bias", {}, 0, False, False),
        ("no branch, 5 stages", {"STAGES": 5}, 0, True, False),
    ]
    if args.rank > 64:  # rank 32 here means the wide layer's first 32 ranks
        variants = [
            (f"r{args.rank} staged (default)", {}, args.rank, True, False),
            (f"r{args.rank} one chunk at a time", {"UP": "chunked"}, args.rank, True, False),
            (f"r{args.rank} staged, MMAs in the turn", {"UP": "turn"}, args.rank, True, False),
            (f"r{args.rank} staged + GELU", {}, args.rank, True, True),
            (f"r{args.rank} chunked + GELU", {"UP": "chunked"}, args.rank, True, True),
            (f"r{args.rank} staged, 5 stages", {"STAGES": 5}, args.rank, True, False),
            (f"r{args.rank} staged, MMAs in the turn, 5 stages", {"UP": "turn", "STAGES": 5}, args.rank, True, False),
            ("r32 (its first 32 ranks)", {}, 32, True, False),
            ("no branch", {}, 0, True, False),
        ]
    if args.knobs:
        variants += [
            ("GROUP_M 16", {"GROUP_M": 16}, 32, True, False),
            ("GROUP_M 4", {"GROUP_M": 4}, 32, True, False),
            ("3 stages", {"STAGES": 3}, 32, True, False),
            ("producer 56 regs", {"PRODUCER_REGS": 56}, 32, True, False),
            ("producer 24 regs", {"PRODUCER_REGS": 24}, 32, True, False),
        ]
    rows = []
    for spec in args.shapes.split(","):
        m, k, n = map(int, spec.split(":"))
        layer = make_layer(n, k, max(32, args.rank))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
        w8 = expand_weight(layer.qweight, layer.wmult)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        bf16 = triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb), rep=100) * 1e3
        ideal = 2.0 * m * n * k / PEAK_INT8_OPS * 1e6
        row = {"M": m, "K": k, "N": n, "bf16_us": bf16, "int8_peak_us": ideal}
        line = [f"M={m} {k}->{n}: bf16 {bf16:.1f} us, int8 at peak {ideal:.1f} us"]
        ref = {}
        for name, change, rank, bias, gelu in variants:
            cfg = {"kwargs": {**base, **change}, "num_warps": 4, "num_stages": 1}

            def fn(cfg=cfg, rank=rank, bias=bias, gelu=gelu):
                return w4a4_gemm(a8, sa, w8, layer.wscale, lora[:, :rank] if rank else None,
                                 layer.proj_up[:, :rank] if rank else None, layer.bias if bias else None,
                                 torch.bfloat16, gelu, config=cfg)

            try:
                y = fn()
                key = (rank, bias, gelu)  # variants of the same product must give the same bits
                if key in ref and not torch.equal(y, ref[key]):
                    d = float((y.float() - ref[key].float()).norm() / ref[key].float().norm())
                    e = float(((y.float() - ref[key].float()).abs() / (ref[key].float().abs() + 1e-3)).max())
                    print(f"  {name}: output differs from {ref[key + ('name',)]}: relative norm {d:.2e}, "
                          f"largest elementwise {e:.2e}", flush=True)
                ref.setdefault(key, y)
                ref.setdefault(key + ("name",), name)
                t = triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3
            except Exception as exc:  # a knob the kernel cannot take at this shape
                print(f"  {name} failed: {str(exc)[-300:]}", flush=True)
                t = float("nan")
            row[name] = t
            line.append(f"{name} {t:.1f} ({ideal / t:.0%} of peak)")
        rows.append(row)
        print("; ".join(line), flush=True)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
