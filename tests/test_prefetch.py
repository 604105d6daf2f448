"""Weight expansion behind attention (``kernels/prefetch.py``): the hook, and prefetched steps on the GPU."""

import pytest
import torch
import torch.nn.functional as F

from helpers import random_layer
from svdq.kernels import prefetch

GPU = torch.cuda.is_available()


def test_override_runs_a_cpu_attention_as_given():
    calls = []

    def attn(q, k, v, heads, mask=None, **kw):
        calls.append((heads, mask, kw))
        return q + 1

    q = torch.randn(2, 3)
    out = prefetch.attention_override(attn, q, q, q, 4, mask=None, transformer_options={}, skip_reshape=True)
    assert torch.equal(out, q + 1)
    assert calls == [(4, None, {"transformer_options": {}, "skip_reshape": True})]


def test_install_keeps_another_nodes_override():
    opts = {}
    assert prefetch.install(opts)
    assert opts["transformer_options"]["optimized_attention_override"] is prefetch.attention_override
    assert prefetch.install(opts)  # again: still ours

    def other(func, *args, **kwargs):
        return func(*args, **kwargs)

    theirs = {"transformer_options": {"optimized_attention_override": other}}
    assert not prefetch.install(theirs)
    assert theirs["transformer_options"]["optimized_attention_override"] is other


def _sdpa(q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(q.shape[0], -1, heads * 64)


def _model(seed):
    """Four layers called as A → attention → B, C → attention → D, over rows enough for the expanded-weight GEMM."""
    shapes = [(768, 256), (256, 768), (512, 256), (256, 512)]
    layers = [random_layer(n, k, 32, True, device="cuda", seed=seed + i) for i, (n, k) in enumerate(shapes)]
    g = torch.Generator(device="cuda").manual_seed(seed)
    xs = [torch.randn(1536, k, device="cuda", dtype=torch.bfloat16, generator=g) for _, k in shapes]
    q = torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    return layers, xs, q


def _step(dispatch, layers, xs, q):
    a, b, c, d = layers
    out = [dispatch.svdq_linear(xs[0], a)]
    out.append(prefetch.attention_override(_sdpa, q, q, q, 2, skip_reshape=True, transformer_options={}))
    out += [dispatch.svdq_linear(xs[1], b), dispatch.svdq_linear(xs[2], c)]
    out.append(prefetch.attention_override(_sdpa, q * 0.5, q, q, 2, skip_reshape=True, transformer_options={}))
    out.append(dispatch.svdq_linear(xs[3], d))
    return out


@pytest.mark.skipif(not GPU, reason="the side streams and expansion kernels need CUDA")
@pytest.mark.parametrize("plans", ["1", "0"])
def test_prefetched_steps_are_bit_identical(plans, triton_kernels, monkeypatch):
    """From the second step on, every layer after an attention call takes the weight expanded beside it; the
    results are the same bits as expanding in line. Windows are learned per attention call: step 2 prefetches
    B, C (after the first) and D (after the second; A follows it only from step 3 on, in the next step)."""
    monkeypatch.setenv("SVDQ_PLANS", plans)
    layers, xs, q = _model(31)
    monkeypatch.setenv("SVDQ_PREFETCH", "0")
    expect = _step(triton_kernels, layers, xs, q)
    monkeypatch.setenv("SVDQ_PREFETCH", "1")
    pf = prefetch.state(q.device)
    hits = []
    for _ in range(3):
        before = pf.hits
        got = _step(triton_kernels, layers, xs, q)
        hits.append(pf.hits - before)
        for e, g in zip(expect, got):
            assert torch.equal(e, g)
    assert hits == [0, 3, 4], hits


@pytest.mark.skipif(not GPU, reason="the side streams and expansion kernels need CUDA")
def test_prefetch_is_off_under_graph_capture_and_replays_exactly(triton_kernels, monkeypatch):
    monkeypatch.setenv("SVDQ_PREFETCH", "1")
    layers, xs, q = _model(41)
    expect = _step(triton_kernels, layers, xs, q)
    _step(triton_kernels, layers, xs, q)  # windows learned: the next attention call queues expansions
    pf = prefetch.state(q.device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _step(triton_kernels, layers, xs, q)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    before = pf.hits
    with torch.cuda.graph(g):
        got = _step(triton_kernels, layers, xs, q)
    assert pf.hits == before  # nothing was taken from outside the capture
    g.replay()
    torch.cuda.synchronize()
    for e, r in zip(expect, got):
        assert torch.equal(e, r)
    after = _step(triton_kernels, layers, xs, q)  # and eager calls after the capture still match
    for e, r in zip(expect, after):
        assert torch.equal(e, r)


@pytest.mark.skipif(not GPU, reason="the side streams and expansion kernels need CUDA")
def test_a_changed_weight_is_not_taken_from_a_stale_prefetch(triton_kernels, monkeypatch):
    monkeypatch.setenv("SVDQ_PREFETCH", "1")
    layers, xs, q = _model(51)
    _step(triton_kernels, layers, xs, q)
    _step(triton_kernels, layers, xs, q)
    a, b, c, d = layers
    triton_kernels.svdq_linear(xs[0], a)
    prefetch.attention_override(_sdpa, q, q, q, 2, skip_reshape=True)  # B's expansion is now pending
    b.qweight.copy_(torch.flip(b.qweight, dims=[0]))  # changed in place after its expansion was queued
    fresh = triton_kernels.svdq_linear(xs[1], b)
    monkeypatch.setenv("SVDQ_PLANS", "0")
    plain = triton_kernels.svdq_linear(xs[1], b)
    assert torch.equal(fresh, plain)


@pytest.mark.skipif(not GPU, reason="the op's eager body runs the CUDA path")
def test_override_compiles_into_one_graph(monkeypatch):
    """Under torch.compile the hook is traced into one opaque op (no graph break) and gives eager's numbers."""
    monkeypatch.setenv("SVDQ_PREFETCH", "1")
    torch._dynamo.reset()
    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)

    def f(t):
        return prefetch.attention_override(_sdpa, t * 2, t, t, 2, skip_reshape=True, transformer_options={}) + 1

    got = torch.compile(f, fullgraph=True)(q)
    assert torch.allclose(got.float(), f(q).float(), atol=2e-2, rtol=2e-2)
