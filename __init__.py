"""svdq: SVDQuant 4-bit diffusion models for ComfyUI, on fused Triton kernels.

This file is ComfyUI's entry point when the folder sits in ``custom_nodes/``. It imports nothing heavy: the
nodes (ComfyUI's V3 schema, ``comfy_entrypoint``) are registered only when ComfyUI itself is running.
"""

import sys

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"

# ``__package__`` is empty when a tool imports this file as a plain module (pytest does, for a checkout whose folder
# name is not an identifier, e.g. ``svdq-main``); ComfyUI imports the folder as a package.
if "comfy.model_management" in sys.modules and __package__:
    from .nodes.comfy_nodes import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY"]
