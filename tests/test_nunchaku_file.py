"""Nunchaku layers and files: packed from known float matrices by the spec-derived generator, read back exactly,
and the loaded layer's output equals the reference computed from those matrices."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nunchaku_gen as gen
from svdq.kernels.reference import svdq_linear_reference
from svdq.quant.checkpoint import CheckpointError
from svdq.quant.formats import quantize_int4_activation, quantize_nvfp4_activation, unpack_int4
from svdq.quant.layer import GELU_SHIFT
from svdq.quant.nunchaku_file import convert_awq, convert_w4a4


def _float_reference(x, L, with_bias=True):
    """y from the logical float matrices: our activation quantizer, the stored residual, the branch, the bias."""
    k = L["k"]
    if L["precision"] == "int4":
        shift = GELU_SHIFT if L["shift"] else 0.0
        op, s = quantize_int4_activation(x, L["smooth"], shift, bool(L["shift"]))
        a = (op.float() * s[:, None])[:, :k]
    else:
        a = quantize_nvfp4_activation(x, L["smooth"])[:, :k]
    y = a @ L["residual"].T + (x.float() @ L["down"].float()) @ L["up"].float().T
    if with_bias and L["bias"] is not None:
        y = y + L["bias"].float()
    return y


def _layer_input(m, k, shift, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if shift:  # GELU outputs: >= -0.17
        x = torch.nn.functional.gelu(x * 2, approximate="tanh")
    return x.to(torch.bfloat16).float()


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(200, 192), (128, 256)])
def test_w4a4_layer_roundtrip_and_output(precision, with_bias, shape):
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) * 0.1
    shift = precision == "int4" and with_bias
    L = gen.logical_w4a4(w, b, 24, g, precision, shift=shift)
    packed = gen.pack_w4a4(L, with_bias=with_bias)
    layer, err = convert_w4a4(packed, n, k, precision, shift, "exact", "test")
    assert err is None
    ours = gen.ours_w4a4(L, with_bias=with_bias)
    # unpacks to exactly the matrices it was made from
    assert torch.equal(layer.qweight, ours.qweight)
    if precision == "int4":
        assert layer.precision == "int4g" and torch.equal(layer.wscales, ours.wscales)
        assert torch.equal(unpack_int4(layer.qweight)[:, :k], L["codes"])
    else:
        assert torch.equal(layer.wscales.view(torch.uint8), ours.wscales.view(torch.uint8))
        assert torch.equal(layer.wtscale.float(), ours.wtscale.float())
    assert torch.equal(layer.proj_down, L["down"]) and torch.equal(layer.proj_up, L["up"])
    assert torch.equal(layer.smooth, L["smooth"])
    assert (layer.bias is None) == (not with_bias)
    if with_bias:
        assert torch.equal(layer.bias, L["bias"])
    assert layer.act_unsigned == shift and layer.act_shift == (GELU_SHIFT if shift else 0.0)
    # and computes what the float matrices say
    x = _layer_input(37, k, shift)
    y = svdq_linear_reference(x, layer, out_dtype=torch.float32)
    ref = _float_reference(x, L, with_bias)
    assert float((y - ref).norm() / ref.norm()) < 1e-5


def test_nvfp4_wcscales_layer():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 128, generator=g) / 11
    L = gen.logical_w4a4(w, None, 16, g, "nvfp4")
    layer, _ = convert_w4a4(gen.pack_w4a4(L, wcscales=True), 256, 128, "nvfp4", False, "exact", "t")
    assert layer.wcscales is not None and torch.allclose(layer.wcscales, torch.full((256,), float(L["wtscale"])))
    x = _layer_input(5, 128, False)
    y = svdq_linear_reference(x, layer, out_dtype=torch.float32)
    ref = _float_reference(x, {**L, "bias": torch.zeros(256)})
    assert float((y - ref).norm() / ref.norm()) < 1e-3  # wcscales stored in bf16


@pytest.mark.parametrize("chunks,plus_one", [(6, (1, 4)), (3, (1,)), (1, ())])
@pytest.mark.parametrize("with_bias", [True, False])
def test_awq_w4a16_layer(chunks, plus_one, with_bias):
    n, k = 384 if chunks != 1 else 100, 192
    g = torch.Generator().manual_seed(chunks)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) * 0.1 if with_bias else None
    L = gen.logical_awq(w, b)
    packed = gen.pack_awq(L, chunks, plus_one)
    layer, err = convert_awq(packed, n, k, chunks, "exact", "t")
    assert err is None and layer.kind == "w4a16" and layer.precision == "int4g"
    assert torch.equal(unpack_int4(layer.qweight, signed=False)[:, :k].to(torch.uint8), L["q"])
    assert torch.equal(layer.wscales, L["scales"]) and torch.equal(layer.wzeros, L["zeros"])
    x = torch.randn(2, k, generator=g)
    wd = (L["q"].float().reshape(n, k // 64, 64) * L["scales"].float()[:, :, None] + L["zeros"].float()[:, :, None])
    ref = x @ wd.reshape(n, k).T
    if with_bias:
        # the "+1" of scale chunks is added in 16 bit by the exporter: recovered to within bf16 rounding
        assert torch.allclose(layer.bias.float(), L["bias"].float(), atol=1e-2)
        ref = ref + layer.bias.float()
    y = svdq_linear_reference(x, layer, out_dtype=torch.float32)
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    # requantized into our integer multipliers: the error is measured and small
    rq, rerr = convert_awq(packed, n, k, chunks, "requantize", "t")
    assert rq.precision == "int4" and 0 < rerr < 0.2
    y2 = svdq_linear_reference(x, rq, out_dtype=torch.float32)
    assert float((y2 - y).norm() / y.norm()) < 0.2


def test_requantize_reports_error():
    g = torch.Generator().manual_seed(5)
    w = torch.distributions.StudentT(4.0).sample((256, 512)) / 30
    L = gen.logical_w4a4(w, torch.zeros(256), 32, g, "int4")
    packed = gen.pack_w4a4(L)
    exact, _ = convert_w4a4(packed, 256, 512, "int4", False, "exact", "t")
    fast, err = convert_w4a4(packed, 256, 512, "int4", False, "requantize", "t")
    assert fast.precision == "int4" and fast.wmult is not None and 0.001 < err < 0.15
    x = _layer_input(16, 512, False)
    ye, yf = (svdq_linear_reference(x, t, out_dtype=torch.float32) for t in (exact, fast))
    assert float((yf - ye).norm() / ye.norm()) < 0.1


def test_int4g_triton_matches_reference(triton_kernels):
    """The int4g fast path (activation kernel + dequantized 16-bit weight) against the reference."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(136, 192, generator=g) / 14
    for shift in (False, True):
        L = gen.logical_w4a4(w, torch.randn(136, generator=g) * 0.1, 16, g, "int4", shift=shift)
        layer = gen.ours_w4a4(L)
        x = _layer_input(9, 192, shift)
        ref = svdq_linear_reference(x, layer, out_dtype=torch.float32)
        y = triton_kernels.svdq_linear(x, layer).float()
        assert float((y - ref).norm() / ref.norm()) < 1e-2
    La = gen.logical_awq(w, None)
    layer = gen.ours_awq(La)
    x = torch.randn(3, 192, generator=g)
    ref = svdq_linear_reference(x, layer, out_dtype=torch.float32)
    assert float((triton_kernels.svdq_linear(x, layer).float() - ref).norm() / ref.norm()) < 1e-2


# ------------------------------------------------------------------------------------------- whole files
@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    from svdq.comfy_runtime import import_comfy

    import_comfy()
    from svdq.demo import make_float_model_file
    from svdq.synthetic import TINY_FLUX

    d = tmp_path_factory.mktemp("nunchaku")
    f = make_float_model_file(d / "tiny-flux-bf16.safetensors")
    sd = load_file(str(f))
    gen.flux_nunchaku_file(sd, TINY_FLUX, d / "svdq-int4_r16-tiny.safetensors", d / "ours-int4.safetensors",
                           legacy_folder=d / "legacy")
    gen.flux_nunchaku_file(sd, TINY_FLUX, d / "svdq-fp4_r16-tiny.safetensors", d / "ours-fp4.safetensors",
                           precision="nvfp4")
    return d


def _forward(patcher, seed=0):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    m = patcher.model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, 16, generator=g)
    ctx = torch.randn(1, 12, 128, generator=g)
    y = torch.randn(1, 64, generator=g)
    with torch.no_grad():
        return m.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx, y=y, guidance=torch.tensor([3.5])).float()


@pytest.mark.parametrize("precision", ["int4", "fp4"])
def test_whole_flux_file_matches_our_format(flux_files, precision):
    from svdq.nodes.loading import load_svdq_model

    nun = load_svdq_model(flux_files / f"svdq-{precision}_r16-tiny.safetensors")
    ours = load_svdq_model(flux_files / f"ours-{precision}.safetensors")
    a, b = _forward(nun), _forward(ours)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    info = nun.model.svdq_info
    assert info["quantized_layers"] == ours.model.svdq_info["quantized_layers"]
    if precision == "int4":
        legacy = load_svdq_model(flux_files / "legacy")
        assert torch.equal(_forward(legacy), a)
        fast = load_svdq_model(flux_files / "svdq-int4_r16-tiny.safetensors", nunchaku_scales="requantize")
        c = _forward(fast)
        assert 0 < float((c - a).norm() / a.norm()) < 0.1


def test_cli_info_and_convert(flux_files, capsys):
    from svdq.cli import main
    from svdq.quant.checkpoint import load_checkpoint

    src = flux_files / "svdq-int4_r16-tiny.safetensors"
    assert main(["info", str(src), "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["format"].startswith("nunchaku") and d["config"]["precision"] == "int4g" and d["layers"]["w4a16"] == 6
    out = flux_files / "converted.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--requantize"]) == 0
    text = capsys.readouterr().out
    assert "requantized" in text and "error" in text
    ck = load_checkpoint(out)
    assert ck.config["precision"] == "int4" and ck.metadata["nunchaku_conversion"]["requantized_layers"] > 0
    exact = flux_files / "converted-exact.safetensors"
    assert main(["convert", str(src), "-o", str(exact)]) == 0
    assert load_checkpoint(exact).config["precision"] == "int4g"


def _rewrite(src, dst, drop=None, meta_update=None):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    meta.update(meta_update or {})
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_bad_nunchaku_files(flux_files):
    from svdq.quant.nunchaku_file import load_nunchaku_checkpoint

    src = flux_files / "svdq-int4_r16-tiny.safetensors"
    bad = _rewrite(src, flux_files / "bad-class.safetensors", meta_update={"model_class": "NunchakuSanaTransformer2DModel"})
    with pytest.raises(CheckpointError, match="bad-class.safetensors.*NunchakuSana.*not supported"):
        load_nunchaku_checkpoint(bad)
    qc = json.loads(load_header_meta(src)["quantization_config"])
    qc["weight"]["dtype"] = "fp4_e2m1_all"
    bad = _rewrite(src, flux_files / "bad-precision.safetensors", meta_update={"quantization_config": json.dumps(qc)})
    with pytest.raises(CheckpointError, match="bad-precision.safetensors.*fp4_e2m1_all.*int4"):
        load_nunchaku_checkpoint(bad)
    bad = _rewrite(src, flux_files / "bad-missing.safetensors", drop="transformer_blocks.1.mlp_fc2.lora_up")
    with pytest.raises(CheckpointError, match=r"bad-missing.safetensors.*transformer_blocks\.1\.mlp_fc2.*lora_up"):
        load_nunchaku_checkpoint(bad)
    bad = _rewrite(src, flux_files / "bad-part.safetensors", drop="single_transformer_blocks.0.mlp_fc1.qweight")
    with pytest.raises(CheckpointError, match="bad-part.safetensors"):
        load_nunchaku_checkpoint(bad)


def load_header_meta(path):
    from svdq.quant.checkpoint import read_header

    return read_header(path)[1]


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_lora_on_composite_single_block_layers(flux_files, path, monkeypatch):
    """A LoRA on a FLUX single block's linear1/linear2 (composite layers of a Nunchaku file) extends the branch:
    each part takes its rows of the LoRA factors (on the kernel path merged into that part's branch)."""
    if path == "triton":
        monkeypatch.setenv("SVDQ_KERNELS", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    import comfy.model_management

    from svdq.nodes.loading import load_svdq_model
    from svdq.nodes.lora import apply_lora

    m = load_svdq_model(flux_files / "svdq-int4_r16-tiny.safetensors")
    g = torch.Generator().manual_seed(4)
    lora = {}
    for name, (n, k) in {"single_blocks.0.linear1": (1792, 256), "single_blocks.1.linear2": (256, 1280)}.items():
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(n, 4, generator=g) * 0.1
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, k, generator=g) * 0.1
    ml = apply_lora(m, lora, 0.5)
    comfy.model_management.load_models_gpu([ml])
    for name, (_n, k) in {"single_blocks.0.linear1": (1792, 256), "single_blocks.1.linear2": (256, 1280)}.items():
        lin = ml.model.diffusion_model.get_submodule(name)
        assert len(lin.svdq_parts) == 2 and len(lin.svdq_lora) == 1
        x = torch.randn(3, k, generator=g)
        with_lora = lin(x)
        saved, lin.svdq_lora = lin.svdq_lora, []
        without = lin(x)
        lin.svdq_lora = saved
        up, down = lora[f"diffusion_model.{name}.lora_up.weight"], lora[f"diffusion_model.{name}.lora_down.weight"]
        expected = 0.5 * (x @ down.T) @ up.T
        tol = 1e-4 if path == "reference" else 1e-2  # the kernel path carries the factors in 16 bits
        assert float((with_lora - without - expected).norm() / expected.norm()) < tol


def test_comfy_config_from_comfyui_nunchaku_is_usable(flux_files):
    """ComfyUI-nunchaku's model_config may carry ``disable_unet_model_creation``; the loader still builds the model."""
    from svdq.nodes.loading import load_svdq_model

    src = flux_files / "svdq-int4_r16-tiny.safetensors"
    cc = json.loads(load_header_meta(src)["comfy_config"])
    cc["model_config"]["disable_unet_model_creation"] = True
    f = _rewrite(src, flux_files / "svdq-int4_r16-cn.safetensors", meta_update={"comfy_config": json.dumps(cc)})
    assert torch.equal(_forward(load_svdq_model(f)), _forward(load_svdq_model(src)))


def test_cli_on_legacy_folder_and_nvfp4(flux_files, capsys):
    """`svdq info` on a legacy folder and `svdq convert` of an NVFP4 file (exact: nothing requantized)."""
    from svdq.cli import main
    from svdq.quant.checkpoint import load_checkpoint

    assert main(["info", str(flux_files / "legacy")]) == 0
    text = capsys.readouterr().out
    assert "legacy folder" in text and "int4g" in text
    assert main(["info", str(flux_files / "svdq-fp4_r16-tiny.safetensors")]) == 0
    assert "E4M3 scales carried over" in capsys.readouterr().out
    out = flux_files / "converted-fp4.safetensors"
    assert main(["convert", str(flux_files / "svdq-fp4_r16-tiny.safetensors"), "-o", str(out), "--requantize"]) == 0
    assert "nothing lost" in capsys.readouterr().out  # NVFP4 scales carry over exactly even when asked to requantize
    ck = load_checkpoint(out)
    assert {layer.precision for layer in ck.layers.values() if layer.kind == "w4a4"} == {"nvfp4"}
    assert main(["convert", str(flux_files / "nope"), "-o", str(out)]) == 2


def test_composite_layer_with_a_missing_part_is_a_clear_error(flux_files):
    from svdq.quant.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(flux_files / "ours-int4.safetensors")
    del ck.layers["single_blocks.0.linear2.parts.0"]
    out = save_checkpoint(flux_files / "ours-missing-part.safetensors", ck.layers, ck.tensors, ck.config, ck.metadata)
    with pytest.raises(CheckpointError, match=r"ours-missing-part.safetensors.*single_blocks\.0\.linear2.*parts \[1\]"):
        load_checkpoint(out)


def relative_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def test_composite_parts_write_slices_and_accumulate_on_the_kernel_path(flux_files, tmp_path, monkeypatch):
    """Requantized composite layers on the W4A4 kernels: linear1's parts write their column slices of one output,
    linear2's parts read strided slices of the input in place and the second adds into the first's output, all
    equal to the reference path (which concatenates and sums); a whole model step agrees too."""
    from svdq.cli import main
    from svdq.nodes.loading import load_svdq_model

    f = tmp_path / "requantized.safetensors"
    assert main(["convert", str(flux_files / "svdq-int4_r16-tiny.safetensors"), "-o", str(f), "--requantize"]) == 0
    m = load_svdq_model(f)
    ref_step = _forward(m)
    g = torch.Generator().manual_seed(5)
    inputs = {}
    for name in ("single_blocks.0.linear1", "single_blocks.1.linear2"):
        lin = m.model.diffusion_model.get_submodule(name)
        assert len(lin.svdq_parts) == 2 and lin.quantized_weights(part=1).precision == "int4"
        wide = torch.randn(2, 3, lin.in_features + 5, generator=g).to(lin.svdq_p0_smooth.dtype)
        inputs[name] = (lin, wide[..., 2: 2 + lin.in_features])  # rows with a stride: read in place
    expected = {n: lin(x) for n, (lin, x) in inputs.items()}
    monkeypatch.setenv("SVDQ_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from svdq.kernels import dispatch

    calls = []
    gemm = dispatch.w4a4_gemm

    def spy(*a, **kw):
        calls.append((kw.get("out") is not None, kw.get("accumulate", False)))
        return gemm(*a, **kw)

    monkeypatch.setattr(dispatch, "w4a4_gemm", spy)
    for n, (lin, x) in inputs.items():
        got = lin(x)
        assert got.shape == expected[n].shape and torch.isfinite(got).all()
        assert relative_err(got, expected[n]) < 1e-2, n
    # linear1: both parts into slices; linear2: the first part allocates, the second adds into it
    assert calls == [(True, False), (True, False), (False, False), (True, True)]
    assert relative_err(_forward(m), ref_step) < 2e-2
    # with a LoRA: each part's share merged into its fused branch, still writing slices / accumulating
    from svdq.nodes.lora import apply_lora

    lora = {}
    for name, (lin, _) in inputs.items():
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(lin.out_features, 4, generator=g) * 0.1
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, lin.in_features, generator=g) * 0.1
    ml = apply_lora(m, lora, 0.7)
    import comfy.model_management

    comfy.model_management.load_models_gpu([ml])
    got = {n: ml.model.diffusion_model.get_submodule(n)(x) for n, (_, x) in inputs.items()}
    monkeypatch.setenv("SVDQ_KERNELS", "reference")
    for n, (_, x) in inputs.items():
        want = ml.model.diffusion_model.get_submodule(n)(x)
        assert relative_err(got[n], want) < 1e-2, n
        assert relative_err(want, expected[n]) > 1e-3  # the LoRA did something


def test_composite_part_ranges_must_tile_the_layer():
    from svdq.nodes.ops import _check_part_ranges

    rows = [(None, None, None, (0, 8), None), (None, None, None, (8, 20), None)]
    _check_part_ranges("ok", rows, 4, 20)
    with pytest.raises(ValueError, match="cover 0..20, the layer has 24"):
        _check_part_ranges("short", rows, 4, 24)
    with pytest.raises(ValueError, match="do not tile"):
        _check_part_ranges("gap", [rows[0], (None, None, None, (9, 20), None)], 4, 20)
    with pytest.raises(ValueError, match="not both"):
        _check_part_ranges("mixed", [rows[0], (None, None, (0, 4), None, None)], 4, 20)
