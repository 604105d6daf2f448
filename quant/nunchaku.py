"""Nunchaku (deepcompressor) tensor layouts: pack and unpack, written from ``shared/docs/nunchaku-format.md`` §5.

These are the byte-level building blocks of reading Nunchaku SVDQuant checkpoints into our layout. Every unpacker
has its packer beside it (the spec-derived generator the tests use): ``unpack(pack(x)) == x`` and the byte
positions are checked against the spec's lane tables.
"""

from __future__ import annotations

import torch

N_TILE = 128  # output channels per weight tile (warp_n)
K_TILE = 64  # input channels per weight tile


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ---------------------------------------------------------------------------------------------- §5.1 qweight
# codes [N, K] view (NT, sub 8, half 2, g 8, KT, khalf 2, t 4, j 8) <-> storage (NT, KT, sub, g, t, half, khalf, j)
_QW_PERM = (0, 4, 1, 3, 6, 2, 5, 7)
_QW_INV = tuple(_QW_PERM.index(i) for i in range(8))


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (values 0..15, i.e. nibbles) -> Nunchaku ``qweight`` int8 [N, K/2] (MMA fragment order)."""
    n, k = codes.shape
    _check(n % N_TILE == 0 and k % (2 * K_TILE) == 0, f"qweight needs N % 128 == 0 and K % 128 == 0, got {n}x{k}")
    c = (codes.to(torch.int16) & 0xF).reshape(n // N_TILE, 8, 2, 8, k // K_TILE, 2, 4, 8)
    c = c.permute(*_QW_PERM).reshape(-1, 2)
    b = (c[:, 0] | (c[:, 1] << 4)).to(torch.uint8)
    return b.view(torch.int8).reshape(n, k // 2)


def unpack_qweight(packed: torch.Tensor) -> torch.Tensor:
    """Nunchaku ``qweight`` int8 [N, K/2] -> 4-bit codes [N, K] as uint8 nibbles (0..15)."""
    n, half = packed.shape
    k = half * 2
    _check(n % N_TILE == 0 and k % (2 * K_TILE) == 0, f"qweight shape {tuple(packed.shape)} is not a Nunchaku layout")
    b = packed.contiguous().view(torch.uint8).reshape(-1).to(torch.int16)
    nib = torch.stack([b & 0xF, (b >> 4) & 0xF], dim=-1)  # j pairs
    nib = nib.reshape(n // N_TILE, k // K_TILE, 8, 8, 4, 2, 2, 8).permute(*_QW_INV)
    return nib.reshape(n, k).to(torch.uint8)


# ------------------------------------------------------------------------------------ §5.2 per-channel order
def _channel_order() -> torch.Tensor:
    """Position p in a 128-channel block's storage -> channel: lane l holds c, c+1, c+8, c+9, c = 16(l/4) + 2(l%4)."""
    lanes = torch.arange(32)
    c = 16 * (lanes // 4) + 2 * (lanes % 4)
    return torch.stack([c, c + 1, c + 8, c + 9], dim=1).reshape(-1)  # [128]


def pack_channel_groups(values: torch.Tensor) -> torch.Tensor:
    """[G, N] group values (or [N] for one group) -> storage order (N-block, group, lane, 4) under the same shape."""
    one = values.dim() == 1
    v = values.reshape(1, -1) if one else values
    g, n = v.shape
    _check(n % N_TILE == 0, f"per-channel tensors need N % 128 == 0, got {n}")
    order = _channel_order().to(v.device)
    blocks = v.reshape(g, n // N_TILE, N_TILE)[:, :, order]  # [G, NB, 128] in storage order within a block
    flat = blocks.permute(1, 0, 2).reshape(-1)  # (NB, G, 128)
    return flat.reshape(values.shape)


def unpack_channel_groups(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_channel_groups`: storage under nominal [G, N] (or [N]) -> logical values."""
    one = stored.dim() == 1
    s = stored.reshape(1, -1) if one else stored
    g, n = s.shape
    _check(n % N_TILE == 0, f"per-channel tensors need N % 128 == 0, got {n}")
    order = _channel_order().to(s.device)
    flat = s.reshape(-1).reshape(n // N_TILE, g, N_TILE)
    out = torch.empty(g, n // N_TILE, N_TILE, dtype=s.dtype, device=s.device)
    out[:, :, order] = flat.permute(1, 0, 2)
    out = out.reshape(g, n)
    return out.reshape(stored.shape)


# ------------------------------------------------------------------------------------------- §5.4 low rank
def _fragment_index() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) within a 16x16 fragment for storage position p = lane*8 + rowhalf*4 + colhalf*2 + pair."""
    lane = torch.arange(32).repeat_interleave(8)
    rest = torch.arange(8).repeat(32)
    rowhalf, colhalf, pair = rest // 4, (rest // 2) % 2, rest % 2
    row = lane // 4 + 8 * rowhalf
    col = 2 * (lane % 4) + 8 * colhalf + pair
    return row, col


def _pack_fragments(m: torch.Tensor, rows_are_channels: bool) -> torch.Tensor:
    """Logical matrix m [A, B] cut in 16x16 fragments, channel-tile-major, then rank-tile."""
    a, b = m.shape
    _check(a % 16 == 0 and b % 16 == 0, f"low-rank matrices need both dims % 16 == 0, got {a}x{b}")
    row, col = _fragment_index()
    tiles = m.reshape(a // 16, 16, b // 16, 16).permute(0, 2, 1, 3)  # [TA, TB, 16, 16]
    if not rows_are_channels:  # channels are the columns: channel tiles are the outer loop
        tiles = tiles.permute(1, 0, 2, 3)
    frag = tiles[:, :, row, col]  # [T_outer, T_inner, 256]
    return frag.reshape(-1)


def _unpack_fragments(flat: torch.Tensor, a: int, b: int, rows_are_channels: bool) -> torch.Tensor:
    row, col = _fragment_index()
    ta, tb = a // 16, b // 16
    outer, inner = (ta, tb) if rows_are_channels else (tb, ta)
    frag = flat.reshape(outer, inner, 256)
    tiles = torch.empty(outer, inner, 16, 16, dtype=flat.dtype, device=flat.device)
    tiles[:, :, row, col] = frag
    if not rows_are_channels:
        tiles = tiles.permute(1, 0, 2, 3)
    return tiles.permute(0, 2, 1, 3).reshape(a, b)


def pack_lora_up(up: torch.Tensor) -> torch.Tensor:
    """Logical up [N, R] -> Nunchaku ``lora_up``/``proj_up`` (nominal [N, R])."""
    return _pack_fragments(up, rows_are_channels=True).reshape(up.shape)


def unpack_lora_up(stored: torch.Tensor) -> torch.Tensor:
    n, r = stored.shape
    return _unpack_fragments(stored.reshape(-1), n, r, rows_are_channels=True)


def pack_lora_down(down: torch.Tensor) -> torch.Tensor:
    """Logical down [K, R] (our proj_down) -> Nunchaku ``lora_down`` (fragments of [R, K], nominal [K, R])."""
    k, r = down.shape
    return _pack_fragments(down.T.contiguous(), rows_are_channels=False).reshape(k, r)


def unpack_lora_down(stored: torch.Tensor) -> torch.Tensor:
    k, r = stored.shape
    return _unpack_fragments(stored.reshape(-1), r, k, rows_are_channels=False).T.contiguous()


# ------------------------------------------------------------------------------ W4A4 INT4 layer conversion
def _pad(t: torch.Tensor, shape: tuple, value: float = 0.0) -> torch.Tensor:
    out = torch.full(shape, value, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def pack_w4a4_int4_layer(codes: torch.Tensor, scales: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                         smooth: torch.Tensor, bias: torch.Tensor, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Spec-derived writer of one Nunchaku INT4 W4A4 layer (engine names) from logical tensors.

    codes [N, K] signed -8..7, scales [K/64, N] group scales, down [K, R] (already divided by λ), up [N, R],
    smooth [K], bias [N]. N and K are padded to 128 (scales/bias/smooth with 1, codes/low-rank with 0) and R to 16.
    """
    n, k = codes.shape
    r = down.shape[1]
    np_, kp, rp = -(-n // 128) * 128, -(-k // 128) * 128, -(-r // 16) * 16
    g = kp // 64
    g_even = g + (g % 2)
    return {
        "qweight": pack_qweight(_pad(codes.to(torch.int16) & 0xF, (np_, kp)).to(torch.uint8)),
        "wscales": pack_channel_groups(_pad(scales.to(dtype), (g_even, np_), 1.0)),
        "lora_down": pack_lora_down(_pad(down.to(dtype), (kp, rp))),
        "lora_up": pack_lora_up(_pad(up.to(dtype), (np_, rp))),
        "smooth": pack_channel_groups(_pad(smooth.to(dtype), (kp,), 1.0)),
        "smooth_orig": pack_channel_groups(_pad(smooth.to(dtype), (kp,), 1.0)),
        "bias": pack_channel_groups(_pad(bias.to(dtype), (np_,), 1.0)),
    }


def read_w4a4_int4_layer(t: dict[str, torch.Tensor], in_features: int, out_features: int, rank: int | None = None):
    """A Nunchaku INT4 W4A4 layer (engine or Python-module tensor names) as logical float tensors.

    Returns dict(residual [N, K] = code * group scale, down [K, R], up [N, R], smooth [K], bias [N]) with padding
    cropped. ``rank`` crops zero-padded ranks (default: keep all).
    """
    get = lambda *names: next((t[n] for n in names if n in t), None)  # noqa: E731
    qweight, wscales = get("qweight"), get("wscales")
    down, up = get("lora_down", "proj_down"), get("lora_up", "proj_up")
    smooth, bias = get("smooth", "smooth_factor"), get("bias")
    missing = [n for n, v in (("qweight", qweight), ("wscales", wscales), ("lora_down", down), ("lora_up", up)) if v is None]
    if missing:
        raise ValueError(f"Nunchaku W4A4 layer is missing tensors: {missing}")
    if wscales.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"wscales dtype {wscales.dtype}: this is an NVFP4 layer, not INT4")
    codes = unpack_qweight(qweight).to(torch.int16)
    codes = torch.where(codes >= 8, codes - 16, codes)
    scales = unpack_channel_groups(wscales).float()  # [G_even, N_pad]
    np_, kp = codes.shape
    residual = codes.float().reshape(np_, kp // 64, 64) * scales[: kp // 64].T[:, :, None]
    residual = residual.reshape(np_, kp)[:out_features, :in_features]
    d = unpack_lora_down(down).float()[:in_features]
    u = unpack_lora_up(up).float()[:out_features]
    if rank is not None:
        d, u = d[:, :rank], u[:, :rank]
    sm = unpack_channel_groups(smooth).float()[:in_features] if smooth is not None else torch.ones(in_features)
    b = unpack_channel_groups(bias).float()[:out_features] if bias is not None else None
    return {"residual": residual, "down": d, "up": u, "smooth": sm, "bias": b}


# ------------------------------------------------------------------------------------- §6 AWQ W4A16 layers
def pack_awq_qweight(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit q [N, K] -> TinyChat ``qweight`` int32 [N/4, K/2] (§6).

    Rows in groups of 4; per 64-wide K chunk the four rows' 16 int16 words follow one another; within every 32 K
    values, word i holds k = i, i+8, i+16, i+24 in nibbles 0..3.
    """
    n, k = q.shape
    _check(n % 4 == 0 and k % 64 == 0, f"AWQ qweight needs N % 4 == 0 and K % 64 == 0, got {n}x{k}")
    v = (q.to(torch.int32) & 0xF).reshape(n // 4, 4, k // 64, 2, 4, 8)  # (group, r, chunk, s, nibble, i)
    v = v.permute(0, 2, 1, 3, 5, 4)  # (group, chunk, r, s, i, nibble)
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    words = (v << shifts).sum(-1).to(torch.int32)  # 16-bit values
    words = words.reshape(n // 4, k).to(torch.int16)
    return words.view(torch.int32).reshape(n // 4, k // 2)


def unpack_awq_qweight(packed: torch.Tensor) -> torch.Tensor:
    """TinyChat ``qweight`` int32 [N/4, K/2] -> unsigned 4-bit q [N, K] (uint8)."""
    g, half = packed.shape
    k = half * 2
    words = packed.contiguous().view(torch.int16).reshape(g, k // 64, 4, 2, 8).to(torch.int32) & 0xFFFF
    nib = torch.stack([(words >> s) & 0xF for s in (0, 4, 8, 12)], dim=-1)  # (group, chunk, r, s, i, nibble)
    nib = nib.permute(0, 2, 1, 3, 5, 4)  # (group, r, chunk, s, nibble, i)
    return nib.reshape(g * 4, k).to(torch.uint8)


def deinterleave_chunks(x: torch.Tensor, chunks: int, dim: int = 0) -> torch.Tensor:
    """Undo AWQ chunk interleaving: channel j of chunk s is stored at j * S + s (weights, scales, bias)."""
    x = x.movedim(dim, 0)
    n = x.shape[0]
    _check(n % chunks == 0, f"{n} channels do not split into {chunks} chunks")
    out = x.reshape(n // chunks, chunks, *x.shape[1:]).transpose(0, 1).reshape(n, *x.shape[1:])
    return out.movedim(0, dim)


def interleave_chunks(x: torch.Tensor, chunks: int, dim: int = 0) -> torch.Tensor:
    x = x.movedim(dim, 0)
    n = x.shape[0]
    out = x.reshape(chunks, n // chunks, *x.shape[1:]).transpose(0, 1).reshape(n, *x.shape[1:])
    return out.movedim(0, dim)


def read_awq_layer(t: dict[str, torch.Tensor], in_features: int, out_features: int, chunks: int = 1,
                   plus_one_chunks: tuple = ()) -> dict[str, torch.Tensor]:
    """An AWQ W4A16 modulation layer as logical float weight [N, K] and bias [N] (chunk order restored; the "+1"
    folded into the ``plus_one_chunks`` of the bias removed again, so the layer computes what ComfyUI's does)."""
    q = unpack_awq_qweight(t["qweight"]).float()  # [N, K] in stored (interleaved) row order
    groups = q.shape[1] // 64
    scales = t["wscales"].float()[:groups]  # plain row-major [G, N] (not fragment-packed)
    zeros = t["wzeros"].float()[:groups]
    w = q.reshape(q.shape[0], groups, 64) * scales.T[:, :, None] + zeros.T[:, :, None]
    w = deinterleave_chunks(w.reshape(q.shape[0], -1), chunks)[:out_features, :in_features]
    bias = t.get("bias")
    b = deinterleave_chunks(bias.float(), chunks)[:out_features] if bias is not None else None
    if b is not None and plus_one_chunks:
        per = out_features // chunks
        for c in plus_one_chunks:
            b[c * per : (c + 1) * per] -= 1.0
    return {"weight": w, "bias": b}


# ---------------------------------------------------------------------------------- §5.3 NVFP4 micro-scales
def _nvfp4_channel_index() -> torch.Tensor:
    """[32 lanes, 4 words] -> channel within a 128-block: word p of lane l is channel 32p + 8(l % 4) + l // 4."""
    lane = torch.arange(32)[:, None]
    p = torch.arange(4)[None, :]
    return 32 * p + 8 * (lane % 4) + lane // 4


def pack_nvfp4_scales(scales: torch.Tensor) -> torch.Tensor:
    """E4M3 group scales [N, K/16] -> Nunchaku ``wscales`` (nominal [K/16, N]), order (N-block, K-tile, lane, word, byte)."""
    n, g16 = scales.shape
    _check(n % N_TILE == 0 and g16 % 4 == 0, f"NVFP4 scales need N % 128 == 0 and K % 64 == 0, got {n}x{g16 * 16}")
    b = scales.contiguous().view(torch.uint8).reshape(n // N_TILE, N_TILE, g16 // 4, 4)  # (NB, ch, KT, group)
    ch = _nvfp4_channel_index()
    out = b[:, ch]  # (NB, lane, word, KT, group)
    out = out.permute(0, 3, 1, 2, 4).reshape(g16, n)
    return out.contiguous().view(torch.float8_e4m3fn)


def unpack_nvfp4_scales(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nvfp4_scales`: returns E4M3 scales [N, K/16]."""
    g16, n = stored.shape
    b = stored.contiguous().view(torch.uint8).reshape(n // N_TILE, g16 // 4, 32, 4, 4)  # (NB, KT, lane, word, byte)
    out = torch.empty(n // N_TILE, N_TILE, g16 // 4, 4, dtype=torch.uint8)
    out[:, _nvfp4_channel_index()] = b.permute(0, 2, 3, 1, 4)
    return out.reshape(n, g16).view(torch.float8_e4m3fn)
