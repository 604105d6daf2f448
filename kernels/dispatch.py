"""Pick the fused Triton kernels or the plain-PyTorch reference for each call.

``SVDQ_KERNELS``: ``auto`` (default: Triton on CUDA, reference elsewhere), ``reference`` (always the reference),
``triton`` (Triton wherever it can run, including the CPU interpreter under ``TRITON_INTERPRET=1``).
A call the kernels cannot take falls back to the reference with one log line per reason, never wrong numbers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading

import torch

from .reference import QuantizedLinearWeights, dequantize_weight, svdq_linear_reference
from .settings import getenv, snapshot

log = logging.getLogger("svdq")

try:  # Triton is optional: CPU-only installs run the reference
    import triton  # noqa: F401

    from .act_quant import batched_rows, quantize_activation
    from .gemm_w4a4 import expand_weight, w4a4_gemm
    from . import gemm_w4a4_packed, gemm_w4a16_packed
    from .autotune_cache import capability_major, interpreting
    from .gemv_w4a16 import w4a16_linear
    from .launch import is_descriptor, recording

    HAS_TRITON = True
except Exception as _exc:  # pragma: no cover - depends on the install
    HAS_TRITON = False
    _TRITON_ERROR = _exc

_warned: set[str] = set()
W4A16_MAX_M = 64  # above this the dequantize + cuBLAS path wins
_ENV = ("SVDQ_GEMM", "SVDQ_W4A16", "SVDQ_FAST_LAUNCH", "SVDQ_TUNED_CONFIGS", "SVDQ_PACKED_MAX_M", "SVDQ_PDL",
        "SVDQ_BRANCH", "SVDQ_STORE", "SVDQ_ACT_STREAM")  # what a plan depends on
INT_POINTERS = True  # call plans pass fixed tensors to the launcher as addresses (bench/host_profile.py A/B)


_helper: concurrent.futures.ThreadPoolExecutor | None = None
_generations = itertools.count(1)  # arena generations, unique across arenas: a plan never matches a newer arena


def outside_graph_pools(make):
    """``make()`` for tensors that outlive the call (arena buffers, a layer's derived tensors, its LoRA-merged
    branch), allocated where a CUDA-graph memory pool cannot take them.

    Why: torch.compile's CUDA graphs (``mode="reduce-overhead"``, ComfyUI's ``cudagraphs`` backend) warm a graph
    up with every allocation *of the calling thread* routed into the graph's private pool, then refuse to record
    if tensors stay alive there without being graph outputs ("Detected N tensor(s) in the cudagraph pool not
    tracked as outputs"). A helper thread allocates from the ordinary pool; it runs on the caller's device and
    stream, so its work stays in stream order. During an actual capture it runs in place, as before."""
    global _helper
    if (not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing()
            or threading.current_thread().name.startswith("svdq-alloc")):  # nested: already outside
        return make()
    if _helper is None:
        _helper = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="svdq-alloc")
    device, stream = torch.cuda.current_device(), torch.cuda.current_stream()
    inference = torch.is_inference_mode_enabled()  # thread-local: the tensors come out as the caller's would

    def run():
        with torch.cuda.device(device), torch.cuda.stream(stream), torch.inference_mode(inference), torch.no_grad():
            return make()

    return _helper.submit(run).result()


class _Arena:
    """Per-device buffers reused call after call: the expanded int8 weight and the activation kernel's outputs.

    Reuse is safe because one layer call's kernels run in stream order before the next call's (ComfyUI runs
    the model on one stream). Buffers only grow; each growth bumps ``generation``, which retires call plans
    that point at the old buffers. A CUDA graph captured over svdq calls bakes these addresses in, so once any
    call has run under capture, a buffer that grows is kept alive (``retired``) instead of freed: a graph captured
    at batch 1 still replays correctly after a batch-2 call grew the arena."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}
        self.generation = next(_generations)
        self.captured = False  # some call ran under CUDA-graph capture: never free a buffer from now on
        self.retired: list[torch.Tensor] = []

    def note_capture(self) -> bool:
        """Whether a CUDA graph is being captured now; remembered for good once one is."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        self.captured |= capturing
        return capturing

    def get(self, name: str, numel: int, dtype: torch.dtype, zeroed: bool = False) -> torch.Tensor:
        """``zeroed``: a buffer made zero when allocated, for kernels that leave it zero again after use (the
        W4A16 pair kernel's split-K tickets); the name must only ever be used that way."""
        need = numel * dtype.itemsize
        buf = self.buffers.get(name)
        self.note_capture()
        if buf is None or buf.numel() < need:
            if buf is not None and self.captured:
                self.retired.append(buf)  # a captured graph may still read or write it
            size = max(need, 0 if buf is None else buf.numel() * 5 // 4)  # grow by at least a quarter
            make = torch.zeros if zeroed else torch.empty
            buf = outside_graph_pools(lambda: make((size + 255) // 256 * 256, dtype=torch.uint8, device=self.device))
            self.buffers[name] = buf
            self.generation = next(_generations)
        return buf[:need].view(dtype)


_arenas: dict[torch.device, _Arena] = {}


def arena(device: torch.device) -> _Arena:
    a = _arenas.get(device)
    if a is None:
        a = _arenas[device] = _Arena(device)
    return a


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("svdq: using the reference path: %s", reason)


def mode() -> str:
    return getenv("SVDQ_KERNELS", "auto").lower()


def triton_usable(x: torch.Tensor) -> bool:
    m = mode()
    if m == "reference" or not HAS_TRITON:
        return False
    if x.is_cuda:
        return True
    return m == "triton" and getenv("TRITON_INTERPRET", "0") == "1"


def weight_workspace(n: int, kp: int, device: torch.device) -> torch.Tensor:
    """A reused int8 buffer for the just-in-time expanded weight (one per device, grown to the largest layer)."""
    return arena(device).get("weights", n * kp, torch.int8).view(n, kp)


def int8_weights(w: QuantizedLinearWeights) -> torch.Tensor:
    """The expanded int8 weight operand, re-expanded per call into the shared workspace (weights stay 4-bit in
    memory; a resident int8 copy measured slower on the H100 as well as doubling weight memory, and was removed)."""
    return expand_weight(w.qweight, w.wmult, out=weight_workspace(w.out_features, w.k_padded, w.qweight.device))


def derived(w: QuantizedLinearWeights, name: str, make) -> torch.Tensor:
    """A tensor computed once from the layer's own (e.g. 1/λ), kept with the layer; call plans may point at it."""
    cache = w.__dict__.setdefault("_svdq_derived", {})
    t = cache.get(name)
    if t is None:
        t = cache[name] = outside_graph_pools(make)
    return t


def extended_branch(w: QuantizedLinearWeights, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's branch factors with extra ranks (LoRA: down [K, r], up [N, r]) appended, in the branch's dtype:
    the fused kernels take one branch, so LoRA ranks ride along with the SVD ranks."""
    if w.proj_down is None:
        return down, up
    return (torch.cat([w.proj_down, down.to(w.proj_down.dtype)], dim=1),
            torch.cat([w.proj_up, up.to(w.proj_up.dtype)], dim=1))


def with_extra_branch(w: QuantizedLinearWeights, down: torch.Tensor, up: torch.Tensor) -> QuantizedLinearWeights:
    """The layer object with ``extended_branch`` as its branch (built once per LoRA set by the callers)."""
    d, u = extended_branch(w, down, up)
    return dataclasses.replace(w, proj_down=d.contiguous(), proj_up=u.contiguous())


def _unsupported(x: torch.Tensor, w: QuantizedLinearWeights) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"input dtype {x.dtype}"
    if w.precision == "nvfp4":
        return "NVFP4 has no native MMA before Blackwell; emulated with dequantized operands"
    if w.qweight.device != x.device:
        return "weights and input on different devices"
    return None


def svdq_linear(
    x: torch.Tensor,
    w: QuantizedLinearWeights,
    extra_down: torch.Tensor | None = None,
    extra_up: torch.Tensor | None = None,
    gelu: bool = False,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """The quantized linear on [..., K] input; ``extra_down``/``extra_up`` append LoRA ranks to the branch.

    ``out`` ([..., N], unit column stride, e.g. a column slice of a wider output) receives the result instead of
    a new tensor, and with ``accumulate`` the result is added to it (the halves of a layer split by input
    columns); the W4A4 kernels write there directly, other paths copy. The input may be a column slice too
    (rows with a stride): the kernels read it in place."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {w.in_features}")
    if out is not None and (out.shape[:-1] != x.shape[:-1] or out.shape[-1] != w.out_features):
        raise ValueError(f"output shape {tuple(out.shape)} does not fit input {tuple(x.shape)} and {w.out_features} features")
    if accumulate and out is None:
        raise ValueError("accumulate needs an output to add to")
    y = _compute(x, w, extra_down, extra_up, gelu, out, accumulate)
    if out is None or y is out:
        return y
    if accumulate:
        out.add_(y.to(out.dtype))
    else:
        out.copy_(y)
    return out


def _compute(x, w, extra_down, extra_up, gelu, out, accumulate):
    """The layer's result: ``out`` itself where a kernel wrote (or added) into it, else a new tensor."""
    if not triton_usable(x):
        return svdq_linear_reference(x, w, extra_down, extra_up, gelu)
    reason = _unsupported(x, w)
    if reason:
        _warn_once(reason)
        return svdq_linear_reference(x, w, extra_down, extra_up, gelu)
    lead = x.shape[:-1]
    x2 = _kernel_rows(x, w)
    out2 = None
    if out is not None and out.dtype == x.dtype and out.stride(-1) == 1:
        try:
            out2 = out.view(-1, w.out_features)  # never a copy: the kernel must write into ``out`` itself
        except RuntimeError:
            out2 = None
    acc = accumulate and out2 is not None
    if extra_down is None:
        y = _planned(x2, w, gelu, out2, acc)
        if y is not None:
            return out if y is out2 else y.reshape(*lead, w.out_features)
    down, up = (w.proj_down, w.proj_up) if extra_down is None else extended_branch(w, extra_down, extra_up)
    y = _run(x2, w, down, up, gelu, out2, acc)
    if y is None:
        _warn_once(f"activation precision {w.act_precision}")
        return svdq_linear_reference(x, w, extra_down, extra_up, gelu)
    return out if y is out2 else y.reshape(*lead, w.out_features)


def _kernel_rows(x: torch.Tensor, w: QuantizedLinearWeights) -> torch.Tensor:
    """x as the kernels take it: [M, K], a view where one can describe it, else a copy; except a W4A4 layer's 3-D
    input whose batches are not one row pitch apart (a token slice at batch > 1, as the double blocks' attention
    output halves are), which stays [B, L, K]: the activation kernels read it in place (``batched_rows``) and
    everything after them works on their [M, Kp] codes."""
    if x.dim() == 3 and w.precision != "int4g" and w.kind != "w4a16" and w.act_precision in ("int4", "int8"):
        return batched_rows(x)[0]
    x2 = x.reshape(-1, w.in_features)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rows(x2: torch.Tensor) -> int:
    """Rows of a kernel input ([M, K], or [B, L, K] batches of rows: B·L)."""
    return x2.shape[0] if x2.dim() == 2 else x2.shape[0] * x2.shape[1]


def _run(x2, w, down, up, gelu, out2=None, accumulate=False):
    """One call on 2-D input ([B, L, K] batches of rows for the W4A4 kernels: ``_kernel_rows``). The W4A4 kernels
    write into ``out2`` when given (adding with ``accumulate``) and return it; the other paths return a new tensor
    for the caller to place."""
    if w.precision == "int4g":
        return _int4g(x2, w, down, up, gelu)
    if w.kind == "w4a16" or w.act_precision == "none":
        return _w4a16(x2, w, down, up, gelu)
    if w.act_precision in ("int4", "int8"):
        a8, ascale, lora = quantize_activation(
            x2, w.k_padded, w.smooth, down, w.act_shift, w.act_unsigned and w.act_precision == "int4", w.act_precision,
            scratch=arena(x2.device).get, inv_smooth=_inv_smooth(w),
        )
        if packed_gemm(x2, w.qweight):
            return gemm_w4a4_packed.w4a4_gemm_packed(a8, ascale, w.qweight, _mult_t(w), w.wscale, lora, up, w.bias,
                                                     x2.dtype, gelu, out=out2, accumulate=accumulate)
        w8 = int8_weights(w)
        return w4a4_gemm(a8, ascale, w8, w.wscale, lora, up, w.bias, x2.dtype, gelu, out=out2, accumulate=accumulate)
    return None


PACKED_MAX_M = 1024  # H100: faster than expansion + int8 GEMM at M = 256-1024, slower at 4608 (BENCHMARKS.md)


def _inv_smooth(w: QuantizedLinearWeights) -> torch.Tensor | None:
    """1/λ in fp32 (``torch.reciprocal``, as the reference), made once and kept with the layer: the kernels multiply
    by it instead of dividing per tile."""
    return None if w.smooth is None else derived(w, "inv_smooth", lambda: torch.reciprocal(w.smooth.float()))


def _mult_t(w: QuantizedLinearWeights) -> torch.Tensor:
    """The layer's group multipliers as the packed-weight kernels take them (made once, kept with the layer)."""
    return derived(w, "mult_t", lambda: gemm_w4a4_packed.transposed_multipliers(w.wmult))


def _packed_choice(x2: torch.Tensor, qweight: torch.Tensor, variable: str, forcing: str) -> str | None:
    """``"forced"``, ``"auto"`` or None (not here) for a packed-weight kernel switched by ``variable``: it needs
    TMA here and a weight starting on a 16-byte boundary (one sliced out of a larger tensor may not: the older
    kernels take it); ``auto`` applies on sm_90 only, where the kernels were measured."""
    choice = getenv(variable, "auto").lower()
    if choice not in ("auto", forcing) or not gemm_w4a4_packed.usable(x2) or qweight.data_ptr() % 16:
        return None
    if choice == forcing:
        return "forced"
    return "auto" if not interpreting() and x2.is_cuda and capability_major(x2.device) == 9 else None


def packed_gemm(x2: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether this call multiplies the packed 4-bit weights directly (``gemm_w4a4_packed``) instead of expanding
    them to int8 first: ``SVDQ_GEMM=packed`` always (where it can run), another ``SVDQ_GEMM`` schedule never,
    ``auto`` on sm_90 for at most ``SVDQ_PACKED_MAX_M`` rows (default 1024), where reading 4-bit weights beats
    the expansion pass; at larger M the expansion is a small share and the warp-specialized int8 GEMMs are faster."""
    choice = _packed_choice(x2, qweight, "SVDQ_GEMM", "packed")
    if choice == "auto":
        return 0 < _rows(x2) <= int(getenv("SVDQ_PACKED_MAX_M", PACKED_MAX_M))
    return choice == "forced"


class _Plan:
    """One layer call at one shape, replayable: the compiled kernels, grids and arguments of its launches, with
    the input and the freshly allocated output put in per call. Everything else they touch is the layer's own
    tensors or the device arena, so a replay costs one allocation and the launches (a 12B DiT step at batch 1
    was host-bound on re-deriving all of this per call)."""

    __slots__ = ("launches", "shape", "dtype", "generation", "anchors", "addresses")

    @classmethod
    def build(cls, rec: list, x2: torch.Tensor, y: torch.Tensor, w: QuantizedLinearWeights, ar: _Arena):
        if not rec or any(r is None for r in rec) or y is x2:
            return None
        own = list(w.tensors().values()) + list(w.__dict__.get("_svdq_derived", {}).values())  # the layer's tensors
        allowed = {b.untyped_storage().data_ptr() for b in ar.buffers.values()}
        allowed |= {t.untyped_storage().data_ptr() for t in own}
        launches, addresses = [], False
        for runner, args in rec:
            xpos, ypos, kept = [], [], list(args)
            for i, a in enumerate(args):
                if a is x2 or a is y:  # slots filled per call; the recording call's tensors are not kept alive
                    (xpos if a is x2 else ypos).append(i)
                    kept[i] = None
                elif is_descriptor(a) and (a.base is y or a.base is x2):  # the GEMM's TMA store, the activation
                    # stream's TMA loads: the descriptor is remade per call from its fields (keeping it would keep
                    # the recording call's input or output alive)
                    (xpos if a.base is x2 else ypos).append(i)
                    kept[i] = (type(a), {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.name != "base"})
                elif isinstance(a, torch.Tensor):
                    if a.untyped_storage().data_ptr() not in allowed:
                        return None
                    if INT_POINTERS and a.is_cuda:  # Triton's launcher takes an address as is; a tensor costs
                        # it a method call and a driver query (cuPointerGetAttribute) on every launch
                        kept[i], addresses = a.data_ptr(), True
                elif is_descriptor(a) and a.base.untyped_storage().data_ptr() not in allowed:
                    return None
            launches.append((runner, tuple(kept), tuple(xpos), tuple(ypos)))
        if not any(lp[3] for lp in launches):  # the output came from a torch op, not a kernel: not replayable
            return None
        plan = cls()
        plan.launches, plan.shape, plan.dtype, plan.generation = launches, tuple(y.shape), y.dtype, ar.generation
        # the layer's own tensors as they are now: the recorded arguments are views of them, which do not follow
        # a tensor whose memory is replaced in place (``module.to`` assigns ``.data``; ComfyUI moves models so)
        plan.anchors = tuple((t, t.data_ptr()) for t in own)
        plan.addresses = addresses
        return plan

    def run(self, x2: torch.Tensor, out2: torch.Tensor | None = None) -> torch.Tensor | None:
        """The recorded launches on this input; None where one of the layer's tensors has moved since it was
        recorded (a module moved off the device and back keeps its tensor objects, not their memory): re-record."""
        for t, ptr in self.anchors:
            if t.data_ptr() != ptr:
                return None
        y = torch.empty(self.shape, dtype=self.dtype, device=x2.device) if out2 is None else out2
        xa, ya = (x2.data_ptr(), y.data_ptr()) if self.addresses else (x2, y)
        for runner, args, xpos, ypos in self.launches:
            a = list(args)
            for i in xpos:
                a[i] = xa if args[i] is None else args[i][0](base=x2, **args[i][1])  # a TMA load's descriptor
            for i in ypos:
                a[i] = ya if args[i] is None else args[i][0](base=y, **args[i][1])  # a TMA store's descriptor
            runner(*a)
        return y


def _planned(x2: torch.Tensor, w: QuantizedLinearWeights, gelu: bool, out2: torch.Tensor | None = None,
             accumulate: bool = False) -> torch.Tensor | None:
    """Replay this layer's recorded launches for this shape, or run the call once while recording them.

    The key holds everything a recorded launch bakes in besides the tensors it swaps: the input's shape and strides
    (rows, or batches of rows) and a given output's row stride, and whether the output is given and added to."""
    settings = snapshot(_ENV)  # a switch changed mid-run must not reuse older plans
    if getenv("SVDQ_PLANS") == "0" or not x2.is_cuda:
        return None
    into = None if out2 is None else (out2.stride(0), out2.data_ptr() % 16 == 0, accumulate)
    key = (x2.shape[:-1], x2.dtype, x2.data_ptr() % 16 == 0, x2.stride()[:-1], gelu, into, settings)
    plans = w.__dict__.setdefault("_svdq_plans", {})
    plan = plans.get(key)
    ar = arena(x2.device)
    if plan is False:
        return None
    capturing = ar.note_capture()
    if plan is not None and plan.generation == ar.generation:
        y = plan.run(x2, out2)
        if y is not None:
            return y
    if capturing:
        return None
    with recording() as rec:
        y = _run(x2, w, w.proj_down, w.proj_up, gelu, out2, accumulate)
    if y is None:
        return None
    plan = _Plan.build(rec, x2, y, w, ar)
    if plan is not None and out2 is not None and y is not out2:  # this path ignores ``out2``: replay allocates
        plan = False
    plans[key] = plan if plan is not None else False
    return y


def packed_w4a16(x2: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether a 16-bit-input call takes the tensor-core kernel on packed weights (``gemm_w4a16_packed``):
    ``SVDQ_W4A16=packed`` always (up to 64 rows), ``gemv`` / ``mma`` never, ``auto`` (default) on sm_90 for 1-64
    rows. Its pair kernel measured faster than the CUDA-core word kernel at every FLUX width, one row included
    (H100, 3072→18432 / 9216 / 3072: 16.6 / 11.4 / 6.8 µs against 20.4 / 12.3 / 7.6), and the 16-bit-word
    tensor-core kernel that served 2-64 rows before (two rows: 16.6 / 11.6 / 7.1 against 30.2 / 15.2 / 8.0;
    ``bench/kernel_variants.py --only w4a16pairs``)."""
    choice = _packed_choice(x2, qweight, "SVDQ_W4A16", "packed")
    return choice is not None and 1 <= x2.shape[0] <= gemm_w4a16_packed.MAX_M


def _w4a16(x2, w, down, up, gelu):
    if x2.shape[0] <= W4A16_MAX_M:
        final = down is None and not gelu  # then the kernel may write the output dtype itself
        inv = _inv_smooth(w)
        if packed_w4a16(x2, w.qweight):
            y = gemm_w4a16_packed.w4a16_packed(x2, w.qweight, _mult_t(w), w.wscale, inv, w.in_features, bias=w.bias,
                                               out_dtype=x2.dtype if final else torch.float32,
                                               scratch=arena(x2.device).get)
            return _finish(y, x2, down, up, gelu)
        y = w4a16_linear(x2, w.qweight, w.wmult, w.wscale, w.smooth, w.in_features, bias=w.bias,
                         out_dtype=x2.dtype if final else torch.float32, inv_smooth=inv)
    else:
        w8 = expand_weight(w.qweight, w.wmult, out=weight_workspace(w.out_features, w.k_padded, x2.device))
        wd = (w8[:, : w.in_features].to(x2.dtype) * w.wscale.to(x2.dtype)[:, None])
        xs = x2 / w.smooth.to(x2.dtype) if w.smooth is not None else x2
        y = (xs @ wd.T).float()
        if w.bias is not None:
            y = y + w.bias.float()
    return _finish(y, x2, down, up, gelu)


def _int4g(x2, w, down, up, gelu):
    """Layers with one float scale per group (Nunchaku/AWQ files loaded exactly): the activation kernel quantizes,
    the weight is dequantized to 16 bit per call and cuBLAS multiplies. Exact int8 codes times 16-bit weights;
    slower than the int4 path (``svdq convert --requantize`` trades a measured error for that path)."""
    wd = dequantize_weight(w).to(x2.dtype)
    if w.kind == "w4a16" or w.act_precision == "none":
        xs = x2 / w.smooth.to(x2.dtype) if w.smooth is not None else x2
        y = (xs @ wd.T).float()
    else:
        a8, ascale, lora = quantize_activation(
            x2, w.k_padded, w.smooth, None, w.act_shift, w.act_unsigned and w.act_precision == "int4", w.act_precision,
            scratch=arena(x2.device).get, inv_smooth=_inv_smooth(w),
        )
        y = (a8[:, : w.in_features].to(x2.dtype) @ wd.T).float() * ascale[:, None]
    if w.bias is not None:
        y = y + w.bias.float()
    return _finish(y, x2, down, up, gelu)


def _finish(y, x2, down, up, gelu):
    """The unfused tail of the W4A16 and int4g paths: low-rank branch, GELU, output dtype."""
    if down is not None:
        y = y + (x2.float() @ down.float()) @ up.float().T
    if gelu:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    return y.to(x2.dtype)
