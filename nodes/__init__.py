"""ComfyUI nodes (thin layer over quant/ and kernels/)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
