"""The algorithm: formats round trips, the reference linear against float64, layer quantization quality."""

import pytest
import torch

from svdq.kernels.reference import dequantize_weight, svdq_linear_reference
from svdq.quant import QuantConfig, quantize_linear
from svdq.quant.formats import (
    e2m1_decode,
    e2m1_encode,
    fake_quant_activation,
    fake_quant_weight,
    pack_int4,
    quantize_int4_activation,
    quantize_int4_weight,
    quantize_nvfp4,
    unpack_int4,
)
from svdq.quant.lowrank import lowrank
from svdq.quant.smooth import smoothing_grid


def rel(a, b):
    return float((a - b).norm() / b.norm())


def outlier_layer(n=192, k=256, s=128, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((n, k)) * 0.02
    x = torch.randn(s, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:6]] *= 40  # a few channels 10-100x larger
    b = torch.randn(n, generator=g) * 0.1
    return w, b, x


def test_pack_unpack_roundtrip_signed_and_unsigned():
    c = torch.randint(-8, 8, (7, 130), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(c), signed=True), c)
    u = torch.randint(0, 16, (3, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(u), signed=False), u)
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_int4_weight_dequantize_close_and_multipliers_in_range():
    w = torch.randn(96, 200)
    q = quantize_int4_weight(w)
    assert q.codes.shape == (96, 256)  # padded to the group, not rejected
    assert int(q.mult.min()) >= 1 and int(q.mult.max()) <= 15
    assert int(q.codes.abs().max()) <= 7
    assert int((q.codes.to(torch.int16) * q.mult.repeat_interleave(64, 1)).abs().max()) <= 105
    deq = q.dequantize()[:, :200]
    assert rel(deq, w) < 0.12
    assert torch.all(q.dequantize()[:, 200:] == 0)


def test_clip_choice_never_worse():
    w = torch.distributions.StudentT(3.0).sample((64, 512))
    e0 = rel(quantize_int4_weight(w, allow_clip=False).dequantize(), w)
    e1 = rel(quantize_int4_weight(w, allow_clip=True).dequantize(), w)
    assert e1 <= e0


def test_activation_quant_unsigned_and_padding():
    x = torch.nn.functional.gelu(torch.randn(5, 100) * 3)
    op, s = quantize_int4_activation(x, shift=0.171875, unsigned=True)
    assert op.shape == (5, 128) and torch.all(op[:, 100:] == 0)
    assert int(op.min()) >= 0
    deq = (op.float() * s[:, None])[:, :100] - 0.171875
    assert rel(deq, x) < 0.1


def test_e2m1_codes_and_ties():
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -6.0, -0.5])
    assert torch.equal(e2m1_decode(e2m1_encode(vals)), vals)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_decode(e2m1_encode(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_nvfp4_roundtrip():
    w = torch.randn(32, 96)
    q = quantize_nvfp4(w)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (32, 6)
    assert rel(q.dequantize(), w) < 0.15


def test_reference_linear_matches_float64_computation():
    w, b, x = outlier_layer()
    mod, _ = quantize_linear(w, b, x, QuantConfig(rank=16, smooth_grid=4, refine_iters=3), dtype=torch.float32)
    lw = mod.weights()
    xt = torch.randn(9, w.shape[1])
    y = svdq_linear_reference(xt, lw)
    # independent float64 evaluation of Q(x̂)·Q(R)ᵀ + x·L1·L2ᵀ + bias from dequantized tensors
    xa = fake_quant_activation(xt.double().float(), "int4", smooth=lw.smooth).double()
    y64 = xa @ dequantize_weight(lw).double().T
    y64 += (xt.double() @ lw.proj_down.double()) @ lw.proj_up.double().T + lw.bias.double()
    assert rel(y.double(), y64) < 1e-5


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_svdquant_beats_rtn_and_smoothquant(precision):
    w, b, x = outlier_layer()
    y = x @ w.T + b
    rtn = fake_quant_activation(x, precision) @ fake_quant_weight(w, precision).T + b
    sq, _ = quantize_linear(w, b, x, QuantConfig(rank=0, precision=precision, refine_iters=1), dtype=torch.float32)
    sv, rep = quantize_linear(w, b, x, QuantConfig(rank=32, precision=precision), dtype=torch.float32)
    e_rtn, e_sq, e_sv = rel(rtn, y), rel(sq(x), y), rel(sv(x), y)
    assert e_sv <= 0.5 * e_rtn, (e_sv, e_rtn)
    assert e_sv <= 0.7 * e_sq, (e_sv, e_sq)
    assert rep.refine_steps >= 1


def test_gptq_option_runs_and_is_not_worse():
    w, b, x = outlier_layer(seed=3)
    y = x @ w.T + b
    base, _ = quantize_linear(w, b, x, QuantConfig(rank=16, smooth_grid=4, refine_iters=3), dtype=torch.float32)
    g, _ = quantize_linear(w, b, x, QuantConfig(rank=16, smooth_grid=4, refine_iters=3, gptq=True), dtype=torch.float32)
    assert rel(g(x), y) <= rel(base(x), y) * 1.001


def test_unsigned_gelu_inputs_detected_and_shift_compensated():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.nn.functional.gelu(torch.randn(256, 128, generator=g) * 2)
    mod, rep = quantize_linear(w, None, x, QuantConfig(rank=16, smooth_grid=4, refine_iters=3), dtype=torch.float32)
    assert rep.act_unsigned and rep.act_shift == pytest.approx(0.171875)
    assert rel(mod(x), x @ w.T) < 0.1


def test_w4a16_layer_and_rank_zero():
    w = torch.randn(80, 128) * 0.05
    x = torch.randn(16, 128)
    mod, _ = quantize_linear(w, None, x, QuantConfig(kind="w4a16", rank=0, smooth_grid=0), dtype=torch.float32)
    assert mod.rank == 0 and mod.act_precision == "none"
    assert rel(mod(x), x @ w.T) < 0.12


def test_nan_weights_and_bad_shapes_are_clear_errors():
    w = torch.randn(8, 64)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_linear(w, None, torch.randn(4, 64))
    with pytest.raises(ValueError, match="inputs must be"):
        quantize_linear(torch.randn(8, 64), None, torch.randn(4, 32))
    with pytest.raises(ValueError, match="no calibration inputs"):
        quantize_linear(torch.randn(8, 64), None, torch.zeros(0, 64))


def test_randomized_svd_matches_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 40, generator=g) @ torch.randn(40, 1300, generator=g) + 0.01 * torch.randn(600, 1300, generator=g)
    d1, u1 = lowrank(a, 32, "exact")
    d2, u2 = lowrank(a, 32, "randomized")
    assert rel(u2 @ d2.T, u1 @ d1.T) < 1e-3


def test_smoothing_grid_sizes():
    assert len(smoothing_grid(20)) == 39
    assert len(smoothing_grid(10)) == 19
