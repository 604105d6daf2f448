"""Where the host time of one small svdq_linear call goes (cProfile over repeated calls; needs a CUDA GPU)."""
import cProfile
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from linear import make_layer  # noqa: E402

from svdq.kernels.dispatch import svdq_linear  # noqa: E402

layer = make_layer(256, 256, 32)
x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
for _ in range(20):
    svdq_linear(x, layer)
torch.cuda.synchronize()
pr = cProfile.Profile()
pr.enable()
for _ in range(300):
    svdq_linear(x, layer)
torch.cuda.synchronize()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
