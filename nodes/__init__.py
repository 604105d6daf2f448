"""ComfyUI nodes: a thin layer over quant/ and kernels/ (``ops``, ``patcher``, ``loading``, ``lora``, ``pipeline``)."""
