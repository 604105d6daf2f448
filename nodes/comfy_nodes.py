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


def _output_folder() -> str:
    """Where in-graph quantization saves: an existing diffusion_models folder (ComfyUI also lists the legacy
    models/unet first, which may not exist), created if none does."""
    import os

    paths = folder_paths.get_folder_paths("diffusion_models")
    existing = [p for p in paths if os.path.isdir(p)]
    for p in existing:
        if os.path.basename(os.path.normpath(p)) == "diffusion_models":
            return p
    if existing:
        return existing[0]
    target = next((p for p in paths if os.path.basename(os.path.normpath(p)) == "diffusion_models"), paths[0])
    os.makedirs(target, exist_ok=True)
    return target


class SVDQLoadDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDQLoadDiffusionModel",
            display_name="SVDQ Load Diffusion Model",
            category="svdq",
            description="Loads an svdq 4-bit checkpoint, or a Nunchaku SVDQuant file (svdq-int4/fp4_r*-*.safetensors "
                        "or a legacy folder), into ComfyUI's own model class with quantized linears (16-bit files load "
                        "unchanged).",
            inputs=[
                io.Combo.Input("model_name", options=_model_files(),
                               tooltip="An svdq or Nunchaku checkpoint from the diffusion_models folder."),
                io.Combo.Input("nunchaku_scales", options=["exact", "requantize"], default="exact", optional=True,
                               tooltip="Nunchaku INT4 files: 'exact' keeps their 16-bit group scales (every number "
                                       "unchanged); 'requantize' re-expresses them as integer multipliers for the "
                                       "faster int4 kernels, with the added error measured and logged."),
                io.String.Input("hf_repo", default="", optional=True,
                                tooltip="Optional OWNER/NAME or OWNER/NAME/FILE on the Hugging Face Hub: fetched into "
                                        "diffusion_models (resumable; honours HF_HUB_OFFLINE and HF_TOKEN) and loaded "
                                        "instead of model_name."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name, nunchaku_scales="exact", hf_repo="") -> io.NodeOutput:
        import os

        from ..quant.checkpoint import is_svdq_file, read_header
        from ..quant.nunchaku_file import LEGACY_FILES, is_nunchaku_checkpoint
        from .loading import load_svdq_model
        from .pipeline import load_float_model

        if hf_repo and hf_repo.strip():
            from ..hub import pull

            parts = hf_repo.strip().strip("/").split("/")
            repo, fname = "/".join(parts[:2]), ("/".join(parts[2:]) or None)
            path = str(pull(repo, fname, dest_dir=_output_folder()))
            model_name = os.path.basename(path)
        else:
            path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        folder = os.path.dirname(path)
        if os.path.basename(path) in LEGACY_FILES and is_nunchaku_checkpoint(folder):
            path = folder  # a legacy Nunchaku folder, picked through one of its files
        else:
            read_header(path)  # clear errors for corrupt or non-safetensors files, naming the file
        if not is_svdq_file(path) and not is_nunchaku_checkpoint(path):
            # a 16-bit model: load it as ComfyUI would, so graphs can compare both
            return io.NodeOutput(load_float_model(path), ui={"text": [f"{model_name}: 16-bit model (not svdq)"]})
        model = load_svdq_model(path, nunchaku_scales=nunchaku_scales)
        info = model.model.svdq_info
        text = (f"{info['precision']} W / {info['act_precision']} A, rank {info['rank']}, "
                f"{info['bytes'] / 2**20:.1f} MiB ({info['bytes'] / max(1, info['bytes_16bit']):.2f}x of 16-bit, "
                f"{(info['bytes_16bit'] - info['bytes']) / 2**20:.1f} MiB saved)")
        if info.get("conversion"):
            text += f"; {info['conversion']}"
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


class SVDQQuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDQQuantizeModel",
            display_name="SVDQ Quantize Model",
            category="svdq",
            description="Quantizes the connected 16-bit model to svdq 4-bit, calibrating on your prompts through the real "
                        "sampler, and saves it into diffusion_models (then load it with SVDQ Load Diffusion Model).",
            is_output_node=True,
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("prompts", tooltip="Calibration prompts; combine several with Conditioning (Combine)."),
                io.String.Input("filename", default="my-model-svdq-int4-r32"),
                io.Int.Input("rank", default=32, min=0, max=512, step=16),
                io.Combo.Input("precision", options=["int4", "nvfp4"], default="int4"),
                io.Int.Input("steps", default=8, min=1, max=100, tooltip="Sampler steps per calibration prompt."),
                io.Int.Input("latent_size", default=64, min=8, max=256, step=8, tooltip="Calibration latent size (pixels / 8)."),
                io.Boolean.Input("fast", default=False, tooltip="19-candidate smoothing grid and at most 10 refinement steps."),
            ],
            outputs=[io.Model.Output(), io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, model, prompts, filename, rank, precision, steps, latent_size, fast) -> io.NodeOutput:
        import os

        import comfy.utils

        from ..quant.layer import QuantConfig
        from .loading import load_svdq_model
        from .pipeline import quantize_patcher, save_result

        name = os.path.basename(filename.strip()) or "svdq-model"
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        out = os.path.join(_output_folder(), name)
        conds = [(c[0], c[1]) for c in prompts]
        if not conds:
            raise ValueError("SVDQ Quantize Model: connect at least one calibration prompt")
        cfg = QuantConfig(rank=rank, precision=precision, smooth_grid=10 if fast else 20, refine_iters=10 if fast else 100)
        bar = comfy.utils.ProgressBar(len(conds) + 1)
        state = {"layers": 0}

        def on_layer(i, total, layer_name):
            if state["layers"] == 0:
                bar.update_absolute(len(conds), len(conds) + total)
            state["layers"] = i
            bar.update_absolute(len(conds) + i, len(conds) + total)

        result = quantize_patcher(model, cfg, conds, steps=steps, size=latent_size, progress=on_layer,
                                  calib_progress=lambda i, n: bar.update_absolute(i, len(conds) + 1))
        save_result(result, cfg, model, out, source="comfyui-graph")
        return io.NodeOutput(load_svdq_model(out), out, ui={"text": [f"saved {out}"]})


class SVDQModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDQModelPatch",
            display_name="SVDQ Model Patch",
            category="svdq",
            description="Per-sampling options: first-block cache for Flux-type DiTs and UNets (skip the remaining blocks "
                        "while the first block's output changes less than the threshold). Composes with other patches.",
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("cache_threshold", default=0.12, min=0.0, max=1.0, step=0.001,
                               tooltip="0 disables the cache; ~0.12 is a common speed/quality balance."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching allowed from this point of the schedule ..."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="... up to this one."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, cache_threshold, start_percent, end_percent) -> io.NodeOutput:
        from .first_block_cache import apply_first_block_cache

        return io.NodeOutput(apply_first_block_cache(model, cache_threshold, start_percent, end_percent))


class SVDQCompileModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from .compile import MODES, SCOPES

        return io.Schema(
            node_id="SVDQCompileModel",
            display_name="SVDQ Compile Model",
            category="svdq",
            description="torch.compile (Inductor) of any model, svdq or 16-bit, the ways that measured fastest: per "
                        "block (compiles in seconds, works with the first-block cache) or the whole model with "
                        "CUDA graphs (reduce-overhead: the host out of the step, the fastest at batch 1; compiling "
                        "takes minutes and every new resolution or batch size compiles again).",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("mode", options=list(MODES), default="default",
                               tooltip="reduce-overhead: Inductor's CUDA graphs (whole model, CUDA only)."),
                io.Combo.Input("scope", options=list(SCOPES), default="per block",
                               tooltip="per block: one compiled module per transformer block; whole model: one "
                                       "graph (what ComfyUI's TorchCompileModel does)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode, scope) -> io.NodeOutput:
        from .compile import compile_model

        return io.NodeOutput(compile_model(model, mode, scope))


NODES = [SVDQLoadDiffusionModel, SVDQLoraLoader, SVDQLoraStack, SVDQQuantizeModel, SVDQModelPatch,
         SVDQCompileModel]


class SVDQExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SVDQExtension:
    return SVDQExtension()
