"""``svdq pull`` against a local Hugging Face cache laid out as huggingface_hub lays it out (no network here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_hf_cache as make_cache


def run_cli(args, cache, tmp_path, offline=True):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "svdq.cli", "pull", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path / "hub", "nunchaku-tech/nunchaku-flux.1-dev", {
        "svdq-int4_r32-flux.1-dev.safetensors": b"int4-bytes" * 100,
        "svdq-fp4_r32-flux.1-dev.safetensors": b"fp4-bytes" * 100,
        "README.md": b"# readme",
    })


def test_pull_named_file_offline(cache, tmp_path):
    dest = tmp_path / "models" / "diffusion_models"
    r = run_cli(["nunchaku-tech/nunchaku-flux.1-dev", "svdq-fp4_r32-flux.1-dev.safetensors", "--dir", str(dest)],
                cache, tmp_path)
    assert r.returncode == 0, r.stderr
    out = dest / "svdq-fp4_r32-flux.1-dev.safetensors"
    assert out.read_bytes() == b"fp4-bytes" * 100
    assert Path(r.stdout.strip()) == out
    assert not [p for p in dest.iterdir() if p.name.endswith(".tmp")]
    # again: already there, nothing breaks
    assert run_cli(["nunchaku-tech/nunchaku-flux.1-dev", "svdq-fp4_r32-flux.1-dev.safetensors", "--dir", str(dest)],
                   cache, tmp_path).returncode == 0


def test_pull_chooses_the_checkpoint(cache, tmp_path):
    dest = tmp_path / "dm"
    r = run_cli(["nunchaku-tech/nunchaku-flux.1-dev", "--dir", str(dest)], cache, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (dest / "svdq-int4_r32-flux.1-dev.safetensors").read_bytes() == b"int4-bytes" * 100


def test_pull_missing_offline_is_a_clear_error(cache, tmp_path):
    r = run_cli(["nunchaku-tech/nunchaku-flux.1-dev", "svdq-int4_r128-missing.safetensors", "--dir", str(tmp_path)],
                cache, tmp_path)
    assert r.returncode == 2
    assert "HF_HUB_OFFLINE" in r.stderr and "svdq-int4_r128-missing.safetensors" in r.stderr
    r = run_cli(["someone/not-cached", "--dir", str(tmp_path)], cache, tmp_path)
    assert r.returncode == 2 and "not in the local Hugging Face cache" in r.stderr
    r = run_cli(["not a repo id", "--dir", str(tmp_path)], cache, tmp_path)
    assert r.returncode == 2 and "OWNER/NAME" in r.stderr
