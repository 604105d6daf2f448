"""Build the example workflows (ComfyUI's UI/LiteGraph format) from API-format graphs and a server's /object_info.

    python scripts/make_workflows.py http://127.0.0.1:8188     # rewrites workflows/*.json

One definition per workflow (``GRAPHS``) gives both formats: the UI file in ``workflows/`` (listed by ComfyUI's
template browser) and the API graph the tests post to a real server.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def _flux_t2i(model: str, loras: list[tuple[str, float]] = ()) -> dict:
    g = {
        "1": {"class_type": "SVDQLoadDiffusionModel", "inputs": {"model_name": model}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp8_e4m3fn.safetensors", "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox in the snow, soft light", "clip": ["2", 0]}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "svdq"}},
    }
    if not loras:  # first-block cache: the per-sampling speed option
        g["12"] = {"class_type": "SVDQModelPatch", "inputs": {"model": ["1", 0], "cache_threshold": 0.12,
                                                              "start_percent": 0.0, "end_percent": 1.0}}
        g["6"]["inputs"]["model"] = ["12", 0]
    if loras:
        inputs = {"model": ["1", 0]}
        for i, (name, strength) in enumerate(loras, 1):
            inputs[f"lora_{i}"] = name
            inputs[f"strength_{i}"] = strength
        g["10"] = {"class_type": "SVDQLoraStack", "inputs": inputs}
        g["11"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["10", 0], "lora_name": loras[0][0], "strength_model": 0.5}}
        g["6"]["inputs"]["model"] = ["11", 0]
    return g


def _sdxl_t2i() -> dict:
    return {
        "1": {"class_type": "SVDQLoadDiffusionModel", "inputs": {"model_name": "sdxl-svdq-int4-r32.safetensors"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "type": "sdxl"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk, oil painting", "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 25, "cfg": 6.0, "sampler_name": "dpmpp_2m",
                                                   "scheduler": "karras", "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "svdq-sdxl"}},
    }


def _quantize_own() -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp8_e4m3fn.safetensors", "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo of an old fisherman", "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a city street at night in the rain, neon signs", "clip": ["2", 0]}},
        "5": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["3", 0], "conditioning_2": ["4", 0]}},
        "6": {"class_type": "SVDQQuantizeModel", "inputs": {"model": ["1", 0], "prompts": ["5", 0], "filename": "flux1-dev-svdq-int4-r32",
                                                            "rank": 32, "precision": "int4", "steps": 8, "latent_size": 64, "fast": False}},
    }


GRAPHS = {
    "svdq-flux-text-to-image": _flux_t2i("flux1-dev-svdq-int4-r32.safetensors"),
    "svdq-flux-loras": _flux_t2i("flux1-dev-svdq-int4-r32.safetensors", [("style-lora.safetensors", 0.8), ("detail-lora.safetensors", 0.6)]),
    "svdq-sdxl-text-to-image": _sdxl_t2i(),
    "svdq-quantize-your-own-model": _quantize_own(),
}

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in WIDGET_TYPES


def api_to_ui(graph: dict, object_info: dict) -> dict:
    """API graph → UI workflow (LiteGraph 0.4): nodes laid out left to right, links, widget values in order."""
    nodes, links = [], []
    ids = {k: i + 1 for i, k in enumerate(graph)}
    link_id = 0
    out_links: dict[tuple[int, int], list[int]] = {}
    depth: dict[str, int] = {}

    def level(k):
        if k not in depth:
            srcs = [v[0] for v in graph[k]["inputs"].values() if isinstance(v, list)]
            depth[k] = 1 + max((level(s) for s in srcs), default=-1)
        return depth[k]

    rows: dict[int, int] = {}
    for order, (key, node) in enumerate(graph.items()):
        info = object_info[node["class_type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        inputs, widgets = [], []
        for name, spec in specs.items():
            val = node["inputs"].get(name)
            if isinstance(val, list) and len(val) == 2 and isinstance(val[0], str) and val[0] in graph:
                link_id += 1
                src = ids[val[0]]
                links.append([link_id, src, val[1], ids[key], len(inputs), object_info[graph[val[0]]["class_type"]]["output"][val[1]]])
                out_links.setdefault((src, val[1]), []).append(link_id)
                entry = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": link_id}
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif _is_widget(spec):
                default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                widgets.append(val if val is not None else default)
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
            else:
                inputs.append({"name": name, "type": spec[0], "link": None})
        lvl = level(key)
        row = rows.get(lvl, 0)
        rows[lvl] = row + 1
        nodes.append({
            "id": ids[key], "type": node["class_type"], "pos": [60 + 360 * lvl, 60 + 260 * row], "size": [320, 200],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(zip(info.get("output_name", info["output"]), info["output"]))],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    for n in nodes:
        for o in n["outputs"]:
            o["links"] = out_links.get((n["id"], o["slot_index"]), [])
    return {"last_node_id": len(nodes), "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def build_all(object_info: dict) -> dict[str, dict]:
    return {name: api_to_ui(g, object_info) for name, g in GRAPHS.items()}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with urllib.request.urlopen(argv[0].rstrip("/") + "/object_info", timeout=60) as r:
        info = json.loads(r.read())
    for name, wf in build_all(info).items():
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        print("wrote", WORKFLOWS / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
