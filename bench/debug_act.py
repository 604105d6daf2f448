"""Debug helper: where do activation codes differ between kernel and reference (prints a few cases)."""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import random_layer
from svdq.kernels.reference import activation_operand
from svdq.kernels.act_quant import quantize_activation
for (m, k, unsigned) in [(1, 64, False), (33, 128, True), (4608, 3072, False)]:
    layer = random_layer(96, k, 16, True, unsigned, 0.171875 if unsigned else 0.0, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    a_ref, s_ref = activation_operand(x, layer)
    a, s, l = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, layer.act_shift, unsigned)
    d = (a != a_ref)
    print(m, k, unsigned, "scale equal", torch.equal(s, s_ref), "max scale rel diff", ((s - s_ref).abs() / s_ref).max().item(), "codes differ", d.sum().item(), "of", d.numel())
    if d.any():
        idx = d.nonzero()[:5]
        for i, j in idx.tolist():
            print("  ", i, j, "kernel", a[i, j].item(), "ref", a_ref[i, j].item())
