"""The nodes users see (ComfyUI V3 schema, category "svdq")."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import ComfyExtension, io

from .lora import apply_lora, load_lora_file

log = logging.getLogger("svdq")
NONE = "None"


def _model_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list("diffusion_models") if f.endswith(".safetensors")]


class SVDQLoadDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDQLoadDiffusionModel",
            display_name="SVDQ Load Diffusion Model",
            category="svdq",
            description="Loads an svdq 4-bit checkpoint into ComfyUI's own model class with quantized linears.",
            inputs=[
                io.Combo.Input("model_name", options=_model_files(),
                               tooltip="An svdq checkpoint from the diffusion_models folder (svdq quantize / in-graph quantization)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        from .loading import load_svdq_model

        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        model = load_svdq_model(path)
        info = model.model.svdq_info
        text = (f"{info['precision']} W / {info['act_precision']} A, rank {info['rank']}, "
                f"{info['bytes'] / 2**20:.1f} MiB ({info['bytes'] / max(1, info['bytes_16bit']):.2f}x of 16-bit, "
                f"{(info['bytes_16bit'] - info['bytes']) / 2**20:.1f} MiB saved)")
        return io.NodeOutput(model, ui={"svdq_info": [info], "text": [text]})


class SVDQLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDQLoraLoader",
            display_name="SVDQ LoRA",
            category="svdq",
            description="Adds a LoRA to the model. On svdq layers it extends the 16-bit low-rank branch: no requantization, "
                        "strength changes are cheap. Works on 16-bit models too.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength; 0 leaves the model unchanged."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return io.NodeOutput(apply_lora(model, load_lora_file(path), strength, name=lora_name))


class SVDQLoraStack(io.ComfyNode):
    SLOTS = 4

    @classmethod
    def define_schema(cls):
        loras = [NONE] + folder_paths.get_filename_list("loras")
        inputs = [io.Model.Input("model")]
        for i in range(1, cls.SLOTS + 1):
            inputs += [io.Combo.Input(f"lora_{i}", options=loras, default=NONE, optional=True),
                       io.Float.Input(f"strength_{i}", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True)]
        return io.Schema(
            node_id="SVDQLoraStack",
            display_name="SVDQ LoRA Stack",
            category="svdq",
            description="Several LoRAs at once; upstream LoRAs are kept (ranks concatenate).",
            inputs=inputs,
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, **kw) -> io.NodeOutput:
        for i in range(1, cls.SLOTS + 1):
            name = kw.get(f"lora_{i}", NONE)
            if name and name != NONE:
                path = folder_paths.get_full_path_or_raise("loras", name)
                model = apply_lora(model, load_lora_file(path), kw.get(f"strength_{i}", 1.0), name=name)
        return io.NodeOutput(model)


NODES = [SVDQLoadDiffusionModel, SVDQLoraLoader, SVDQLoraStack]


class SVDQExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SVDQExtension:
    return SVDQExtension()
