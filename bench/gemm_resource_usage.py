"""Registers and stack (spills) of the persistent TMA GEMM kernel, compiled for sm_90a without a GPU.

    python bench/gemm_resource_usage.py [--tree DIR] [--block 128,256,128] [--warps 8] [--stages 4] [--gluon | --act]
                                        [--plain] [--pdl]

Why: an epilogue change can push the 128 x 256 tile past 255 registers into local-memory spills, which costs more
than the work it saves (BENCHMARKS.md, session 6: the per-column GELU select). This compiles the kernel with and
without the GELU epilogue through Triton's own compiler and reads the resource usage ``cuobjdump`` reports, so the
check runs on any machine with Triton's bundled CUDA tools. ``--tree`` compiles another checkout's kernels (a
folder holding ``svdq/kernels``). ``--gluon`` reports the warp-specialized Gluon kernels instead (cooperative and
ping-pong, at their candidate tiles; this needs a Triton with Gluon, e.g. the 3.6 wheel): the figure per kernel is
its largest partition's stack. ``--act``: the activation kernels' two passes. Kernels are compiled with the
launcher's specialization (aligned pointers, integer arguments divisible by 16, as at FLUX's shapes); ``--plain``
without it, as the figures before session 9 were taken. ``--pdl`` compiles them as launched with programmatic
dependent launch (``PDL=True``: the grid-dependency instructions at the top) and counts those instructions in the PTX.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


EXTRA: dict = {"PDL": 0}  # constexprs every kernel here takes: the PDL mode, 0 or (``--pdl``) the launcher's default


def extra_for(fn) -> dict:
    """``EXTRA`` for the kernels that take it (another checkout's, ``--tree``, may predate it)."""
    return {k: v for k, v in EXTRA.items() if k in fn.arg_names}


def pdl_note(k) -> str:
    """How many grid-dependency instructions the compiled kernel holds (``--pdl``)."""
    return f", {k.asm['ptx'].count('griddepcontrol')} griddepcontrol in PTX" if EXTRA["PDL"] else ""


def usage(cubin: bytes, bindir: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", path],
                              capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def launcher_attrs(names, sig: dict, plain: bool) -> dict:
    """The specialization the launcher gives at FLUX's shapes: 16-byte-aligned pointers and integer arguments that
    are multiples of 16 (``kernels/launch.py`` keys on the same). Compiled without it, loads through the epilogue's
    pointers are not vectorized and the register and stack figures come out far too high (255 registers and 64 bytes
    of stack for 5f5e58d's activation pass 2 at 64 x 128, against 101 and none as launched)."""
    if plain:
        return {}
    return {(names.index(n),): [["tt.divisibility", 16]] for n in names
            if sig[n].startswith("*") or sig[n] == "i32" and n != "gelu_from"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=None, help="folder holding another checkout as svdq/ (default: this one)")
    ap.add_argument("--block", default="128,256,128", help="BLOCK_M,BLOCK_N,BLOCK_K")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--gluon", action="store_true", help="the Gluon kernels (cooperative and ping-pong) instead")
    ap.add_argument("--rank", type=int, default=32, help="--gluon: the branch's rank (96: rank 32 + a LoRA of 64)")
    ap.add_argument("--sass-hash", action="store_true", help="--gluon: print a hash of each kernel's SASS")
    ap.add_argument("--act", action="store_true", help="the activation kernels (both passes at their default tiles "
                    "and the tiles they replaced) instead")
    ap.add_argument("--w4a16", action="store_true", help="the tensor-core W4A16 kernels on packed weights (16-bit "
                    "words of four codes, and the pair kernel on 32-bit words of eight) at M = 1's tile")
    ap.add_argument("--plain", action="store_true", help="without the launcher's alignment specialization (as the "
                    "figures before session 9 were taken)")
    ap.add_argument("--pdl", action="store_true", help="compiled in the launcher's default programmatic-dependent-launch mode "
                    "(else PDL=0: no grid-dependency instructions)")
    args = ap.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _path  # noqa: F401  (this checkout as ``svdq``)
    if args.pdl:
        from svdq.kernels.launch import PDL_DEFAULT

        EXTRA["PDL"] = PDL_DEFAULT
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from svdq.kernels import gemm_w4a4

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if args.gluon:
        return gluon_usage(bindir, args.plain, args.rank, args.sass_hash)
    if args.act:
        return act_usage(bindir, args.plain)
    if args.w4a16:
        return w4a16_usage(bindir, args.plain)
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
                     BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=32, R_CHUNK=32, GROUP_M=8, FLATTEN=True, **extra_for(fn))
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                        attrs=launcher_attrs(names, sig, args.plain))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": args.warps, "num_stages": args.stages})
        u = usage(k.asm["cubin"], bindir)
        print(f"TMA GEMM {bm}x{bn}x{bk}, {args.warps} warps, {args.stages} stages, rank 32 + bias, GELU={gelu}: "
              f"{u.get('REG')} registers, {u.get('STACK')} bytes of stack, {u.get('SHARED')} B static shared "
              f"(Triton {triton.__version__}, sm_90a){pdl_note(k)}")
    return 0


def act_usage(bindir: str, plain: bool) -> int:
    """Compile the activation kernels' two passes (rank 32, smoothing, int4) for sm_90a at the tiles the launcher
    picks now and at session 8's, and print registers, stack, SASS instructions per thread and IEEE division
    sequences (``FCHK``) per thread."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from svdq.kernels import act_quant

    ints = {"M", "K", "KP", "R", "NSUB", "NPARTS", "SEG", "stride_xb", "stride_xm", "stride_dk", "stride_gm", "stride_om",
            "stride_lm"}
    fixed = dict(QMAX=7, UMAX=15, QMIN=-7, UNSIGNED=False, HAS_SMOOTH=True, INT8_MODE=False, USE_RINT=True,
                 HAS_LORA=True, DOT_FP32=False, BLOCK_R=32, GROUP=64, NP_POW2=8, REVERSE=True, EW_MAX=False)
    cases = [("pass 1, K = 3072 (32 rows x 128, 3 tiles)", act_quant._act_stats_kernel, dict(BLOCK_M=32, GROUPS=2, KSUB=3), 4),
             ("pass 1, K >= 8192 now (64 x 128, 4 tiles, 8 warps)", act_quant._act_stats_kernel,
              dict(BLOCK_M=64, GROUPS=2, KSUB=4), 8),
             ("pass 1, K >= 8192 before (4 warps)", act_quant._act_stats_kernel, dict(BLOCK_M=64, GROUPS=2, KSUB=4), 4),
             ("pass 2 now (16 rows x 256)", act_quant._act_quant_kernel, dict(BLOCK_M=16, GROUPS=4), 4),
             ("pass 2 before, K >= 8192 (64 x 128)", act_quant._act_quant_kernel, dict(BLOCK_M=64, GROUPS=2), 4),
             ("pass 2 before, K = 3072 (32 x 128)", act_quant._act_quant_kernel, dict(BLOCK_M=32, GROUPS=2), 4)]
    for label, fn, tile, warps in cases:
        names = fn.arg_names
        const = {k: v for k, v in dict(fixed, **tile, **extra_for(fn)).items() if k in names}
        sig = {n: "constexpr" if n in const else "i32" if n in ints else "fp32" if n == "shift" else
               "*i8" if n == "out_ptr" else "*bf16" if n in ("x_ptr", "down_ptr") else "*fp32" for n in names}
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                        attrs=launcher_attrs(names, sig, plain))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        u = usage(k.asm["cubin"], bindir)
        sass = sass_text(k.asm["cubin"], bindir)
        ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+([A-Z0-9_]+)", sass, re.M)
        print(f"act {label}, {warps} warps: {u.get('REG')} registers, {u.get('STACK')} bytes of stack, {len(ops)} SASS "
              f"instructions, {ops.count('FCHK')} division sequences (Triton {triton.__version__}, sm_90a){pdl_note(k)}")
    return 0


def w4a16_usage(bindir: str, plain: bool) -> int:
    """Compile both tensor-core W4A16 kernels (bias, smoothing, no split) for sm_90a at 64 weight rows x 256 and
    print registers, stack, SASS instructions per thread and the main loop's instruction mix."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from svdq.kernels import gemm_w4a16_packed as w

    ints = {"M", "N", "K", "KP", "K_PER_SPLIT", "stride_xm", "stride_om"}
    bn, bk = 64, 256
    for label, fn, words, xd in (("16-bit words", w._w4a16_packed_kernel, 4, None),
                                 ("32-bit words (pairs), x read per step", w._w4a16_pairs_kernel, 8, False),
                                 ("32-bit words (pairs), x prepared once", w._w4a16_pairs_kernel, 8, True)):
        names = fn.arg_names
        const = dict(HAS_SMOOTH=True, HAS_BIAS=True, SPLIT=1, BLOCK_N=bn, BLOCK_T=16, BLOCK_K=bk, STAGES=4, USE_PTX=1,
                     DOT_FP32=False, **({} if xd is None else {"X_DESC": xd}), **extra_for(fn))
        sig = {n: "constexpr" if n in const else "i32" if n in ints else
               f"tensordesc<i{4 * words}[{bn}, {bk // words}]>" if n == "p_desc" else
               f"tensordesc<u8[{bk // 64}, {bn}]>" if n == "mt_desc" else
               f"tensordesc<bf16[16, {bk}]>" if n == "x_desc" else
               "*bf16" if n in ("x_ptr", "bias_ptr", "out_ptr") else "*fp32" for n in names}
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                        attrs=launcher_attrs(names, sig, plain))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        u = usage(k.asm["cubin"], bindir)
        ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+([A-Z0-9_]+)", sass_text(k.asm["cubin"], bindir), re.M)
        mix = {op: ops.count(op) for op in sorted(set(ops), key=ops.count, reverse=True)[:12]}
        print(f"W4A16 {label}, {bn} x {bk}, 4 warps: {u.get('REG')} registers, {u.get('STACK')} bytes of stack, "
              f"{len(ops)} SASS instructions; most frequent: {mix} (Triton {triton.__version__}, sm_90a){pdl_note(k)}")
    return 0


def sass_text(cubin: bytes, bindir: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def gluon_usage(bindir: str, plain: bool, rank: int = 32, sass_hash: bool = False) -> int:
    """Compile the Gluon kernels for sm_90a (branch of ``rank`` + bias epilogue, with and without GELU) and print
    their resource usage."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from svdq.kernels import gemm_w4a4_gluon as g
    from svdq.kernels.gemm_w4a4 import branch_chunks

    block_r, r_chunk = branch_chunks(rank)
    base = dict(HAS_LORA=True, HAS_BIAS=True, GELU=True, ACCUMULATE=False, BLOCK_R=block_r, R_CHUNK=r_chunk, GROUP_M=8)
    kernels = [("cooperative", g._w4a4_gemm_ws_kernel, (128, 256, 128), dict(STAGES=4, INSTR_N=128, WARPS=8), 8),
               ("cooperative", g._w4a4_gemm_ws_kernel, (128, 128, 128), dict(STAGES=5, INSTR_N=128, WARPS=8), 8),
               ("ping-pong", g._w4a4_gemm_pingpong_kernel, (128, 128, 128), dict(STAGES=4, INSTR_N=128, **g.pingpong_registers(40)), 4),
               ("ping-pong, branch in the epilogue", g._w4a4_gemm_pingpong_kernel, (128, 128, 128),
                dict(STAGES=4, INSTR_N=128, BRANCH_IN_TURN=False, **g.pingpong_registers(40)), 4),
               ("ping-pong, producer 24 registers", g._w4a4_gemm_pingpong_kernel, (128, 128, 128),
                dict(STAGES=4, INSTR_N=128, **g.pingpong_registers(24)), 4),
               ("ping-pong", g._w4a4_gemm_pingpong_kernel, (64, 256, 128), dict(STAGES=4, INSTR_N=128, **g.pingpong_registers(40)), 4)]
    if "STORE_TMA" in g._w4a4_gemm_pingpong_kernel.arg_names:
        kernels.append(("ping-pong, TMA store", g._w4a4_gemm_pingpong_kernel, (128, 128, 128),
                        dict(STAGES=4, INSTR_N=128, STORE_TMA=True, **g.pingpong_registers(40)), 4))
    if "BRANCH_STAGED" in g._w4a4_gemm_pingpong_kernel.arg_names and block_r > r_chunk:
        kernels.append(("ping-pong, TMA store, branch staged", g._w4a4_gemm_pingpong_kernel, (128, 128, 128),
                        dict(STAGES=4, INSTR_N=128, STORE_TMA=True, BRANCH_STAGED=True, **g.pingpong_registers(40)), 4))
        kernels.append(("ping-pong, TMA store, branch staged, in the turn", g._w4a4_gemm_pingpong_kernel, (128, 128, 128),
                        dict(STAGES=4, INSTR_N=128, STORE_TMA=True, BRANCH_STAGED=True, BRANCH_IN_TURN=True,
                             **g.pingpong_registers(40)), 4))
    if "STORE_TMA" in g._w4a4_gemm_pingpong_kernel.arg_names:  # no branch: its buffer drops out, 5 stages fit
        kernels.append(("ping-pong, TMA store, no branch", g._w4a4_gemm_pingpong_kernel, (128, 128, 128),
                        dict(STAGES=5, INSTR_N=128, STORE_TMA=True, HAS_LORA=False, BRANCH_IN_TURN=False,
                             **g.pingpong_registers(40)), 4))
    for (label, fn, (bm, bn, bk), extra, warps), gelu in [(k, gelu) for k in kernels for gelu in (False, True)]:
        if "BRANCH_IN_TURN" in fn.arg_names and "BRANCH_IN_TURN" not in extra:  # as launched
            extra = dict(extra, BRANCH_IN_TURN=block_r == r_chunk)
        for flag in ("STORE_TMA", "BRANCH_STAGED"):  # constexprs with defaults: as launched, or the signature
            if flag in fn.arg_names and flag not in extra:  # below would make them runtime integers (both
                extra = dict(extra, **{flag: False})  # branches of each `if` compiled in)
        a = torch.empty(256, 256, dtype=torch.int8)
        descs = {"a_desc": TensorDescriptor(a, [256, 256], [256, 1], [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)),
                 "b_desc": TensorDescriptor(a, [256, 256], [256, 1], [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))}
        if extra.get("STORE_TMA"):
            cb = torch.empty(256, 256, dtype=torch.bfloat16)
            descs["c_desc"] = TensorDescriptor(cb, [256, 256], [256, 1], [bm, bn], gl.NVMMASharedLayout.get_default_for([bm, bn], gl.bfloat16))
        elif "c_desc" in fn.arg_names:
            descs["c_desc"] = descs["b_desc"]
        const = dict(base, GELU=gelu, **extra, **extra_for(fn))
        sig = {n: mangle_type(descs[n]) if n in descs else
               ("*bf16" if n in ("up_ptr", "bias_ptr", "c_ptr") else "*fp32") if n.endswith("_ptr") else
               "constexpr" if n in const else "i32" for n in fn.arg_names}
        src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                             attrs=launcher_attrs(fn.arg_names, sig, plain))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        u = usage(k.asm["cubin"], bindir)
        if sass_hash:  # same hash, same machine code: a refactor that should change nothing can be checked offline
            import hashlib
            label += " [SASS " + hashlib.sha256(sass_text(k.asm["cubin"], bindir).encode()).hexdigest()[:12] + "]"
        branch = f"rank {rank}" if const["HAS_LORA"] else "no branch"
        print(f"Gluon {label} {bm}x{bn}x{bk}, {extra['STAGES']} stages, {branch} + bias, GELU={gelu}: {u.get('STACK')} bytes of "
              f"stack, {k.metadata.shared} B shared (Triton {triton.__version__}, sm_90a){pdl_note(k)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
