"""Triton kernels against the plain-PyTorch reference: same integer codes, relative error ≤ 1e-2.

On CPU the kernels run under TRITON_INTERPRET=1 at small shapes (conftest); on a CUDA GPU at larger ones.
"""

import numpy as np
import pytest
import torch

from helpers import random_layer
from conftest import device
from svdq.kernels.reference import activation_operand, int8_weight_operand, svdq_linear_reference

GPU = torch.cuda.is_available()
DEV = device()
SM90 = GPU and torch.cuda.get_device_capability()[0] == 9
SCHEDULES = ["pointer", "tma", "packed"] + [pytest.param("gluon", marks=pytest.mark.skipif(not SM90, reason="Gluon wgmma kernel: sm_90"))]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


SHAPES = [  # (M, K, N, rank, bias, unsigned)
    (1, 64, 64, 0, False, False),
    (7, 200, 72, 16, True, False),  # odd M, K not a multiple of 64, N not of the tile
    (33, 128, 130, 32, True, True),  # unsigned activations after the GELU shift
    (17, 320, 96, 64, False, False),
    (5, 256, 48, 128, True, False),
    (9, 640, 80, 96, True, False),  # a LoRA-widened branch: 3 epilogue chunks of 32, no power-of-two pad
    (12, 448, 64, 48, False, False),  # 3 chunks of 16
] + ([(4608, 3072, 3072, 32, True, False), (1000, 3072, 12288, 32, True, True), (77, 12288, 3072, 32, False, False)] if GPU else [])


@pytest.mark.parametrize("m,k,n,rank,bias,unsigned", SHAPES)
def test_activation_kernel_codes_match(m, k, n, rank, bias, unsigned, triton_kernels):
    from svdq.kernels.act_quant import quantize_activation

    layer = random_layer(n, k, rank, bias, unsigned, 0.171875 if unsigned else 0.0, device=DEV, seed=m)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * 2
    if unsigned:
        x = torch.nn.functional.gelu(x.float(), approximate="tanh").to(torch.bfloat16)
    a_ref, s_ref = activation_operand(x, layer)
    a, s, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, layer.act_shift, unsigned)
    assert torch.equal(s, s_ref)
    assert torch.equal(a, a_ref), f"{(a != a_ref).sum().item()} codes differ"
    if rank:
        lref = x.float() @ layer.proj_down.float()
        assert rel(lora, lref) < 1e-3


@pytest.mark.parametrize("per_program,ew_max", [(2, False), (3, False), (3, True)])
def test_activation_tiles_per_program(per_program, ew_max, triton_kernels):
    """Pass 1 covering several K tiles per program (fewer low-rank partials; the last program's share may be
    short), its row maxima reduced per tile or once (``ew_max``), gives the same codes and branch product as one
    tile per program."""
    from svdq.kernels.act_quant import quantize_activation

    layer = random_layer(64, 1280, 96, True, device=DEV, seed=per_program)  # 5 tiles of 256
    x = torch.randn(37, 1280, device=DEV, dtype=torch.bfloat16)
    a1, s1, l1 = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, k_per_program=1)
    a, s, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, k_per_program=per_program,
                                     ew_max=ew_max)
    assert torch.equal(a, a1) and torch.equal(s, s1)
    assert rel(lora, l1) < 1e-5
    assert rel(lora, x.float() @ layer.proj_down.float()) < 1e-3


STREAM_SHAPES = [  # (M, K, rank, unsigned, tiles per program)
    (37, 1280, 32, False, 2), (5, 200, 16, False, 3), (64, 512, 0, False, 2), (33, 640, 96, True, 2),
    (17, 256, 32, False, 1), (40, 512, 128, False, 3), (21, 768, 80, False, 2),
] + ([(9216, 15360, 32, False, None), (4608, 3072, 32, False, None), (1000, 3072, 32, True, None),
      (77, 12288, 32, False, None), (8192, 3072, 32, False, 16), (8192, 12288, 32, False, 16),
      (4608, 15360, 96, False, None), (4608, 3072, 96, False, None), (8192, 3072, 96, False, 16),
      (9216, 3072, 96, False, 8), (300, 4096, 64, False, 5), (129, 1216, 16, False, None)] if SM90 else [])


@pytest.mark.parametrize("m,k,rank,unsigned,per_program", STREAM_SHAPES)
def test_activation_stream_pass1_same_results(m, k, rank, unsigned, per_program, triton_kernels, monkeypatch):
    """Pass 1 by TMA stream gives the unrolled kernel's codes and scales bit for bit and its branch product within
    1e-5 (and the fp32 product's within 2e-4), whatever the rows, K tail, rank up to ``STREAM_MAX_RANK`` (wider than
    32: in 32-wide MMAs), unsigned shift or tiles a program. Repeated on the GPU: a pipelining race (as the
    pointer-load version of this loop had, and this one had with one MMA as wide as a LoRA-extended branch) shows up
    as a partial that differs between runs."""
    from svdq.kernels.act_quant import quantize_activation

    layer = random_layer(64, k, rank, True, unsigned, 0.171875 if unsigned else 0.0, device=DEV, seed=m + k)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * 2
    if unsigned:
        x = torch.nn.functional.gelu(x.float(), approximate="tanh").to(torch.bfloat16)
    args = (x, layer.k_padded, layer.smooth, layer.proj_down, layer.act_shift, unsigned)
    a1, s1, l1 = (t.clone() if t is not None else None for t in quantize_activation(*args, stream=False))
    a_ref, s_ref = activation_operand(x, layer)
    assert torch.equal(a1, a_ref) and torch.equal(s1, s_ref)
    for _ in range(5 if GPU else 1):
        a, s, lora = quantize_activation(*args, stream=True, k_per_program=per_program)
        assert torch.equal(s, s1)
        assert torch.equal(a, a1), f"{(a != a1).sum().item()} codes differ"
        if rank:
            assert rel(lora, l1) < 1e-5
            assert rel(lora, x.float() @ layer.proj_down.float()) < 2e-4


@pytest.mark.parametrize("m,k,rank", [(33, 640, 160)] + ([(4608, 3072, 160)] if SM90 else []))
def test_widest_branch_takes_the_unrolled_pass1(m, k, rank, triton_kernels, monkeypatch):
    """A branch wider than ``STREAM_MAX_RANK`` never takes the TMA stream: asking for it is an error, and
    ``SVDQ_ACT_STREAM=1`` leaves it to the unrolled kernel, whose branch product stays within 2e-4 of the fp32
    product, run after run."""
    from svdq.kernels.act_quant import quantize_activation, stream_pass1

    layer = random_layer(64, k, rank, True, device=DEV, seed=m)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * 2
    args = (x, layer.k_padded, layer.smooth, layer.proj_down)
    with pytest.raises(ValueError, match="at most 128 ranks"):
        quantize_activation(*args, stream=True)
    monkeypatch.setenv("SVDQ_ACT_STREAM", "1")
    assert not stream_pass1(x, 1000, 16, rank) and stream_pass1(x, 1000, 16, 128)
    ref = x.float() @ layer.proj_down.float()
    for _ in range(3 if GPU else 1):
        assert rel(quantize_activation(*args)[2], ref) < 2e-4


BATCHED_SHAPES = [  # (batches, rows a batch, rows before the slice in each batch, K, rank, unsigned)
    (2, 64, 16, 256, 32, False),  # 64-row batches: the TMA stream's 32-row tiles stay inside one
    (3, 37, 5, 200, 16, True),  # odd batch, K tail, unsigned: the unrolled pass 1 (a stream tile would straddle)
    (2, 64, 0, 1280, 96, False),  # the slice at the start of each batch, a LoRA-widened branch (64-row tiles)
] + ([(2, 4096, 512, 3072, 32, False), (2, 512, 0, 3072, 32, False), (2, 4096, 512, 3072, 96, False),
      (2, 4096, 512, 12288, 32, True)] if GPU else [])


@pytest.mark.parametrize("nb,seg,skip,k,rank,unsigned", BATCHED_SHAPES)
def test_activation_batched_rows_read_in_place(nb, seg, skip, k, rank, unsigned, triton_kernels, monkeypatch):
    """A [B, L, K] token slice whose batches are not one row pitch apart (the double blocks' attention-output halves
    at batch 2) is read in place, by the unrolled pass 1 and, where its batches hold whole tiles, by the TMA stream:
    the same codes and scales bit for bit, and the same branch product, as on a contiguous copy. The rows around
    the slice hold huge values, so reading any of them would change the scales."""
    from svdq.kernels.act_quant import batched_rows, quantize_activation

    layer = random_layer(64, k, rank, True, unsigned, 0.171875 if unsigned else 0.0, device=DEV, seed=seg + k)
    full = torch.full((nb, skip + seg + 3, k), 3e4, device=DEV, dtype=torch.bfloat16)
    x = full[:, skip:skip + seg]
    x.copy_(torch.randn(nb, seg, k, device=DEV) * 2)
    if unsigned:
        x.copy_(torch.nn.functional.gelu(x.float(), approximate="tanh"))
    assert batched_rows(x)[0] is x and batched_rows(x)[1:] == (seg, nb)
    args = (layer.k_padded, layer.smooth, layer.proj_down, layer.act_shift, unsigned)
    a1, s1, l1 = (t.clone() if t is not None else None for t in quantize_activation(x.reshape(-1, k), *args))
    a_ref, s_ref = activation_operand(x.reshape(-1, k), layer)
    assert torch.equal(a1, a_ref) and torch.equal(s1, s_ref)
    if rank:
        lref = x.reshape(-1, k).float() @ layer.proj_down.float()
        assert rel(l1, lref) < 2e-4, "the contiguous copy's branch product"
    bm = 64 if k >= 8192 or rank > 32 else 32  # pass 1's tile rows
    streams = [False, None] + ([True] if seg % bm == 0 else [])
    for stream in streams:
        a, s, lora = quantize_activation(x, *args, stream=stream)
        assert torch.equal(s, s1) and torch.equal(a, a1), f"stream={stream}: {(a != a1).sum().item()} codes differ"
        if rank:
            assert rel(lora, lref) < 2e-4 and rel(lora, l1) < 1e-5, f"stream={stream}"
    if seg % bm:
        with pytest.raises(ValueError, match="rows a batch"):
            quantize_activation(x, *args, stream=True)


@pytest.mark.parametrize("stream", ["auto", "1"])
def test_linear_on_a_token_slice_is_not_copied(stream, triton_kernels, monkeypatch):
    """``svdq_linear`` hands a batched token slice to the activation kernels as it is (no 3-D copy made first) and
    returns the same numbers as on a contiguous copy, planned (GPU: replays remake the stream's descriptor on the
    new input) or not; a 2-D or viewable input still arrives as [M, K]."""
    from svdq.kernels import dispatch

    monkeypatch.setenv("SVDQ_ACT_STREAM", stream)

    seen = []
    real = dispatch.quantize_activation

    def spy(x2, *a, **kw):
        seen.append((x2.dim(), x2.is_contiguous()))
        return real(x2, *a, **kw)

    monkeypatch.setattr(dispatch, "quantize_activation", spy)
    layer = random_layer(96, 192, 32, True, device=DEV, seed=23)
    full = torch.randn(2, 40, 192, device=DEV, dtype=torch.bfloat16)
    x = full[:, 8:40]
    plain = triton_kernels.svdq_linear(x.contiguous(), layer)
    assert seen[-1] == (2, True)
    for _ in range(3):  # the first call records a plan on the GPU, the others replay it
        got = triton_kernels.svdq_linear(x, layer)
        assert got.shape == (2, 32, 96) and torch.equal(got, plain)
    assert (3, False) in seen
    other = torch.randn(2, 40, 192, device=DEV, dtype=torch.bfloat16)  # a replay on another input of this layout
    assert torch.equal(triton_kernels.svdq_linear(other[:, 8:40], layer),
                       triton_kernels.svdq_linear(other[:, 8:40].contiguous(), layer))
    gelu = triton_kernels.svdq_linear(x, layer, gelu=True)
    assert torch.equal(gelu, triton_kernels.svdq_linear(x.contiguous(), layer, gelu=True))
    triton_kernels.svdq_linear(full[:1, 8:40], layer)  # one batch: a [M, K] view
    assert seen[-1] == (2, True)


@pytest.mark.parametrize("dtype,m,k,rank", [(torch.float16, 45, 704, 32), (torch.bfloat16, 37, 1216, 16)]
                         + ([(torch.float16, 4608, 3072, 32), (torch.bfloat16, 2000, 12288, 32)] if SM90 else []))
def test_activation_stream_on_a_column_slice_and_fp16(dtype, m, k, rank, triton_kernels):
    """The stream reads a column slice of a wider input (row pitch past K, base 128 bytes in, K not a multiple of
    the tile) through its descriptor, and takes fp16 inputs: the same codes, scales and branch product as the
    unrolled kernel on a contiguous copy, whatever the huge values on either side of the slice."""
    from svdq.kernels.act_quant import descriptor_addressable, quantize_activation

    layer = random_layer(64, k, rank, True, device=DEV, seed=k + 3)
    layer.smooth = layer.smooth.to(dtype)
    layer.proj_down = layer.proj_down.to(dtype)
    wide = torch.randn(m, k + 192, device=DEV, dtype=dtype)
    wide[:, :64] = 1e4  # columns left and right of the slice: huge, so reading any of them changes the scales
    wide[:, 64 + k:] = -1e4
    x = wide[:, 64:64 + k]
    assert descriptor_addressable(x) and x.stride(0) == k + 192
    a1, s1, l1 = quantize_activation(x.contiguous(), layer.k_padded, layer.smooth, layer.proj_down, stream=False)
    a1, s1, l1 = a1.clone(), s1.clone(), l1.clone()
    a, s, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, stream=True)
    assert torch.equal(s, s1) and torch.equal(a, a1)
    assert rel(lora, l1) < 1e-5


def test_activation_stream_choice(monkeypatch):
    """The TMA stream runs only where a descriptor can address the input; an explicit request it cannot honour is a
    clear error, and SVDQ_ACT_STREAM takes 0, 1 or auto."""
    from svdq.kernels import act_quant
    from svdq.kernels.act_quant import quantize_activation, stream_pass1

    if not act_quant.HAS_HOST_DESCRIPTORS:
        pytest.skip("this Triton has no host-side descriptors")
    x = torch.randn(8, 64 * 9, dtype=torch.bfloat16)
    monkeypatch.setenv("SVDQ_ACT_STREAM", "1")
    assert stream_pass1(x, 1, 9, 32)
    assert not stream_pass1(x[:, 4:580 - 8], 1, 9, 32)  # base 8 bytes past alignment
    assert not stream_pass1(torch.randn(8, 100, dtype=torch.bfloat16), 1, 2, 32)  # 200-byte row pitch
    assert not stream_pass1(x.float(), 1, 9, 32)  # fp32 inputs take the unrolled kernel
    monkeypatch.setenv("SVDQ_ACT_STREAM", "0")
    assert not stream_pass1(x, 1000, 9, 32)
    monkeypatch.setenv("SVDQ_ACT_STREAM", "auto")
    assert stream_pass1(x, 1000, 9, 32) == (GPU and torch.cuda.get_device_capability()[0] >= 9 and x.is_cuda)
    monkeypatch.setenv("SVDQ_ACT_STREAM", "yes")
    with pytest.raises(ValueError, match="SVDQ_ACT_STREAM"):
        stream_pass1(x, 1, 9, 32)
    monkeypatch.delenv("SVDQ_ACT_STREAM")
    x = x.to(DEV)  # the kernels run below: on the GPU where there is one (a CPU tensor cannot be launched on there)
    odd = torch.randn(4, 100, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="cannot address"):
        quantize_activation(odd, 128, None, None, stream=True)
    with pytest.raises(ValueError, match="one warpgroup"):
        quantize_activation(x, 64 * 9, None, None, stream=True, num_warps=8)
    monkeypatch.setenv("SVDQ_ACT_STREAM", "1")  # the stream wherever it can run, but 8 warps asked: the unrolled one
    a8, s8, _ = quantize_activation(x, 64 * 9, None, None, num_warps=8)
    a4, s4, _ = quantize_activation(x, 64 * 9, None, None)
    assert torch.equal(a8, a4) and torch.equal(s8, s4)


@pytest.mark.parametrize("block_m,pass2_block_m,pass2_warps,pass2_groups", [(32, 16, 4, None), (16, 64, 8, 1),
                                                                           (64, 32, 2, 4)])
def test_activation_pass2_tile_apart(block_m, pass2_block_m, pass2_warps, pass2_groups, triton_kernels):
    """Pass 2 on tiles of another height and width than pass 1's (they exchange per-row maxima and branch partials),
    with 1/λ given precomputed, gives the same codes, scales and branch product as matching tiles."""
    from svdq.kernels.act_quant import quantize_activation

    layer = random_layer(64, 1280, 32, True, device=DEV, seed=block_m)
    x = torch.randn(75, 1280, device=DEV, dtype=torch.bfloat16)
    a1, s1, l1 = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, block_m=block_m)
    inv = torch.reciprocal(layer.smooth.float())
    a, s, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, block_m=block_m,
                                     pass2_block_m=pass2_block_m, pass2_warps=pass2_warps, pass2_groups=pass2_groups,
                                     inv_smooth=inv)
    assert torch.equal(a, a1) and torch.equal(s, s1) and torch.equal(lora, l1)
    a_ref, s_ref = activation_operand(x, layer)
    assert torch.equal(a, a_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("m,k,n,rank,bias,unsigned", SHAPES)
def test_w4a4_linear_matches_reference(m, k, n, rank, bias, unsigned, triton_kernels):
    layer = random_layer(n, k, rank, bias, unsigned, 0.171875 if unsigned else 0.0, device=DEV, seed=k)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = triton_kernels.svdq_linear(x, layer)
    ref = svdq_linear_reference(x, layer)
    assert out.dtype == x.dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= 1e-2


def test_layer_keeps_one_inverse_smoothing(triton_kernels):
    """The W4A4 path hands the activation kernels the layer's 1/λ, made once (``torch.reciprocal`` in fp32, as the
    reference) and kept with the layer: the same tensor on the next call, and the codes equal the reference's."""
    layer = random_layer(96, 320, 16, True, device=DEV, seed=3)
    x = torch.randn(9, 320, device=DEV, dtype=torch.bfloat16)
    out = triton_kernels.svdq_linear(x, layer)
    inv = layer.__dict__["_svdq_derived"]["inv_smooth"]
    assert inv.dtype == torch.float32 and torch.equal(inv, torch.reciprocal(layer.smooth.float()))
    triton_kernels.svdq_linear(x, layer)
    assert layer.__dict__["_svdq_derived"]["inv_smooth"] is inv
    assert rel(out, svdq_linear_reference(x, layer)) <= 1e-2


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("m,k,n,rank,bias,unsigned", SHAPES[1:] + ([(300, 3072, 9216, 32, True, False)] if GPU else []))
def test_gemm_schedules_match_reference(m, k, n, rank, bias, unsigned, schedule, triton_kernels, monkeypatch):
    """The grouped pointer kernel, the persistent TMA kernel and the warp-specialized Gluon kernel compute the
    same layer."""
    monkeypatch.setenv("SVDQ_GEMM", schedule)
    layer = random_layer(n, k, rank, bias, unsigned, 0.171875 if unsigned else 0.0, device=DEV, seed=k + 1)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    assert rel(triton_kernels.svdq_linear(x, layer), svdq_linear_reference(x, layer)) <= 1e-2
    assert rel(triton_kernels.svdq_linear(x, layer, gelu=True), svdq_linear_reference(x, layer, gelu=True)) <= 1e-2


PACKED_CASES = [  # (M, K, N, rank, bias, gelu, unsigned): odd M and N, K with a short last tile, wide branches
    (7, 200, 130, 16, True, False, False),
    (33, 384, 64, 32, False, True, True),
    (70, 128, 192, 0, True, False, False),
    (12, 640, 96, 96, True, True, False),
] + ([(512, 3072, 9216, 32, True, False, False), (1000, 12288, 3072, 32, True, False, False),
      (4608, 3072, 3072, 32, True, True, False)] if GPU else [])
PACKED_TILES = [(64, 64, 128), (128, 64, 64)] + ([(64, 128, 128), (64, 256, 128), (128, 128, 128)] if GPU else [])


@pytest.mark.parametrize("tile", PACKED_TILES)
@pytest.mark.parametrize("m,k,n,rank,bias,gelu,unsigned", PACKED_CASES)
def test_packed_gemm_equals_expanded_gemm(m, k, n, rank, bias, gelu, unsigned, tile, triton_kernels):
    """The GEMM on packed weights (codes unpacked in registers) against the int8 GEMM on the expanded weight: the
    same integer accumulation, so the same output (the branch MMA runs transposed: within a bf16 ulp if not
    bit for bit), also when adding into a column slice of a wider output."""
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import w4a4_gemm
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers, w4a4_gemm_packed

    layer = random_layer(n, k, rank, bias, unsigned, 0.171875 if unsigned else 0.0, device=DEV, seed=m + n)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down, layer.act_shift, unsigned)
    up = layer.proj_up if rank else None
    want = w4a4_gemm(a8, sa, int8_weight_operand(layer), layer.wscale, lora, up, layer.bias, torch.bfloat16, gelu,
                     schedule="pointer")
    bn, bt, bk = tile
    cfg = {"BLOCK_N": bn, "BLOCK_T": bt, "BLOCK_K": bk, "STAGES": 2, "num_warps": 4}
    mt = transposed_multipliers(layer.wmult)
    got = w4a4_gemm_packed(a8, sa, layer.qweight, mt, layer.wscale, lora, up, layer.bias, torch.bfloat16, gelu,
                           config=cfg)
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -7
    assert rel(got, want) < 1e-3
    if not GPU and rank == 0:  # integer product and the same elementwise epilogue: equal bits (the branch's fp32
        assert torch.equal(got, want)  # dot runs transposed here, and numpy may sum it in another order)
    wide = torch.randn(m, n + 40, device=DEV, dtype=torch.bfloat16)
    before = wide.clone()
    w4a4_gemm_packed(a8, sa, layer.qweight, mt, layer.wscale, lora, up, layer.bias, torch.bfloat16, gelu,
                     out=wide[:, 24 : 24 + n], accumulate=True, config=cfg)
    assert torch.equal(wide[:, :24], before[:, :24]) and torch.equal(wide[:, 24 + n :], before[:, 24 + n :])
    assert rel(wide[:, 24 : 24 + n], before[:, 24 : 24 + n].float() + want.float()) < 1e-2


def _sext4(v):
    return np.where(v & 8, v.astype(np.int64) - 16, v.astype(np.int64))


def test_unpack_ptx_sequences_on_every_word():
    """The inline PTX that unpacks codes on the GPU, run by a small PTX model on every 16-bit word of four codes and
    every multiplier 0..15 (the interpreter runs the kernels' plain-Triton twin instead, so this is what checks the
    bit tricks on the CPU): the int8 operand ``code * mult`` of the W4A4 kernel, and the bf16 pairs of both W4A16
    kernels (for the 32-bit-word one, every low half-word with a scrambled high half)."""
    from ptx_model import run
    from svdq.kernels.gemm_w4a4_packed import _UNPACK_PTX
    from svdq.kernels.gemm_w4a16_packed import _PAIR_BF16_PTX, _UNPACK_BF16_PTX

    word, mult = (a.ravel().astype(np.uint32) for a in np.meshgrid(np.arange(65536), np.arange(16)))
    word32 = np.where(word & 0x8000, word | 0xFFFF0000, word).astype(np.uint32)  # int16 widened, as the kernel's .to(int32)
    codes = [_sext4((word >> (4 * i)) & 0xF) * mult for i in range(4)]
    packed = run(_UNPACK_PTX.value, {1: word32, 5: mult})[0]
    for i in range(4):
        assert np.array_equal(((packed >> (8 * i)) & 0xFF).astype(np.uint8).view(np.int8), codes[i].astype(np.int8))
    mult_f32 = mult.astype(np.float32).view(np.uint32)
    bf16x2 = lambda v: (lambda b: b | (b << 16))(v.astype(np.float32).view(np.uint32) >> 16)  # exact small integers
    for j in range(4):  # 32-bit words: the pair kernel hands each call the word shifted by 4j (codes j and j + 4)
        hi_word = (word32 * 0x9E3779B1 & 0xFFFF).astype(np.uint32)  # the other half-word: codes 4-7
        w32 = (word | (hi_word << 16)).astype(np.uint32)
        pair = run(_PAIR_BF16_PTX.value, {1: w32 >> (4 * j), 3: bf16x2(mult), 5: bf16x2(-136.0 * mult)})[0]
        for lane, nib in enumerate((j, j + 4)):
            want = _sext4((w32 >> (4 * nib)) & 0xF) * mult
            got = ((pair >> (16 * lane)) & 0xFFFF).astype(np.uint32) << 16
            assert np.array_equal(got.view(np.float32), want.astype(np.float32))
    for j in range(2):  # the kernel hands each asm call the word shifted to its pair
        pair = run(_UNPACK_BF16_PTX.value, {1: (word32.view(np.int32) >> (8 * j)).view(np.uint32), 3: mult_f32})[0]
        for lane in range(2):
            got = ((pair >> (16 * lane)) & 0xFFFF).astype(np.uint32) << 16
            assert np.array_equal(got.view(np.float32), codes[2 * j + lane].astype(np.float32))


def test_packed_gemm_rejects_mismatched_operands(triton_kernels):
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers, w4a4_gemm_packed

    layer = random_layer(64, 256, 0, False, device=DEV)
    a8, sa, _ = quantize_activation(torch.randn(3, 256, device=DEV, dtype=torch.bfloat16), 256, layer.smooth, None)
    mt = transposed_multipliers(layer.wmult)
    args = (layer.wscale, None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="packed weight"):
        w4a4_gemm_packed(a8[:, :192], sa, layer.qweight, mt, *args)
    with pytest.raises(ValueError, match="multipliers"):
        w4a4_gemm_packed(a8, sa, layer.qweight, layer.wmult, *args)
    with pytest.raises(ValueError, match="BLOCK_K"):
        w4a4_gemm_packed(a8, sa, layer.qweight, mt, *args, config={"BLOCK_N": 32, "BLOCK_K": 128})
    with pytest.raises(ValueError, match="output"):
        w4a4_gemm_packed(a8, sa, layer.qweight, mt, *args, out=torch.empty(3, 65, device=DEV, dtype=torch.bfloat16))


def test_packed_gemm_dispatch_rule(triton_kernels, monkeypatch):
    """``SVDQ_GEMM=packed`` forces the packed kernel, another schedule disables it; ``auto`` takes it on sm_90
    up to SVDQ_PACKED_MAX_M rows and never on the CPU interpreter."""
    layer = random_layer(64, 128, 0, False, device=DEV)
    x = torch.randn(5, 128, device=DEV, dtype=torch.bfloat16)
    monkeypatch.setenv("SVDQ_GEMM", "packed")
    assert triton_kernels.packed_gemm(x, layer.qweight)
    assert not triton_kernels.packed_gemm(x, layer.qweight.view(-1)[1:33].view(1, 32))  # off a 16-byte boundary
    monkeypatch.setenv("SVDQ_GEMM", "tma")
    assert not triton_kernels.packed_gemm(x, layer.qweight)
    monkeypatch.setenv("SVDQ_GEMM", "auto")
    assert triton_kernels.packed_gemm(x, layer.qweight) == SM90
    monkeypatch.setenv("SVDQ_PACKED_MAX_M", "4")
    assert not triton_kernels.packed_gemm(x, layer.qweight)


def test_packed_w4a16_dispatch_rule(triton_kernels, monkeypatch):
    """W4A16: ``auto`` takes the packed tensor-core kernel on sm_90 for 1-64 rows, ``packed`` forces it up to 64 rows
    (elsewhere too), ``gemv`` / ``mma`` never."""
    layer = random_layer(64, 128, 0, False, kind="w4a16", device=DEV)
    rows = {m: torch.randn(m, 128, device=DEV, dtype=torch.bfloat16) for m in (1, 2, 64, 65)}
    monkeypatch.setenv("SVDQ_W4A16", "auto")
    assert [triton_kernels.packed_w4a16(rows[m], layer.qweight) for m in (1, 2, 64, 65)] == [SM90, SM90, SM90, False]
    monkeypatch.setenv("SVDQ_W4A16", "packed")
    assert [triton_kernels.packed_w4a16(rows[m], layer.qweight) for m in (1, 2, 64, 65)] == [True, True, True, False]
    for impl in ("gemv", "mma"):
        monkeypatch.setenv("SVDQ_W4A16", impl)
        assert not triton_kernels.packed_w4a16(rows[2], layer.qweight)
        assert not triton_kernels.packed_w4a16(rows[1], layer.qweight)


def test_int8_activation_mode(triton_kernels):
    layer = random_layer(96, 192, 32, True, act="int8", device=DEV)
    x = torch.randn(9, 192, device=DEV, dtype=torch.bfloat16)
    assert rel(triton_kernels.svdq_linear(x, layer), svdq_linear_reference(x, layer)) <= 1e-2


def test_gelu_epilogue(triton_kernels):
    layer = random_layer(64, 128, 16, True, device=DEV)
    x = torch.randn(5, 128, device=DEV, dtype=torch.bfloat16)
    out = triton_kernels.svdq_linear(x, layer, gelu=True)
    assert rel(out, svdq_linear_reference(x, layer, gelu=True)) <= 1e-2


def test_lora_extension_matches_reference(triton_kernels):
    layer = random_layer(80, 128, 32, True, device=DEV)
    down = torch.randn(128, 8, device=DEV, dtype=torch.bfloat16) * 0.1
    up = torch.randn(80, 8, device=DEV, dtype=torch.bfloat16) * 0.1
    x = torch.randn(6, 128, device=DEV, dtype=torch.bfloat16)
    out = triton_kernels.svdq_linear(x, layer, down, up)
    ref = svdq_linear_reference(x, layer, down, up)
    assert rel(out, ref) <= 1e-2
    assert rel(out, svdq_linear_reference(x, layer)) > 1e-3  # the LoRA term did something


@pytest.mark.parametrize("n,k", [(64, 128), (130, 200), (96, 3072)] + ([(18432, 3072), (3072, 12288)] if GPU else []))
def test_expand_weight_exact(n, k, triton_kernels):
    from svdq.kernels.gemm_w4a4 import expand_weight

    layer = random_layer(n, k, 0, False, device=DEV)
    assert torch.equal(expand_weight(layer.qweight, layer.wmult), int8_weight_operand(layer))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 16, 40])
@pytest.mark.parametrize("impl", ["gemv", "mma", "packed", "auto"])
def test_w4a16_matches_reference(m, impl, triton_kernels, monkeypatch):
    """Every W4A16 kernel: the CUDA-core word kernels (M <= 4 with ``gemv``), the older tensor-core kernel
    (``mma``), the tensor-core kernel on packed weights (``packed``; ``auto`` takes it on sm_90 for 2-64 rows)."""
    monkeypatch.setenv("SVDQ_W4A16", impl)
    k, n = (3072, 9216) if GPU else (256, 96)
    layer = random_layer(n, k, 0, True, kind="w4a16", device=DEV, seed=m)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = triton_kernels.svdq_linear(x, layer)
    assert rel(out, svdq_linear_reference(x, layer)) <= 1e-2


_W4A16_SMALL = [
    (1, 200, 130, (64, 128), None, True, True),  # K with a short last tile, N not a multiple of the tile
    (16, 640, 64, (64, 128), 3, False, True),  # split over K (partial sums, bias once)
    (40, 384, 192, (128, 128), 2, True, False),  # 40 rows: one 64-row tile; no smoothing
    (3, 512, 96, (64, 256), 1, True, True),
]
_W4A16_FLUX = [(2, 3072, 18432, (64, 256), None, True, True), (64, 3072, 3072, (64, 128), None, True, True),
               (1, 3072, 9216, (128, 128), None, True, True), (5, 1000, 300, (64, 512), 2, True, True)]


# both kernels at the small shapes; at FLUX's (GPU) the pair kernel that dispatch runs, and the 16-bit-word kernel
# (kept for A/B runs) once: each case compiles new kernel variants, minutes of a GPU run
@pytest.mark.parametrize("m,k,n,tile,split,bias,smooth,words",
                         [(*c, w) for c in _W4A16_SMALL for w in (16, 32)]
                         + ([(*c, 32) for c in _W4A16_FLUX] + [(*_W4A16_FLUX[0], 16)] if GPU else []))
def test_w4a16_packed_matches_reference(m, k, n, tile, split, bias, smooth, words, triton_kernels):
    """The tensor-core W4A16 kernels on packed weights (codes unpacked to bf16 in registers; 16-bit words of four
    codes, or 32-bit words of eight with K permuted) at odd shapes, tiles and K splits; fp32 out of a split (partial
    sums added atomically), the output dtype without one."""
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers
    from svdq.kernels.gemm_w4a16_packed import w4a16_packed

    layer = random_layer(n, k, 0, bias, kind="w4a16", device=DEV, seed=m + k)
    if not smooth:
        layer.smooth = None
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    inv = None if layer.smooth is None else torch.reciprocal(layer.smooth.float())
    cfg = {"BLOCK_N": tile[0], "BLOCK_K": tile[1], "WORDS": words, "num_warps": 8 if tile[0] == 128 else 4,
           **({"SPLIT": split} if split else {})}
    y = w4a16_packed(x, layer.qweight, transposed_multipliers(layer.wmult), layer.wscale, inv, k, layer.bias,
                     torch.bfloat16, config=cfg)
    if split:  # (left to the launcher, the split depends on the GPU's size)
        assert y.dtype == (torch.float32 if split > 1 and words == 16 else torch.bfloat16)
    assert rel(y, svdq_linear_reference(x, layer)) <= 1e-2
    with pytest.raises(ValueError, match="rows"):
        w4a16_packed(torch.zeros(65, k, device=DEV, dtype=torch.bfloat16), layer.qweight,
                     transposed_multipliers(layer.wmult), layer.wscale, inv, k)


def test_w4a16_pair_kernel_split_leaves_its_tickets_zero(triton_kernels):
    """Split over K, the pair kernel's last program per tile adds the parts and sets the tile's ticket back to zero:
    calls through a reused (arena) buffer give the same bits every time, and the next call starts from zero."""
    from svdq.kernels.dispatch import _Arena
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers
    from svdq.kernels.gemm_w4a16_packed import w4a16_packed

    m, k, n = 3, 640, 96
    layer = random_layer(n, k, 0, True, kind="w4a16", device=DEV, seed=7)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    inv = torch.reciprocal(layer.smooth.float())
    ar = _Arena(torch.device(DEV))
    cfg = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT": 3}
    ys = [w4a16_packed(x, layer.qweight, transposed_multipliers(layer.wmult), layer.wscale, inv, k, layer.bias,
                       torch.bfloat16, config=cfg, scratch=ar.get) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert not ar.buffers["w4a16_tickets"].view(torch.int32).any()
    assert rel(ys[0], svdq_linear_reference(x, layer)) <= 1e-2


def test_w4a16_prepared_input_rows_past_m_do_not_reach_the_output(triton_kernels):
    """The pair kernel's prepared input covers whole 16-row tiles and only M rows are written: rows past M hold what
    the reused buffer held before (here NaN). They reach only output rows that are masked off, so the result is
    exact and finite; the descriptor over M rows (TMA zero fill, ``X_ROWS="m"``) gives the same bits."""
    from svdq.kernels.dispatch import _Arena
    from svdq.kernels.gemm_w4a4_packed import transposed_multipliers
    from svdq.kernels.gemm_w4a16_packed import w4a16_packed

    m, k, n = 3, 640, 96
    layer = random_layer(n, k, 0, True, kind="w4a16", device=DEV, seed=11)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    inv = torch.reciprocal(layer.smooth.float())
    ar = _Arena(torch.device(DEV))
    ar.get("w4a16_x", 16 * k, torch.bfloat16).fill_(float("nan"))
    ys = [w4a16_packed(x, layer.qweight, transposed_multipliers(layer.wmult), layer.wscale, inv, k, layer.bias,
                       torch.bfloat16, config={"BLOCK_N": 64, "BLOCK_K": 128, "X_DESC": True, "X_ROWS": rows},
                       scratch=ar.get) for rows in ("tile", "m")]
    assert ar.buffers["w4a16_x"].view(torch.bfloat16)[m * k:16 * k].isnan().all()  # the rows past M were not written
    assert torch.isfinite(ys[0]).all() and torch.equal(ys[0], ys[1])
    assert rel(ys[0], svdq_linear_reference(x, layer)) <= 1e-2


def test_pdl_mode_only_on_hopper_cuda(monkeypatch):
    """Programmatic dependent launch is off on the CPU, under the interpreter and with SVDQ_PDL=0; an unknown value
    is an error on a GPU that has it."""
    from svdq.kernels import launch

    monkeypatch.setenv("SVDQ_PDL", "end")
    assert launch.pdl_mode(torch.device("cpu")) == 0
    assert launch.pdl_mode(None) == 0
    if SM90 and launch.HAS_GDC:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        dev = torch.device("cuda", torch.cuda.current_device())
        assert launch.pdl_mode(dev) == launch.PDL_MODES["end"]
        monkeypatch.setenv("SVDQ_PDL", "1")
        assert launch.pdl_mode(dev) == launch.PDL_DEFAULT
        monkeypatch.setenv("SVDQ_PDL", "0")
        assert launch.pdl_mode(dev) == 0
        monkeypatch.setenv("SVDQ_PDL", "sometimes")
        with pytest.raises(ValueError, match="SVDQ_PDL"):
            launch.pdl_mode(dev)


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="programmatic dependent launch: sm_90+")
@pytest.mark.parametrize("kind,m", [("w4a4", 300), ("w4a4", 1200), ("w4a16", 1), ("w4a16", 2)])
def test_pdl_modes_give_the_same_bits_eager_and_in_cuda_graphs(kind, m, monkeypatch):
    """Every launch mode gives the bits of plain launches, called one by one and replayed back to back from a CUDA
    graph (where a kernel may start before the one before it has finished: a missing wait would read stale
    activations or overwrite a buffer still in use)."""
    from svdq.kernels import dispatch

    k, n = (3072, 9216) if kind == "w4a4" else (3072, 18432)
    layers = [random_layer(n, k, 0 if kind == "w4a16" else 32, True, kind=kind, device="cuda", seed=s) for s in (1, 2)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    monkeypatch.setenv("SVDQ_PDL", "0")
    want = [dispatch.svdq_linear(x, layer) for x in xs for layer in layers]
    for mode in ("start", "end", "wait"):
        monkeypatch.setenv("SVDQ_PDL", mode)
        got = [dispatch.svdq_linear(x, layer) for x in xs for layer in layers]
        assert all(torch.equal(a, b) for a, b in zip(want, got)), mode
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = [dispatch.svdq_linear(x, layer) for x in xs for layer in layers]
        torch.cuda.current_stream().wait_stream(side)
        for o in outs:
            o.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(want, outs)), mode


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("k,n,tile,split", [(200, 40, (8, 2), 1), (448, 24, (8, 2), 2)]
                         + ([(3072, 3000, (16, 8), None)] if GPU else []))
def test_w4a16_one_row_tiles_match_reference(m, k, n, tile, split, prefetch, triton_kernels):
    """The word kernel (one row, or two sharing each unpacked weight) with and without the next step's words
    prefetched, K not a multiple of the step, split-K."""
    from svdq.kernels.gemv_w4a16 import _w4a16_gemv_one_row

    layer = random_layer(n, k, 0, True, kind="w4a16", device=DEV, seed=k)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    y = _w4a16_gemv_one_row(x, layer.qweight, layer.wmult, layer.wscale, layer.smooth, None, layer.bias, torch.float32,
                            tile[0], tile[1], split, prefetch)
    assert rel(y, svdq_linear_reference(x, layer)) <= 1e-2


def test_fast_launch_reuses_kernels_correctly(triton_kernels):
    """Repeated calls (the cached-launcher path on a GPU) with changing M, alignment and rank stay exact."""
    from svdq.kernels import launch

    for i, (m, off, r) in enumerate([(5, 0, 16), (5, 0, 16), (9, 1, 16), (5, 3, 0), (33, 0, 32), (5, 0, 16)]):
        layer = random_layer(96, 192, r, True, device=DEV, seed=3)
        buf = torch.randn(m * 192 + off, device=DEV, dtype=torch.bfloat16, generator=None)
        x = buf[off:].view(m, 192)  # misaligned views change Triton's specialization
        out = triton_kernels.svdq_linear(x, layer)
        assert rel(out, svdq_linear_reference(x, layer)) <= 1e-2, (i, m, off, r)
    if GPU:
        assert launch._cache, "the fast launcher cached nothing"


def test_fallback_for_unsupported_dtype(triton_kernels):
    layer = random_layer(64, 64, 0, False, device=DEV)
    x = torch.randn(3, 64, device=DEV, dtype=torch.float64)
    out = triton_kernels.svdq_linear(x, layer)
    assert torch.allclose(out, svdq_linear_reference(x, layer))


def test_wrong_feature_count_is_a_clear_error(triton_kernels):
    layer = random_layer(64, 64, 0, False, device=DEV)
    with pytest.raises(ValueError, match="expects 64"):
        triton_kernels.svdq_linear(torch.randn(3, 65, device=DEV), layer)


@pytest.mark.skipif(not GPU, reason="call plans replay compiled CUDA kernels")
@pytest.mark.parametrize("kind,dtype", [("w4a4", torch.bfloat16), ("w4a16", torch.bfloat16), ("w4a16", torch.float32),
                                        pytest.param("w4a4-large", torch.bfloat16, marks=pytest.mark.skipif(
                                            not SM90, reason="the ping-pong GEMM's TMA store: sm_90")),
                                        pytest.param("w4a4-stream", torch.bfloat16, marks=pytest.mark.skipif(
                                            not SM90, reason="the activation kernel's TMA stream: sm_90"))])
def test_call_plans_replay_exactly(kind, dtype, triton_kernels, monkeypatch):
    """A layer call is recorded once per shape and replayed after: same numbers as the unplanned path, across
    changing inputs, shapes and an arena that grows in between (which retires the plans). In fp32 the W4A16
    kernels' split-K output (zeroed, then added into) is the call's output itself: a replay must zero it again.
    ``w4a4-large``: rows and columns enough for the ping-pong GEMM, whose TMA store descriptor wraps the output
    and is remade per replay."""
    large = kind == "w4a4-large"
    if kind == "w4a4-stream":  # pass 1 by TMA: its load descriptor wraps the input and is remade per replay
        monkeypatch.setenv("SVDQ_ACT_STREAM", "1")
    kind = "w4a4" if kind.startswith("w4a4") else kind
    monkeypatch.setenv("SVDQ_AUTOTUNE", "0")  # untuned: the ping-pong kernel leads the default order at this size
    layer = random_layer(3200 if large else 256, 512, 0 if kind == "w4a16" else 32, True, kind=kind, device=DEV,
                         seed=11)
    ms = [1, 2] if kind == "w4a16" else [1500, 1100, 1500] if large else [64, 7, 64]
    monkeypatch.setenv("SVDQ_PLANS", "0")
    xs = [torch.randn(m, 512, device=DEV, dtype=dtype) for m in ms * 2]
    expect = [triton_kernels.svdq_linear(x, layer) for x in xs]
    monkeypatch.setenv("SVDQ_PLANS", "1")
    got = []
    for i, x in enumerate(xs):
        if i == len(xs) // 2:  # a bigger layer elsewhere grows the arena: plans must be rebuilt, not reused
            big = random_layer(1024, 4096, 32, True, device=DEV, seed=12)
            triton_kernels.svdq_linear(torch.randn(300, 4096, device=DEV, dtype=torch.bfloat16), big)
        got.append(triton_kernels.svdq_linear(x, layer))
    plans = [p for p in layer.__dict__.get("_svdq_plans", {}).values() if p]
    assert plans, "no call plan was recorded"
    for e, g in zip(expect, got):
        assert torch.equal(e, g)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_output_slices_strided_input_and_accumulate(schedule, triton_kernels, monkeypatch):
    """Writing into a column slice of a wider output, reading a column slice of a wider input, and adding into
    an existing output give the plain call's numbers, planned (GPU) or not, on both GEMM schedules."""
    monkeypatch.setenv("SVDQ_GEMM", schedule)
    layer = random_layer(96, 192, 32, True, device=DEV, seed=21)
    wide_x = torch.randn(2, 7, 200, device=DEV, dtype=torch.bfloat16)
    x = wide_x[..., 3:195]
    plain = triton_kernels.svdq_linear(x.contiguous(), layer)
    for _ in range(3):  # the first call records a plan on the GPU, the others replay it
        buf = torch.full((2, 7, 130), float("nan"), device=DEV, dtype=torch.bfloat16)
        got = triton_kernels.svdq_linear(x, layer, out=buf[..., 10:106])
        assert got.data_ptr() == buf[..., 10:106].data_ptr()
        assert torch.equal(buf[..., 10:106], plain)
        assert buf[..., :10].isnan().all() and buf[..., 106:].isnan().all()  # nothing written outside the slice
        base = torch.randn(2, 7, 96, device=DEV, dtype=torch.bfloat16)
        acc = base.clone()
        triton_kernels.svdq_linear(x, layer, out=acc, accumulate=True)
        assert rel(acc, base.float() + plain.float()) < 1e-2
    with pytest.raises(ValueError, match="output shape"):
        triton_kernels.svdq_linear(x, layer, out=torch.empty(2, 7, 95, device=DEV, dtype=torch.bfloat16))


def test_arena_grows_and_retires_plans():
    from svdq.kernels.dispatch import _Arena

    ar = _Arena(torch.device("cpu"))
    a = ar.get("act_f32", 250, torch.float32)
    g = ar.generation
    assert a.shape == (250,) and a.dtype == torch.float32
    assert ar.get("act_f32", 100, torch.float32).data_ptr() == a.data_ptr() and ar.generation == g  # reused
    b = ar.get("act_f32", 301, torch.float32)  # grows (by at least a quarter): plans recorded before are retired
    assert b.shape == (301,) and ar.generation == g + 1
    assert ar.get("act_i8", 999, torch.int8).shape == (999,)
    assert ar.get("act_f32", 377, torch.float32).shape == (377,)  # within the grown buffer, any size


def test_call_plan_substitutes_input_and_output():
    """The plan logic alone (CPU): recorded launches get this call's input and a fresh output."""
    from svdq.kernels.dispatch import _Arena, _Plan

    layer = random_layer(8, 64, 0, False)
    ar = _Arena(torch.device("cpu"))
    scratch = ar.get("act_f32", 16, torch.float32)
    x_rec, y_rec = torch.randn(2, 4), torch.empty(2, 4)

    def add_runner(x, s, y, k):  # stands in for a compiled kernel: y = x * k + s[0]
        y.copy_(x * k + s[0])

    rec = [(add_runner, (x_rec, scratch, y_rec, 3.0))]
    plan = _Plan.build(rec, x_rec, y_rec, layer, ar)
    assert plan is not None
    kept = [a for _, args, _, _ in plan.launches for a in args]
    assert not any(a is x_rec or a is y_rec for a in kept), "a plan must not keep the recording call's tensors alive"
    scratch[0] = 1.5
    x = torch.randn(2, 4)
    assert torch.equal(plan.run(x), x * 3.0 + 1.5)
    foreign = torch.zeros(4)  # a per-call allocation that is neither input nor output: not replayable
    assert _Plan.build([(add_runner, (x_rec, foreign, y_rec, 3.0))], x_rec, y_rec, layer, ar) is None
    assert _Plan.build([None], x_rec, y_rec, layer, ar) is None


@pytest.mark.skipif(not GPU, reason="call plans pass CUDA addresses")
def test_call_plan_rerecords_when_a_tensor_moves(triton_kernels):
    """Plans hand the launcher the layer's tensors as addresses; a tensor whose memory moved (a module moved off
    the device and back keeps its tensor objects) must not be read at its old address."""
    from svdq.kernels.dispatch import svdq_linear

    layer = random_layer(256, 512, 32, True, device=DEV)
    x = torch.randn(64, 512, device=DEV, dtype=torch.bfloat16)
    ref = svdq_linear_reference(x, layer)
    for _ in range(3):  # record, then replay
        assert rel(svdq_linear(x, layer), ref) <= 1e-2
    plans = [p for p in layer.__dict__.get("_svdq_plans", {}).values() if p]
    assert plans and all(p.addresses for p in plans), "the replay should pass addresses"
    old = layer.qweight.data
    layer.qweight.data = old.clone()  # same object, new memory
    old.zero_()  # the stale address now holds different weights
    out = svdq_linear(x, layer)
    assert rel(out, ref) <= 1e-2


@pytest.mark.skipif(not GPU, reason="measures CUDA memory")
def test_call_plans_do_not_hold_inputs_or_outputs(triton_kernels):
    """Recording a plan must not keep that call's input and output alive (it did once: +22 GiB on a 12B model)."""
    layers = [random_layer(3072, 3072, 32, True, device=DEV, seed=s) for s in range(3)]
    triton_kernels.svdq_linear(torch.randn(2048, 3072, device=DEV, dtype=torch.bfloat16), layers[0])  # arena at size
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for layer in layers[1:]:  # each records a new plan
        x = torch.randn(2048, 3072, device=DEV, dtype=torch.bfloat16)
        y = triton_kernels.svdq_linear(x, layer)
        assert layer.__dict__["_svdq_plans"]
        del x, y
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2048 * 3072  # less than one input's worth stays


@pytest.mark.skipif(not SM90, reason="Gluon wgmma kernel: sm_90")
@pytest.mark.parametrize("rank,gelu,acc", [(0, False, False), (32, False, False), (96, True, False), (128, False, True)])
def test_gluon_schedule_bit_identical_to_tma(rank, gelu, acc, triton_kernels):
    """The warp-specialized kernel and the Triton TMA kernel give the same bits (same int32 sums, same epilogue
    order) for every branch width the epilogue chunks and when adding into an output; with GELU within 1e-5."""
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    layer = random_layer(3072, 3072, rank, True, device=DEV, seed=rank)
    x = torch.randn(1000, 3072, device=DEV, dtype=torch.bfloat16)
    a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
    w8 = expand_weight(layer.qweight, layer.wmult)
    base = torch.randn(1000, 3072, device=DEV, dtype=torch.bfloat16)
    outs = {}
    for sched in ("tma", "gluon"):
        out = base.clone() if acc else None
        outs[sched] = w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, gelu,
                                schedule=sched, out=out, accumulate=acc)
    if gelu:  # tanh-GELU: the same expression; measured identical only without it so far (H100, before the rewrite)
        assert rel(outs["gluon"], outs["tma"]) < 1e-5
    else:
        assert torch.equal(outs["gluon"], outs["tma"])
    from svdq.kernels import gemm_w4a4_gluon, launch

    kernel = gemm_w4a4_gluon._w4a4_gemm_ws_kernel  # launched directly (cached compiled kernel), not re-bound per call
    assert kernel not in launch._broken and any(key[0] is kernel for key in launch._cache)


@pytest.mark.skipif(not SM90, reason="Gluon wgmma kernel: sm_90")
@pytest.mark.parametrize("m,rank,acc,gelu", [(1000, 32, False, False), (1000, 96, True, False), (100, 0, False, False),
                                             (4608, 32, False, False), (4608, 32, False, True)])
@pytest.mark.parametrize("tile", [(64, 256, 128, 4), (128, 128, 128, 4)])
def test_pingpong_schedule_bit_identical_to_tma(m, rank, acc, gelu, tile, triton_kernels):
    """The ping-pong Gluon kernel (two warpgroups taking turns over the stage ring) gives the TMA kernel's bits:
    odd M, a chunked wide branch, accumulation, fewer tiles than warpgroups (M = 100: one of them idle), and a
    FLUX-sized layer where each program's warpgroups alternate many times; with GELU (the shipped configs pick
    this kernel for FLUX's MLP up-projections) within 1e-5, as the cooperative kernel."""
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    bm, bn, bk, stages = tile
    layer = random_layer(3072, 3072, rank, True, device=DEV, seed=rank + m)
    x = torch.randn(m, 3072, device=DEV, dtype=torch.bfloat16)
    a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
    w8 = expand_weight(layer.qweight, layer.wmult)
    base = torch.randn(m, 3072, device=DEV, dtype=torch.bfloat16)
    cfg = {"kwargs": {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                      "STAGES": stages, "GROUP_M": 8}, "num_warps": 4, "num_stages": 1}
    want = w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, gelu,
                     schedule="tma", out=base.clone() if acc else None, accumulate=acc)
    got = w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, gelu, config=cfg,
                    out=base.clone() if acc else None, accumulate=acc)
    torch.cuda.synchronize()
    if gelu:
        assert rel(got, want) < 1e-5
    else:
        assert torch.equal(got, want)


@pytest.mark.skipif(not SM90, reason="Gluon wgmma kernel: sm_90")
@pytest.mark.parametrize("branch", ["turn", "epilogue"])
def test_pingpong_branch_placement_same_bits(branch, triton_kernels):
    """The branch MMA issued in the warpgroup's turn (default) or in the epilogue: the same bits as the TMA kernel."""
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    layer = random_layer(3072, 3072, 32, True, device=DEV, seed=7)
    x = torch.randn(2000, 3072, device=DEV, dtype=torch.bfloat16)
    a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
    w8 = expand_weight(layer.qweight, layer.wmult)
    cfg = {"kwargs": {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128,
                      "STAGES": 4, "GROUP_M": 8, "BRANCH": branch}, "num_warps": 4, "num_stages": 1}
    want = w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, schedule="tma")
    got = w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, torch.bfloat16, config=cfg)
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@pytest.mark.skipif(not SM90, reason="Gluon wgmma kernel: sm_90")
@pytest.mark.parametrize("store", ["tma", "pointer"])
@pytest.mark.parametrize("m,n,rank,gelu,column_slice", [(1999, 3000, 32, False, False), (2000, 3072, 96, True, False),
                                                        (513, 1024, 0, False, False), (700, 1536, 32, True, True)])
def test_pingpong_store_same_bits(store, m, n, rank, gelu, column_slice, triton_kernels):
    """The ping-pong kernel's output through shared memory and a TMA bulk store (clipped at odd M and N, into a
    column slice of a wider output) or by pointer stores: the same bits as the TMA Triton kernel, and nothing
    written outside the output."""
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    layer = random_layer(n, 3072, rank, True, device=DEV, seed=m)
    x = torch.randn(m, 3072, device=DEV, dtype=torch.bfloat16)
    a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
    w8 = expand_weight(layer.qweight, layer.wmult)
    up = layer.proj_up if rank else None
    cfg = {"kwargs": {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128,
                      "STAGES": 4, "GROUP_M": 8, "STORE": store}, "num_warps": 4, "num_stages": 1}
    want = w4a4_gemm(a8, sa, w8, layer.wscale, lora, up, layer.bias, torch.bfloat16, gelu=gelu, schedule="tma")
    wide = torch.full((m, n + 256), 7.0, device=DEV, dtype=torch.bfloat16)
    out = wide[:, 128:128 + n] if column_slice else None
    got = w4a4_gemm(a8, sa, w8, layer.wscale, lora, up, layer.bias, torch.bfloat16, gelu=gelu, config=cfg, out=out)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    if column_slice:
        assert got.data_ptr() == out.data_ptr()
        assert bool((wide[:, :128] == 7).all()) and bool((wide[:, 128 + n:] == 7).all())


@pytest.mark.skipif(not SM90, reason="Gluon wgmma kernel: sm_90")
@pytest.mark.parametrize("rank,bm,bn,stages", [(0, 64, 256, 4), (0, 128, 128, 5), (96, 128, 128, 5)])
def test_pingpong_tma_store_where_the_branch_buffer_drops_out(rank, bm, bn, stages, triton_kernels):
    """Configs whose TMA-stored tiles fit only because no branch, or a staged one, leaves the branch's buffer unused
    (``pingpong_shared_bytes``): they do store by TMA, and give the TMA Triton kernel's bits at odd M and N."""
    from svdq.kernels import gemm_w4a4_gluon as gluon
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import branch_chunks, expand_weight, w4a4_gemm

    m, n = 1999, 3000
    layer = random_layer(n, 3072, rank, True, device=DEV, seed=m + rank)
    x = torch.randn(m, 3072, device=DEV, dtype=torch.bfloat16)
    a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
    w8 = expand_weight(layer.qweight, layer.wmult)
    up = layer.proj_up if rank else None
    kwargs = {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "STAGES": stages,
              "GROUP_M": 8}
    block_r, chunk = branch_chunks(rank) if rank else (16, 16)
    flags = {"HAS_LORA": rank > 0, "BLOCK_R": block_r, "R_CHUNK": chunk}
    want = w4a4_gemm(a8, sa, w8, layer.wscale, lora, up, layer.bias, torch.bfloat16, schedule="tma")
    assert gluon.store_by_tma(kwargs, flags, want)
    got = w4a4_gemm(a8, sa, w8, layer.wscale, lora, up, layer.bias, torch.bfloat16,
                    config={"kwargs": kwargs, "num_warps": 4, "num_stages": 1})
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@pytest.mark.skipif(not SM90, reason="Gluon wgmma kernel: sm_90")
@pytest.mark.parametrize("up", ["staged", "chunked", "turn"])
@pytest.mark.parametrize("m,n,rank,gelu,dtype", [(2000, 3072, 96, False, torch.bfloat16),
                                                 (1999, 3000, 96, True, torch.bfloat16),
                                                 (700, 1536, 128, False, torch.bfloat16),
                                                 (513, 1024, 48, True, torch.float16),
                                                 (1000, 3072, 160, False, torch.bfloat16)])
def test_pingpong_wide_branch_same_bits(up, m, n, rank, gelu, dtype, triton_kernels):
    """A branch of several chunks (a LoRA-widened one), staged in the output tile and issued in one go (in the
    epilogue or in the turn) or taken a chunk at a time: the TMA Triton kernel's bits at odd M and N, chunks of 16,
    32 and 64, GELU, fp16 output; rank 160 is wider than the staging tile holds and keeps the chunked loop."""
    from svdq.kernels.act_quant import quantize_activation
    from svdq.kernels.gemm_w4a4 import expand_weight, w4a4_gemm

    layer = random_layer(n, 3072, rank, True, device=DEV, seed=m + rank)
    x = torch.randn(m, 3072, device=DEV, dtype=torch.bfloat16)
    a8, sa, lora = quantize_activation(x, layer.k_padded, layer.smooth, layer.proj_down)
    w8 = expand_weight(layer.qweight, layer.wmult)
    cfg = {"kwargs": {"SCHEDULE": "gluon", "PINGPONG": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128,
                      "STAGES": 4, "GROUP_M": 8, "UP": up}, "num_warps": 4, "num_stages": 1}
    want = w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, dtype, gelu=gelu, schedule="tma")
    got = w4a4_gemm(a8, sa, w8, layer.wscale, lora, layer.proj_up, layer.bias, dtype, gelu=gelu, config=cfg)
    torch.cuda.synchronize()
    assert torch.equal(got, want)


def test_wide_branch_staging_choice(monkeypatch):
    """Which branches the ping-pong epilogue stages in the output tile: several chunks, a TMA-stored tile that
    holds them (rank ≤ BLOCK_M), not in the turn; ``SVDQ_BRANCH_UP`` / ``UP`` switch it off, other values refused."""
    gluon = pytest.importorskip("svdq.kernels.gemm_w4a4_gluon")
    from svdq.kernels.gemm_w4a4 import branch_chunks

    def flags(rank):
        block_r, chunk = branch_chunks(rank)
        return {"HAS_LORA": rank > 0, "BLOCK_R": block_r, "R_CHUNK": chunk}

    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 4}
    monkeypatch.delenv("SVDQ_BRANCH_UP", raising=False)
    assert gluon.branch_staged(cfg, flags(96), True, False) and gluon.branch_staged(cfg, flags(128), True, False)
    assert gluon.branch_staged(cfg, flags(48), True, False)
    assert not gluon.branch_staged(cfg, flags(32), True, False)  # one chunk: nothing to batch
    assert not gluon.branch_staged(cfg, flags(64), True, False)
    assert not gluon.branch_staged(cfg, flags(0), True, False)
    assert not gluon.branch_staged(cfg, flags(160), True, False)  # 160 ranks x 128 columns: past the 128 x 128 tile
    assert not gluon.branch_staged(dict(cfg, BLOCK_M=64), flags(96), True, False)
    assert not gluon.branch_staged(cfg, flags(96), False, False)  # pointer stores: no staging tile
    assert not gluon.branch_staged(cfg, flags(96), True, True)
    assert not gluon.branch_staged(dict(cfg, UP="chunked"), flags(96), True, False)
    assert gluon.branch_staged(dict(cfg, UP="turn"), flags(96), True, False)  # staged, its MMAs in the turn
    assert gluon.staged_in_turn(dict(cfg, UP="turn")) and not gluon.staged_in_turn(dict(cfg, UP="chunked"))
    assert not gluon.staged_in_turn(cfg)  # opt-in: the default stages in the epilogue
    # the branch's own buffer is not counted where the staged branch or no branch leaves it unused
    five = dict(cfg, STAGES=5)
    assert gluon.pingpong_shared_bytes(five, flags(96), True) > gluon.H100_SHARED
    assert gluon.pingpong_shared_bytes(five, flags(96), True, staged=True) <= gluon.H100_SHARED
    assert gluon.pingpong_shared_bytes(five, flags(0), True) <= gluon.H100_SHARED
    c = torch.empty(64, 256, dtype=torch.bfloat16)
    assert gluon.store_by_tma(five, flags(96), c) and not gluon.store_by_tma(five, flags(32), c)
    assert not gluon.store_by_tma(dict(five, UP="chunked"), flags(96), c)
    monkeypatch.setenv("SVDQ_BRANCH_UP", "chunked")
    assert not gluon.branch_staged(dict(cfg, UP="staged"), flags(96), True, False)  # the variable over the config
    monkeypatch.setenv("SVDQ_BRANCH_UP", "staged")
    assert gluon.branch_staged(dict(cfg, UP="chunked"), flags(96), True, False)
    monkeypatch.setenv("SVDQ_BRANCH_UP", "later")
    with pytest.raises(ValueError, match="SVDQ_BRANCH_UP"):
        gluon.branch_staged(cfg, flags(96), True, False)


def test_store_choice(monkeypatch):
    """Which outputs the ping-pong kernel stores by TMA: 16-bit, 16-byte aligned base and row pitch, not
    accumulated into, a tile pair that fits in shared memory beside the ring; ``SVDQ_STORE`` / ``STORE`` switch it off, other values are refused."""
    gluon = pytest.importorskip("svdq.kernels.gemm_w4a4_gluon")
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 4}
    c = torch.empty(64, 256, dtype=torch.bfloat16)
    monkeypatch.delenv("SVDQ_STORE", raising=False)
    assert gluon.store_by_tma(cfg, {}, c)
    assert not gluon.store_by_tma(cfg, {"ACCUMULATE": True}, c)
    assert not gluon.store_by_tma(cfg, {}, c.float())
    assert not gluon.store_by_tma(cfg, {}, torch.empty(64, 257, dtype=torch.bfloat16)[:, :256])  # 514-byte rows
    assert not gluon.store_by_tma(cfg, {}, c.view(-1)[1:1 + 64 * 255].view(64, 255))  # base off 16 bytes
    assert not gluon.store_by_tma(dict(cfg, BLOCK_M=64, BLOCK_N=512), {}, c)
    # shared memory: 64 x 256 x 128 with four stages and a rank-32 branch needs 262 KB with the staged tiles
    wide = dict(cfg, BLOCK_M=64, BLOCK_N=256)
    r32 = {"HAS_LORA": True, "BLOCK_R": 32, "R_CHUNK": 32}
    assert gluon.pingpong_shared_bytes(wide, r32, True) > gluon.H100_SHARED
    assert gluon.pingpong_shared_bytes(wide, r32, False) <= gluon.H100_SHARED
    assert not gluon.store_by_tma(wide, r32, c)
    assert gluon.store_by_tma(wide, {}, c)  # no branch: its buffer drops out, and the tiles fit (225 KB)
    assert gluon.store_by_tma(cfg, r32, c)  # the shipped 128 x 128 tile: 209 KB
    assert not gluon.store_by_tma(dict(cfg, STORE="pointer"), {}, c)
    monkeypatch.setenv("SVDQ_STORE", "pointer")
    assert not gluon.store_by_tma(cfg, {}, c)
    assert not gluon.store_by_tma(dict(cfg, STORE="tma"), {}, c)  # the variable forces one way over the config
    monkeypatch.setenv("SVDQ_STORE", "tma")
    assert not gluon.store_by_tma(dict(cfg, STORE="pointer"), {}, c.float())  # still only where TMA can store
    assert gluon.store_by_tma(dict(cfg, STORE="pointer"), {}, c)
    monkeypatch.setenv("SVDQ_STORE", "async")
    with pytest.raises(ValueError, match="SVDQ_STORE"):
        gluon.store_by_tma(cfg, {}, c)


def test_branch_placement_choice(monkeypatch):
    """Which branches the ping-pong kernel issues in the turn: one chunk only, ``SVDQ_BRANCH`` / ``BRANCH`` can
    move it to the epilogue, anything else is refused by name."""
    gluon = pytest.importorskip("svdq.kernels.gemm_w4a4_gluon")
    from svdq.kernels.gemm_w4a4 import branch_chunks

    def flags(rank):
        block_r, chunk = branch_chunks(rank)
        return {"HAS_LORA": rank > 0, "BLOCK_R": block_r, "R_CHUNK": chunk}

    monkeypatch.delenv("SVDQ_BRANCH", raising=False)
    assert gluon.branch_in_turn({}, flags(32)) and gluon.branch_in_turn({}, flags(64))
    assert not gluon.branch_in_turn({}, flags(96))  # three chunks of 32: the epilogue's loop
    assert not gluon.branch_in_turn({}, flags(0))
    assert not gluon.branch_in_turn({"BRANCH": "epilogue"}, flags(32))
    monkeypatch.setenv("SVDQ_BRANCH", "epilogue")
    assert not gluon.branch_in_turn({}, flags(32))
    assert not gluon.branch_in_turn({"BRANCH": "turn"}, flags(32))  # the variable forces one way over the config
    monkeypatch.setenv("SVDQ_BRANCH", "turn")
    assert gluon.branch_in_turn({"BRANCH": "epilogue"}, flags(32))
    monkeypatch.setenv("SVDQ_BRANCH", "sideways")
    with pytest.raises(ValueError, match="SVDQ_BRANCH"):
        gluon.branch_in_turn({}, flags(32))


def test_tuner_offers_gluon_configs_only_where_they_run(monkeypatch):
    """The warp-specialized schedule is a candidate only for sm_90 calls with a 16-bit (or no) branch; fp32 data
    (fp32 dots in the epilogue) and other GPUs tune over the Triton kernels alone."""
    from svdq.kernels import gemm_w4a4

    if not gemm_w4a4.HAS_GLUON:
        pytest.skip("this Triton has no Gluon")
    tuner = gemm_w4a4._TUNERS["auto"]
    gluon_cfgs = [c for c in tuner.configs if c.kwargs.get("SCHEDULE") == "gluon"]
    assert gluon_cfgs, "auto tuner lists the Gluon configs"
    a8 = torch.zeros(4, 64, dtype=torch.int8)
    up = torch.zeros(8, 16, dtype=torch.bfloat16)
    args = (a8, None, None, None, None, up) + (None,) * 11
    for sm90, fp32, expect in [(True, False, True), (True, True, False), (False, False, False)]:
        monkeypatch.setattr(gemm_w4a4.gemm_w4a4_gluon, "usable", lambda a, u, ok=sm90: ok)
        got = tuner._candidates(args, {"HAS_LORA": True, "DOT_FP32": fp32})
        assert any(c in got for c in gluon_cfgs) == expect
        assert len(got) == len(tuner.configs) - (0 if expect else len(gluon_cfgs))


def test_launch_keys_accept_both_descriptor_kinds():
    """Launch-cache keys for Triton's and Gluon's host descriptors: hashable, and different tile shapes or layouts
    never share a compiled kernel."""
    from svdq.kernels import launch

    if not launch.HAS_HOST_DESCRIPTORS:
        pytest.skip("this Triton has no host descriptors")
    t = torch.zeros(64, 64, dtype=torch.int8)
    d1 = launch.TensorDescriptor(t, [64, 64], [64, 1], [32, 32])
    d2 = launch.TensorDescriptor(t, [64, 64], [64, 1], [64, 32])
    assert launch.is_descriptor(d1) and not launch.is_descriptor(t)
    assert hash(launch._spec(d1)) is not None and launch._spec(d1) != launch._spec(d2)
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    except ImportError:
        return
    g1 = GluonDescriptor(t, [64, 64], [64, 1], [32, 32], gl.NVMMASharedLayout.get_default_for([32, 32], gl.int8))
    g2 = GluonDescriptor(t, [64, 64], [64, 1], [32, 32], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8))
    assert launch.is_descriptor(g1)
    assert hash(launch._spec(g1)) is not None and launch._spec(g1) != launch._spec(g2)


def test_untuned_gemm_starts_from_the_measured_winners():
    """Without tuning (SVDQ_AUTOTUNE=0, graph capture before tuning) the GEMM tries the sweep winners first: the
    ping-pong Gluon kernel for big layers where it can run, else the large TMA tile, the two-per-SM tile for small
    ones; every other config stays behind them in its order."""
    from svdq.kernels import gemm_w4a4

    tuner = gemm_w4a4._TUNERS["auto"]

    def first(m, n, kp):
        args = (None,) * 8 + (m, n, kp)
        order = tuner._default_order(tuner.configs, args)
        assert sorted(map(id, order)) == sorted(map(id, tuner.configs))
        c = order[0]
        return c.kwargs["SCHEDULE"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs.get("PER_SM", 1), c.num_stages

    assert first(512, 12288, 3072) == ("tma", 128, 64, 2, 4)
    no_gluon = [c for c in tuner.configs if c.kwargs["SCHEDULE"] != "gluon"]
    big = (None,) * 8 + (4608, 12288, 3072)
    c = tuner._default_order(no_gluon, big)[0]
    assert (c.kwargs["SCHEDULE"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) == ("tma", 256, 128, 4)
    assert tuner._default_order(no_gluon, (None,) * 8 + (4608, 3072, 15360))[0].kwargs["SCHEDULE"] == "tma"
    if gemm_w4a4.HAS_GLUON:
        for shape in [(4608, 12288, 3072), (4608, 3072, 15360)]:
            c = tuner._default_order(tuner.configs, (None,) * 8 + shape)[0]
            assert c.kwargs.get("PINGPONG") and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (128, 128)


def test_shipped_tuned_configs_are_used_before_tuning_when_they_can_run(monkeypatch):
    """A shape the user's cache lacks takes the config shipped in ``kernels/tuned_configs.json`` (no tuning on the
    first image); one this install cannot run (here: a Gluon winner where Gluon is unusable) is tuned instead."""
    from svdq.kernels import autotune_cache, gemm_w4a4

    tuner = gemm_w4a4._TUNERS["auto"]
    monkeypatch.setattr(autotune_cache.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(autotune_cache.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(autotune_cache, "_cache", {})
    monkeypatch.setattr(autotune_cache, "_save", lambda: None)
    monkeypatch.setenv("SVDQ_AUTOTUNE", "1")
    tuned = []
    monkeypatch.setattr(tuner, "_tune", lambda args, flags, m, n: tuned.append((m, n)) or {"tuned": True})
    monkeypatch.setattr(gemm_w4a4.gemm_w4a4_gluon, "usable", lambda a, u: False)
    a8 = torch.zeros(4, 64, dtype=torch.int8)
    args = (a8,) + (None,) * 7 + (4608, 3072, 3072)
    flags = {"HAS_LORA": False}
    key = f"Test GPU|{tuner.name}|8192|3072|3072|HAS_LORA=False"
    tma = next(c for c in tuner.configs if c.kwargs["SCHEDULE"] == "tma")
    monkeypatch.setattr(autotune_cache, "_shipped_cache", {key: tuner._cfg_dict(tma)})
    assert tuner._lookup_or_tune(args, flags, 4608, 3072, 3072) == tuner._cfg_dict(tma) and not tuned
    if gemm_w4a4.HAS_GLUON:
        gluon = next(c for c in tuner.configs if c.kwargs["SCHEDULE"] == "gluon")
        monkeypatch.setattr(autotune_cache, "_shipped_cache", {key: tuner._cfg_dict(gluon)})
        assert tuner._lookup_or_tune(args, flags, 4608, 3072, 3072) == {"tuned": True} and tuned == [(4608, 3072)]


def test_every_shipped_config_is_a_tuner_candidate():
    """The shipped file only helps where its winner is one of the tuner's own configs (``_lookup_or_tune`` ignores
    any other and tunes the shape): a retune that writes a config the candidate list lacks (a key renamed, a
    candidate dropped) would silently bring first-call tuning back on the H100."""
    import json
    from pathlib import Path

    from svdq.kernels import gemm_w4a4

    if not gemm_w4a4.HAS_GLUON:
        pytest.skip("the shipped H100 winners include Gluon configs; this Triton has no Gluon")
    tuner = gemm_w4a4._TUNERS["auto"]
    table = json.loads((Path(gemm_w4a4.__file__).with_name("tuned_configs.json")).read_text())
    candidates = [tuner._cfg_dict(c) for c in tuner.configs]
    ours = {k: v for k, v in table.items() if k.split("|")[1] == tuner.name}
    assert len(ours) >= 40
    missing = [k for k, v in ours.items() if v not in candidates]
    assert not missing, missing[:3]
    assert any(v["kwargs"].get("BRANCH") == "epilogue" for v in ours.values())


def test_tuned_configs_override_and_reload(monkeypatch, tmp_path, caplog):
    """``SVDQ_TUNED_CONFIGS`` replaces the shipped file once ``reload_tuned_configs`` runs (which also drops every
    tuner's remembered choices); an unreadable file logs a warning and means "tune as shapes come", never a crash.
    Call plans are keyed by the variable, so a switch mid-run re-records them."""
    from svdq.kernels import autotune_cache, dispatch, gemm_w4a4

    tuner = gemm_w4a4._TUNERS["auto"]
    own = tmp_path / "own.json"
    own.write_text('{"GPU|w4a4_gemm_auto_ws|512|64|64": {"kwargs": {"SCHEDULE": "pointer"}}}')
    monkeypatch.setattr(autotune_cache, "_shipped_cache", None)
    monkeypatch.setenv("SVDQ_TUNED_CONFIGS", str(own))
    tuner._fast["stale"] = {"kwargs": {}}
    autotune_cache.reload_tuned_configs()
    assert "stale" not in tuner._fast
    assert list(autotune_cache.shipped()) == ["GPU|w4a4_gemm_auto_ws|512|64|64"]
    monkeypatch.setenv("SVDQ_TUNED_CONFIGS", str(tmp_path / "missing.json"))
    autotune_cache.reload_tuned_configs()
    with caplog.at_level("WARNING", logger="svdq"):
        assert autotune_cache.shipped() == {}
    assert "SVDQ_TUNED_CONFIGS" in caplog.text
    monkeypatch.delenv("SVDQ_TUNED_CONFIGS")
    autotune_cache.reload_tuned_configs()
    assert autotune_cache.shipped() and "SVDQ_TUNED_CONFIGS" in dispatch._ENV
    monkeypatch.setattr(autotune_cache, "_shipped_cache", None)


def test_shipped_tuned_configs_file_is_valid():
    """Every shipped entry names a kernel config that exists in this version's tuner lists."""
    from svdq.kernels import autotune_cache, gemm_w4a4

    shipped = autotune_cache.shipped()
    names = {t.name: t for t in gemm_w4a4._TUNERS.values()}
    for key, cfg in shipped.items():
        gpu, name, bucket, n, kp, *flags = key.split("|")
        assert name in names, key
        assert any(names[name]._cfg_dict(c) == cfg for c in names[name].configs), key
        assert int(bucket) & (int(bucket) - 1) == 0 and int(n) > 0 and int(kp) % 64 == 0, key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_correctly_after_the_arena_grows(monkeypatch):
    """A graph captured over svdq calls bakes in the arena's buffers; a later, larger call grows the arena. The
    graph must still replay correct results (the old buffers are kept once anything was captured)."""
    from svdq.kernels import dispatch

    monkeypatch.setattr(dispatch, "_arenas", {})  # a fresh arena, so the large call below really grows it
    layer = random_layer(256, 320, rank=32, device="cuda")
    static_x = torch.randn(64, 320, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compile, plan
        for _ in range(2):
            dispatch.svdq_linear(static_x, layer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = dispatch.svdq_linear(static_x, layer)
    for rows in (None, 4096):
        if rows:  # grow every arena buffer, then reuse the freed memory, then replay the old graph
            dispatch.svdq_linear(torch.randn(rows, 320, device="cuda", dtype=torch.bfloat16), layer)
            junk = [torch.full((1 << 22,), 7, dtype=torch.uint8, device="cuda") for _ in range(4)]
            assert dispatch.arena(static_x.device).retired and junk
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, dispatch.svdq_linear(x, layer))


def _replay_with_descriptor(w, make):
    """A plan recorded from one launch: ``make()`` gives the recording call's input and output, the launch's
    arguments (a TMA descriptor on one of the two among them) and that tensor; the plan must not keep it alive.
    Replayed on a new input: (the replayed launch's arguments, the replay's output, the new input)."""
    import gc
    import weakref

    from svdq.kernels.dispatch import _Arena, _Plan

    x2, y, args, dropped = make()  # made here, so that no caller's frame keeps them alive
    calls = []
    plan = _Plan.build([(lambda *a: calls.append(a), args)], x2, y, w, _Arena(torch.device("cpu")))
    assert plan is not None
    gone = weakref.ref(dropped)
    del x2, y, args, dropped
    gc.collect()
    assert gone() is None  # the plan holds the descriptor's fields, not the recording call's tensor
    x_new = torch.randn(64, 128, dtype=torch.bfloat16)
    out = plan.run(x_new)
    return calls[-1], out, x_new


def test_call_plan_remakes_the_output_descriptor():
    """A recorded launch whose TMA store descriptor wraps the call's output is replayed with a descriptor on the
    new output (same fields), and the plan does not keep the recording call's output alive."""
    pytest.importorskip("svdq.kernels.gemm_w4a4_gluon")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    w = random_layer(256, 128, 16, seed=3)
    layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)

    def make():
        x2 = torch.randn(64, 128, dtype=torch.bfloat16)
        y = torch.empty(64, 256, dtype=torch.bfloat16)
        return x2, y, (x2, w.qweight, TensorDescriptor(y, [64, 256], [256, 1], [64, 128], layout)), y

    got, out, x_new = _replay_with_descriptor(w, make)
    assert got[0] is x_new and got[1] is w.qweight
    assert isinstance(got[2], TensorDescriptor) and got[2].base is out
    assert list(got[2].block_shape) == [64, 128] and got[2].layout == layout and list(got[2].shape) == [64, 256]


def test_call_plan_remakes_the_input_descriptor():
    """A recorded launch whose TMA load descriptor wraps the call's input (the activation stream) is replayed with a
    descriptor on the new input, and the plan does not keep the recording call's input alive."""
    from svdq.kernels import launch

    if not launch.HAS_HOST_DESCRIPTORS:
        pytest.skip("this Triton has no host-side descriptors")
    w = random_layer(256, 128, 16, seed=4)

    def make():
        x2 = torch.randn(64, 128, dtype=torch.bfloat16)
        y = torch.empty(64, 256, dtype=torch.bfloat16)
        return x2, y, (launch.TensorDescriptor(x2, [64, 128], [128, 1], [32, 128]), w.qweight, y), x2

    got, out, x_new = _replay_with_descriptor(w, make)
    assert isinstance(got[0], launch.TensorDescriptor) and got[0].base is x_new
    assert list(got[0].block_shape) == [32, 128] and list(got[0].shape) == [64, 128]
    assert got[1] is w.qweight and got[2] is out


REPEAT_SHAPES = [  # (M, K, N, rank): FLUX layers at batch 1-2, rank 32 and rank 32 + a LoRA of 64
    (4608, 3072, 3072, 32), (4608, 3072, 12288, 96), (8192, 12288, 3072, 32), (9216, 15360, 3072, 96),
    (9216, 3072, 21504, 32), (1024, 3072, 12288, 96), (512, 3072, 9216, 32), (2, 3072, 18432, 0),
]


@pytest.mark.skipif(not GPU, reason="a race between a kernel's warps only shows on a GPU")
@pytest.mark.parametrize("m,k,n,rank", REPEAT_SHAPES)
def test_layer_results_repeat_bit_for_bit(m, k, n, rank, triton_kernels, monkeypatch):
    """The same call on the same input gives the same bits, call after call, with other GPU work of changing size in
    between to shift the timing. Every kernel on the W4A4 path reduces in a fixed order, so any difference is a race:
    session 17 found one (pass 1's stream with a LoRA-widened branch, 1e-3 off and varying) that the tolerance-based
    tests had passed for two sessions."""
    monkeypatch.setenv("SVDQ_AUTOTUNE", "0")
    kind = "w4a16" if m <= 64 else "w4a4"
    layer = random_layer(n, k, rank, True, kind=kind, device=DEV, seed=m + n)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    noise = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)
    first = triton_kernels.svdq_linear(x, layer).clone()
    for i in range(6):
        side = noise[: 512 * (i + 1)] @ noise[:, : 512 * (6 - i)]  # other work, of another size each time
        got = triton_kernels.svdq_linear(x, layer)
        assert torch.equal(got, first), f"call {i + 2}: {(got != first).sum().item()} outputs differ"
        del side
