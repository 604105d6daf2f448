"""Spec-derived generator of Nunchaku SVDQuant files (shared/docs/nunchaku-format.md), for tests.

From known float matrices it writes layers in Nunchaku's packed layouts (quant.nunchaku packers) and, beside
them, the same numbers as our own layer objects, so a test can check the reader against ground truth.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from svdq.kernels.reference import QuantizedLinearWeights
from svdq.quant.formats import pack_int4, quantize_nvfp4
from svdq.quant.layer import GELU_SHIFT
from svdq.quant.nunchaku import (
    interleave_chunks,
    pack_awq_qweight,
    pack_channel_groups,
    pack_lora_down,
    pack_lora_up,
    pack_nvfp4_scales,
    pack_qweight,
    pack_w4a4_int4_layer,
)


def _pad(t, shape, value=0.0):
    out = torch.full(shape, value, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _up128(n):
    return -(-n // 128) * 128


def logical_w4a4(w: torch.Tensor, b: torch.Tensor | None, rank: int, gen: torch.Generator, precision: str = "int4",
                 shift: bool = False, dtype=torch.bfloat16) -> dict:
    """An SVDQuant decomposition of w [N, K] in Nunchaku's terms: codes, 16-bit (INT4) or E4M3 (NVFP4) group
    scales, down [K, R] pre-divided by λ, up [N, R], λ [K], bias with the shift compensation folded in."""
    n, k = w.shape
    lam = torch.exp2(torch.rand(k, generator=gen) * 2 - 1).to(dtype).float()
    ws = w.float() * lam[None, :]
    u, s, vh = torch.linalg.svd(ws, full_matrices=False)
    up = (u[:, :rank] * s[:rank]).to(dtype)
    down_s = vh[:rank].T
    resid = ws - up.float() @ down_s.T
    down = (down_s / lam[:, None]).to(dtype)
    out = {"n": n, "k": k, "smooth": lam.to(dtype), "down": down, "up": up, "precision": precision}
    if precision == "int4":
        g = resid.reshape(n, k // 64, 64)
        scales = (g.abs().amax(-1) / 7).clamp(min=1e-8).to(dtype)  # [N, K/64]
        codes = torch.round(g / scales.float()[:, :, None]).clamp(-8, 7).to(torch.int8).reshape(n, k)
        deq = (codes.float().reshape(n, k // 64, 64) * scales.float()[:, :, None]).reshape(n, k)
        out.update(codes=codes, scales=scales)
    else:
        q = quantize_nvfp4(resid)
        q.tensor_scale = q.tensor_scale.to(dtype).float().reshape(1)  # Nunchaku stores it in the model dtype
        out.update(codes=q.codes, scales=q.scales, wtscale=q.tensor_scale)
        deq = q.dequantize()[:, :k]
    bias = b.float() if b is not None else (torch.zeros(n) if shift else None)
    if shift:
        bias = bias - deq @ (GELU_SHIFT / lam)
    out["bias"] = None if bias is None else bias.to(dtype)
    out["shift"] = shift
    out["residual"] = deq
    return out


def pack_w4a4(L: dict, dtype=torch.bfloat16, with_bias: bool = True, wcscales: bool = False) -> dict[str, torch.Tensor]:
    """Nunchaku tensors (engine names) of a logical W4A4 layer."""
    n, k = L["n"], L["k"]
    bias = L["bias"] if (with_bias and L["bias"] is not None) else torch.zeros(n, dtype=dtype)
    if L["precision"] == "int4":
        t = pack_w4a4_int4_layer(L["codes"], L["scales"].T, L["down"], L["up"], L["smooth"], bias, dtype)
    else:
        np_, kp = _up128(n), _up128(k)
        rp = -(-L["down"].shape[1] // 16) * 16
        sc = torch.full((np_, kp // 16), 1.0).to(torch.float8_e4m3fn)
        sc[:n, : k // 16] = L["scales"][:, : k // 16]
        t = {
            "qweight": pack_qweight(_pad(L["codes"][:, :k].to(torch.uint8), (np_, kp))),
            "wscales": pack_nvfp4_scales(sc),
            "lora_down": pack_lora_down(_pad(L["down"], (kp, rp))),
            "lora_up": pack_lora_up(_pad(L["up"], (np_, rp))),
            "smooth": pack_channel_groups(_pad(L["smooth"], (kp,), 1.0)),
            "smooth_orig": pack_channel_groups(_pad(L["smooth"], (kp,), 1.0)),
            "bias": pack_channel_groups(_pad(bias.to(dtype), (np_,), 1.0)),
        }
        if wcscales:  # a per-channel factor instead of the per-tensor one (fused Q/K/V export)
            t["wcscales"] = pack_channel_groups(_pad(torch.full((n,), float(L["wtscale"])).to(dtype), (np_,), 1.0))
        else:
            t["wtscale"] = L["wtscale"].to(dtype)
    if not with_bias:
        t.pop("bias")
    return t


def ours_w4a4(L: dict, with_bias: bool = True, wcscales: bool = False) -> QuantizedLinearWeights:
    """Our layer holding exactly the same numbers (precision int4g / nvfp4)."""
    n, k = L["n"], L["k"]
    bias = L["bias"] if with_bias else None
    shift = {"act_unsigned": True, "act_shift": GELU_SHIFT} if L["shift"] and L["precision"] == "int4" else {}
    if L["precision"] == "int4":
        return QuantizedLinearWeights(in_features=k, out_features=n, qweight=pack_int4(L["codes"]), precision="int4g",
                                      wscales=L["scales"], smooth=L["smooth"], proj_down=L["down"], proj_up=L["up"],
                                      bias=bias, **shift)
    wt = L["wtscale"]
    return QuantizedLinearWeights(
        in_features=k, out_features=n, qweight=pack_int4(L["codes"][:, :k]), precision="nvfp4", act_precision="nvfp4",
        wscales=L["scales"][:, : k // 16].contiguous(), wtscale=torch.ones(1) if wcscales else wt,
        wcscales=torch.full((n,), float(wt)) if wcscales else None,
        smooth=L["smooth"], proj_down=L["down"], proj_up=L["up"], bias=bias)


def logical_awq(w: torch.Tensor, b: torch.Tensor | None, dtype=torch.bfloat16) -> dict:
    """Asymmetric 4-bit, group 64, as the TinyChat exporter makes it: w ≈ q·scale + zero, q in 0..15."""
    n, k = w.shape
    g = w.float().reshape(n, k // 64, 64)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(dtype)
    zp = torch.round(-lo / scale.float()).clamp(0, 15)
    q = (torch.round(g / scale.float()[:, :, None]) + zp[:, :, None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    zeros = (-zp * scale.float()).to(dtype)
    return {"n": n, "k": k, "q": q, "scales": scale, "zeros": zeros, "bias": None if b is None else b.to(dtype)}


def pack_awq(L: dict, chunks: int, plus_one: tuple, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    t = {
        "qweight": pack_awq_qweight(interleave_chunks(L["q"], chunks)),
        "wscales": interleave_chunks(L["scales"], chunks).T.contiguous(),
        "wzeros": interleave_chunks(L["zeros"], chunks).T.contiguous(),
    }
    if L["bias"] is not None:
        b = L["bias"].float().clone()
        per = L["n"] // chunks
        for c in plus_one:
            b[c * per: (c + 1) * per] += 1.0
        t["bias"] = interleave_chunks(b.to(dtype), chunks)
        # the "+1" is added in 16 bit, so the file holds bf16(b + 1) - 1, not b (spec §10.10)
        eff = b.to(dtype).float()
        for c in plus_one:
            eff[c * per: (c + 1) * per] -= 1.0
        L["file_bias"] = eff.to(dtype)
    return t


def ours_awq(L: dict) -> QuantizedLinearWeights:
    return QuantizedLinearWeights(in_features=L["k"], out_features=L["n"], qweight=pack_int4(L["q"]), kind="w4a16",
                                  precision="int4g", act_precision="none", wscales=L["scales"], wzeros=L["zeros"],
                                  bias=L.get("file_bias", L["bias"]))


# --------------------------------------------------------------------------------------------- a FLUX model
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_DOUBLE = {"img_attn.qkv": "qkv_proj", "txt_attn.qkv": "qkv_proj_context", "img_attn.proj": "out_proj",
           "txt_attn.proj": "out_proj_context", "img_mlp.0": "mlp_fc1", "img_mlp.2": "mlp_fc2",
           "txt_mlp.0": "mlp_context_fc1", "txt_mlp.2": "mlp_context_fc2"}
_NORMS = {"img_attn.norm.query_norm": "norm_q", "img_attn.norm.key_norm": "norm_k",
          "txt_attn.norm.query_norm": "norm_added_q", "txt_attn.norm.key_norm": "norm_added_k",
          "norm.query_norm": "norm_q", "norm.key_norm": "norm_k"}


def flux_nunchaku_file(sd: dict[str, torch.Tensor], unet_config: dict, path, ours_path=None, rank: int = 16,
                       precision: str = "int4", seed: int = 0, legacy_folder=None) -> dict:
    """Write a FLUX-structured Nunchaku single file from a BFL (ComfyUI) 16-bit state dict; optionally the same
    weights in our format (``ours_path``) and as a legacy folder. Returns {comfy layer: our layer}."""
    from svdq.quant.checkpoint import save_checkpoint

    gen = torch.Generator().manual_seed(seed)
    hidden = unet_config["hidden_size"]
    mlp = int(hidden * unet_config["mlp_ratio"])
    nun: dict[str, torch.Tensor] = {}
    quant: dict[str, torch.Tensor] = {}
    ours: dict[str, QuantizedLinearWeights] = {}
    plain: dict[str, torch.Tensor] = {}
    bf = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    used = set()

    def w4a4(comfy, prefix_n, w, b, shift=False, part=None):
        L = logical_w4a4(w, b, rank, gen, precision, shift and precision == "int4")
        for s, t in pack_w4a4(L).items():
            quant[f"{prefix_n}.{s}"] = t
        layer = ours_w4a4(L)
        if part is not None:
            layer.extra = part
            comfy = f"{part['part_of']}.parts.{1 if (part.get('out_range') or part.get('in_range'))[0] else 0}"
        ours[comfy] = layer

    for i in range(unet_config["depth"]):
        p, e = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for c, n in _DOUBLE.items():
            w4a4(p + c, e + n, bf[p + c + ".weight"], bf.get(p + c + ".bias"), shift=n.endswith("fc2"))
            used |= {p + c + ".weight", p + c + ".bias"}
        for c, n, chunks in (("img_mod.lin", "norm1.linear", 6), ("txt_mod.lin", "norm1_context.linear", 6)):
            L = logical_awq(bf[p + c + ".weight"], bf[p + c + ".bias"])
            for s, t in pack_awq(L, chunks, (1, 4)).items():
                quant[f"{e}{n}.{s}"] = t
            ours[p + c] = ours_awq(L)
            used |= {p + c + ".weight", p + c + ".bias"}
    for i in range(unet_config["depth_single_blocks"]):
        p, e = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        w1, b1 = bf[p + "linear1.weight"], bf[p + "linear1.bias"]
        w2, b2 = bf[p + "linear2.weight"], bf[p + "linear2.bias"]
        full1, full2 = [3 * hidden + mlp, hidden], [hidden, hidden + mlp]
        w4a4(None, e + "qkv_proj", w1[: 3 * hidden], b1[: 3 * hidden],
             part={"part_of": p + "linear1", "full_shape": full1, "out_range": [0, 3 * hidden]})
        w4a4(None, e + "mlp_fc1", w1[3 * hidden:], b1[3 * hidden:],
             part={"part_of": p + "linear1", "full_shape": full1, "out_range": [3 * hidden, 3 * hidden + mlp]})
        w4a4(None, e + "out_proj", w2[:, :hidden], b2,
             part={"part_of": p + "linear2", "full_shape": full2, "in_range": [0, hidden]})
        w4a4(None, e + "mlp_fc2", w2[:, hidden:], None, shift=True,
             part={"part_of": p + "linear2", "full_shape": full2, "in_range": [hidden, hidden + mlp]})
        L = logical_awq(bf[p + "modulation.lin.weight"], bf[p + "modulation.lin.bias"])
        for s, t in pack_awq(L, 3, (1,)).items():
            quant[f"{e}norm.linear.{s}"] = t
        ours[p + "modulation.lin"] = ours_awq(L)
        used |= {p + x for x in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                                 "modulation.lin.weight", "modulation.lin.bias")}
    for k, v in bf.items():
        if k in used:
            continue
        plain[k] = v
        blk = k.split(".")
        if blk[0] in ("double_blocks", "single_blocks"):
            local = ".".join(blk[2:-1])
            e = ("transformer_blocks." if blk[0] == "double_blocks" else "single_transformer_blocks.") + blk[1]
            nun[f"{e}.{_NORMS[local]}.weight"] = v
            continue
        layer, _, suffix = k.rpartition(".")
        if layer == "final_layer.adaLN_modulation.1":
            v = torch.cat(v.chunk(2, dim=0)[::-1], dim=0)
        nun[f"{_TOP[layer]}.{suffix}"] = v
    meta = {
        "config": json.dumps({"_class_name": "FluxTransformer2DModel", "num_attention_heads": unet_config["num_heads"],
                              "attention_head_dim": hidden // unet_config["num_heads"],
                              "num_layers": unet_config["depth"], "num_single_layers": unet_config["depth_single_blocks"],
                              "guidance_embeds": unet_config["guidance_embed"]}),
        "comfy_config": json.dumps({"model_class": "Flux", "model_config": unet_config}),
        "model_class": "NunchakuFluxTransformer2dModel",
        "quantization_config": json.dumps({
            "method": "svdquant", "rank": -(-rank // 16) * 16,
            "weight": {"dtype": "int4" if precision == "int4" else "fp4_e2m1_all",
                       "scale_dtype": None if precision == "int4" else [None, "fp8_e4m3_nan"],
                       "group_size": 64 if precision == "int4" else 16},
            "activation": {"dtype": "int4" if precision == "int4" else "fp4_e2m1_all",
                           "scale_dtype": None if precision == "int4" else "fp8_e4m3_nan",
                           "group_size": 64 if precision == "int4" else 16}}),
    }
    save_file({**nun, **quant}, str(path), metadata=meta)
    if legacy_folder is not None:
        legacy_folder.mkdir(parents=True, exist_ok=True)
        save_file(quant, str(legacy_folder / "transformer_blocks.safetensors"))
        save_file(nun, str(legacy_folder / "unquantized_layers.safetensors"))
        (legacy_folder / "config.json").write_text(meta["config"])
        (legacy_folder / "comfy_config.json").write_text(meta["comfy_config"])
    if ours_path is not None:
        cfg = {"method": "svdquant", "rank": rank, "precision": "int4g" if precision == "int4" else "nvfp4",
               "act_precision": precision}
        save_checkpoint(ours_path, ours, plain, cfg, {"model_family": "flux", "comfy_unet_config": unet_config})
    return ours
