"""svdq: SVDQuant 4-bit diffusion models for ComfyUI, on fused Triton kernels.

This file is ComfyUI's entry point when the folder sits in ``custom_nodes/``. It imports nothing heavy: the
nodes (ComfyUI's V3 schema, ``comfy_entrypoint``) are registered only when ComfyUI itself is running.
"""

import sys

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"

if "comfy.model_management" in sys.modules:
    from .nodes.comfy_nodes import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY"]
