"""Checkpoint format: round trip through a file, and every kind of bad input gives one clear error, no partial file."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from helpers import random_layer
from svdq.kernels.reference import svdq_linear_reference
from svdq.quant.checkpoint import CheckpointError, load_checkpoint, read_header, save_checkpoint


def write_ckpt(path, **kw):
    layers = {"blocks.0.attn.qkv": random_layer(96, 128, 16, True, dtype=torch.bfloat16),
              "blocks.0.mod.lin": random_layer(64, 128, 0, True, kind="w4a16")}
    tensors = {"img_in.weight": torch.randn(128, 16, dtype=torch.bfloat16), "img_in.bias": torch.zeros(128)}
    save_checkpoint(path, layers, tensors, {"rank": 16, "precision": "int4"}, {"model_family": "flux", **kw})
    return layers, tensors


def test_roundtrip_through_file(tmp_path):
    p = tmp_path / "m.safetensors"
    layers, tensors = write_ckpt(p)
    ck = load_checkpoint(p)
    assert set(ck.layers) == set(layers) and set(ck.tensors) == set(tensors)
    assert ck.config["rank"] == 16 and ck.metadata["model_family"] == "flux"
    for name, l in layers.items():
        got = ck.layers[name]
        assert got.kind == l.kind and got.act_unsigned == l.act_unsigned
        for k, t in l.tensors().items():
            assert torch.equal(getattr(got, k), t), (name, k)
        x = torch.randn(3, 128)
        assert torch.equal(svdq_linear_reference(x, got), svdq_linear_reference(x, l))
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_missing_output_folder_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_ckpt(tmp_path / "nope" / "m.safetensors")
    assert not (tmp_path / "nope").exists()


def test_nan_tensor_refused_without_partial_file(tmp_path):
    layer = random_layer(64, 64, 16, True, dtype=torch.float32)
    layer.proj_up[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_checkpoint(tmp_path / "m.safetensors", {"a": layer}, {}, {})
    assert os.listdir(tmp_path) == []


def test_truncated_file(tmp_path):
    p = tmp_path / "m.safetensors"
    write_ckpt(p)
    data = p.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "t.safetensors")


def test_corrupt_and_non_safetensors_files(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path / "garbage.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04\x95" + b"pickle-ish" * 20)  # never unpickled
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path / "model.ckpt")
    bad_json = struct.pack("<Q", 10) + b"{not json}" + b"\0" * 10
    (tmp_path / "h.safetensors").write_bytes(bad_json)
    with pytest.raises(CheckpointError, match="not JSON"):
        load_checkpoint(tmp_path / "h.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError):
        read_header(tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_plain_safetensors_and_wrong_version(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an svdq checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "v9.safetensors"), metadata={"format": "svdq", "format_version": "9"})
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(tmp_path / "v9.safetensors")


def test_missing_layer_tensor_named(tmp_path):
    meta = {"format": "svdq", "format_version": "1", "layers": json.dumps({"a.b": {"kind": "w4a4", "in_features": 64, "out_features": 64}})}
    save_file({"x": torch.zeros(2)}, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="a.b.qweight"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_nan_in_stored_tensor_detected(tmp_path):
    p = tmp_path / "m.safetensors"
    layers, _ = write_ckpt(p)
    ck_bytes = bytearray(p.read_bytes())
    header, _ = read_header(p)
    (hlen,) = struct.unpack("<Q", bytes(ck_bytes[:8]))
    start = 8 + hlen + header["blocks.0.attn.qkv.proj_up"]["data_offsets"][0]
    ck_bytes[start : start + 2] = b"\xc0\x7f"  # bf16 NaN
    p.write_bytes(bytes(ck_bytes))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(p)
