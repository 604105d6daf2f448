"""First-block cache on ComfyUI's Flux class through its dit block-replacement patches."""

import pytest
import torch

from svdq.comfy_runtime import import_comfy

import_comfy()

from svdq.demo import relative_error  # noqa: E402
from svdq.nodes.comfy_nodes import SVDQModelPatch  # noqa: E402
from svdq.nodes.first_block_cache import apply_first_block_cache  # noqa: E402
from svdq.nodes.loading import load_svdq_model  # noqa: E402
from svdq.nodes.pipeline import random_conditioning, sample  # noqa: E402


@pytest.fixture(scope="module")
def qm(tiny_models):
    return load_svdq_model(tiny_models[1])


def test_threshold_zero_is_identity(qm):
    c = random_conditioning(qm, 1, seed=1)[0]
    base = sample(qm, c, seed=0, steps=6)
    off = SVDQModelPatch.execute(model=qm, cache_threshold=0.0, start_percent=0.0, end_percent=1.0).result[0]
    assert torch.equal(sample(off, c, seed=0, steps=6), base)


def test_cache_skips_steps_and_stays_close(qm):
    c = random_conditioning(qm, 1, seed=2)[0]
    base = sample(qm, c, seed=0, steps=12)
    cached = apply_first_block_cache(qm, 0.5)
    out = sample(cached, c, seed=0, steps=12)
    cache = cached.svdq_first_block_cache
    assert cache.skipped_steps > 0 and cache.computed_steps > 0
    err = relative_error(out, base)
    assert 0 < err < 0.5, err
    # a tiny threshold never skips: identical to no cache
    strict = apply_first_block_cache(qm, 1e-9)
    assert torch.allclose(sample(strict, c, seed=0, steps=12), base, atol=1e-5)
    assert strict.svdq_first_block_cache.skipped_steps == 0


def test_range_limits_caching(qm):
    c = random_conditioning(qm, 1, seed=3)[0]
    early_only = apply_first_block_cache(qm, 0.5, start_percent=0.0, end_percent=0.0)
    sample(early_only, c, seed=0, steps=8)
    assert early_only.svdq_first_block_cache.skipped_steps == 0


def test_composes_with_an_existing_block_patch(qm):
    calls = {"n": 0}

    def counting(args, extra):
        calls["n"] += 1
        return extra["original_block"](args)

    m = qm.clone()
    m.set_model_patch_replace(counting, "dit", "double_block", 1)
    cached = apply_first_block_cache(m, 1e-9)
    c = random_conditioning(qm, 1, seed=4)[0]
    sample(cached, c, seed=0, steps=3)
    assert calls["n"] >= 3  # the earlier patch still runs inside the cache's wrapper


def test_other_models_are_a_clear_error():
    class Fake:
        class model:
            diffusion_model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="Flux-type"):
        apply_first_block_cache(Fake, 0.1)


def test_unet_first_block_cache(tmp_path):
    from svdq.demo import make_float_model_file
    from svdq.nodes.pipeline import load_float_model
    from svdq.synthetic import TINY_UNET

    um = load_float_model(make_float_model_file(tmp_path / "unet.safetensors", TINY_UNET))
    c = random_conditioning(um, 1, seed=1, tokens=77)[0]
    base = sample(um, c, seed=0, steps=10, size=8)
    strict = apply_first_block_cache(um, 1e-9)
    assert torch.allclose(sample(strict, c, seed=0, steps=10, size=8), base, atol=1e-5)
    assert strict.svdq_first_block_cache.skipped_steps == 0
    loose = apply_first_block_cache(um, 0.5)
    out = sample(loose, c, seed=0, steps=10, size=8)
    assert loose.svdq_first_block_cache.skipped_steps > 0
    assert 0 < relative_error(out, base) < 0.5


def test_lowvram_partial_load_gives_the_same_output(qm):
    import comfy.model_management

    c = random_conditioning(qm, 1, seed=5)[0]
    full = sample(qm, c, seed=0, steps=2)
    m = qm.clone()
    comfy.model_management.unload_all_models()
    total = m.model_size()
    m.load(device_to=m.load_device, lowvram_model_memory=total // 3)  # ComfyUI's partial load, as on a small GPU
    assert m.model.model_lowvram
    offloaded = [n for n, mod in m.model.diffusion_model.named_modules() if getattr(mod, "comfy_cast_weights", False)
                 and getattr(mod, "svdq_meta", None) is not None]
    assert offloaded  # some quantized layers are streamed per forward
    dm = m.model.diffusion_model
    x, ctx, y = torch.randn(1, 16, 16, 16), c[0], c[1]
    t = torch.tensor([0.5])
    out_low = dm(x, t, ctx, y, guidance=torch.tensor([3.5]))
    m.unpatch_model()
    m.load(device_to=m.load_device, lowvram_model_memory=0, full_load=True)
    out_full = dm(x, t, ctx, y, guidance=torch.tensor([3.5]))
    assert torch.allclose(out_low, out_full, atol=1e-5)
    assert full.shape == (1, 16, 16, 16)


def test_memory_accounting_counts_4bit_bytes(qm, tiny_models):
    import os

    size = qm.model_size()
    file_size = os.path.getsize(tiny_models[1])
    assert 0.5 * file_size < size < 1.5 * file_size  # not the logical 16-bit size of the fake weights


class _CountingSigma(torch.Tensor):
    """A sigmas tensor that counts the reads that would synchronise host and GPU."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.max, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_first_block_cache_reads_the_step_state_once_per_step():
    """Only the first block reads sigma and the change (one host copy); the other blocks' patches read nothing, so
    the host keeps running ahead of the GPU. Skipping still follows the threshold."""
    from svdq.nodes.first_block_cache import FirstBlockCache

    cache = FirstBlockCache(0.05, sigma_start=1.0, sigma_end=0.0, n_double=3, n_single=3)
    first = cache.first_double(None)
    mids = [cache.passthrough(None, ("img", "txt")) for _ in range(2)] + [cache.passthrough(None, ("img",))]
    last = cache.last_single(None)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 8, 4, generator=g)

    def block(scale):
        return lambda a: {"img": a["img"] * scale, "txt": a["txt"]} if "txt" in a else {"img": a["img"] * scale}

    for step, (sigma, s0) in enumerate([(0.9, 1.5), (0.8, 1.5), (0.7, 1.51)]):
        _CountingSigma.reads = 0
        topts = {"sigmas": torch.tensor([sigma]).as_subclass(_CountingSigma), "cond_or_uncond": [0]}
        txt = torch.zeros(1, 2, 4)
        out = first({"img": base.clone(), "txt": txt, "transformer_options": topts}, {"original_block": block(s0)})
        after_first = _CountingSigma.reads
        assert 1 <= after_first <= 2
        for fn in mids[:2]:
            out = fn({**out, "transformer_options": topts}, {"original_block": block(1.1)})
        img = torch.cat((out["txt"], out["img"]), 1)
        img = mids[2]({"img": img, "transformer_options": topts}, {"original_block": block(1.1)})["img"]
        last({"img": img, "transformer_options": topts}, {"original_block": block(1.1)})
        assert _CountingSigma.reads == after_first, "a later block read the step state again"
    # step 0 computes; steps 1 and 2 change the first block's residual by 0% and 2% (< 5%): skipped
    assert cache.computed_steps == 1 and cache.skipped_steps == 2
