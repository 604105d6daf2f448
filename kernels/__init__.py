"""Fused 4-bit kernels (Triton) and their plain-PyTorch reference."""
