"""Added weight error of ``requantize`` on a Nunchaku INT4 layer (CPU): a 3072x3072 Student-t layer is written in
the Nunchaku layout by the spec-derived test generator, then re-expressed as our integer group multipliers.

    python bench/nunchaku_requantize_error.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import nunchaku_gen as gen  # noqa: E402

from svdq.quant.nunchaku_file import convert_w4a4  # noqa: E402

torch.manual_seed(0)  # StudentT samples from the global generator
g = torch.Generator().manual_seed(0)
w = torch.distributions.StudentT(4.0).sample((3072, 3072)) / 3072**0.5
layer = gen.logical_w4a4(w, torch.zeros(3072), 32, g, "int4")
_, err = convert_w4a4(gen.pack_w4a4(layer), 3072, 3072, "int4", False, "requantize", "bench")
print(f"requantize: added relative weight error {err:.4f} (3072x3072 Student-t(4), rank 32)")
