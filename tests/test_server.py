"""End to end on a real ComfyUI server (127.0.0.1, CPU): the pack loads as a custom-node folder, its nodes are
registered, and example workflows posted through the HTTP API produce images; the svdq image is compared with
the 16-bit model's image."""

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
    tiny_assets.make_taesd(models / "vae" / "tiny-taesd.safetensors", latent_channels=4)
    from svdq.synthetic import TINY_UNET

    uf = make_float_model_file(models / "diffusion_models" / "tiny-unet-bf16.safetensors", TINY_UNET)
    um = load_float_model(uf)
    res = quantize_patcher(um, cfg, random_conditioning(um, 2, tokens=77), steps=2, size=8)
    save_result(res, cfg, um, models / "diffusion_models" / "tiny-unet-svdq.safetensors", uf)
    # the same tiny FLUX weights as a Nunchaku single file and, number for number, in our own format
    import nunchaku_gen
    from safetensors.torch import load_file

    nunchaku_gen.flux_nunchaku_file(load_file(str(f)), tiny_assets.E2E_FLUX,
                                    models / "diffusion_models" / "svdq-int4_r16-tiny-flux.safetensors",
                                    models / "diffusion_models" / "tiny-flux-nunchaku-as-svdq.safetensors")
    # a Hugging Face cache (offline) holding the same file under another name, for the loader's hf_repo option
    from helpers import make_hf_cache

    hub = make_hf_cache(base / "hf-cache", "svdq-test/tiny-flux", {
        "svdq-int4_r16-hub-flux.safetensors": (models / "diffusion_models" / "svdq-int4_r16-tiny-flux.safetensors").read_bytes(),
    })
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
        cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"},
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
    for node in ("SVDQLoadDiffusionModel", "SVDQLoraLoader", "SVDQLoraStack", "SVDQQuantizeModel", "SVDQModelPatch",
                 "SVDQCompileModel"):
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


def test_nunchaku_file_through_the_loader_node(server):
    """A Nunchaku single file loads by itself through the svdq loader and gives the image of the same weights
    stored in our own format (bit for bit); requantized, it stays close."""
    n, sn = run_prompt(server, text_to_image("svdq-int4_r16-tiny-flux.safetensors", prefix="nunchaku"))
    o, so = run_prompt(server, text_to_image("tiny-flux-nunchaku-as-svdq.safetensors", prefix="nunchaku-ours"))
    assert n is not None, json.dumps(sn)[:2000]
    assert o is not None, json.dumps(so)[:2000]
    a, b = load_image(server, n), load_image(server, o)
    assert torch.equal(a, b) and a.std() > 0
    g = text_to_image("svdq-int4_r16-tiny-flux.safetensors", prefix="nunchaku-rq")
    g["1"]["inputs"]["nunchaku_scales"] = "requantize"
    r, sr = run_prompt(server, g)
    assert r is not None, json.dumps(sr)[:2000]
    p = psnr(load_image(server, r), a)
    print(f"PSNR Nunchaku requantized vs exact: {p:.1f} dB")
    assert 25.0 < p < float("inf")
    # the loader's hf_repo option: fetched from the (offline) Hugging Face cache into diffusion_models, then loaded
    g = text_to_image("svdq-int4_r16-tiny-flux.safetensors", prefix="nunchaku-hub")
    g["1"]["inputs"]["hf_repo"] = "svdq-test/tiny-flux"
    h, sh = run_prompt(server, g)
    assert h is not None, json.dumps(sh)[:2000]
    assert torch.equal(load_image(server, h), a)
    assert (server["base"] / "models" / "diffusion_models" / "svdq-int4_r16-hub-flux.safetensors").exists()
    # a damaged Nunchaku file (a layer's tensor missing): a clear error naming the file and the tensor
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = server["base"] / "models" / "diffusion_models" / "svdq-int4_r16-tiny-flux.safetensors"
    with safe_open(str(src), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "transformer_blocks.0.qkv_proj.wscales"}
    save_file(tensors, str(src.with_name("svdq-int4_r16-damaged.safetensors")), metadata=meta)
    out, status = run_prompt(server, text_to_image("svdq-int4_r16-damaged.safetensors", prefix="damaged"))
    assert out is None
    msgs = json.dumps(status)
    assert "svdq-int4_r16-damaged.safetensors" in msgs and "wscales" in msgs, msgs[:1500]
    assert server["proc"].poll() is None


def test_unet_svdq_vs_16bit(server):
    def graph(model, prefix):
        g = tiny_version(make_workflows.GRAPHS["svdq-sdxl-text-to-image"])
        g["1"]["inputs"]["model_name"] = model
        g["9"]["inputs"]["filename_prefix"] = prefix
        return g

    q, sq = run_prompt(server, graph("tiny-unet-svdq.safetensors", "unet-svdq"))
    f, sf = run_prompt(server, graph("tiny-unet-bf16.safetensors", "unet-bf16"))
    assert q is not None, json.dumps(sq)[:2000]
    assert f is not None, json.dumps(sf)[:2000]
    p = psnr(load_image(server, q), load_image(server, f))
    print(f"PSNR svdq vs 16-bit UNet image: {p:.1f} dB")
    assert p > 20.0


def test_lora_for_another_model_is_a_clear_error(server):
    from safetensors.torch import save_file

    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)},
              str(server["base"] / "models" / "loras" / "other-model.safetensors"))
    g = text_to_image("tiny-flux-svdq.safetensors", prefix="other")
    g["9"] = {"class_type": "SVDQLoraLoader", "inputs": {"model": ["1", 0], "lora_name": "other-model.safetensors", "strength": 1.0}}
    g["5"]["inputs"]["model"] = ["9", 0]
    out, status = run_prompt(server, g)
    assert out is None and "match a layer" in json.dumps(status)
    assert server["proc"].poll() is None


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


sys.path.insert(0, str(REPO / "scripts"))
import make_workflows  # noqa: E402

# Tiny models cannot carry FLUX's 4.7B-parameter T5, so the runs below swap only the text-encoder loader (and,
# for quantize-your-own, core UNETLoader, which cannot detect a 2-head Flux) and point file names at tiny files.
TINY_FILES = {
    "flux1-dev-svdq-int4-r32.safetensors": "tiny-flux-svdq.safetensors",
    "flux1-dev.safetensors": "tiny-flux-bf16.safetensors",
    "style-lora.safetensors": "tiny-lora.safetensors",
    "detail-lora.safetensors": "tiny-lora.safetensors",
    "ae.safetensors": "tiny-taef1.safetensors",
    # ComfyUI matches SDXL only at full size (2.6B parameters); the UNet workflow runs on an SD1.x-class UNet
    "sdxl-svdq-int4-r32.safetensors": "tiny-unet-svdq.safetensors",
    "sdxl_vae.safetensors": "tiny-taesd.safetensors",
}


def tiny_version(graph):
    g = json.loads(json.dumps(graph))
    for node in g.values():
        if node["class_type"] == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": "tiny-clip-l.safetensors", "type": "stable_diffusion"}
        if node["class_type"] == "UNETLoader":
            node["class_type"] = "SVDQLoadDiffusionModel"
            node["inputs"] = {"model_name": node["inputs"]["unet_name"]}
        for k, v in node["inputs"].items():
            if isinstance(v, str) and v in TINY_FILES:
                node["inputs"][k] = TINY_FILES[v]
        if node["class_type"] in ("EmptySD3LatentImage",):
            node["inputs"].update(width=128, height=128)
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
        if node["class_type"] == "SVDQQuantizeModel":
            node["inputs"].update(rank=16, steps=2, latent_size=16, fast=True, filename="quantized-in-graph")
    return g


def test_workflows_listed_as_templates(server):
    templates = json.loads(http(server["url"] + "/api/workflow_templates"))
    listed = set(next(v for k, v in templates.items() if "svdq" in k.lower()))
    assert {p.stem for p in WORKFLOWS.glob("*.json")} <= listed


def test_committed_workflows_match_the_generator(server):
    info = json.loads(http(server["url"] + "/object_info"))
    built = make_workflows.build_all(info)
    for name, wf in built.items():
        path = WORKFLOWS / f"{name}.json"
        assert path.exists(), f"run scripts/make_workflows.py: {path} missing"
        assert json.loads(path.read_text()) == wf, f"{path} is stale: run scripts/make_workflows.py {server['url']}"


@pytest.mark.parametrize("name", ["svdq-flux-text-to-image", "svdq-flux-loras", "svdq-sdxl-text-to-image",
                                  "svdq-quantize-your-own-model"])
def test_example_workflows_run(server, name):
    out, status = run_prompt(server, tiny_version(make_workflows.GRAPHS[name]), timeout=600)
    assert out is not None, json.dumps(status)[:2000]
    if name != "svdq-quantize-your-own-model":
        img = load_image(server, out)
        side = 64 if "sdxl" in name else 128
        assert img.shape == (side, side, 3) and img.std() > 0
    else:
        assert (server["base"] / "models" / "diffusion_models" / "quantized-in-graph.safetensors").exists()


def test_browser_loads_every_workflow(server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian chromium is not installed (scripts/setup.sh installs it where apt-get is available)")
    from playwright.sync_api import sync_playwright

    out_dir = REPO / "test-output"
    out_dir.mkdir(exist_ok=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    http(server["url"] + "/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog over the graph
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server["url"], wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_function("window.app.extensions && window.app.extensions.some(e => e.name === 'svdq.ui')", timeout=60_000)
        for path in sorted(WORKFLOWS.glob("*.json")):
            wf = json.loads(path.read_text())
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
            missing = page.evaluate(
                "(types) => types.filter(t => !(t in window.LiteGraph.registered_node_types))",
                sorted({n["type"] for n in wf["nodes"]}),
            )
            assert missing == [], f"{path.name}: missing node types {missing}"
            count = page.evaluate("() => window.app.graph._nodes.length")
            assert count == len(wf["nodes"])
            page.wait_for_timeout(300)
            page.screenshot(path=str(out_dir / f"{path.stem}.png"))
        browser.close()
    assert not [e for e in errors if "svdq" in e.lower()], errors
