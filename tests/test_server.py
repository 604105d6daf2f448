"""End to end on a real ComfyUI server (127.0.0.1, CPU): the pack loads as a custom-node folder, its nodes are
registered, and example workflows posted through the HTTP API produce images; the svdq image is compared with
the 16-bit model's image."""

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from svdq.comfy_runtime import ensure_comfyui, import_comfy

import_comfy()

import tiny_assets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from svdq.demo import make_float_model_file
    from svdq.nodes.pipeline import load_float_model, quantize_patcher, random_conditioning, save_result
    from svdq.quant.layer import QuantConfig

    base = tmp_path_factory.mktemp("comfy-base")
    models = base / "models"
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (models / sub).mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "svdq", target_is_directory=True)
    f = make_float_model_file(models / "diffusion_models" / "tiny-flux-bf16.safetensors", tiny_assets.E2E_FLUX)
    fm = load_float_model(f)
    cfg = QuantConfig(rank=16, smooth_grid=4, refine_iters=3)
    res = quantize_patcher(fm, cfg, random_conditioning(fm, 2, tokens=77), steps=2, size=16)
    save_result(res, cfg, fm, models / "diffusion_models" / "tiny-flux-svdq.safetensors", f)
    tiny_assets.make_clip_l(models / "text_encoders" / "tiny-clip-l.safetensors")
    tiny_assets.make_taesd(models / "vae" / "tiny-taef1.safetensors")
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import save_file

    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(768, 4, generator=g) * 0.3,
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, 256, generator=g) * 0.05},
              str(models / "loras" / "tiny-lora.safetensors"))
    port = free_port()
    log = open(base / "server.log", "w")
    comfy_dir = ensure_comfyui()
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch"],
        cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + (base / "server.log").read_text()[-3000:])
            try:
                http(url + "/system_stats", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("ComfyUI did not start:\n" + (base / "server.log").read_text()[-3000:])
        yield {"url": url, "base": base, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_prompt(server, graph, timeout=300):
    pid = json.loads(http(server["url"] + "/prompt", {"prompt": graph}))["prompt_id"]
    t0 = time.time()
    while time.time() - t0 < timeout:
        hist = json.loads(http(f"{server['url']}/history/{pid}"))
        if pid in hist:
            status = hist[pid].get("status", {})
            if status.get("status_str") == "error":
                return None, status
            return hist[pid], status
        time.sleep(0.5)
    raise TimeoutError("prompt did not finish")


def load_image(server, out):
    from PIL import Image

    img = next(iter(v["images"] for v in out["outputs"].values() if "images" in v))[0]
    path = server["base"] / "output" / img.get("subfolder", "") / img["filename"]
    import numpy as np

    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))


def psnr(a, b):
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def text_to_image(model_name, lora=None, prefix="svdq"):
    g = {
        "1": {"class_type": "SVDQLoadDiffusionModel", "inputs": {"model_name": model_name}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny-clip-l.safetensors", "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox in the snow", "clip": ["2", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 3, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-taef1.safetensors"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    if lora:
        g["9"] = {"class_type": "SVDQLoraLoader", "inputs": {"model": ["1", 0], "lora_name": lora, "strength": 1.0}}
        g["10"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": 1.0}}
        g["5"]["inputs"]["model"] = ["9", 0]
    return g


def test_nodes_registered(server):
    info = json.loads(http(server["url"] + "/object_info"))
    for node in ("SVDQLoadDiffusionModel", "SVDQLoraLoader", "SVDQLoraStack", "SVDQQuantizeModel"):
        assert node in info, node
        assert info[node]["category"] == "svdq"
    opts = info["SVDQLoadDiffusionModel"]["input"]["required"]["model_name"]
    assert "tiny-flux-svdq.safetensors" in json.dumps(opts)


def test_text_to_image_svdq_vs_16bit(server):
    q, sq = run_prompt(server, text_to_image("tiny-flux-svdq.safetensors", prefix="svdq"))
    f, sf = run_prompt(server, text_to_image("tiny-flux-bf16.safetensors", prefix="bf16"))
    assert q is not None, sq
    assert f is not None, sf
    a, b = load_image(server, q), load_image(server, f)
    p = psnr(a, b)
    print(f"PSNR svdq vs 16-bit image: {p:.1f} dB")
    assert p > 20.0


def test_lora_workflow_runs(server):
    out, status = run_prompt(server, text_to_image("tiny-flux-svdq.safetensors", lora="tiny-lora.safetensors", prefix="lora"))
    assert out is not None, status


def test_bad_file_is_a_clear_error_and_server_keeps_running(server):
    (server["base"] / "models" / "diffusion_models" / "broken.safetensors").write_bytes(b"\x00" * 100)
    out, status = run_prompt(server, text_to_image("broken.safetensors", prefix="broken"))
    assert out is None
    msgs = json.dumps(status)
    print(msgs[:1500])
    assert "broken.safetensors" in msgs and "not a safetensors file" in msgs
    assert server["proc"].poll() is None
    http(server["url"] + "/system_stats")
