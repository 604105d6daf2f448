# ruff: noqa: UP006, UP035, UP045
"""Weight expansion behind attention: while attention runs, a side stream expands the int8 operands of the layers
that come after it.

Why: a W4A4 layer on many rows first expands its 4-bit weight to the int8 GEMM operand (a copy-rate pass, about
3.5 ms of a FLUX step). That pass depends only on the weight, and attention is compute-bound, so the two can share
the GPU: behind SDPA at FLUX's single-block shape, 71% of the expansions' time is hidden when attention's blocks
are dispatched first, none when the expansions are (``bench/overlap_probe.py``, BENCHMARKS.md).

How:

- The loader puts :func:`attention_override` into the model's ``transformer_options``
  (``optimized_attention_override``, ComfyUI's own hook around every attention call).
- At each attention call the prefetcher looks up the *window* it saw after this same call last time: the layers that
  expanded a weight between it and the next attention call. The call is known by the svdq layer called just before
  it and that call's row count.
- It runs the attention on a high-priority stream and queues the window's expansions on a normal-priority side
  stream, each into its own slice of one arena buffer. Both streams start from the main stream's state; the main
  stream waits for the attention.
- A layer call that finds its weight prefetched waits for that expansion's event and skips its own
  (``dispatch._run``, and call plans, whose key holds the slice's address).

Safe reuse: a window's slices are only read by the layer calls between its attention call and the next one. The
next window's expansions start from the main stream's state at that next call, after all of those reads.

Off on CPU, under CUDA-graph capture (a side stream would have to rejoin the capture), and with
``SVDQ_PREFETCH=0``. A call whose layer order differs from last time only misses: it expands as before.

No ``from __future__ import annotations`` here: the custom op's schema is read from the real annotations.
"""

import logging
import os
import weakref
from typing import Optional

import torch

log = logging.getLogger("svdq")

_ALIGN = 256


def enabled() -> bool:
    return os.environ.get("SVDQ_PREFETCH", "1") != "0"


class Prefetcher:
    """One device's windows (learned layer order), pending expansions and streams."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last: Optional[tuple] = None  # (id of the last called layer's qweight, its row count)
        self.windows: dict = {}  # attention call key -> [(weakref qweight, weakref wmult)]
        self.rec_key: Optional[tuple] = None
        self.rec: list = []  # the window being observed now
        self.pending: dict = {}  # id(qweight) -> (int8 view, event, weakref to the qweight, its version)
        self.noted = 0  # expansions noted so far (call plans compare it around a recorded call)
        self.hits = 0
        self._streams = None
        self._events: list = []

    # -- what the layer calls report -------------------------------------------------------------------------
    def called(self, w, rows: int) -> None:
        self.last = (id(w.qweight), rows)

    def note(self, w) -> None:
        """This call used an expanded weight (its own pass or a prefetched one): part of the current window."""
        self.noted += 1
        if self.rec_key is not None:
            self.rec.append((weakref.ref(w.qweight), weakref.ref(w.wmult)))

    def peek(self, w) -> int:
        """The address of this layer's prefetched operand, 0 if none is pending for it (call-plan key)."""
        e = self.pending.get(id(w.qweight))
        if e is None or e[2]() is not w.qweight or e[3] != w.qweight._version:
            return 0
        return e[0].data_ptr()

    def take(self, w) -> Optional[torch.Tensor]:
        """This layer's prefetched int8 operand, once, with the current stream ordered after its expansion."""
        e = self.pending.pop(id(w.qweight), None)
        if e is None or e[2]() is not w.qweight or e[3] != w.qweight._version:  # ids of dead tensors get reused
            return None
        if torch.cuda.is_current_stream_capturing():  # an event from outside a capture cannot be waited on in it
            self.pending.clear()
            return None
        torch.cuda.current_stream(self.device).wait_event(e[1])
        self.hits += 1
        return e[0]

    # -- the attention call -------------------------------------------------------------------------------
    def _begin_window(self, key) -> None:
        if self.rec_key is not None:
            self.windows[self.rec_key] = self.rec
        self.rec_key, self.rec = key, []
        self.pending.clear()  # unclaimed expansions of the last window are dropped (their slices get reused)

    def around(self, run):
        """``run()`` (the attention) with the next window's expansions beside it."""
        if torch.cuda.is_current_stream_capturing():
            self.rec_key, self.rec = None, []
            self.pending.clear()
            return run()
        key = self.last
        self._begin_window(key)
        todo = []
        for qref, mref in self.windows.get(key, ()):
            q, m = qref(), mref()
            if q is not None and m is not None and q.device == self.device and id(q) not in {id(t[0]) for t in todo}:
                todo.append((q, m))
        if not todo:
            return run()
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device, priority=-1), torch.cuda.Stream(self.device, priority=0))
        att, side = self._streams
        main = torch.cuda.current_stream(self.device)
        att.wait_stream(main)
        with torch.cuda.stream(att):  # queued first and at higher priority: its blocks are dispatched first
            out = run()
        self._expand(todo, main, side)
        main.wait_stream(att)
        return out

    def _expand(self, todo, main, side) -> None:
        from .dispatch import arena
        from .gemm_w4a4 import expand_weight

        sizes = [q.shape[0] * q.shape[1] * 2 for q, _ in todo]  # int8 operand: two codes per packed byte
        offsets, total = [], 0
        for s in sizes:
            offsets.append(total)
            total += (s + _ALIGN - 1) // _ALIGN * _ALIGN
        buf = arena(self.device).get("prefetch", total, torch.int8)
        side.wait_stream(main)  # main's state before the attention: every read of the last window's slices
        while len(self._events) < len(todo):
            self._events.append(torch.cuda.Event())
        with torch.cuda.stream(side):
            for (q, m), off, s, ev in zip(todo, offsets, sizes, self._events):
                view = buf[off: off + s].view(q.shape[0], q.shape[1] * 2)
                expand_weight(q, m, out=view)
                ev.record(side)
                self.pending[id(q)] = (view, ev, weakref.ref(q), q._version)
        buf.record_stream(side)  # if the arena regrows, this memory waits for the side stream before reuse


_states: dict = {}


def state(device: torch.device) -> Prefetcher:
    p = _states.get(device)
    if p is None:
        p = _states[device] = Prefetcher(device)
    return p


def existing(device: torch.device) -> Optional[Prefetcher]:
    """The device's prefetcher if an attention call has made one (layer calls only report to an existing one)."""
    return _states.get(device)


# -- ComfyUI's attention hook, as one custom op so that torch.compile keeps it whole ---------------------------

_calls: list = []  # (attention function, its non-tensor arguments), indexed by the op's ``call`` argument
_call_index: dict = {}


def _intern(func, args: tuple, kwargs: dict) -> Optional[int]:
    try:
        key = (func, args, tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:
        return None
    i = _call_index.get(key)
    if i is None:
        i = _call_index[key] = len(_calls)
        _calls.append((func, args, kwargs))
    return i


def _run_call(q, k, v, mask, call):
    func, args, kwargs = _calls[call]
    out = func(q, k, v, *args, mask=mask, **kwargs)
    return out if out.is_contiguous() else out.contiguous()


@torch.library.custom_op("svdq::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                 call: int) -> torch.Tensor:
    """ComfyUI's attention function (interned as ``call``) on q, k, v, with the next window's expansions beside it."""
    if not (q.is_cuda and enabled()):
        return _run_call(q, k, v, mask, call)
    return state(q.device).around(lambda: _run_call(q, k, v, mask, call))


@attention_op.register_fake
def _attention_shape(q, k, v, mask, call):
    return _run_call(q, k, v, mask, call)


def attention_override(func, *args, **kwargs):
    """``transformer_options["optimized_attention_override"]``: ComfyUI passes the attention function it chose
    and that function's arguments. Calls the op above where the arguments are q, k, v, then hashable settings;
    anything else (or a CPU tensor) runs as it came."""
    q = args[0] if args else None
    if len(args) < 3 or not isinstance(q, torch.Tensor) or not q.is_cuda:
        return func(*args, **kwargs)
    kw = {key: val for key, val in kwargs.items() if key not in ("mask", "transformer_options")}
    mask = kwargs.get("mask")
    if (mask is not None and not isinstance(mask, torch.Tensor)) or any(isinstance(a, torch.Tensor) for a in args[3:]):
        return func(*args, **kwargs)
    call = _intern(func, tuple(args[3:]), kw)
    if call is None:
        return func(*args, **kwargs)
    return attention_op(args[0], args[1], args[2], mask, call)


def install(model_options: dict) -> bool:
    """Put the override into a ModelPatcher's ``model_options``; keeps another node's override where one is set."""
    topts = model_options.setdefault("transformer_options", {})
    current = topts.get("optimized_attention_override")
    if current is not None and current is not attention_override:
        log.info("svdq: another attention override is set; weight expansion is not prefetched behind attention")
        return False
    topts["optimized_attention_override"] = attention_override
    return True
