"""Which part of the ping-pong GEMM's low-rank epilogue costs time at K = 3072 (H100 probe, no production change).

``bench/gemm_epilogue_ab.py`` measured the branch (rank 32) at +10-14% of the ping-pong GEMM at K = 3072, though one
warpgroup's epilogue should hide under the other's main loop. This builds edited copies of
``kernels/gemm_w4a4_gluon.py`` (text edits of its epilogue, imported from a temporary folder) and times each against
the shipped kernel in one run (CUDA-graph µs). Some edits are deliberately unsafe (no fence, no barriers): they are
timing probes, their outputs are only compared, never used.

    python3 bench/gluon_epilogue_probe.py --source <(git show 24c0d47:kernels/gemm_w4a4_gluon.py)

The edits match the epilogue as it was before the branch moved into the warpgroup's turn (commit 6b8e478), so
``--source`` names that version (the run in BENCHMARKS.md, session 12, used it); against a later source the probe
says which edit no longer matches.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

import _path  # noqa: F401

from linear import make_layer  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "kernels" / "gemm_w4a4_gluon.py"

FENCE = "            fence_async_shared()\n"
BARRIERS = ("            gl.thread_barrier()  # the previous chunk's (or tile's) MMA has finished reading up_smem\n",
            "            gl.thread_barrier()\n            y = warpgroup_mma")
MMA = ("            y = warpgroup_mma(la, up_smem.permute((1, 0)), y, is_async=True)\n"
       "            y = warpgroup_mma_wait(num_outstanding=0, deps=(y,))\n")
LA_LOAD = ("            la = gl.load(lora_ptr + lm[:, None] * stride_lm + lr[None, :],\n"
           "                         mask=(lm < M)[:, None] & (lr < R)[None, :], other=0.0).to(gl.bfloat16)\n")

EDITS = {
    "shipped": [],
    "no fence": [(FENCE, "")],
    "no fence, no barriers": [(FENCE, ""), (BARRIERS[0], ""), (BARRIERS[1], "            y = warpgroup_mma")],
    "no branch MMA (its operand load then dead too; proj_up load, store to smem, barriers kept)": [(MMA, "")],
    "lora operand zeros (no load of it)": [(LA_LOAD, "            la = gl.zeros([BM, R_CHUNK], gl.bfloat16, layout=la_layout)\n")],
}


def edited_module(name: str, edits: list, source: Path = SRC):
    text = source.read_text()
    for old, new in edits:
        if old not in text:
            raise RuntimeError(f"probe edit for {name!r} no longer matches the kernel source")
        text = text.replace(old, new)
    d = Path(tempfile.mkdtemp(prefix="svdq-epi-"))
    path = d / "gemm_w4a4_gluon_probe.py"
    path.write_text(text.replace("from .autotune_cache", "from svdq.kernels.autotune_cache")
                    .replace("from .launch", "from svdq.kernels.launch"))
    spec = importlib.util.spec_from_file_location(f"svdq_epi_probe_{abs(hash(name))}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    import argparse

    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, default=SRC, help="the Gluon kernel source to edit")
    source = ap.parse_args().source

    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import branch_chunks, expand_weight

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    mods = {}
    for name, edits in EDITS.items():
        try:
            mods[name] = edited_module(name, edits, source)
        except Exception as exc:
            print(f"{name}: {exc}", flush=True)
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 4, "GROUP_M": 8, "PINGPONG": True}
    for m, k, n in [(4608, 3072, 21504), (4608, 3072, 12288), (4608, 15360, 3072)]:
        layer = make_layer(n, k, 32)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
        w8 = expand_weight(layer.qweight, layer.wmult)
        block_r, r_chunk = branch_chunks(32)
        line, ref = [f"M={m} {k}->{n}"], None
        for name, mod in mods.items():
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            args = (a8, w8, sa, layer.wscale, lora, layer.proj_up, layer.bias, out, m, n, layer.k_padded, 32,
                    a8.stride(0), w8.stride(0), lora.stride(0), layer.proj_up.stride(0), out.stride(0))
            flags = dict(HAS_LORA=True, HAS_BIAS=True, GELU=False, BLOCK_R=block_r, R_CHUNK=r_chunk, ACCUMULATE=False)

            def fn(mod=mod, args=args, flags=flags):
                mod.launch_ws(cfg, 4, args, flags, m, n)

            try:
                fn()
                torch.cuda.synchronize()
                if ref is None:
                    ref = out.clone()
                diff = float((out.float() - ref.float()).abs().max())
                t = triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3
                line.append(f"{name} {t:.1f} us (max diff to shipped {diff:.3g})")
            except Exception as exc:
                line.append(f"{name} failed: {str(exc)[-200:]}")
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
