"""Read Nunchaku SVDQuant checkpoints (single file or legacy folder) into an svdq ``Checkpoint``.

The byte layouts are unpacked by ``quant.nunchaku``; this module knows the files: metadata, the two tensor-naming
schemes, the FLUX layer renames to ComfyUI's (BFL) names, the single-block splits (composite layers), the AWQ
modulation layers and the GELU-shifted fc2 inputs. See ``shared/docs/nunchaku-format.md`` §1-§10 and
``docs/FORMAT.md`` ("Nunchaku files").

Two ways to take Nunchaku's 16-bit group scales:
- ``exact`` (default): kept as they are (precision ``int4g``): every number of the file is used unchanged.
- ``requantize``: W4A4 layers re-expressed as our integer group multipliers (precision ``int4``, the fast int8
  kernel path); this changes the residual weights, and the added error is measured per layer and reported. The AWQ
  modulation layers stay exact (requantizing them adds ~13% weight error for no speed gain).
NVFP4 layers convert exactly either way (same E2M1 codes and E4M3 scales).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..kernels.reference import QuantizedLinearWeights
from .checkpoint import Checkpoint, CheckpointError, read_header
from .formats import INT4_GROUP, NVFP4_GROUP, pack_int4, quantize_int4_weight
from .layer import GELU_SHIFT
from .nunchaku import (
    read_awq_layer,
    unpack_awq_qweight,
    deinterleave_chunks,
    unpack_channel_groups,
    unpack_lora_down,
    unpack_lora_up,
    unpack_nvfp4_scales,
    unpack_qweight,
)

log = logging.getLogger("svdq")

LEGACY_FILES = ("transformer_blocks.safetensors", "unquantized_layers.safetensors")
FLUX_MODEL_CLASSES = ("NunchakuFluxTransformer2dModel", "NunchakuFluxTransformer2DModel", "NunchakuFluxTransformer2DModelV2")
SCALE_MODES = ("exact", "requantize")

# per-layer tensor suffixes, both naming schemes (§3); first name is the engine one
SUFFIX_ALIASES = {
    "qweight": ("qweight",), "wscales": ("wscales",), "wzeros": ("wzeros",), "bias": ("bias",),
    "down": ("lora_down", "proj_down"), "up": ("lora_up", "proj_up"),
    "smooth": ("smooth", "smooth_factor"), "smooth_orig": ("smooth_orig", "smooth_factor_orig"),
    "wtscale": ("wtscale",), "wcscales": ("wcscales",),
}
_ALIAS = {s: key for key, names in SUFFIX_ALIASES.items() for s in names}  # stored suffix -> our key

# FLUX (§7): engine / Python-V2 layer name inside a block -> (ComfyUI name, how it maps)
# how: ("w4a4", shift) | ("awq", chunks) | ("part", comfy composite, index, split, shift) | ("norm", None)
_DOUBLE = {
    ("qkv_proj", "attn.to_qkv"): ("img_attn.qkv", ("w4a4", False)),
    ("qkv_proj_context", "attn.add_qkv_proj"): ("txt_attn.qkv", ("w4a4", False)),
    ("out_proj", "attn.to_out.0"): ("img_attn.proj", ("w4a4", False)),
    ("out_proj_context", "attn.to_add_out"): ("txt_attn.proj", ("w4a4", False)),
    ("mlp_fc1", "ff.net.0.proj"): ("img_mlp.0", ("w4a4", False)),
    ("mlp_fc2", "ff.net.2"): ("img_mlp.2", ("w4a4", True)),
    ("mlp_context_fc1", "ff_context.net.0.proj"): ("txt_mlp.0", ("w4a4", False)),
    ("mlp_context_fc2", "ff_context.net.2"): ("txt_mlp.2", ("w4a4", True)),
    ("norm1.linear",): ("img_mod.lin", ("awq", 6)),
    ("norm1_context.linear",): ("txt_mod.lin", ("awq", 6)),
    ("norm_q", "attn.norm_q"): ("img_attn.norm.query_norm", ("norm",)),
    ("norm_k", "attn.norm_k"): ("img_attn.norm.key_norm", ("norm",)),
    ("norm_added_q", "attn.norm_added_q"): ("txt_attn.norm.query_norm", ("norm",)),
    ("norm_added_k", "attn.norm_added_k"): ("txt_attn.norm.key_norm", ("norm",)),
}
_SINGLE = {
    ("qkv_proj", "attn.to_qkv"): ("linear1", ("part", 0, "out", False)),
    ("mlp_fc1",): ("linear1", ("part", 1, "out", False)),
    ("out_proj", "attn.to_out", "attn.to_out.0"): ("linear2", ("part", 0, "in", False)),
    ("mlp_fc2",): ("linear2", ("part", 1, "in", True)),
    ("norm.linear",): ("modulation.lin", ("awq", 3)),
    ("norm_q", "attn.norm_q"): ("norm.query_norm", ("norm",)),
    ("norm_k", "attn.norm_k"): ("norm.key_norm", ("norm",)),
}
# unquantized FLUX layers, diffusers -> ComfyUI (BFL); norm_out's shift/scale halves are swapped
_FLUX_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


@dataclass
class ConversionReport:
    """What the conversion did: exact layers, requantized layers with their measured error, what was dropped."""

    source: str
    precision: str
    scales: str
    rank: int = 0
    exact_layers: int = 0
    requantized: dict[str, float] = field(default_factory=dict)  # layer -> relative weight error added
    notes: list[str] = field(default_factory=list)

    def describe(self, with_source: bool = True) -> str:
        s = (f"{self.source}: " if with_source else "") + (
            f"Nunchaku {self.precision} rank {self.rank} checkpoint, {self.exact_layers} layers converted exactly")
        if self.requantized:
            errs = list(self.requantized.values())
            s += (f", {len(errs)} requantized into integer group multipliers (added relative weight error "
                  f"mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f})")
        return s + "".join(f"; {n}" for n in self.notes)

    def as_dict(self) -> dict:
        errs = list(self.requantized.values())
        return {"source": self.source, "precision": self.precision, "scales": self.scales, "rank": self.rank,
                "exact_layers": self.exact_layers, "requantized_layers": len(errs),
                "requantize_error_mean": sum(errs) / len(errs) if errs else 0.0,
                "requantize_error_max": max(errs) if errs else 0.0, "notes": self.notes}


# ------------------------------------------------------------------------------------------------ file access
def _json(meta: dict, key: str, path) -> dict:
    raw = meta.get(key)
    if not raw:
        return {}
    try:
        v = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: Nunchaku metadata {key!r} is not valid JSON ({exc})") from exc
    return v if isinstance(v, dict) else {}


def is_nunchaku_checkpoint(path: str | os.PathLike) -> bool:
    """A legacy folder, or a safetensors file with SVDQuant layers (``*.wscales`` + a low-rank tensor) or the
    single-file metadata, that is not an svdq file."""
    p = Path(path)
    if p.is_dir():
        return (p / LEGACY_FILES[0]).exists()
    try:
        header, meta = read_header(p)
    except CheckpointError:
        return False
    if meta.get("format") == "svdq":
        return False
    qc = _json(meta, "quantization_config", p) if meta.get("quantization_config") else {}
    if qc.get("method") == "svdquant":
        return True
    return any(k.endswith((".lora_down", ".proj_down")) for k in header) and any(k.endswith(".wscales") for k in header)


def read_nunchaku_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the (parsed) metadata of a single file or a legacy folder."""
    p = Path(path)
    files = [p / f for f in LEGACY_FILES] if p.is_dir() else [p]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{p}: legacy Nunchaku folder without {f.name}")
        _, m = read_header(f)
        meta.update(m)
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read tensors ({exc})") from exc
    parsed = {k: _json(meta, k, p) for k in ("config", "comfy_config", "quantization_config")}
    parsed["model_class"] = meta.get("model_class")
    if p.is_dir():
        for name, key in (("config.json", "config"), ("comfy_config.json", "comfy_config")):
            if (p / name).exists():
                try:
                    parsed[key] = json.loads((p / name).read_text())
                except json.JSONDecodeError as exc:
                    raise CheckpointError(f"{p / name}: not valid JSON ({exc})") from exc
    return tensors, parsed


# ---------------------------------------------------------------------------------------------- layer groups
def _split_layers(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group block tensors by layer (suffix aliases resolved to our keys); return (layers, everything else)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        base, _, suffix = k.rpartition(".")
        if suffix in _ALIAS and base and (suffix != "bias" or f"{base}.qweight" in tensors):
            layers.setdefault(base, {})[_ALIAS[suffix]] = t
        else:
            rest[k] = t
    return layers, rest


def _detect_precision(layers: dict, qc: dict, path) -> str:
    fp8 = any(t["wscales"].dtype == torch.float8_e4m3fn for t in layers.values() if "down" in t and "wscales" in t)
    precision = "nvfp4" if fp8 else "int4"
    declared = ((qc.get("weight") or {}).get("dtype") or "").lower()
    if declared:
        want = "nvfp4" if "fp4" in declared else ("int4" if "int4" in declared else None)
        if want is None:
            raise CheckpointError(f"{path}: unknown Nunchaku weight dtype {declared!r} in quantization_config")
        if want != precision:
            raise CheckpointError(
                f"{path}: quantization_config says {declared} weights but the tensors are {precision} "
                f"({'FP8' if fp8 else '16-bit'} group scales): the file is inconsistent (a bad merge or a damaged download)"
            )
    return precision


def _trim_rank(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing all-zero ranks (the 16-multiple padding) — they contribute exactly nothing."""
    r = down.shape[1]
    while r > 0 and not torch.any(down[:, r - 1]) and not torch.any(up[:, r - 1]):
        r -= 1
    return down[:, :r].contiguous(), up[:, :r].contiguous()


def _crop(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return t[:rows, :cols].contiguous()


def convert_w4a4(t: dict[str, torch.Tensor], n: int, k: int, precision: str, shift: bool, scales: str,
                 name: str) -> tuple[QuantizedLinearWeights, float | None]:
    """One Nunchaku W4A4 layer (tensors under either naming scheme) -> our layer. Returns (layer, added weight
    error or None when exact)."""
    t = _normalize(t)
    missing = [s for s in ("qweight", "wscales", "down", "up") if s not in t]
    if missing:
        names = [SUFFIX_ALIASES[s][0] for s in missing]
        raise CheckpointError(f"layer {name}: missing tensors {names}")
    dtype = t["down"].dtype
    kp = k + (-k) % INT4_GROUP
    nibbles = unpack_qweight(t["qweight"])  # [Np, Kp128] uint8 0..15
    if nibbles.shape[0] < n or nibbles.shape[1] < k:
        raise CheckpointError(f"layer {name}: qweight {tuple(t['qweight'].shape)} is too small for {n}x{k}")
    codes = _crop(nibbles, n, kp)
    down = unpack_lora_down(t["down"])[:k]
    up = unpack_lora_up(t["up"])[:n]
    down, up = _trim_rank(down, up)
    smooth = unpack_channel_groups(t["smooth"])[:k].contiguous() if "smooth" in t else torch.ones(k, dtype=dtype)
    bias = unpack_channel_groups(t["bias"])[:n].contiguous() if "bias" in t else None
    lowrank = {"proj_down": down, "proj_up": up} if down.shape[1] else {}
    if precision == "nvfp4":
        ws = unpack_nvfp4_scales(t["wscales"])[:n, : kp // NVFP4_GROUP].contiguous()
        wt = t.get("wtscale")
        wc = t.get("wcscales")
        layer = QuantizedLinearWeights(
            in_features=k, out_features=n, qweight=pack_int4(codes), precision="nvfp4", act_precision="nvfp4",
            wscales=ws, wtscale=(wt.float().reshape(1) if wt is not None else torch.ones(1)),
            wcscales=unpack_channel_groups(wc)[:n].float().contiguous() if wc is not None else None,
            smooth=smooth, bias=bias, **lowrank)
        layer.validate()
        return layer, None
    signed = codes.to(torch.int16)
    signed = torch.where(signed >= 8, signed - 16, signed)
    gscales = unpack_channel_groups(t["wscales"])[: kp // INT4_GROUP, :n].T.contiguous()  # [N, Kp/64]
    act = {"act_unsigned": True, "act_shift": GELU_SHIFT} if shift else {}
    if scales == "exact":
        layer = QuantizedLinearWeights(in_features=k, out_features=n, qweight=pack_int4(signed), precision="int4g",
                                       wscales=gscales, smooth=smooth, bias=bias, **lowrank, **act)
        layer.validate()
        return layer, None
    residual = (signed.float().reshape(n, kp // INT4_GROUP, INT4_GROUP) * gscales.float()[:, :, None]).reshape(n, kp)
    residual = residual[:, :k]
    q, err = _requantize(residual)
    layer = QuantizedLinearWeights(in_features=k, out_features=n, qweight=pack_int4(q.codes), wmult=q.mult, wscale=q.scale,
                                   smooth=smooth, bias=bias, **lowrank, **act)
    layer.validate()
    return layer, err


def _requantize(w: torch.Tensor):
    """Our INT4 (integer group multipliers) of a float residual, on the GPU when there is one; returns the
    quantized tensor on the CPU and the measured relative weight error it adds."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    wd = w.to(dev, torch.float32)
    q = quantize_int4_weight(wd)
    err = float((q.dequantize()[:, : w.shape[1]] - wd).norm() / wd.norm().clamp(min=1e-12))
    q.codes, q.mult, q.scale = q.codes.cpu(), q.mult.cpu(), q.scale.cpu()
    return q, err


def _normalize(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_ALIAS.get(k, k): v for k, v in t.items()}


def _awq_bias(bias: torch.Tensor | None, n: int, chunks: int, plus_one: tuple) -> torch.Tensor | None:
    if bias is None:
        return None
    b = deinterleave_chunks(bias.float(), chunks)[:n].clone()
    per = n // chunks
    for c in plus_one:
        b[c * per: (c + 1) * per] -= 1.0
    return b


def convert_awq(t: dict[str, torch.Tensor], n: int, k: int, chunks: int, scales: str,
                name: str) -> tuple[QuantizedLinearWeights, float | None]:
    """One AWQ W4A16 modulation layer (§6) -> our W4A16 layer, chunk order restored and the folded "+1" removed
    (ComfyUI's Flux adds 1 + scale itself)."""
    t = _normalize(t)
    missing = [s for s in ("qweight", "wscales", "wzeros") if s not in t]
    if missing:
        raise CheckpointError(f"layer {name}: missing AWQ tensors {missing}")
    dtype = t["wscales"].dtype
    plus_one = (1,) if chunks == 3 else ((1, chunks - 2) if chunks >= 6 else ())
    kp = k + (-k) % INT4_GROUP
    groups = kp // INT4_GROUP
    if scales == "exact":
        q = deinterleave_chunks(unpack_awq_qweight(t["qweight"]), chunks)[:n, :kp]
        ws = deinterleave_chunks(t["wscales"][:groups].T.contiguous(), chunks)[:n].contiguous()
        wz = deinterleave_chunks(t["wzeros"][:groups].T.contiguous(), chunks)[:n].contiguous()
        bias = _awq_bias(t.get("bias"), n, chunks, plus_one)
        layer = QuantizedLinearWeights(in_features=k, out_features=n, qweight=pack_int4(q), kind="w4a16",
                                       precision="int4g", act_precision="none", wscales=ws, wzeros=wz,
                                       bias=None if bias is None else bias.to(dtype))
        layer.validate()
        return layer, None
    f = read_awq_layer(t, k, n, chunks, plus_one)
    q, err = _requantize(f["weight"])
    layer = QuantizedLinearWeights(in_features=k, out_features=n, qweight=pack_int4(q.codes), kind="w4a16",
                                   act_precision="none", wmult=q.mult, wscale=q.scale, smooth=torch.ones(k, dtype=dtype),
                                   bias=None if f["bias"] is None else f["bias"].to(dtype))
    layer.validate()
    return layer, err


# ------------------------------------------------------------------------------------------------ FLUX renames
def _flux_hidden(rest: dict[str, torch.Tensor], path) -> int:
    """The hidden size, from the image embedder (FLUX's MLP is 4x that)."""
    w = rest.get("x_embedder.weight")
    if w is None:
        raise CheckpointError(f"{path}: missing tensor 'x_embedder.weight' (not a FLUX-type Nunchaku file?)")
    return int(w.shape[0])


def _lookup(table: dict, local: str):
    for names, target in table.items():
        if local in names:
            return target
    return None


def convert_flux(tensors: dict[str, torch.Tensor], meta: dict, path, scales: str = "exact"):
    """FLUX-structured Nunchaku tensors -> (layers, unquantized tensors, report) under ComfyUI's names."""
    layers_raw, rest = _split_layers(tensors)
    precision = _detect_precision(layers_raw, meta.get("quantization_config") or {}, path)
    hidden = _flux_hidden(rest, path)
    mlp = 4 * hidden
    report = ConversionReport(source=str(path), precision=precision, scales=scales)
    layers: dict[str, QuantizedLinearWeights] = {}
    out: dict[str, torch.Tensor] = {}
    block_re = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
    shapes_single = {"linear1": [(0, 3 * hidden), (3 * hidden, 3 * hidden + mlp)],
                     "linear2": [(0, hidden), (hidden, hidden + mlp)]}

    def w4a4_shape(local: str) -> tuple[int, int]:
        if local.startswith("qkv"):
            return 3 * hidden, hidden
        if "fc1" in local or "net.0" in local:
            return mlp, hidden
        if "fc2" in local or "net.2" in local:
            return hidden, mlp
        return hidden, hidden  # out_proj

    for base, t in layers_raw.items():
        m = block_re.match(base)
        if not m:
            raise CheckpointError(f"{path}: quantized layer {base!r} is outside the FLUX blocks; not a FLUX file?")
        double = m.group(1) == "transformer_blocks"
        idx, local = m.group(2), m.group(3)
        target = _lookup(_DOUBLE if double else _SINGLE, local)
        if target is None:
            raise CheckpointError(f"{path}: unknown FLUX layer {base!r} (no ComfyUI counterpart known)")
        comfy_name, how = target
        prefix = f"{'double_blocks' if double else 'single_blocks'}.{idx}."
        try:
            if how[0] == "awq":
                # kept exact in both modes: AWQ's asymmetric scales/zeros re-expressed as our symmetric multipliers
                # cost ~13% relative weight error on the modulation layers (measured, tests), for a GEMV that is not
                # faster; `convert_awq(..., "requantize")` stays available for callers that want it
                n = int(t["wscales"].shape[1]) if "wscales" in t else 0
                layer, err = convert_awq(t, n, hidden, how[1], "exact", base)
                layers[prefix + comfy_name] = layer
            elif how[0] == "w4a4":
                n, k = w4a4_shape(local)
                layer, err = convert_w4a4(t, n, k, precision, how[1] and precision == "int4", scales, base)
                layers[prefix + comfy_name] = layer
            else:  # a part of a composite single-block layer
                _, part, split, shift = how
                lo, hi = shapes_single[comfy_name][part]
                n, k = (hi - lo, hidden) if split == "out" else (hidden, hi - lo)
                layer, err = convert_w4a4(t, n, k, precision, shift and precision == "int4", scales, base)
                full = (3 * hidden + mlp, hidden) if comfy_name == "linear1" else (hidden, hidden + mlp)
                layer.extra = {"part_of": prefix + comfy_name, "full_shape": list(full),
                               f"{split}_range": [lo, hi]}
                # split by input columns: both parts' biases are summed, as Nunchaku sums the two outputs
                layers[f"{prefix}{comfy_name}.parts.{part}"] = layer
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        except ValueError as exc:
            raise CheckpointError(f"{path}: layer {base!r}: {exc}") from exc
        if err is None:
            report.exact_layers += 1
        else:
            report.requantized[prefix + comfy_name] = err
        report.rank = max(report.rank, layer.rank)

    for k, v in rest.items():
        m = block_re.match(k)
        if m:
            double = m.group(1) == "transformer_blocks"
            local, _, suffix = m.group(3).rpartition(".")
            target = _lookup(_DOUBLE if double else _SINGLE, local)
            if target is None or target[1][0] != "norm" or suffix != "weight":
                raise CheckpointError(f"{path}: unknown tensor {k!r} in a FLUX block; refusing to drop weights")
            out[f"{'double_blocks' if double else 'single_blocks'}.{m.group(2)}.{target[0]}.scale"] = v
            continue
        layer_name, _, suffix = k.rpartition(".")
        if layer_name not in _FLUX_TOP:
            raise CheckpointError(f"{path}: unknown tensor {k!r}; refusing to drop weights")
        if layer_name == "norm_out.linear":  # diffusers (scale, shift) -> BFL (shift, scale)
            v = torch.cat(v.chunk(2, dim=0)[::-1], dim=0)
        out[f"{_FLUX_TOP[layer_name]}.{suffix}"] = v
    _check_composites(layers, path)
    if any("smooth_orig" in t for t in layers_raw.values()):
        report.notes.append("smooth_orig ignored (unused at run time, as in Nunchaku)")
    if precision == "nvfp4":
        report.notes.append("NVFP4 runs emulated (dequantized operands) on GPUs without FP4 tensor cores")
    return layers, out, report


def _check_composites(layers: dict, path) -> None:
    bases: dict[str, list[int]] = {}
    for name, layer in layers.items():
        if layer.extra.get("part_of"):
            bases.setdefault(layer.extra["part_of"], []).append(int(name.rsplit(".", 1)[1]))
    for base, idx in bases.items():
        if sorted(idx) != [0, 1]:
            raise CheckpointError(f"{path}: {base} needs both of its Nunchaku parts, found part(s) {sorted(idx)}")


def _unet_config(meta: dict) -> dict | None:
    cc = meta.get("comfy_config") or {}
    mc = cc.get("model_config")
    if isinstance(mc, dict) and mc:
        # ComfyUI-nunchaku's own flag would stop ComfyUI from building the model: we build it
        cfg = {k: v for k, v in mc.items() if k != "disable_unet_model_creation"}
        cfg.setdefault("image_model", "flux")
        return cfg
    return None


def load_nunchaku_checkpoint(path: str | os.PathLike, scales: str = "exact") -> tuple[Checkpoint, ConversionReport]:
    """A Nunchaku file or folder as an svdq ``Checkpoint`` under ComfyUI's names, plus what the conversion did."""
    if scales not in SCALE_MODES:
        raise ValueError(f"scales must be one of {SCALE_MODES}, got {scales!r}")
    p = Path(path)
    tensors, meta = read_nunchaku_tensors(p)
    model_class = meta.get("model_class") or (meta.get("comfy_config") or {}).get("model_class")
    diffusers_class = (meta.get("config") or {}).get("_class_name", "")
    is_flux_keys = any(k.startswith("single_transformer_blocks.") for k in tensors) and "x_embedder.weight" in tensors
    known = {None, "", "Flux", "FluxSchnell", *FLUX_MODEL_CLASSES}
    if model_class not in known or (diffusers_class and "Flux" not in diffusers_class):
        raise CheckpointError(
            f"{p}: Nunchaku model class {model_class or diffusers_class!r} is not supported by svdq yet "
            "(supported: FLUX.1-type models: dev, schnell, Kontext, Krea, Fill/Canny/Depth)")
    if not is_flux_keys:
        raise CheckpointError(f"{p}: not a FLUX-structured Nunchaku checkpoint (no single_transformer_blocks / x_embedder)")
    layers, rest, report = convert_flux(tensors, meta, p, scales)
    qc = meta.get("quantization_config") or {}
    stored_rank = qc.get("rank")
    if report.precision == "nvfp4":
        precision, weight_scales = "nvfp4", "e4m3"
    elif scales == "exact":
        precision, weight_scales = "int4g", "16-bit per group"
    else:
        precision, weight_scales = "int4", "int-multiplier"
    config = {"method": "svdquant", "rank": report.rank, "precision": precision, "act_precision": report.precision,
              "source_format": "nunchaku", "nunchaku_scales": scales, "weight_scales": weight_scales}
    if stored_rank is not None:
        config["nunchaku_rank"] = stored_rank
    metadata = {"model_family": "flux", "source": str(p), "nunchaku_conversion": report.as_dict()}
    unet = _unet_config(meta)
    if unet:
        metadata["comfy_unet_config"] = unet
    return Checkpoint(layers=layers, tensors=rest, config=config, metadata=metadata), report
