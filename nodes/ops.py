"""The quantized Linear for ComfyUI's ``custom_operations`` (the ComfyUI-GGUF approach).

ComfyUI builds its own model classes with these ops. Linears whose state dict carries svdq tensors become
quantized (4-bit residual + low-rank branch as parameters, so ComfyUI's memory management counts and moves them);
every other layer is ComfyUI's ``manual_cast`` op unchanged. Under lowvram ComfyUI leaves a layer on the offload
device and sets ``comfy_cast_weights``; the quantized forward then streams the 4-bit tensors to the input's
device, four times fewer bytes than a 16-bit layer.
"""

from __future__ import annotations

import comfy.model_management
import comfy.ops
import torch

from ..kernels import torch_op
from ..kernels.dispatch import outside_graph_pools, svdq_linear, triton_usable, with_extra_branch
from ..kernels.reference import QuantizedLinearWeights

_META = ("kind", "precision", "act_precision", "act_unsigned", "act_shift")


def _check_part_ranges(name: str, parts: list, in_features: int, out_features: int) -> None:
    """A composite layer's parts must tile its outputs (split by rows) or its inputs (split by columns) exactly:
    the forward writes each part into its slice of one output, so a gap would leave memory unwritten."""
    by_rows = [p[3] is not None for p in parts]
    if all(by_rows):
        ranges, total = [tuple(p[3]) for p in parts], out_features
    elif not any(by_rows) and all(p[2] is not None for p in parts):
        ranges, total = [tuple(p[2]) for p in parts], in_features
    else:
        raise ValueError(f"{name}: a composite layer splits either by output rows or by input columns, not both")
    edge = 0
    for lo, hi in ranges:
        if lo != edge or hi <= lo:
            raise ValueError(f"{name}: part ranges {ranges} do not tile 0..{total} in order")
        edge = hi
    if edge != total:
        raise ValueError(f"{name}: part ranges {ranges} cover 0..{edge}, the layer has {total}")


def make_svdq_ops(layer_meta: dict[str, dict]):
    """An operations class that knows which layers are quantized (``layer_meta``: name → metadata dict)."""

    class SVDQOps(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            svdq_meta: dict | None = None

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                torch.nn.Module.__init__(self)
                self.in_features = in_features
                self.out_features = out_features
                self.has_bias = bias
                self.factory = {"device": device, "dtype": dtype}
                # weights are created at load time: quantized or 16-bit, as the file says
                self.weight = None
                self.bias = None
                self.svdq_meta = None
                self.svdq_lora: list = []  # (down [K, r], up [N, r]) extra low-rank factors (LoRA), see patcher
                self.svdq_bias_delta = None  # LoRA bias patches on a quantized layer, see patcher
                self.svdq_gelu = False  # the tanh GELU after this layer was moved in here (``fuse_mlp_gelu``)
                self.svdq_parts: list = []  # (attribute prefix, meta, in_range, out_range, state-dict prefix)
                self.svdq_field_names: list = []  # per part: the attribute names of its tensors, in TENSOR_FIELDS order

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
                name = prefix[:-1]
                meta = layer_meta.get(name)
                if meta is None or not (f"{prefix}qweight" in state_dict or f"{prefix}parts.0.qweight" in state_dict):
                    w = state_dict.get(f"{prefix}weight")
                    if w is None:
                        missing_keys.append(f"{prefix}weight")
                        return
                    self.weight = torch.nn.Parameter(w, requires_grad=False)
                    b = state_dict.get(f"{prefix}bias")
                    if b is not None:
                        self.bias = torch.nn.Parameter(b, requires_grad=False)
                    elif self.has_bias:
                        missing_keys.append(f"{prefix}bias")
                    return
                # a plain layer is one part with tensors at the prefix; a composite layer (a fused ComfyUI linear
                # made of parts quantized separately, e.g. Nunchaku's FLUX single blocks) has parts.i.* tensors
                parts = meta.get("parts") or [{"meta": meta, "in_range": None, "out_range": None}]
                self.svdq_parts = []
                for i, part in enumerate(parts):
                    attr = "svdq_" if "parts" not in meta else f"svdq_p{i}_"
                    src = prefix if "parts" not in meta else f"{prefix}parts.{i}."
                    for field in QuantizedLinearWeights.TENSOR_FIELDS:
                        t = state_dict.get(f"{src}{field}")
                        setattr(self, f"{attr}{field}", None if t is None else torch.nn.Parameter(t, requires_grad=False))
                    self.svdq_parts.append((attr, {k: part["meta"][k] for k in _META if k in part["meta"]},
                                            part.get("in_range"), part.get("out_range"), src))
                self.svdq_field_names = [[f"{attr}{f}" for f in QuantizedLinearWeights.TENSOR_FIELDS]
                                         for attr, *_ in self.svdq_parts]
                if "parts" in meta:
                    _check_part_ranges(name, self.svdq_parts, self.in_features, self.out_features)
                self.svdq_meta = {"parts": len(self.svdq_parts)} if "parts" in meta else self.svdq_parts[0][1]
                torch_op.register_owner(self)
                # the layer's float bias lives in svdq_bias (shift compensation folded in); ``weight`` (and a
                # composite's ``bias``) are storage-free tensors of the logical shape, so ComfyUI's LoRA key maps
                # and shape checks see the layer
                self.bias = None
                self.weight = torch.zeros((), dtype=torch.bfloat16).expand(self.out_features, self.in_features)
                for i in range(len(self.svdq_parts)):
                    self.quantized_weights(part=i).validate()

            def _save_to_state_dict(self, destination, prefix, keep_vars):
                if self.svdq_meta is None:
                    return super()._save_to_state_dict(destination, prefix, keep_vars)
                destination[f"{prefix}weight"] = self.weight
                composite = len(self.svdq_parts) > 1 or "parts" in self.svdq_meta
                if composite:
                    destination[f"{prefix}bias"] = torch.zeros((), dtype=torch.bfloat16).expand(self.out_features)
                for attr, _, _, _, src in self.svdq_parts:
                    for field in QuantizedLinearWeights.TENSOR_FIELDS:
                        t = getattr(self, f"{attr}{field}", None)
                        if t is None:
                            continue
                        if composite:  # parts keep their own names
                            name = f"{src[len(prefix):]}{field}"
                        else:  # the bias under its usual name, so LoRA bias patches find it
                            name = "bias" if field == "bias" else f"svdq_{field}"
                        destination[f"{prefix}{name}"] = t if keep_vars else t.detach()

            @property
            def is_quantized(self) -> bool:
                return self.svdq_meta is not None

            def quantized_weights(self, device=None, part: int = 0) -> QuantizedLinearWeights:
                """The part's tensors as one object; reused while they stay where they are (a forward at batch 1
                is host-bound, so the object is not rebuilt per call), rebuilt after ComfyUI moves them."""
                attr, meta, in_range, out_range, _ = self.svdq_parts[part]
                params = self._parameters  # direct: Module.__getattr__ per field cost ~1 µs a call each
                names = self.svdq_field_names[part]
                q = params.get(names[0])
                if q is None:
                    q = getattr(self, names[0])
                if device is not None and q.device == device:
                    cache = self.__dict__.setdefault("_svdq_cache", {})
                    key = tuple(t.data_ptr() for n in names if (t := params.get(n)) is not None)
                    hit = cache.get(part)
                    if hit is not None and hit[0] == key:
                        return hit[1]
                    w = self._build_weights(attr, meta, in_range, out_range, None)
                    cache[part] = (key, w)
                    return w
                return self._build_weights(attr, meta, in_range, out_range, device)

            def _build_weights(self, attr, meta, in_range, out_range, device) -> QuantizedLinearWeights:
                tensors = {}
                for field in QuantizedLinearWeights.TENSOR_FIELDS:
                    t = getattr(self, f"{attr}{field}", None)
                    if t is not None and device is not None and t.device != device:
                        t = comfy.model_management.cast_to(t, None, device, non_blocking=True, copy=False)
                    tensors[field] = t
                n = self.out_features if out_range is None else out_range[1] - out_range[0]
                k = self.in_features if in_range is None else in_range[1] - in_range[0]
                return QuantizedLinearWeights(in_features=k, out_features=n, **meta, **tensors)

            def forward(self, x, *args, **kwargs):
                if self.svdq_meta is None:
                    return super().forward(x, *args, **kwargs)
                # the GELU runs in the GEMM epilogue unless a LoRA bias delta must be added before it, or the
                # parts split the input (their sum exists only after the last part)
                gelu = self.svdq_gelu and self.svdq_bias_delta is None and self.svdq_parts[0][2] is None
                if torch.compiler.is_compiling():
                    y = self._traced_forward(x, gelu)
                elif len(self.svdq_parts) == 1 and self.svdq_parts[0][2] is None and self.svdq_parts[0][3] is None:
                    comfy.ops.run_every_op()
                    y = self._part_linear(x, 0, gelu=gelu)
                else:
                    comfy.ops.run_every_op()
                    y = self._composite_forward(x, gelu)
                if self.svdq_bias_delta is not None:
                    y = y + self.svdq_bias_delta.to(device=y.device, dtype=y.dtype)
                if self.svdq_gelu and not gelu:
                    y = torch.nn.functional.gelu(y, approximate="tanh")
                return y

            def _lora_factors(self, device, part: int = 0):
                """Every attached LoRA's (down [K, r], up [N, r]) side by side along the rank, cut to one part's
                share: a part split by output rows takes its rows of ``up``, one split by input columns its rows
                of ``down`` (the parts' products then sum to x · down · upᵀ)."""
                if len(self.svdq_lora) == 1:  # the patcher's case: no copy
                    down, up = (t.to(device) for t in self.svdq_lora[0])
                else:
                    down = torch.cat([d.to(device) for d, _ in self.svdq_lora], dim=1)
                    up = torch.cat([u.to(device) for _, u in self.svdq_lora], dim=1)
                _, _, in_range, out_range, _ = self.svdq_parts[part]
                if in_range is not None:
                    down = down[in_range[0]: in_range[1]]
                if out_range is not None:
                    up = up[out_range[0]: out_range[1]]
                return down, up

            def _with_lora_branch(self, w: QuantizedLinearWeights, device, part: int = 0) -> QuantizedLinearWeights:
                """The layer (or one part of a composite) with its LoRA factors appended to the low-rank branch,
                built once per LoRA set (the patcher installs a new list on every change) instead of concatenated
                on every call."""
                cache = self.__dict__.setdefault("_svdq_lora_cat", {})
                c = cache.get(part)
                if c is not None and c[0] is self.svdq_lora and c[1] is w and c[2] == device:
                    return c[3]
                merged = outside_graph_pools(lambda: with_extra_branch(w, *self._lora_factors(device, part)))
                cache[part] = (self.svdq_lora, w, device, merged)
                return merged

            def _part_linear(self, x, part: int, out=None, accumulate: bool = False, gelu: bool = False):
                w = self.quantized_weights(device=x.device, part=part)
                if not self.svdq_lora:
                    return svdq_linear(x, w, gelu=gelu, out=out, accumulate=accumulate)
                if triton_usable(x):  # the kernels take one branch: merged once per LoRA set
                    return svdq_linear(x, self._with_lora_branch(w, x.device, part), gelu=gelu, out=out,
                                       accumulate=accumulate)
                down, up = self._lora_factors(x.device, part)  # the reference keeps them separate, in fp32
                return svdq_linear(x, w, extra_down=down, extra_up=up, gelu=gelu, out=out, accumulate=accumulate)

            def _composite_forward(self, x, gelu: bool = False):
                """Parts split by output rows write their column slices of one output (no concatenation); parts
                split by input columns read their slices of the input in place and add into the first part's
                output (no fp32 sum). Each part carries its share of an attached LoRA in its own branch."""
                if self.svdq_parts[0][3] is not None:
                    y = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
                    for i, (_, _, in_range, (lo, hi), _) in enumerate(self.svdq_parts):
                        xi = x if in_range is None else x[..., in_range[0]: in_range[1]]
                        self._part_linear(xi, i, out=y[..., lo:hi], gelu=gelu)
                    return y
                y = None
                for i, (_, _, (lo, hi), _, _) in enumerate(self.svdq_parts):
                    if y is None:
                        y = self._part_linear(x[..., lo:hi], i)
                    else:
                        self._part_linear(x[..., lo:hi], i, out=y, accumulate=True)
                return y

            def _traced_forward(self, x, gelu: bool = False):
                """Under ``torch.compile``: every part is one ``svdq::linear`` node (opaque to Dynamo, see
                ``kernels.torch_op``) given the module's own tensors; at run time the op finds this module by
                its qweight and runs ``svdq_part_linear`` (the eager path: its caches, lowvram streaming, LoRA).
                Composite parts are concatenated or summed in the graph instead of written into slices."""
                outs = []
                for i, (_, meta, in_range, out_range, _) in enumerate(self.svdq_parts):
                    tensors = [getattr(self, n, None) for n in self.svdq_field_names[i]]
                    down, up = self._lora_factors(x.device, i) if self.svdq_lora else (None, None)
                    xi = x if in_range is None else x[..., in_range[0]: in_range[1]]
                    k = xi.shape[-1]
                    n = self.out_features if out_range is None else out_range[1] - out_range[0]
                    outs.append(torch_op.call(xi, tensors, meta, k, n, down, up, gelu=gelu))
                if len(outs) == 1:
                    return outs[0]
                if self.svdq_parts[0][3] is not None:
                    return torch.cat(outs, dim=-1)
                y = outs[0]
                for o in outs[1:]:
                    y = y + o
                return y

            def forget_device_state(self) -> None:
                """Drop what the layer derived on a device (its weights object with call plans and 1/λ, a
                LoRA-merged branch): called when ComfyUI unpatches or moves the model, so nothing derived from
                the old placement keeps device memory alive until the layer's next call."""
                self.__dict__.pop("_svdq_cache", None)
                self.__dict__.pop("_svdq_lora_cat", None)
                for i in range(len(self.svdq_parts)):
                    q = self.svdq_part_qweight(i)
                    if q is not None and hasattr(q, torch_op.STATE):
                        delattr(q, torch_op.STATE)

            def svdq_part_qweight(self, part: int):
                """The part's packed weight (how ``svdq::linear`` recognises this layer at run time)."""
                return getattr(self, self.svdq_field_names[part][0], None)

            def svdq_part_with_lora(self, w: QuantizedLinearWeights, device, part: int) -> QuantizedLinearWeights:
                """The part's weights object with the attached LoRA merged into its branch (cached per LoRA set)."""
                return self._with_lora_branch(w, device, part)

            def svdq_part_linear(self, x, part: int, gelu: bool = False):
                """One part on its input, as the eager forward computes it (what ``svdq::linear`` runs)."""
                return self._part_linear(x, part, gelu=gelu)

    return SVDQOps


def fuse_mlp_gelu(root: torch.nn.Module) -> int:
    """Move each tanh GELU that follows a quantized linear inside an ``nn.Sequential`` MLP (Flux's
    ``Linear, GELU, Linear``) into that layer's GEMM epilogue: the GELU module becomes ``nn.Identity`` and the
    layer applies it to its fp32 result before the one 16-bit store, so the 4608 x 12288 activation is not
    written, read and written again by a separate kernel. The model's classes and forward code stay ComfyUI's.
    Returns how many were moved."""
    moved = 0
    for seq in root.modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        mods = list(seq)
        for i in range(len(mods) - 1):
            lin, act = mods[i], mods[i + 1]
            if (type(act) is torch.nn.GELU and act.approximate == "tanh" and getattr(lin, "svdq_meta", None) is not None
                    and not lin.svdq_gelu):
                lin.svdq_gelu = True
                seq[i + 1] = torch.nn.Identity()
                moved += 1
    return moved
