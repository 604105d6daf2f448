"""Every architecture family end to end on ComfyUI's own classes: generate, calibrate through the sampler,
quantize, save, load with the quantized op, and sample against the 16-bit model."""

import pytest

from svdq.comfy_runtime import import_comfy

import_comfy()

from svdq.demo import make_float_model_file, relative_error  # noqa: E402
from svdq.nodes.loading import load_svdq_model  # noqa: E402
from svdq.nodes.pipeline import load_float_model, quantize_patcher, random_conditioning, sample, save_result  # noqa: E402
from svdq.quant.layer import QuantConfig  # noqa: E402
from svdq.synthetic import TINY_FLUX, TINY_QWEN_IMAGE, TINY_UNET, TINY_WAN  # noqa: E402

CASES = {  # name: (unet_config, family, expected model class, tokens, latent size, kinds)
    "flux": (TINY_FLUX, "flux", "Flux", 16, 16, {"w4a4", "w4a16"}),
    "unet-sd1": (TINY_UNET, "unet", "UNetModel", 77, 8, {"w4a4"}),
    "qwen-image": (TINY_QWEN_IMAGE, "qwen_image", "QwenImageTransformer2DModel", 16, 16, {"w4a4", "w4a16"}),
    "wan2.1": (TINY_WAN, "wan", "WanModel", 16, 16, {"w4a4"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_architecture_end_to_end(name, tmp_path):
    cfg_unet, family, cls, tokens, size, kinds = CASES[name]
    f = make_float_model_file(tmp_path / f"{name}.safetensors", cfg_unet)
    fm = load_float_model(f)
    assert type(fm.model.diffusion_model).__name__ == cls
    cfg = QuantConfig(rank=16, smooth_grid=4, refine_iters=3)
    res = quantize_patcher(fm, cfg, random_conditioning(fm, 2, tokens=tokens), steps=2, size=size)
    assert res.family == family and not res.skipped
    assert {l.kind for l in res.layers.values()} == kinds
    q = save_result(res, cfg, fm, tmp_path / f"{name}-svdq.safetensors", f)
    qm = load_svdq_model(q)
    assert type(qm.model.diffusion_model).__name__ == cls
    c = random_conditioning(fm, 1, seed=3, tokens=tokens)[0]
    ref = sample(fm, c, seed=0, steps=3, size=size)
    got = sample(qm, c, seed=0, steps=3, size=size)
    err = relative_error(got, ref)
    assert err < 0.25, err
    assert relative_error(sample(fm, c, seed=1, steps=3, size=size), ref) > 3 * err  # control: another seed
