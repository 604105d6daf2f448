"""Shared builders for tests: random quantized layers with realistic tensors; a Hugging Face cache layout."""

from pathlib import Path

import torch

from svdq.kernels.reference import QuantizedLinearWeights
from svdq.quant.formats import pack_int4, quantize_int4_weight


def random_layer(n, k, rank=32, bias=True, unsigned=False, shift=0.0, act="int4", kind="w4a4",
                 device="cpu", dtype=torch.bfloat16, seed=0) -> QuantizedLinearWeights:
    """A layer with a genuinely quantized random weight (not random codes), smoothing and a low-rank branch."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q = quantize_int4_weight(w)
    smooth = (torch.rand(k, generator=g) * 1.5 + 0.25).to(dtype)
    down = (torch.randn(k, rank, generator=g) * 0.05).to(dtype) if rank else None
    up = (torch.randn(n, rank, generator=g) * 0.05).to(dtype) if rank else None
    layer = QuantizedLinearWeights(
        in_features=k, out_features=n, kind=kind, precision="int4", act_precision=act if kind == "w4a4" else "none",
        qweight=pack_int4(q.codes), wmult=q.mult, wscale=q.scale, smooth=smooth,
        proj_down=down, proj_up=up, bias=(torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None,
        act_unsigned=unsigned, act_shift=shift,
    )
    layer.validate()
    return layer.to(device)


def make_hf_cache(root: Path, repo: str, files: dict[str, bytes], commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """models--OWNER--NAME/{refs/main, snapshots/COMMIT/FILE -> ../../blobs/HASH}."""
    import hashlib
    import os

    d = root / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    for name, data in files.items():
        h = hashlib.sha256(data).hexdigest()
        blob = d / "blobs" / h
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = d / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return root


