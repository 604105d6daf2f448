"""Read and write svdq checkpoints: one ``.safetensors`` file, tensors per layer plus JSON metadata.

See ``docs/FORMAT.md`` for the specification. Writes are atomic (temporary file in the target folder, then
rename); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..kernels.reference import QuantizedLinearWeights

FORMAT_NAME = "svdq"
FORMAT_VERSION = 1
SUFFIXES = QuantizedLinearWeights.TENSOR_FIELDS
LAYER_FIELDS = ("kind", "precision", "act_precision", "in_features", "out_features", "act_unsigned", "act_shift")
# composite layers: one ComfyUI linear made of parts quantized separately (``NAME.parts.i``), e.g. a FLUX single
# block's linear1 = [qkv; mlp_fc1] (split by output rows) and linear2 = [out_proj | mlp_fc2] (split by input columns)
PART_FIELDS = ("part_of", "in_range", "out_range", "full_shape")
META_FIELDS = ("kind", "precision", "act_precision", "act_unsigned", "act_shift")


class CheckpointError(ValueError):
    """A file that cannot be read as an svdq checkpoint; the message names the file and the problem."""


@dataclass
class Checkpoint:
    layers: dict[str, QuantizedLinearWeights]
    tensors: dict[str, torch.Tensor]  # unquantized tensors under their original names
    config: dict = field(default_factory=dict)  # quantization_config
    metadata: dict = field(default_factory=dict)  # every other metadata entry (parsed where JSON)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = dict(self.tensors)
        for name, layer in self.layers.items():
            for suffix, t in layer.tensors().items():
                sd[f"{name}.{suffix}"] = t
        return sd

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def logical_shapes(self) -> dict[str, tuple[int, int]]:
        """ComfyUI layer name -> (out_features, in_features), composite layers under their own name."""
        shapes = {}
        for name, layer in self.layers.items():
            base = layer.extra.get("part_of")
            if base is None:
                shapes[name] = (layer.out_features, layer.in_features)
            else:
                shapes[base] = tuple(layer.extra["full_shape"])
        return shapes

    def layer_meta(self) -> dict[str, dict]:
        """What the quantized op needs per ComfyUI layer: metadata, or ``parts`` with their ranges."""
        out: dict[str, dict] = {}
        for name, layer in self.layers.items():
            meta = {k: getattr(layer, k) for k in META_FIELDS}
            base = layer.extra.get("part_of")
            if base is None:
                out[name] = meta
                continue
            idx = int(name.rsplit(".", 1)[1])
            parts = out.setdefault(base, {"parts": []})["parts"]
            parts.extend([None] * (idx + 1 - len(parts)))
            parts[idx] = {"meta": meta, "in_range": layer.extra.get("in_range"), "out_range": layer.extra.get("out_range")}
        return out

    def summary(self) -> dict:
        """Precision, rank, layer kinds, bytes and the 16-bit bytes they replace (what `svdq info` and the loader show)."""
        layers = list(self.layers.values())
        q_bytes = sum(layer.nbytes() for layer in layers)
        q_params = sum(layer.in_features * layer.out_features for layer in layers)
        other = sum(t.numel() * t.element_size() for t in self.tensors.values())
        kinds: dict[str, int] = {}
        for layer in layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        ranks = sorted({layer.rank for layer in layers})
        return {
            "precision": self.config.get("precision"),
            "act_precision": self.config.get("act_precision"),
            "rank": ranks[-1] if ranks else 0,
            "quantized_layers": len(layers),
            "layers": kinds,
            "bytes": q_bytes + other,
            "bytes_16bit": q_params * 2 + other,
            "bits_per_weight": (8.0 * q_bytes / q_params) if q_params else 0.0,
            "family": self.metadata.get("model_family"),
        }


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Parse a safetensors header without loading tensors: (tensor entries, metadata). Clear errors on garbage."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: file not found")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, expected a .safetensors file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: not a safetensors file (only {size} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen <= 0 or hlen > min(size - 8, 100 * 2**20):
            raise CheckpointError(
                f"{p}: not a safetensors file (bad header length {hlen}; a pickle .ckpt/.pt or a truncated download?)"
            )
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, entry in header.items():
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise CheckpointError(f"{p}: corrupt safetensors header entry for {name!r}") from exc
    if 8 + hlen + end > size:
        raise CheckpointError(
            f"{p}: truncated: the header promises {8 + hlen + end} bytes, the file has {size}. "
            "Re-download or re-create it."
        )
    return header, meta


def is_svdq_file(path: str | os.PathLike) -> bool:
    try:
        _, meta = read_header(path)
    except CheckpointError:
        return False
    return meta.get("format") == FORMAT_NAME


def _json_meta(meta: dict, key: str, path) -> dict:
    try:
        return json.loads(meta.get(key) or "{}")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata entry {key!r} is not valid JSON ({exc})") from exc


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", check_finite: bool = True) -> Checkpoint:
    """Load an svdq checkpoint. Raises ``CheckpointError`` naming the file and what is wrong."""
    p = Path(path)
    header, meta = read_header(p)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{p}: not an svdq checkpoint (metadata 'format' is {meta.get('format')!r}). "
            "Quantize a model with `svdq quantize`, or convert a Nunchaku file with `svdq convert`."
        )
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: svdq format version {meta.get('format_version')!r} is not supported by this svdq "
            f"(reads version {FORMAT_VERSION}); update svdq or re-quantize the model"
        )
    layer_info = _json_meta(meta, "layers", p)
    config = _json_meta(meta, "quantization_config", p)
    try:
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{p}: cannot read tensors ({exc})") from exc

    layers: dict[str, QuantizedLinearWeights] = {}
    for name, info in layer_info.items():
        kw = {k: info[k] for k in LAYER_FIELDS if k in info}
        kw["extra"] = {k: info[k] for k in PART_FIELDS if info.get(k) is not None}
        if kw["extra"] and (name != f"{kw['extra'].get('part_of')}.parts.{name.rsplit('.', 1)[-1]}"
                            or "full_shape" not in kw["extra"]):
            raise CheckpointError(f"{p}: layer {name!r} has inconsistent composite-part metadata")
        for suffix in SUFFIXES:
            kw[suffix] = raw.pop(f"{name}.{suffix}", None)
        if kw["qweight"] is None:
            raise CheckpointError(f"{p}: layer {name!r} is listed in the metadata but its tensor '{name}.qweight' is missing")
        try:
            layer = QuantizedLinearWeights(**kw)
            layer.validate()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{p}: layer {name!r}: {exc}") from exc
        if check_finite:
            for suffix, t in layer.tensors().items():
                if t.is_floating_point() and t.dtype.itemsize > 1 and not torch.isfinite(t).all():
                    raise CheckpointError(f"{p}: tensor '{name}.{suffix}' contains NaN/Inf values")
        layers[name] = layer
    parts: dict[str, list[int]] = {}
    for name, layer in layers.items():
        if layer.extra.get("part_of"):
            parts.setdefault(layer.extra["part_of"], []).append(int(name.rsplit(".", 1)[1]))
    for base, idx in parts.items():
        if sorted(idx) != list(range(len(idx))):
            raise CheckpointError(f"{p}: composite layer {base!r} has parts {sorted(idx)}; parts 0..{len(idx) - 1} expected")
    other = {k: v for k, v in meta.items() if k not in ("layers", "quantization_config")}
    for k, v in other.items():  # structured entries (written with json.dumps) come back parsed
        if isinstance(v, str) and v[:1] in ("{", "["):
            other[k] = _json_meta(meta, k, p)
    return Checkpoint(layers=layers, tensors=raw, config=config, metadata=other)


def save_checkpoint(
    path: str | os.PathLike,
    layers: dict[str, QuantizedLinearWeights],
    tensors: dict[str, torch.Tensor],
    config: dict,
    metadata: dict | None = None,
) -> Path:
    """Write atomically: a temporary file beside the target, fsync, then rename. The folder must exist."""
    p = Path(path)
    if not p.parent.exists():
        raise FileNotFoundError(f"output folder {p.parent} does not exist; create it first")
    if p.exists() and p.is_dir():
        raise IsADirectoryError(f"{p} is a folder; give a file name ending in .safetensors")
    sd: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for name, layer in layers.items():
        layer.validate()
        info[name] = {k: getattr(layer, k) for k in LAYER_FIELDS}
        info[name].update({k: layer.extra[k] for k in PART_FIELDS if layer.extra.get(k) is not None})
        for suffix, t in layer.tensors().items():
            sd[f"{name}.{suffix}"] = t.detach().to("cpu").contiguous()
    for name, t in tensors.items():
        if name in sd:
            raise ValueError(f"tensor name {name!r} collides with a quantized layer's tensor")
        sd[name] = t.detach().to("cpu").contiguous()
    for name, t in sd.items():
        if t.is_floating_point() and t.dtype.itemsize > 1 and not torch.isfinite(t).all():
            raise ValueError(f"refusing to write {p}: tensor {name!r} contains NaN/Inf values")
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "quantization_config": json.dumps(config, sort_keys=True),
        "layers": json.dumps(info, sort_keys=True),
    }
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent))
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p
