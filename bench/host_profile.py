"""Where the host time of one small svdq_linear call goes (cProfile over repeated calls; needs a CUDA GPU).

Measured and removed: call-plan replays calling Triton 3.6's C launch entry directly instead of its Python runner
saved nothing (53.8 vs 52.9 µs per W4A4 call, 26.7 vs 25.4 µs W4A16; bench/results-host-direct-launch-h100.log):
the host time is in the C launch itself (argument conversion and cuLaunchKernelEx), four launches per call."""
import cProfile
import os
import pstats
import sys
import timeit

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _path  # noqa: E402,F401
from linear import launch_overhead_us, make_layer  # noqa: E402

from svdq.kernels.dispatch import svdq_linear  # noqa: E402

from svdq.kernels.act_quant import quantize_activation  # noqa: E402
from svdq.kernels.dispatch import int8_weights  # noqa: E402
from svdq.kernels.gemm_w4a4 import w4a4_gemm  # noqa: E402

layer = make_layer(256, 256, 32)
mod = make_layer(256, 256, 0, kind="w4a16")
x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
x1 = x[:1].contiguous()
wb = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
w8 = int8_weights(layer)


def per_call_us(fn):
    return launch_overhead_us(fn, calls=2000)


stages = {
    "F.linear (bf16)": lambda: torch.nn.functional.linear(x, wb),
    "torch.empty": lambda: torch.empty(16, 256, device="cuda", dtype=torch.bfloat16),
    "activation kernels": lambda: quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down),
    "weight expansion": lambda: int8_weights(layer),
    "GEMM + epilogue": lambda: w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16),
    "svdq_linear W4A4 r32": lambda: svdq_linear(x, layer),
    "svdq_linear W4A16 M=1": lambda: svdq_linear(x1, mod),
}
for name, fn in stages.items():
    print(f"host µs per call  {name:<34} {per_call_us(fn):7.1f}", flush=True)
os.environ["SVDQ_PLANS"] = "0"  # the same calls re-deriving every launch (no call plans)
for name in ("svdq_linear W4A4 r32", "svdq_linear W4A16 M=1"):
    print(f"host µs per call  {name + ' (plans off)':<34} {per_call_us(stages[name]):7.1f}", flush=True)
os.environ.pop("SVDQ_PLANS")
from svdq.kernels import dispatch  # noqa: E402

for ints in (False, True):  # call plans passing fixed tensors to the launcher as tensors vs as addresses
    dispatch.INT_POINTERS = ints
    for lay in (layer, mod):
        lay.__dict__.pop("_svdq_plans", None)
    for name in ("svdq_linear W4A4 r32", "svdq_linear W4A16 M=1"):
        print(f"host µs per call  {name + (' (addresses)' if ints else ' (tensors)'):<40} "
              f"{per_call_us(stages[name]):7.1f}", flush=True)
# The compiled model's entry: svdq::linear (a plain torch.library op) against the same body registered with
# torch.library.custom_op, which adds an autograd shim and an output-aliasing check to every call (loose tensors:
# both build the layer object per call, so only the registration differs).
from svdq.kernels import settings, torch_op  # noqa: E402

twin = torch.library.custom_op("svdq_bench::linear", mutates_args=())(torch_op._linear_impl)
twin.register_fake(torch_op._linear_shape)
op_args = (x, [getattr(layer, f) for f in torch_op.FIELDS], None, None, layer.kind, layer.precision,
           layer.act_precision, layer.act_unsigned, layer.act_shift, layer.in_features, layer.out_features, False)
with torch.no_grad():
    for name, op in (("svdq::linear (Library)", torch.ops.svdq.linear.default),
                     ("same body as custom_op", torch.ops.svdq_bench.linear.default)):
        print(f"host µs per call  {name:<34} {per_call_us(lambda op=op: op(*op_args)):7.1f}", flush=True)


class _Owner:
    """The least a layer module gives the op (``nodes/ops.py``'s modules register themselves and give more)."""

    svdq_lora = None
    svdq_parts = [None]

    def __init__(self, w):
        self.w = w

    def svdq_part_qweight(self, part):
        return self.w.qweight

    def quantized_weights(self, device=None, part=0):
        return self.w


# The compiled model's own path: the op finds the registered layer by its qweight and keeps it there, so a call is
# the op's argument boxing (12 arguments, 10 of them tensors in a list), that check and the planned svdq_linear; the
# difference from "svdq_linear W4A4 r32" above is what the op adds per call on this host.
owner = _Owner(layer)
torch_op.register_owner(owner)
with torch.no_grad():
    print(f"host µs per call  {'svdq::linear, registered layer':<34} "
          f"{per_call_us(lambda: torch.ops.svdq.linear.default(*op_args)):7.1f}", flush=True)
# The per-call environment reads (the call-plan key's nine switches), os.environ.get against kernels/settings.py
env_old = timeit.timeit(lambda: tuple(map(os.environ.get, dispatch._ENV)), number=20000) / 20000 * 1e6
env_new = timeit.timeit(lambda: settings.snapshot(dispatch._ENV), number=20000) / 20000 * 1e6
print(f"host µs per call  plan-key switches: os.environ.get {env_old:.2f}, settings.snapshot {env_new:.2f}", flush=True)

pr = cProfile.Profile()
pr.enable()
for _ in range(300):
    svdq_linear(x, layer)
torch.cuda.synchronize()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
