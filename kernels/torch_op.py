# ruff: noqa: UP006, UP035, UP045
"""The quantized linear as one PyTorch custom op, ``torch.ops.svdq.linear``, for ``torch.compile``.

Dynamo cannot trace what the eager path does per call (Triton launches, call plans, the device arena: data
pointers and Python caches); left to itself it would break the graph at every quantized linear. Registered as a
custom op with a shape-only fake implementation, each layer is one opaque node: the graph stays whole and
Inductor fuses the model's own code around it (norms, modulation, RoPE, gates) — what ComfyUI's
``TorchCompileModel`` node does to a model. The op's body is the eager dispatch; its per-layer state (call plans,
1/λ, a LoRA-extended branch) stays with the layer module, which the op finds by its qweight's address; on the kernel
path the op then keeps that layer object on the qweight tensor it was given, so later calls skip the lookup (the
compiled step at batch 1 is host-bound: every microsecond per call is ~0.3 ms per step).

No ``from __future__ import annotations`` and ``typing`` forms here: the op's schema is inferred from the real
annotations, which torch reads in these forms on every supported version.
"""

import weakref
from typing import List, Optional

import torch

from .dispatch import svdq_linear, triton_usable, with_extra_branch
from .reference import QuantizedLinearWeights

FIELDS = QuantizedLinearWeights.TENSOR_FIELDS

STATE = "_svdq_op_fast"  # on a layer's qweight: (tensor addresses, layer, its LoRA list, the layer object to run)

# Layers (ComfyUI modules) that run their own parts, with their own caches. A graph hands the op tensors, not the
# module, so the op finds the layer by its qweight's address (re-indexed when ComfyUI has moved the weights).
_owners: "weakref.WeakSet" = weakref.WeakSet()
_by_address: dict = {}  # qweight data_ptr -> (weakref to layer, part)


def register_owner(layer) -> None:
    """A layer whose parts the op should run through ``layer.svdq_part_linear(x, part)`` (its plans, 1/λ and
    LoRA-merged branch are cached there and dropped with ``forget_device_state``); it provides
    ``svdq_part_qweight(part)`` and ``svdq_parts``."""
    _owners.add(layer)


def _owner_of(q: torch.Tensor):
    def check(hit):
        if hit is None:
            return None
        layer = hit[0]()
        t = None if layer is None else layer.svdq_part_qweight(hit[1])
        ok = t is not None and t.data_ptr() == q.data_ptr() and t.shape == q.shape and t.device == q.device
        return (layer, hit[1]) if ok else None

    found = check(_by_address.get(q.data_ptr()))
    if found is None:  # weights moved (or a new layer): re-index every live layer once
        _by_address.clear()
        for layer in list(_owners):
            for i in range(len(layer.svdq_parts)):
                t = layer.svdq_part_qweight(i)
                if t is not None:
                    _by_address[t.data_ptr()] = (weakref.ref(layer), i)
        found = check(_by_address.get(q.data_ptr()))
    return found


# The op is defined on a plain ``torch.library.Library`` rather than with ``torch.library.custom_op``: custom_op
# wraps every call in an autograd shim and an output-aliasing check, ~4 µs of Python a call on this project's CPU
# (9.5 against 5.5 µs for an op of this signature that does nothing), and a compiled step makes ~300 of these calls.
# One kernel for every backend (the body dispatches itself: kernels on CUDA, the reference elsewhere); no autograd
# formula (inference only, as before); the fake implementation below serves Meta and fake tensors.
_LIB = torch.library.Library("svdq", "DEF")
_LIB.define("linear(Tensor x, Tensor?[] tensors, Tensor? lora_down, Tensor? lora_up, str kind, str precision, "
            "str act_precision, bool act_unsigned, float act_shift, int in_features, int out_features, "
            "bool gelu=False) -> Tensor")


def _linear_impl(
    x: torch.Tensor,
    tensors: List[Optional[torch.Tensor]],
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    kind: str,
    precision: str,
    act_precision: str,
    act_unsigned: bool,
    act_shift: float,
    in_features: int,
    out_features: int,
    gelu: bool = False,
) -> torch.Tensor:
    """One quantized linear on [..., K]: ``tensors`` in ``QuantizedLinearWeights.TENSOR_FIELDS`` order, an
    optional LoRA (down [K, r], up [N, r], strength folded in) added to the branch, then (``gelu``) the tanh GELU.
    Returns [..., N] in x's dtype."""
    if len(tensors) != len(FIELDS):
        raise ValueError(f"svdq::linear takes {len(FIELDS)} weight tensors ({', '.join(FIELDS)}), got {len(tensors)}")
    q = tensors[0]
    key = tuple(0 if t is None else t.data_ptr() for t in tensors)
    fast = getattr(q, STATE, None)  # the kernel path's layer object, kept on the qweight the graph passes
    if fast is not None and fast[0] == key:
        layer = fast[1]()
        if layer is not None and layer.svdq_lora is fast[2] and triton_usable(x):
            y = svdq_linear(x, fast[3], gelu=gelu)
            return y if y.dtype == x.dtype else y.to(x.dtype)
    found = _owner_of(q)
    if found is not None:  # a registered layer: its own eager path, with its caches and its attached LoRA
        layer, part = found
        if q.device == x.device and triton_usable(x):  # remember the layer object for the next calls
            w = layer.quantized_weights(device=x.device, part=part)
            if layer.svdq_lora:
                w = layer.svdq_part_with_lora(w, x.device, part)
            setattr(q, STATE, (key, weakref.ref(layer), layer.svdq_lora, w))
            y = svdq_linear(x, w, gelu=gelu)
        else:  # reference path or weights elsewhere (lowvram): the layer streams and computes them
            y = layer.svdq_part_linear(x, part, gelu)
    else:  # loose tensors: a layer object for this call
        w = QuantizedLinearWeights(in_features=in_features, out_features=out_features, kind=kind, precision=precision,
                                   act_precision=act_precision, act_unsigned=act_unsigned, act_shift=act_shift,
                                   **dict(zip(FIELDS, tensors)))
        w.validate()
        if lora_down is None:
            y = svdq_linear(x, w, gelu=gelu)
        elif triton_usable(x):  # the kernels take one branch
            y = svdq_linear(x, with_extra_branch(w, lora_down, lora_up), gelu=gelu)
        else:  # the reference keeps the LoRA separate, in fp32
            y = svdq_linear(x, w, extra_down=lora_down, extra_up=lora_up, gelu=gelu)
    return y if y.dtype == x.dtype else y.to(x.dtype)


_LIB.impl("linear", _linear_impl, "CompositeExplicitAutograd")
linear = torch.ops.svdq.linear.default


@torch.library.register_fake("svdq::linear")
def _linear_shape(x, tensors, lora_down, lora_up, kind, precision, act_precision, act_unsigned, act_shift,
                  in_features, out_features, gelu=False):
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


def call(x: torch.Tensor, w_tensors: List[Optional[torch.Tensor]], meta: dict, in_features: int, out_features: int,
         lora_down: Optional[torch.Tensor] = None, lora_up: Optional[torch.Tensor] = None,
         gelu: bool = False) -> torch.Tensor:
    """``torch.ops.svdq.linear`` with the layer metadata dict of the checkpoint format (missing keys: defaults)."""
    return linear(x, w_tensors, lora_down, lora_up, meta.get("kind", "w4a4"), meta.get("precision", "int4"),
                  meta.get("act_precision", "int4"), bool(meta.get("act_unsigned", False)),
                  float(meta.get("act_shift", 0.0)), in_features, out_features, gelu)
