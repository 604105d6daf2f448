"""Can a Gluon kernel keep an int8 wgmma's register operand alive across one MMA group in flight? Compiled for
sm_90a without a GPU (a Triton with Gluon, e.g. the 3.6 wheel); nothing runs.

    python bench/gluon_register_operand_probe.py

Why: the "no weight expansion" lead (BENCHMARKS.md, sessions 8 and 20) is a GEMM that unpacks the 4-bit weights in
registers as wgmma's A operand and overlaps the next K step's unpacking with this step's MMAs. That needs the step's
operand registers left alone until its MMA group retires (``warpgroup_mma_wait``); Triton's own pipeliner waits for
every register-operand wgmma instead (``pendings = 0``), which is why session 8's packed kernel lost at M = 4608.

The probe builds the operand the way such a kernel would: 16-bit words of four codes in a linear layout whose
register, lane and warp bases are the int8 dot operand's with its two lowest K bits taken out; four codes each,
joined and reshaped to [64, 128] int8, which converts to the operand layout trivially (``assert_trivial``). It then
checks two things:

1. whether ``warpgroup_mma_wait`` accepts the 8-bit operand among its ``deps`` (what keeps it alive): Triton 3.6
   fails with "Unexpected bitwidth in WGMMAWaitGroupOp: 8";
2. in the kernel without that, whether the loop's next unpacking writes the registers the MMAs in flight read: the
   SASS's register operands of the last IGMMA group, and any instruction inside the loop writing one of them.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build(keep_operand: bool):
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    @gluon.jit
    def probe(w_ptr, m_ptr, x_ptr, out_ptr, KSTEPS, KEEP: gl.constexpr):
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, 128, 32])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=4)
        # the operand's layout (gl.to_linear_layout: registers [0,1] [0,2] [8,0] [0,16] [0,32] [0,64], lanes [0,4]
        # [0,8] [1,0] [2,0] [4,0], warps [16,0] [32,0]) with K / 4: one 16-bit word per four-code register
        w_layout: gl.constexpr = gl.DistributedLinearLayout(reg_bases=[[8, 0], [0, 4], [0, 8], [0, 16]],
                                                            lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                                            warp_bases=[[16, 0], [32, 0]], block_bases=[],
                                                            shape=[64, 32])
        x_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
        rw = gl.arange(0, 64, layout=gl.SliceLayout(1, w_layout))
        cw = gl.arange(0, 32, layout=gl.SliceLayout(0, w_layout))
        rx = gl.arange(0, 256, layout=gl.SliceLayout(1, x_layout))
        cx = gl.arange(0, 128, layout=gl.SliceLayout(0, x_layout))
        x_smem = gl.allocate_shared_memory(gl.int8, [256, 128],
                                           gl.NVMMASharedLayout.get_default_for([256, 128], gl.int8))
        x_smem.store(gl.load(x_ptr + rx[:, None] * 128 + cx[None, :]))
        fence_async_shared()
        acc = gl.zeros([64, 256], gl.int32, layout=acc_layout)
        for ks in range(KSTEPS):
            w = gl.load(w_ptr + ks * 2048 + rw[:, None] * 32 + cw[None, :]).to(gl.int32)
            mult = gl.load(m_ptr + ks * 2048 + rw[:, None] * 32 + cw[None, :]).to(gl.int32)
            c0 = (((w & 15) ^ 8) - 8) * mult
            c1 = ((((w >> 4) & 15) ^ 8) - 8) * mult
            c2 = ((((w >> 8) & 15) ^ 8) - 8) * mult
            c3 = ((((w >> 12) & 15) ^ 8) - 8) * mult
            codes = gl.join(gl.join(c0, c1), gl.join(c2, c3)).to(gl.int8)  # [64, 32, 2 (bit 0), 2 (bit 1)]
            a = gl.convert_layout(gl.reshape(gl.permute(codes, (0, 1, 3, 2)), [64, 128]), a_layout,
                                  assert_trivial=True)
            acc = warpgroup_mma(a, x_smem.permute((1, 0)), acc, is_async=True)
            if KEEP:
                acc, a = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a))
            else:
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        ra = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
        ca = gl.arange(0, 256, layout=gl.SliceLayout(0, acc_layout))
        gl.store(out_ptr + ra[:, None] * 256 + ca[None, :], acc)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {"w_ptr": "*i16", "m_ptr": "*i8", "x_ptr": "*i8", "out_ptr": "*i32", "KSTEPS": "i32", "KEEP": "constexpr"}
    src = GluonASTSource(probe, sig, constexprs={(5,): keep_operand})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def overwritten_operands(sass: str) -> tuple[list[str], list[str]]:
    """(the last IGMMA group's A registers, loop instructions that write one of them). The loop is the span from
    the backward branch's target to the branch."""
    rows = [(int(m.group(1), 16), m.group(2)) for m in
            re.finditer(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", sass, re.M)]
    back = next(((a, int(t.group(1), 16)) for a, ins in rows
                 if (t := re.search(r"BRA\s+0x([0-9a-f]+)", ins)) and int(t.group(1), 16) < a), None)
    if back is None:
        return [], []
    end, start = back
    groups = [ins for a, ins in rows if start <= a <= end and ins.startswith("IGMMA")]
    regs = set()
    for ins in groups:
        a_reg = re.search(r"IGMMA\S*\s+R\d+,\s+R(\d+),", ins)
        if a_reg:
            regs.update(f"R{int(a_reg.group(1)) + i}" for i in range(4))  # 64 x 32 int8: 4 registers a thread
    writers = [f"{a:#x} {ins}" for a, ins in rows if start <= a < end and not ins.startswith(("IGMMA", "WARPGROUP"))
               and (d := re.match(r"(?:@!?U?P\w+\s+)?[A-Z0-9_.]+\s+(R\d+)", ins)) and d.group(1) in regs]
    return sorted(regs, key=lambda r: int(r[1:])), writers


def compiler_messages(fn) -> tuple[bool, str]:
    """Run ``fn`` with the process's stderr (where the compiler's C++ passes write) captured: (it succeeded, the
    first line naming an error)."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            fn()
            ok = True
        except Exception:
            ok = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    line = next((ln.strip() for ln in text.splitlines() if "ERROR" in ln or "Assertion" in ln), "")
    return ok, line


def main() -> int:
    import triton

    from gemm_resource_usage import sass_text

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    print(f"Triton {triton.__version__}, sm_90a")
    ok, why = compiler_messages(lambda: build(True))
    print("1. the 8-bit register operand among warpgroup_mma_wait's deps: "
          + ("compiles" if ok else f"does not compile ({why or 'see the compiler output'})"))
    k = build(False)
    regs, writers = overwritten_operands(sass_text(k.asm["cubin"], bindir))
    span = f"{regs[0]}-{regs[-1]}" if regs else "no registers found"
    print(f"2. without it: the loop's IGMMAs read A from {span}; {len(writers)} instructions of the loop write one of "
          "them while the last MMA group may still be in flight (its wait allows one outstanding; PTX calls that "
          "undefined behaviour)" + ("" if not writers else ", e.g.:"))
    for row in writers[:6]:
        print("   ", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
