"""Test setup: without CUDA the Triton kernels run under the interpreter (must be set before Triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
