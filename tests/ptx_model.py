"""A tiny interpreter for the integer and bf16x2 PTX the unpacking kernels inline, so CPU tests can run the very asm
text the GPU runs, on every input, without a GPU (Triton's interpreter cannot run inline PTX).

Covers the instructions those snippets use: and/or/xor/lop3/shl/shr, prmt (default mode), mad.lo.u32, mul.f32,
cvt.rn.bf16x2.f32 and fma.rn.bf16x2. Registers hold numpy uint32 arrays (one lane per test input).
"""

from __future__ import annotations

import re

import numpy as np


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 values → bf16 bit patterns, round to nearest even (finite inputs)."""
    f = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = f + 0x7FFF + ((f >> 16) & 1)
    return ((rounded >> 16) & 0xFFFF).astype(np.uint32)


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _prmt(a: np.ndarray, b: np.ndarray, sel: np.ndarray) -> np.ndarray:
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = np.choose((s & 7).astype(np.int64), pool)
        byte = np.where(s & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out |= byte.astype(np.uint32) << (8 * i)
    return out


def run(asm: str, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Execute ``asm`` (one inline-asm block) with ``$n`` operands bound to uint32 arrays; returns every ``$n`` it
    wrote."""
    regs: dict[str, np.ndarray] = {f"${k}": v.astype(np.uint32) for k, v in inputs.items()}
    shape = next(iter(inputs.values())).shape

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if tok.startswith("0f"):
            return np.full(shape, int(tok[2:], 16), dtype=np.uint32)
        return np.full(shape, int(tok, 0) & 0xFFFFFFFF, dtype=np.uint32)

    written: dict[int, np.ndarray] = {}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in src]
        if op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "xor.b32":
            r = a[0] ^ a[1]
        elif op == "shl.b32":
            r = (a[0].astype(np.uint64) << a[1]).astype(np.uint64) & 0xFFFFFFFF
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "lop3.b32":  # any function of three inputs: bit i of the table is f(a, b, c) at a·4 + b·2 + c = i
            lut = int(src[3], 0)
            r = np.zeros_like(a[0])
            for i in range(8):
                if lut >> i & 1:
                    r |= ((a[0] if i & 4 else ~a[0]) & (a[1] if i & 2 else ~a[1]) & (a[2] if i & 1 else ~a[2]))
        elif op == "prmt.b32":
            r = _prmt(a[0], a[1], a[2])
        elif op == "mad.lo.u32":
            r = (a[0].astype(np.uint64) * a[1] + a[2]) & 0xFFFFFFFF
        elif op == "mul.f32":
            r = (a[0].view(np.float32) * a[1].view(np.float32)).view(np.uint32)
        elif op == "cvt.rn.bf16x2.f32":  # d = {bf16(a) high, bf16(b) low}
            hi = _bf16_bits(a[0].view(np.float32).astype(np.float64))
            lo = _bf16_bits(a[1].view(np.float32).astype(np.float64))
            r = (hi << 16) | lo
        elif op == "fma.rn.bf16x2":  # per 16-bit lane, one rounding of the exact a * b + c
            lanes = []
            for sh in (0, 16):
                x, y, z = ((t >> sh) & 0xFFFF for t in a)
                lanes.append(_bf16_bits(_bf16_value(x) * _bf16_value(y) + _bf16_value(z)) << sh)
            r = lanes[0] | lanes[1]
        else:
            raise NotImplementedError(f"PTX model has no {op!r}")
        regs[d] = np.asarray(r, dtype=np.uint64).astype(np.uint32)
        if re.fullmatch(r"\$\d+", d):
            written[int(d[1:])] = regs[d]
    return written
