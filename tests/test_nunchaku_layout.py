"""Nunchaku layouts (shared/docs/nunchaku-format.md §5): spec-derived packers, exact unpacking, byte positions."""

import torch

from svdq.quant.nunchaku import (
    pack_channel_groups,
    pack_lora_down,
    pack_lora_up,
    pack_qweight,
    unpack_channel_groups,
    unpack_lora_down,
    unpack_lora_up,
    unpack_qweight,
)


def test_qweight_roundtrip():
    codes = torch.randint(0, 16, (256, 384), dtype=torch.uint8)
    packed = pack_qweight(codes)
    assert packed.dtype == torch.int8 and packed.shape == (256, 192)
    assert torch.equal(unpack_qweight(packed), codes)


def test_qweight_byte_positions_follow_the_spec():
    def where(r, k, n=256, kk=128):
        codes = torch.zeros(n, kk, dtype=torch.uint8)
        codes[r, k] = 0xA
        flat = pack_qweight(codes).view(torch.uint8).reshape(-1)
        idx = int(flat.nonzero()[0])
        return idx, "low" if flat[idx] == 0xA else "high"

    assert where(0, 0) == (0, "low")
    assert where(8, 32) == (12, "low")  # row g+8 -> word 3 with k in the second 32
    assert where(1, 9) == (80, "high")  # lane 5 (g=1, t=1), j=1 -> high nibble of byte 0
    assert where(130, 70) == (3 * 4096 + 128 + 3, "low")  # N-tile 1, K-tile 1, lane 8, j=6


def test_channel_groups_roundtrip_and_positions():
    vals = torch.randn(4, 256)
    stored = pack_channel_groups(vals)
    assert torch.equal(unpack_channel_groups(stored), vals)
    one = torch.arange(128, dtype=torch.float32)
    s = pack_channel_groups(one)
    assert s[:4].tolist() == [0, 1, 8, 9] and s[4:8].tolist() == [2, 3, 10, 11] and s[16] == 16
    two = torch.stack([torch.zeros(128), torch.ones(128)])
    assert pack_channel_groups(two).reshape(-1)[128:256].eq(1).all()  # (block, group, lane, value) order


def test_lowrank_roundtrip_and_positions():
    up = torch.randn(256, 48)
    down = torch.randn(384, 32)
    assert torch.equal(unpack_lora_up(pack_lora_up(up)), up)
    assert torch.equal(unpack_lora_down(pack_lora_down(down)), down)
    m = torch.zeros(16, 16)
    m[8, 1] = 1.0
    assert int(pack_lora_up(m).reshape(-1).nonzero()[0]) == 5  # lane 0, row half 1, pair 1
    big = torch.zeros(32, 16)
    big[16, 0] = 1.0  # second channel tile comes after all rank tiles of the first
    assert int(pack_lora_up(big).reshape(-1).nonzero()[0]) == 256


def test_w4a4_layer_from_known_float_matrices():
    from svdq.kernels.reference import svdq_linear_reference
    from svdq.quant.nunchaku import pack_w4a4_int4_layer, read_w4a4_int4_layer
    from svdq.quant.nunchaku_file import convert_w4a4

    g = torch.Generator().manual_seed(0)
    n, k, r = 200, 300, 20  # nothing a multiple of the tiles: padding on every axis
    codes = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
    kp = 384
    scales = (torch.rand(kp // 64, n, generator=g) * 0.01 + 0.001).to(torch.bfloat16)
    down = (torch.randn(k, r, generator=g) * 0.05).to(torch.bfloat16)
    up = (torch.randn(n, r, generator=g) * 0.05).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16)
    bias = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16)
    tensors = pack_w4a4_int4_layer(codes, scales, down, up, smooth, bias)
    assert tensors["qweight"].shape == (256, 192) and tensors["wscales"].shape == (6, 256)
    assert tensors["lora_down"].shape == (384, 32) and tensors["lora_up"].shape == (256, 32)

    f = read_w4a4_int4_layer(tensors, k, n, rank=r)
    expect = codes.float() * scales.float()[: k // 64 + 1].repeat_interleave(64, 0)[:k].T
    assert torch.equal(f["residual"], expect)  # exactly the float matrices we started from
    assert torch.equal(f["down"], down.float()) and torch.equal(f["up"], up.float())
    assert torch.equal(f["smooth"], smooth.float()) and torch.equal(f["bias"], bias.float())

    layer, err = convert_w4a4(tensors, n, k, "int4", False, "requantize", "test")
    assert 0 <= err < 0.1  # requantizing 16-bit group scales to integer multipliers: measured, small
    x = torch.randn(5, k, generator=g)
    y = svdq_linear_reference(x, layer).float()
    # reference from the float matrices: quantized activations of x/λ times the exact residual, plus the branch
    from svdq.quant.formats import fake_quant_activation

    xq = fake_quant_activation(x, "int4", smooth=smooth)
    y_ref = xq @ f["residual"].T + (x @ down.float()) @ up.float().T + bias.float()
    assert float((y - y_ref).norm() / y_ref.norm()) < 0.1


def test_awq_qweight_roundtrip_and_positions():
    from svdq.quant.nunchaku import pack_awq_qweight, unpack_awq_qweight

    q = torch.randint(0, 16, (16, 192), dtype=torch.uint8)
    packed = pack_awq_qweight(q)
    assert packed.dtype == torch.int32 and packed.shape == (4, 96)
    assert torch.equal(unpack_awq_qweight(packed), q)
    one = torch.zeros(8, 64, dtype=torch.uint8)
    one[1, 9] = 0xA  # row 1 of group 0, chunk 0, first 32-block, word 1, nibble 1 (9 = 1 + 8)
    words = pack_awq_qweight(one).view(torch.int16).reshape(-1)
    idx = int(words.nonzero()[0])
    assert idx == 1 * 16 + 1 and int(words[idx]) == 0xA << 4


def test_awq_layer_with_chunk_interleave_and_plus_one():
    from svdq.quant.nunchaku import interleave_chunks, pack_awq_qweight, read_awq_layer

    g = torch.Generator().manual_seed(1)
    n, k, s = 24, 128, 6
    q = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    scales = torch.rand(k // 64, n, generator=g) * 0.01
    zeros = -7 * scales
    bias = torch.randn(n, generator=g)
    w_true = (q.float().reshape(n, 2, 64) * scales.T[:, :, None] + zeros.T[:, :, None]).reshape(n, k)
    stored_bias = bias.clone()
    stored_bias[4:8] += 1.0  # chunk 1 (scale_msa) and chunk 4 (scale_mlp) carry the folded +1
    stored_bias[16:20] += 1.0
    t = {
        "qweight": pack_awq_qweight(interleave_chunks(q, s)),
        "wscales": interleave_chunks(scales, s, dim=1),
        "wzeros": interleave_chunks(zeros, s, dim=1),
        "bias": interleave_chunks(stored_bias, s),
    }
    f = read_awq_layer(t, k, n, chunks=s, plus_one_chunks=(1, 4))
    assert torch.allclose(f["weight"], w_true) and torch.allclose(f["bias"], bias)


def test_nvfp4_micro_scales_roundtrip_and_positions():
    from svdq.quant.nunchaku import pack_nvfp4_scales, unpack_nvfp4_scales

    s = (torch.rand(256, 16) * 4 + 0.1).to(torch.float8_e4m3fn)
    stored = pack_nvfp4_scales(s)
    assert stored.shape == (16, 256) and stored.dtype == torch.float8_e4m3fn
    assert torch.equal(unpack_nvfp4_scales(stored).view(torch.uint8), s.view(torch.uint8))
    one = torch.zeros(128, 4).to(torch.float8_e4m3fn)
    one[9, 2] = 1.0  # channel 9 = 32*0 + 8*1 + 1 -> lane 5 (l%4 = 1, l//4 = 1), word 0; third group -> byte 2
    flat = pack_nvfp4_scales(one).view(torch.uint8).reshape(-1)
    assert int(flat.nonzero()[0]) == 5 * 16 + 0 * 4 + 2
