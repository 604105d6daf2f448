"""Registers and stack (spills) of the persistent TMA GEMM kernel, compiled for sm_90a without a GPU.

    python bench/gemm_resource_usage.py [--tree DIR] [--block 128,256,128] [--warps 8] [--stages 4] [--gluon]

Why: an epilogue change can push the 128 x 256 tile past 255 registers into local-memory spills, which costs more
than the work it saves (BENCHMARKS.md, session 6: the per-column GELU select). This compiles the kernel with and
without the GELU epilogue through Triton's own compiler and reads the resource usage ``cuobjdump`` reports, so the
check runs on any machine with Triton's bundled CUDA tools. ``--tree`` compiles another checkout's kernels (a
folder holding ``svdq/kernels``). ``--gluon`` reports the warp-specialized Gluon kernels instead (cooperative and
ping-pong, at their candidate tiles; this needs a Triton with Gluon, e.g. the 3.6 wheel): the figure per kernel is
its largest partition's stack.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def usage(cubin: bytes, bindir: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", path],
                              capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=None, help="folder holding another checkout as svdq/ (default: this one)")
    ap.add_argument("--block", default="128,256,128", help="BLOCK_M,BLOCK_N,BLOCK_K")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--gluon", action="store_true", help="the Gluon kernels (cooperative and ping-pong) instead")
    args = ap.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _path  # noqa: F401  (this checkout as ``svdq``)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from svdq.kernels import gemm_w4a4

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if args.gluon:
        return gluon_usage(bindir)
    bm, bn, bk = (int(v) for v in args.block.split(","))
    fn = gemm_w4a4._w4a4_gemm_tma_kernel
    names = fn.arg_names
    ints = {"M", "N", "KP", "R", "stride_lm", "stride_un", "stride_cm", "NUM_PROGRAMS", "gelu_from"}
    for gelu in (False, True):
        sig = {}
        for n in names:
            if n == "a_desc":
                sig[n] = f"tensordesc<i8[{bm}, {bk}]>"
            elif n == "b_desc":
                sig[n] = f"tensordesc<i8[{bn}, {bk}]>"
            elif n.endswith("_ptr"):
                sig[n] = "*bf16" if n in ("up_ptr", "bias_ptr", "c_ptr") else "*fp32"
            else:
                sig[n] = "i32" if n in ints else "constexpr"
        const = dict(HAS_LORA=True, HAS_BIAS=True, GELU=gelu, DOT_FP32=False, ACCUMULATE=False, BLOCK_M=bm,
                     BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=32, R_CHUNK=32, GROUP_M=8, FLATTEN=True)
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": args.warps, "num_stages": args.stages})
        u = usage(k.asm["cubin"], bindir)
        print(f"TMA GEMM {bm}x{bn}x{bk}, {args.warps} warps, {args.stages} stages, rank 32 + bias, GELU={gelu}: "
              f"{u.get('REG')} registers, {u.get('STACK')} bytes of stack, {u.get('SHARED')} B static shared "
              f"(Triton {triton.__version__}, sm_90a)")
    return 0


def gluon_usage(bindir: str) -> int:
    """Compile the Gluon kernels for sm_90a (rank 32 + bias epilogue, with and without GELU) and print their
    resource usage."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from svdq.kernels import gemm_w4a4_gluon as g

    base = dict(HAS_LORA=True, HAS_BIAS=True, GELU=True, ACCUMULATE=False, BLOCK_R=32, R_CHUNK=32, GROUP_M=8)
    kernels = [("cooperative", g._w4a4_gemm_ws_kernel, (128, 256, 128), dict(STAGES=4, INSTR_N=128, WARPS=8), 8),
               ("cooperative", g._w4a4_gemm_ws_kernel, (128, 128, 128), dict(STAGES=5, INSTR_N=128, WARPS=8), 8),
               ("ping-pong", g._w4a4_gemm_pingpong_kernel, (128, 128, 128), dict(STAGES=4, INSTR_N=128, **g.pingpong_registers(40)), 4),
               ("ping-pong, producer 24 registers", g._w4a4_gemm_pingpong_kernel, (128, 128, 128),
                dict(STAGES=4, INSTR_N=128, **g.pingpong_registers(24)), 4),
               ("ping-pong", g._w4a4_gemm_pingpong_kernel, (64, 256, 128), dict(STAGES=4, INSTR_N=128, **g.pingpong_registers(40)), 4)]
    for (label, fn, (bm, bn, bk), extra, warps), gelu in [(k, gelu) for k in kernels for gelu in (False, True)]:
        a = torch.empty(256, 256, dtype=torch.int8)
        descs = {"a_desc": TensorDescriptor(a, [256, 256], [256, 1], [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)),
                 "b_desc": TensorDescriptor(a, [256, 256], [256, 1], [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))}
        const = dict(base, GELU=gelu, **extra)
        sig = {n: mangle_type(descs[n]) if n in descs else
               ("*bf16" if n in ("up_ptr", "bias_ptr", "c_ptr") else "*fp32") if n.endswith("_ptr") else
               "constexpr" if n in const else "i32" for n in fn.arg_names}
        src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        u = usage(k.asm["cubin"], bindir)
        print(f"Gluon {label} {bm}x{bn}x{bk}, {extra['STAGES']} stages, rank 32 + bias, GELU={gelu}: {u.get('STACK')} bytes of "
              f"stack, {k.metadata.shared} B shared (Triton {triton.__version__}, sm_90a)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
