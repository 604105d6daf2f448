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
