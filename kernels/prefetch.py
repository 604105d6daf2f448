"""Expanding the next layer's weight inside this layer's GEMM (the expansion chain).

The W4A4 GEMMs multiply an int8 copy of the 4-bit weight that a separate pass writes just before each call
(``gemm_w4a4.expand_weight``: at copy rate, 3.5 ms of a 12B DiT step on the H100, every step). The GEMM itself is
bound by its tensor cores, so its memory system has room: two spare warps of the Gluon GEMMs (``_expander`` in
``gemm_w4a4_gluon``) can expand *another* layer's weight while it runs. A model calls its layers in the same order
every step, so the layer to expand is the one that followed this layer last time.

State, per device: two int8 workspaces; which layer's weight each holds (the packed tensor itself, its address and
version, and the workspace's address); and, on each layer's packed weight, a weak link to the layer that came
next. A call whose weight is already in a workspace skips its expansion pass; any other expands as before. A wrong
guess costs only the wasted expansion. Everything here is host bookkeeping in stream order: a kernel that writes a
workspace runs before the next call's kernels read it, and after the kernels that read it last (programmatic
dependent launch keeps that order: every kernel waits for its predecessor before touching memory).

Off (``SVDQ_PREFETCH=0``), under CUDA-graph capture, and for good once a graph has been captured on the device: a
replayed graph changes the workspaces without the host knowing, so the bookkeeping could no longer be trusted.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

NEXT = "_svdq_next_layer"  # attribute on a packed weight: weak references to the next layer's (qweight, wmult)


def enabled() -> bool:
    return os.environ.get("SVDQ_PREFETCH", "1") != "0"


@dataclass
class Decision:
    """What one call does with the workspaces; ``key`` goes into the call plan's key (a plan replays the launches
    of one decision only)."""

    qweight: torch.Tensor
    slot: int  # the workspace this call's GEMM reads
    hit: bool  # its weight is already there (expanded by the previous GEMM): no expansion pass
    target: tuple | None  # (qweight, wmult) of the layer expected next, to expand into the other workspace
    done: bool = False  # set by the GEMM launcher: the expansion of ``target`` was launched

    @property
    def key(self) -> tuple:
        return (self.slot, self.hit, None if self.target is None else id(self.target[0]))


class ExpansionChain:
    """The two workspaces of one device and what they hold (see the module docstring)."""

    def __init__(self, arena):
        self.arena = arena
        self.slots: list[tuple | None] = [None, None]  # (qweight, its data_ptr, its _version, workspace address)
        self.last: weakref.ref | None = None  # the packed weight of the previous W4A4 call
        self.last_slot = 1

    def usable(self) -> bool:
        return enabled() and not self.arena.note_capture() and not self.arena.captured

    def _address(self, slot: int) -> int | None:
        buf = self.arena.buffers.get(f"weights{slot}")
        return None if buf is None else buf.data_ptr()

    def _holds(self, slot: int, q: torch.Tensor) -> bool:
        rec = self.slots[slot]
        return (rec is not None and rec[0] is q and rec[1] == q.data_ptr() and rec[2] == q._version
                and rec[3] == self._address(slot))

    def decide(self, q: torch.Tensor) -> Decision:
        """Which workspace this call reads, whether its weight is there already, and what to expand beside it."""
        hit = next((s for s in (0, 1) if self._holds(s, q)), None)
        slot = hit if hit is not None else 1 - self.last_slot
        target = None
        link = getattr(q, NEXT, None)
        if link is not None:
            nq, nm = link[0](), link[1]()
            if (nq is not None and nm is not None and nq is not q and nq.device == q.device and nq.is_contiguous()
                    and nm.is_contiguous() and nq.data_ptr() % 16 == 0 and not self._holds(1 - slot, nq)):
                target = (nq, nm)
        return Decision(q, slot, hit is not None, target)

    def workspace(self, slot: int, n: int, kp: int) -> torch.Tensor:
        return self.arena.get(f"weights{slot}", n * kp, torch.int8).view(n, kp)

    def target_workspace(self, d: Decision) -> tuple | None:
        """(qweight, wmult, int8 output) for the GEMM's expander, or None."""
        if d.target is None:
            return None
        nq, nm = d.target
        return nq, nm, self.workspace(1 - d.slot, nq.shape[0], nq.shape[1] * 2)

    def commit(self, d: Decision) -> None:
        """Record what the call's kernels leave in the workspaces, and learn the call order."""
        self._learn(d.qweight)
        q = d.qweight
        self.slots[d.slot] = (q, q.data_ptr(), q._version, self._address(d.slot))
        if d.done and d.target is not None:
            nq = d.target[0]
            self.slots[1 - d.slot] = (nq, nq.data_ptr(), nq._version, self._address(1 - d.slot))
        self.last_slot = d.slot

    def note_unexpanded(self, q: torch.Tensor) -> None:
        """A call that read no workspace (the packed-weight GEMM): it only takes its place in the call order."""
        self._learn(q)

    def _learn(self, q: torch.Tensor) -> None:
        prev = None if self.last is None else self.last()
        if prev is not None and prev is not q:
            wm = getattr(q, "_svdq_wmult_ref", None)
            if wm is not None:
                setattr(prev, NEXT, (weakref.ref(q), wm))
        self.last = weakref.ref(q)


_chains: dict = {}


def chain(arena) -> ExpansionChain:
    c = _chains.get(arena.device)
    if c is None or c.arena is not arena:
        c = _chains[arena.device] = ExpansionChain(arena)
    return c


def remember_multipliers(q: torch.Tensor, wmult: torch.Tensor) -> None:
    """Keep a weak reference to the layer's multipliers on its packed weight (the expander needs both)."""
    ref = getattr(q, "_svdq_wmult_ref", None)
    if ref is None or ref() is not wmult:
        q._svdq_wmult_ref = weakref.ref(wmult)
