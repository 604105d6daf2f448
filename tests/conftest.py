"""Test setup: without CUDA the Triton kernels run under the interpreter (must be set before Triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Untuned unless a test says otherwise (the shipped winners, else each shape's default order): tuning every new test
# shape over all GEMM configs took the H100 suite past 10 minutes, and would write test shapes into the user's
# tuning cache. The interpreter never tunes; tests of the tuner set SVDQ_AUTOTUNE=1 themselves.
os.environ.setdefault("SVDQ_AUTOTUNE", "0")

import pytest  # noqa: E402


@pytest.fixture
def triton_kernels(monkeypatch):
    """Route svdq_linear through the Triton kernels (interpreter on CPU)."""
    monkeypatch.setenv("SVDQ_KERNELS", "triton")
    from svdq.kernels import dispatch

    if not dispatch.HAS_TRITON:
        pytest.skip("triton is not installed")
    return dispatch


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(16-bit file, svdq file) of the tiny Flux-type model, quantized once per session (fast settings)."""
    from svdq.comfy_runtime import import_comfy

    import_comfy()
    from svdq.demo import make_float_model_file
    from svdq.nodes.pipeline import load_float_model, quantize_patcher, random_conditioning, save_result
    from svdq.quant.layer import QuantConfig

    d = tmp_path_factory.mktemp("models")
    float_path = make_float_model_file(d / "tiny-flux-bf16.safetensors")
    fm = load_float_model(float_path)
    cfg = QuantConfig(rank=16, smooth_grid=4, refine_iters=3)
    res = quantize_patcher(fm, cfg, random_conditioning(fm, 2), steps=2, size=16)
    q_path = save_result(res, cfg, fm, d / "tiny-flux-svdq.safetensors", float_path)
    return float_path, q_path
