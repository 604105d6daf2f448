"""The V3 nodes called as ComfyUI calls them, with ComfyUI's folder_paths pointed at temporary folders."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from svdq.comfy_runtime import import_comfy

import_comfy()

import folder_paths  # noqa: E402

from svdq.demo import relative_error  # noqa: E402
from svdq.nodes.comfy_nodes import NODES, SVDQLoadDiffusionModel, SVDQLoraLoader, SVDQLoraStack, SVDQQuantizeModel  # noqa: E402
from svdq.nodes.pipeline import load_float_model, random_conditioning, sample  # noqa: E402
from svdq.quant.checkpoint import CheckpointError  # noqa: E402


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("comfy")
    (d / "diffusion_models").mkdir()
    (d / "loras").mkdir()
    f, q = tiny_models
    shutil.copy(q, d / "diffusion_models" / "tiny-svdq.safetensors")
    (d / "diffusion_models" / "junk.safetensors").write_bytes(b"\x00" * 64)
    g = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(768, 4, generator=g) * 0.3,
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, 256, generator=g) * 0.05},
              str(d / "loras" / "tiny-lora.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(d / "diffusion_models"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(d / "loras"), is_default=True)
    return d, f


def test_schemas_are_valid_and_in_category():
    for node in NODES:
        schema = node.define_schema()
        assert schema.category == "svdq" and schema.node_id.startswith("SVDQ")
    opts = SVDQLoadDiffusionModel.define_schema().inputs[0].options
    assert isinstance(opts, list)


def test_loader_lora_and_stack_nodes(folders):
    d, f = folders
    out = SVDQLoadDiffusionModel.execute(model_name="tiny-svdq.safetensors")
    model = out.result[0]
    assert "rank 16" in out.ui["text"][0]
    c = random_conditioning(model, 1, seed=3)[0]
    base = sample(model, c, seed=0, steps=2)
    lora_model = SVDQLoraLoader.execute(model=model, lora_name="tiny-lora.safetensors", strength=1.0).result[0]
    assert relative_error(sample(lora_model, c, seed=0, steps=2), base) > 1e-3
    stacked = SVDQLoraStack.execute(model=model, lora_1="tiny-lora.safetensors", strength_1=1.0, lora_2="None").result[0]
    assert torch.allclose(sample(stacked, c, seed=0, steps=2), sample(lora_model, c, seed=0, steps=2), atol=1e-5)


def test_loader_errors_name_the_file(folders):
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        SVDQLoadDiffusionModel.execute(model_name="junk.safetensors")


def test_quantize_node_saves_a_loadable_model(folders):
    d, f = folders
    fm = load_float_model(f)
    prompts = [[ctx, {"pooled_output": pooled}] for ctx, pooled in random_conditioning(fm, 2, seed=11)]
    out = SVDQQuantizeModel.execute(model=fm, prompts=prompts, filename="graph-made", rank=16, precision="int4",
                                    steps=2, latent_size=16, fast=True)
    qm, path = out.result
    assert path.endswith("graph-made.safetensors") and (d / "diffusion_models" / "graph-made.safetensors").exists()
    loaded = SVDQLoadDiffusionModel.execute(model_name="graph-made.safetensors").result[0]
    c = random_conditioning(fm, 1, seed=12)[0]
    ref = sample(fm, c, seed=2, steps=2)
    assert relative_error(sample(loaded, c, seed=2, steps=2), ref) < 0.25
