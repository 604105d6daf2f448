"""LoRA on svdq models through ComfyUI's own LoRA machinery: the branch is extended, the 4-bit residual untouched."""

import pytest
import torch

from svdq.comfy_runtime import import_comfy

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402

from svdq.demo import relative_error  # noqa: E402
from svdq.nodes.loading import load_svdq_model  # noqa: E402
from svdq.nodes.lora import apply_lora  # noqa: E402
from svdq.nodes.pipeline import load_float_model, random_conditioning, sample  # noqa: E402

H = 256  # hidden size of the tiny model


def make_lora(rank=8, seed=0, scale=0.3, extra=None):
    """A LoRA in ComfyUI's generic key format on quantized (qkv, mlp), W4A16 (img_mod) and 16-bit (img_in) layers."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n, k) in {
        "double_blocks.0.img_attn.qkv": (3 * H, H),
        "double_blocks.1.img_mlp.0": (4 * H, H),
        "single_blocks.0.linear2": (H, 5 * H),
        "double_blocks.0.img_mod.lin": (6 * H, H),
        "img_in": (H, 64),
    }.items():
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(n, rank, generator=g) * scale
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, k, generator=g) * scale / k**0.5
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank) / 2)
    sd.update(extra or {})
    return sd


@pytest.fixture(scope="module")
def models(tiny_models):
    f, q = tiny_models
    return load_float_model(f), load_svdq_model(q)


def test_core_lora_loader_has_effect_and_matches_16bit(models):
    fm, qm = models
    c = random_conditioning(fm, 1, seed=5)[0]
    lora = make_lora()
    fm_l, _ = comfy.sd.load_lora_for_models(fm, None, lora, 1.0, 0)  # what core LoraLoaderModelOnly does
    qm_l, _ = comfy.sd.load_lora_for_models(qm, None, lora, 1.0, 0)
    ref, ref_l = sample(fm, c, seed=3, steps=2), sample(fm_l, c, seed=3, steps=2)
    got, got_l = sample(qm, c, seed=3, steps=2), sample(qm_l, c, seed=3, steps=2)
    lora_effect = relative_error(ref_l, ref)
    assert lora_effect > 0.1  # the LoRA really changes the 16-bit model
    assert relative_error(got_l, got) > 0.1  # ... and the svdq model (core LoraLoader is not a no-op)
    base_err = relative_error(got, ref)
    assert relative_error(got_l, ref_l) < max(0.25, 2.0 * base_err)  # svdq+LoRA tracks 16-bit+LoRA
    # the quantized residual was never rewritten
    lin = qm_l.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert lin.is_quantized and lin.svdq_qweight.dtype == torch.uint8


def test_branch_extension_is_exact_on_one_layer(models):
    _, qm = models
    lora = make_lora(rank=4, seed=1)
    ql = apply_lora(qm, lora, 0.7)
    comfy.model_management.load_models_gpu([ql])
    lin = ql.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert len(lin.svdq_lora) == 1
    x = torch.randn(5, H)
    with_lora = lin(x)
    saved, lin.svdq_lora = lin.svdq_lora, []
    without = lin(x)
    lin.svdq_lora = saved
    up = lora["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"]
    down = lora["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"]
    expected = 0.7 * (2.0 / 4) * (x @ down.T) @ up.T
    assert relative_error(with_lora - without, expected) < 1e-4


def test_strength_zero_and_strength_change_without_reload(models):
    _, qm = models
    c = random_conditioning(qm, 1, seed=9)[0]
    base = sample(qm, c, seed=1, steps=2)
    lora = make_lora(seed=2)
    assert torch.equal(sample(apply_lora(qm, lora, 0.0), c, seed=1, steps=2), base)
    qweight = qm.model.diffusion_model.double_blocks[0].img_attn.qkv.svdq_qweight
    ptr, codes = qweight.data_ptr(), qweight.detach().cpu().clone()
    a = sample(apply_lora(qm, lora, 1.0), c, seed=1, steps=2)
    b = sample(apply_lora(qm, lora, 0.3), c, seed=1, steps=2)
    again = sample(qm, c, seed=1, steps=2)  # the unpatched model is back: nothing leaked
    assert relative_error(a, base) > relative_error(b, base) > 0
    assert torch.allclose(again, base, atol=1e-5)
    qweight = qm.model.diffusion_model.double_blocks[0].img_attn.qkv.svdq_qweight
    assert torch.equal(qweight.detach().cpu(), codes)  # the 4-bit residual was never rewritten
    if qweight.device.type == "cpu":  # nor copied (on a GPU ComfyUI may move the model between loads)
        assert qweight.data_ptr() == ptr


def test_strength_change_keeps_the_weights_where_they_are(models, monkeypatch):
    """ComfyUI unpatches a clone with other patches by moving the whole model to the offload device and back; an
    svdq model's quantized weights are never patched, so a LoRA strength change must not move them. The offload
    device here is ``meta``, where a tensor keeps no data: one round trip and the next step fails or differs."""
    _, qm = models
    c = random_conditioning(qm, 1, seed=11)[0]
    lora = {k: v for k, v in make_lora(seed=12).items() if not k.startswith("diffusion_model.img_in.")}
    want = [sample(apply_lora(qm, lora, s), c, seed=2, steps=2) for s in (1.0, 0.4, 1.0)]
    offload = qm.offload_device
    monkeypatch.setattr(qm, "offload_device", torch.device("meta"))  # clones made from here on inherit it
    lin = qm.model.diffusion_model.double_blocks[0].img_attn.qkv
    ptr = lin.svdq_qweight.data_ptr()
    clones = [apply_lora(qm, lora, s) for s in (1.0, 0.4, 1.0)]
    try:
        got = [sample(m, c, seed=2, steps=2) for m in clones]
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        assert not lin.svdq_qweight.is_meta and lin.svdq_qweight.data_ptr() == ptr
    finally:  # a real unload does move the model: to the real offload device, for the tests after this one
        for m in clones:
            m.offload_device = offload
        comfy.model_management.unload_all_models()


def test_failed_reload_still_moves_the_model_off(tiny_models, monkeypatch):
    """The weights stay put only for the unpatch that starts a clone's load: when the load itself then fails,
    ComfyUI's detach must still move the model to the offload device (``meta`` here: where it lands shows)."""
    qm = load_svdq_model(tiny_models[1])  # its own copy: this test sends it to meta
    c = random_conditioning(qm, 1, seed=13)[0]
    lora = {k: v for k, v in make_lora(seed=14).items() if not k.startswith("diffusion_model.img_in.")}
    sample(apply_lora(qm, lora, 1.0), c, seed=2, steps=1)
    qm.offload_device = torch.device("meta")
    clone = apply_lora(qm, lora, 0.5)

    def fail(*args, **kwargs):
        raise RuntimeError("load failed")

    monkeypatch.setattr(clone, "load", fail)
    with pytest.raises(RuntimeError, match="load failed"):
        comfy.model_management.load_models_gpu([clone])
    assert qm.model.diffusion_model.double_blocks[0].img_attn.qkv.svdq_qweight.is_meta
    assert not clone._svdq_stay


def test_diffusers_qkv_slices_touch_only_their_rows(models):
    _, qm = models
    g = torch.Generator().manual_seed(4)
    lora = {
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(4, H, generator=g) * 0.1,
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(H, 4, generator=g),
    }
    ql = apply_lora(qm, lora, 1.0)
    comfy.model_management.load_models_gpu([ql])
    lin = ql.model.diffusion_model.double_blocks[0].img_attn.qkv
    x = torch.randn(3, H)
    with_lora = lin(x)
    saved, lin.svdq_lora = lin.svdq_lora, []
    delta = with_lora - lin(x)
    lin.svdq_lora = saved
    assert delta[:, :H].abs().max() == 0 and delta[:, 2 * H :].abs().max() == 0
    assert delta[:, H : 2 * H].abs().max() > 0


def test_loha_is_brought_to_low_rank(models):
    _, qm = models
    g = torch.Generator().manual_seed(6)
    pre = "lora_unet_double_blocks_0_img_attn_proj"
    lora = {f"{pre}.hada_w1_a": torch.randn(H, 4, generator=g) * 0.2, f"{pre}.hada_w1_b": torch.randn(4, H, generator=g) * 0.2,
            f"{pre}.hada_w2_a": torch.randn(H, 4, generator=g) * 0.2, f"{pre}.hada_w2_b": torch.randn(4, H, generator=g) * 0.2,
            f"{pre}.alpha": torch.tensor(4.0)}
    ql = apply_lora(qm, lora, 1.0)
    comfy.model_management.load_models_gpu([ql])
    lin = ql.model.diffusion_model.double_blocks[0].img_attn.proj
    assert lin.svdq_lora and lin.svdq_lora[0][0].shape[1] <= 64
    dense = (lora[f"{pre}.hada_w1_a"] @ lora[f"{pre}.hada_w1_b"]) * (lora[f"{pre}.hada_w2_a"] @ lora[f"{pre}.hada_w2_b"])
    d, u = (t.cpu() for t in lin.svdq_lora[0])
    assert relative_error(u @ d.T, dense) < 1e-4  # rank <= 16 product: the SVD keeps it exactly


def test_bad_loras_are_clear_errors_and_model_unchanged(models):
    _, qm = models
    other = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="match a layer"):
        apply_lora(qm, other, 1.0, name="sdxl-style.safetensors")
    bad = make_lora()
    bad["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"] = torch.zeros(3 * H + 1, 8)
    with pytest.raises(ValueError, match="do not fit"):
        apply_lora(qm, bad, 1.0, name="mismatched.safetensors")
    assert not qm.patches  # nothing was added to the shared model


def test_lora_bias_deltas_on_quantized_layers(models):
    _, qm = models
    g = torch.Generator().manual_seed(8)
    name = "diffusion_model.double_blocks.0.img_attn.qkv"
    diff_b = torch.randn(3 * H, generator=g)
    lora = make_lora(rank=4, seed=9)
    lora[f"{name}.diff_b"] = diff_b
    ql = apply_lora(qm, lora, 0.5)
    comfy.model_management.load_models_gpu([ql])
    lin = ql.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert lin.svdq_bias_delta is not None
    x = torch.randn(2, H)
    with_b = lin(x)
    saved, lin.svdq_bias_delta = lin.svdq_bias_delta, None
    without_b = lin(x)
    lin.svdq_bias_delta = saved
    assert torch.allclose(with_b - without_b, (0.5 * diff_b).expand(2, -1), atol=1e-5)


def test_kernel_path_merges_the_lora_branch_once(models, triton_kernels, monkeypatch):
    """On the kernel path the LoRA factors are appended to the layer's branch once per LoRA set (no per-call
    concatenation) and the result matches the reference path."""
    _, qm = models
    ql = apply_lora(qm, make_lora(rank=4, seed=3), 0.8)
    comfy.model_management.load_models_gpu([ql])
    lin = ql.model.diffusion_model.double_blocks[0].img_attn.qkv
    x = torch.randn(3, H, device=lin.svdq_qweight.device)  # where the layer is: a CPU input takes the reference
    fast = lin(x)
    merged = lin._svdq_lora_cat[0][3]
    assert merged.rank == lin.quantized_weights().rank + 4
    assert lin(x) is not None and lin._svdq_lora_cat[0][3] is merged  # reused, not rebuilt
    monkeypatch.setenv("SVDQ_KERNELS", "reference")
    ref = lin(x)
    assert relative_error(fast, ref) < 1e-2


def test_unpatching_drops_what_layers_derived_on_the_device(models):
    """ComfyUI unpatches a model before moving or freeing it: the layers' cached weight objects (call plans, 1/λ)
    and LoRA-merged branches must go with it, not hold device memory until the layer's next call."""
    _, qm = models
    ml = apply_lora(qm, make_lora(), 1.0)
    comfy.model_management.load_models_gpu([ml])
    lin = ml.model.diffusion_model.double_blocks[0].img_attn.qkv
    lin(torch.randn(3, H, device=lin.svdq_qweight.device))  # the cache is kept for inputs where the weights are
    assert "_svdq_cache" in lin.__dict__
    ml.unpatch_model()
    assert "_svdq_cache" not in lin.__dict__ and "_svdq_lora_cat" not in lin.__dict__ and not lin.svdq_lora
