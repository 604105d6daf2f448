"""The expansion chain (``kernels.prefetch``): which layer's int8 weight each workspace holds, and the GEMM that
expands the next layer's weight beside its own work.

The bookkeeping runs on CPU tensors (no kernels involved); the kernels' side is checked on an sm_90 GPU: every
output with the chain on is bit-identical to the chain off, in the expected order, a changed order and at the
packed kernel's row counts, and the chain's hits do happen."""

import pytest
import torch

from helpers import random_layer
from svdq.kernels.dispatch import _Arena
from svdq.kernels import prefetch

GPU = torch.cuda.is_available()
SM90 = GPU and torch.cuda.get_device_capability()[0] == 9


def _layers(n=3):
    layers = [random_layer(64 * (i + 1), 128, 16, seed=i) for i in range(n)]
    for w in layers:
        prefetch.remember_multipliers(w.qweight, w.wmult)
    return layers


def _call(ch, w, expander=True):
    """What dispatch does around one W4A4 call, without kernels: decide, (the GEMM may take the target), commit."""
    d = ch.decide(w.qweight)
    ch.workspace(d.slot, w.out_features, w.k_padded)
    if ch.target_workspace(d) is not None:
        d.done = expander
    ch.commit(d)
    return d


def test_chain_learns_the_call_order_and_hits_the_second_time(monkeypatch):
    monkeypatch.delenv("SVDQ_PREFETCH", raising=False)
    ch = prefetch.ExpansionChain(_Arena(torch.device("cpu")))
    a, b, c = _layers()
    first = [_call(ch, w) for w in (a, b, c)]
    assert not any(d.hit for d in first) and all(d.target is None for d in first)  # nothing known yet
    second = [_call(ch, w) for w in (a, b, c)]
    assert not second[0].hit  # nobody expanded A: C's successor was unknown during C's call
    assert second[0].target[0] is b.qweight and second[1].hit and second[2].hit
    assert second[1].slot != second[0].slot  # the target goes to the other workspace, never the one being read
    third = [_call(ch, w) for w in (a, b, c)]
    assert all(d.hit for d in third)


def test_chain_misses_whenever_the_workspace_may_not_hold_the_weight(monkeypatch):
    monkeypatch.delenv("SVDQ_PREFETCH", raising=False)
    arena = _Arena(torch.device("cpu"))
    ch = prefetch.ExpansionChain(arena)
    a, b, c = _layers()
    for _ in range(2):
        for w in (a, b, c):
            _call(ch, w)
    assert _call(ch, a).hit and _call(ch, b).hit
    # a different order: C was expected after B, A comes (and A's slot was overwritten since)
    assert not _call(ch, a).hit
    for w in (b, c):
        _call(ch, w)
    # the kernel that should have expanded B could not (a schedule without the expander warps)
    assert _call(ch, a, expander=False).target[0] is b.qweight
    assert not _call(ch, b).hit
    for w in (c, a):
        _call(ch, w)
    # the weight changed in place since it was expanded
    b.qweight.add_(0)
    assert not _call(ch, b).hit
    for w in (c, a):
        _call(ch, w)
    # the workspace was reallocated (grown by a larger layer) after B's weight was written into it
    d = ch.decide(b.qweight)
    assert d.hit
    arena.get(f"weights{d.slot}", 1 << 20, torch.int8)
    assert not ch.decide(b.qweight).hit


def test_chain_is_off_by_switch_and_after_a_cuda_graph(monkeypatch):
    arena = _Arena(torch.device("cpu"))
    ch = prefetch.ExpansionChain(arena)
    monkeypatch.setenv("SVDQ_PREFETCH", "0")
    assert not ch.usable()
    monkeypatch.delenv("SVDQ_PREFETCH")
    assert ch.usable()
    arena.captured = True  # a replayed graph would change the workspaces behind the host's back
    assert not ch.usable()


@pytest.mark.skipif(not SM90, reason="the expander warps live in the Gluon (sm_90) GEMMs")
def test_prefetched_calls_give_the_same_bits(monkeypatch, triton_kernels):
    """A block-like sequence of layers (packed-kernel row counts included), twice in order, then in a changed
    order, with the chain on and off: identical outputs, and the chain does skip expansions."""
    from svdq.kernels import dispatch

    monkeypatch.setenv("SVDQ_AUTOTUNE", "0")
    dev = "cuda"
    shapes = [(3072, 9216, 4096), (3072, 3072, 512), (3072, 12288, 4096), (12288, 3072, 4096), (3072, 3072, 4096)]
    layers = [random_layer(n, k, 32, True, device=dev, seed=i) for i, (k, n, _) in enumerate(shapes)]
    xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k, _, m in shapes]
    order = [0, 1, 2, 3, 4] * 3 + [0, 2, 1, 4, 3, 3, 0]

    def run(flag):
        monkeypatch.setenv("SVDQ_PREFETCH", flag)
        outs = []
        for i in order:
            outs.append(dispatch.svdq_linear(xs[i], layers[i], gelu=i == 2))
        torch.cuda.synchronize()
        return outs

    off = run("0")
    ch = dispatch.expansion_chain(xs[0].device)  # the arena's key: the device with its index
    hits = []
    orig = ch.commit
    monkeypatch.setattr(ch, "commit", lambda d: (hits.append(d.hit), orig(d))[1])
    on = run("1")
    for i, (a, b) in enumerate(zip(off, on)):
        assert torch.equal(a, b), f"call {i} (layer {order[i]}) differs with the chain on"
    assert sum(hits) >= 8, f"only {sum(hits)} of {len(hits)} calls found their weight prefetched"
