"""Launch a Triton kernel with less host time: the compiled kernel is cached per specialization and launched
directly, skipping ``JITFunction.run``'s argument binding and cache-key building on every call.

Why: a 12B DiT step makes ~1,200 launches; at batch 1 the host (not the GPU) set the step time (bench/e2e.py).
The key reproduces what Triton specializes on (tensor dtype and 16-byte alignment; integers equal to 1, divisible
by 16, or past 32 bits; constexpr values; warps and stages), so a call that would compile differently never reuses
a kernel. ``SVDQ_FAST_LAUNCH=0`` turns it off; the interpreter always takes the plain path.

Programmatic dependent launch (``pdl=True``, sm_90+): a kernel of a chain (activation passes, weight expansion,
GEMM; W4A16's input preparation and GEMM) is launched so that its programs may become resident while the kernel
before it finishes; each such kernel takes a ``PDL`` constexpr and starts with ``pdl_start`` (wait for the previous
kernel's results, then let the next kernel launch). Why: a layer is three or four dependent launches, and under CUDA
graphs each boundary otherwise costs the next kernel's launch and ramp-up with the GPU idle (BENCHMARKS.md).
``SVDQ_PDL=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import triton
import triton.language as tl

from .autotune_cache import interpreting
from .settings import getenv

try:
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_HOST_DESCRIPTORS = True
except ImportError:  # an older Triton: no host-side descriptors (the TMA schedule is then not offered)
    HAS_HOST_DESCRIPTORS = False

    class TensorDescriptor:  # type: ignore[no-redef]
        pass

_cache: dict = {}
_broken: set = set()  # kernels whose direct launch failed once: plain launches from then on
_recording: list | None = None  # see ``recording``: launches of one svdq call, for dispatch's call plans
log = logging.getLogger("svdq")


try:  # grid dependency control (Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - depends on the Triton version
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


PDL_MODES = {"0": 0, "off": 0, "start": 1, "end": 2, "wait": 3}  # SVDQ_PDL values; "1" means PDL_DEFAULT
PDL_DEFAULT = 2  # "end": H100, bench/pdl_ab.py (BENCHMARKS.md): "start" slowed M = 4608 layers by 14%


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First thing in a kernel launched with ``pdl=True``: wait until the previous kernel in the stream has finished
    and its writes are visible (before this kernel reads or writes anything another kernel touches). ``PDL`` is the
    mode: 0 emits nothing; 1 then lets the next kernel's programs launch at once; 2 leaves that to ``pdl_end``; 3
    never signals (the next kernel launches as this one's programs exit)."""
    if PDL > 0:
        gdc_wait()
    if PDL == 1:
        gdc_launch_dependents()


@triton.jit
def pdl_end(PDL: tl.constexpr):
    """Last thing in a kernel launched with ``pdl=True``: in mode 2, let the next kernel's programs launch."""
    if PDL == 2:
        gdc_launch_dependents()


try:  # Gluon's host descriptor (Triton >= 3.5) also carries its shared-memory layout
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDescriptor

    _DESCRIPTORS: tuple = (TensorDescriptor, _GluonDescriptor)
except ImportError:
    _DESCRIPTORS = (TensorDescriptor,)


def is_descriptor(a) -> bool:
    """A host-side TMA descriptor: Triton's or Gluon's."""
    return isinstance(a, _DESCRIPTORS)


def _spec(a):
    if isinstance(a, torch.Tensor):  # the common case first: this runs for every argument of every launch
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, _DESCRIPTORS):  # compiled per element type, tile shape (and, for Gluon, shared-memory layout)
        return ("desc", a.base.dtype, tuple(a.block_shape), a.padding, repr(getattr(a, "layout", None)))
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
    if isinstance(a, float):
        return "f"
    return a


@contextlib.contextmanager
def _recording_into(target: list | None):
    global _recording
    prev, _recording = _recording, target
    try:
        yield target
    finally:
        _recording = prev


def recording():
    """Collect ``(runner, all arguments)`` of every launch in the block (``None`` for one that cannot be
    replayed), so a layer call can be replayed later without re-deriving its launches."""
    return _recording_into([])


def not_recorded():
    """Launches in the block (autotuning candidates) are not part of the call being recorded."""
    return _recording_into(None)


def enabled() -> bool:
    return getenv("SVDQ_FAST_LAUNCH", "1") != "0" and not interpreting()


_PDL_DEVICES: dict = {}


def pdl_mode(device: torch.device | None) -> int:
    """The programmatic-dependent-launch mode (``pdl_start``) for kernels on ``device``: 0 unless it is an NVIDIA GPU
    of compute capability 9 or newer, with a Triton that has grid dependency control, outside the interpreter;
    else ``SVDQ_PDL`` (``0``/``off``, ``start``, ``end``, ``wait``; ``1`` or unset: ``PDL_DEFAULT``)."""
    if device is None or device.type != "cuda" or not HAS_GDC or interpreting() or torch.version.hip is not None:
        return 0
    value = getenv("SVDQ_PDL", "1")
    mode = PDL_DEFAULT if value == "1" else PDL_MODES.get(value)
    if mode is None:
        raise ValueError(f"SVDQ_PDL takes 0, 1, off, start, end or wait, not {value!r}")
    ok = _PDL_DEVICES.get(device.index)
    if ok is None:
        ok = _PDL_DEVICES[device.index] = torch.cuda.get_device_capability(device)[0] >= 9
    return mode if ok else 0


def launch(kernel, grid: tuple, args: tuple, num_warps: int = 4, num_stages: int | None = None, pdl: bool = False,
           **constexprs) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``, with the compiled kernel reused.

    ``args`` are the leading positional (runtime) arguments; every later parameter is given in ``constexprs``.
    ``pdl``: the kernel takes a ``PDL`` constexpr, starts with ``pdl_start`` and ends with ``pdl_end``; where
    ``pdl_mode`` is not 0, it is launched as a programmatic dependent of the kernel before it.
    """
    opts = {"num_warps": num_warps}
    if num_stages is not None:
        opts["num_stages"] = num_stages
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if pdl:
        mode = pdl_mode(device if device is not None else
                        next((a.base.device for a in args if is_descriptor(a)), None))
        constexprs["PDL"] = mode
        if mode:
            opts["launch_pdl"] = True
    if not enabled() or kernel in _broken:
        kernel[grid](*args, **constexprs, **opts)
        if _recording is not None:
            _recording.append(None)
        return
    key = (kernel, None if device is None else device.index, num_warps, num_stages, tuple(sorted(constexprs.items())), tuple(_spec(a) for a in args))
    hit = _cache.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **constexprs, **opts)
        names = list(getattr(kernel, "arg_names", []))
        tail = names[len(args):]
        if compiled is not None and set(tail) == set(constexprs):
            _cache[key] = hit = (compiled, tuple(tail))
        if _recording is not None:
            _recording.append(None if hit is None else _replayable(compiled, tuple(tail), grid, args, constexprs))
        return
    compiled, tail = hit
    grid3 = tuple(grid) + (1,) * (3 - len(grid))  # the compiled kernel's runner reads grid[0..2]
    if _recording is not None:
        _recording.append(_replayable(compiled, tail, grid3, args, constexprs))
    try:
        compiled[grid3](*args, *(constexprs[n] for n in tail))
    except Exception as exc:  # a Triton whose launcher differs: this kernel takes the plain path for good
        _broken.add(kernel)
        log.warning("svdq: direct launch of %s unavailable with this Triton (%s); using the standard launch",
                    getattr(kernel, "__name__", kernel), exc)
        kernel[grid](*args, **constexprs, **opts)
        if _recording is not None:
            _recording[-1] = None


@triton.jit
def _zero_kernel(ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.zeros([BLOCK], ptr.dtype.element_ty), mask=offs < n)


def zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros`` for the outputs that split-K kernels add into, filled by a launch of ours: a recorded call
    plan (``dispatch._Plan``) replays into a fresh ``torch.empty`` output, and would otherwise add into garbage."""
    out = torch.empty(shape, dtype=dtype, device=device)
    n = out.numel()
    if n:
        launch(_zero_kernel, (triton.cdiv(n, 1024),), (out, n), BLOCK=1024)
    return out


def _replayable(compiled, tail, grid, args, constexprs):
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    return compiled[grid3], tuple(args) + tuple(constexprs[n] for n in tail)
