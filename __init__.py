"""svdq: SVDQuant 4-bit diffusion models for ComfyUI, on fused Triton kernels.

This file is ComfyUI's entry point when the folder sits in ``custom_nodes/``. It imports nothing heavy: the
nodes are registered only when ComfyUI itself is running (``comfy`` already imported).
"""

import sys

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if "comfy" in sys.modules and "comfy.model_management" in sys.modules:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
