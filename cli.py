"""The ``svdq`` command: quantize, info, convert, pull, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("svdq")


def _quantize(args) -> int:
    from .comfy_runtime import import_comfy

    out = Path(args.output)
    if not out.parent.exists():
        raise SystemExit(f"svdq quantize: output folder {out.parent} does not exist")
    src = Path(args.input)
    from .quant.checkpoint import read_header

    read_header(src)  # clear errors for missing / corrupt / non-safetensors input before importing ComfyUI
    if args.device == "cpu":
        import_comfy(cpu=True)
    else:
        import_comfy()
    from tqdm import tqdm

    from .nodes.pipeline import load_calibration_file, load_float_model, quantize_patcher, random_conditioning, save_result
    from .quant.layer import QuantConfig

    cfg = QuantConfig(
        rank=args.rank,
        precision=args.precision,
        act_precision=args.act_precision,
        smooth_grid=0 if args.no_smooth else (10 if args.fast else 20),
        refine_iters=10 if args.fast else args.refine_iters,
        gptq=args.gptq,
    )
    model = load_float_model(src)
    conds = load_calibration_file(args.calib) if args.calib else random_conditioning(model, args.prompts)
    if not args.calib:
        log.warning("no --calib file: calibrating on %d random conditionings (fine for tests, worse for real models)", len(conds))
    cbar = tqdm(total=len(conds), desc="calibrate", unit="prompt")
    qbar = tqdm(total=0, desc="quantize", unit="layer")

    def on_layer(i, total, name):
        qbar.total = total
        qbar.set_postfix_str(name[-28:])
        qbar.update(1)

    def on_prompt(i, total):
        cbar.update(1)

    result = quantize_patcher(model, cfg, conds, steps=args.steps, size=args.latent_size, progress=on_layer,
                              calib_progress=on_prompt, device=args.device)
    cbar.close()
    qbar.close()
    save_result(result, cfg, model, out, src)
    errs = [r.error for r in result.reports.values()]
    print(f"wrote {out}: {len(result.layers)} quantized layers, mean layer error {sum(errs) / max(1, len(errs)):.4f}")
    return 0


def describe(path: str) -> dict:
    from .quant.checkpoint import CheckpointError, load_checkpoint, read_header
    from .quant.nunchaku_file import is_nunchaku_checkpoint, load_nunchaku_checkpoint

    conversion = None
    if is_nunchaku_checkpoint(path):
        ckpt, report = load_nunchaku_checkpoint(path)
        fmt = "nunchaku (" + ("legacy folder" if Path(path).is_dir() else "single file") + ")"
        conversion = report.as_dict()
    else:
        header, meta = read_header(path)
        if meta.get("format") != "svdq":
            raise CheckpointError(f"{path}: not an svdq or Nunchaku checkpoint (a plain safetensors file with "
                                  f"{len(header)} tensors)")
        ckpt = load_checkpoint(path, check_finite=False)
        fmt = f"svdq v{meta.get('format_version')}"
    info = ckpt.summary()
    return {
        "file": str(path),
        "format": fmt,
        "conversion": conversion,
        "family": info["family"],
        "config": ckpt.config,
        "layers": info["layers"],
        "bytes": info["bytes"],
        "bytes_16bit_equivalent": info["bytes_16bit"],
        "bits_per_weight": info["bits_per_weight"],
    }


def _info(args) -> int:
    d = describe(args.file)
    if args.json:
        print(json.dumps(d))
        return 0
    print(f"{d['file']}\n  format          {d['format']}\n  family          {d['family']}")
    c = d["config"]
    print(f"  precision       W {c.get('precision')} / A {c.get('act_precision')}, rank {c.get('rank')}")
    print(f"  layers          {', '.join(f'{v} {k}' for k, v in d['layers'].items())}")
    print(f"  size            {d['bytes'] / 2**20:.2f} MiB ({d['bytes'] / d['bytes_16bit_equivalent']:.3f}x of 16-bit)")
    print(f"  bits/weight     {d['bits_per_weight']:.2f} (quantized layers, scales and low-rank branch included)")
    if d["conversion"]:
        c = d["conversion"]
        if c["precision"] == "int4":
            print(f"  loads as        {c['exact_layers']} layers exactly (16-bit group scales kept: int4g path); "
                  "`svdq convert --requantize` trades a measured error for the int4 kernel path")
        else:
            print(f"  loads as        {c['exact_layers']} layers exactly (E2M1 codes and E4M3 scales carried over)")
        for note in c["notes"]:
            print(f"  note            {note}")
    return 0


def _convert(args) -> int:
    from .quant.checkpoint import save_checkpoint
    from .quant.nunchaku_file import is_nunchaku_checkpoint, load_nunchaku_checkpoint

    src, out = Path(args.input), Path(args.output)
    if not is_nunchaku_checkpoint(src):
        raise ValueError(f"{src}: not a Nunchaku SVDQuant checkpoint (file or legacy folder)")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    ckpt, report = load_nunchaku_checkpoint(src, scales="requantize" if args.requantize else "exact")
    save_checkpoint(out, ckpt.layers, ckpt.tensors, ckpt.config, ckpt.metadata)
    print(f"wrote {out}: {report.describe()}")
    if report.requantized:
        worst = sorted(report.requantized.items(), key=lambda kv: -kv[1])[:3]
        print("  changed numbers: requantized residual weights; largest relative weight errors: "
              + ", ".join(f"{k} {v:.4f}" for k, v in worst))
    else:
        print("  nothing lost: every tensor carried over exactly (smooth_orig is unused at run time and not kept)")
    return 0


def _pull(args) -> int:
    from .hub import pull

    path = pull(args.repo_id, args.file, dest_dir=args.dir, revision=args.revision, token=args.token)
    print(f"{path}")
    return 0


def _demo(args) -> int:
    from .demo import format_report, run_demo

    r = run_demo(args.out, fast=args.fast, rank=args.rank)
    print(format_report(r))
    if args.json:
        print(json.dumps(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdq", description="SVDQuant 4-bit diffusion models for ComfyUI")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a 16-bit diffusion model (.safetensors) ComfyUI can load")
    q.add_argument("input")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--rank", type=int, default=32)
    q.add_argument("--precision", choices=["int4", "nvfp4"], default="int4")
    q.add_argument("--act-precision", choices=["int4", "int8", "nvfp4"], default=None,
                   help="activation format (default: same as --precision; int8 = Hopper A8 mode)")
    q.add_argument("--calib", help="safetensors with 'context' [P,T,D] (+ 'pooled' [P,V]) text-encoder outputs")
    q.add_argument("--prompts", type=int, default=16, help="random conditionings when no --calib is given")
    q.add_argument("--steps", type=int, default=4, help="sampler steps per calibration prompt")
    q.add_argument("--latent-size", type=int, default=32, help="calibration latent size (pixels / 8)")
    q.add_argument("--refine-iters", type=int, default=100)
    q.add_argument("--fast", action="store_true", help="19-candidate smoothing grid, ≤10 refinement steps")
    q.add_argument("--no-smooth", action="store_true")
    q.add_argument("--gptq", action="store_true", help="GPTQ on the 4-bit residual")
    q.add_argument("--device", default=None, help="device for quantization math (default: ComfyUI's device)")
    q.set_defaults(func=_quantize)

    i = sub.add_parser("info", help="describe an svdq or Nunchaku checkpoint")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)

    c = sub.add_parser("convert", help="convert a Nunchaku SVDQuant checkpoint (file or legacy folder) to svdq format")
    c.add_argument("input")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--requantize", action="store_true",
                   help="re-express 16-bit group scales as integer multipliers (fast int4 kernels; error is measured and shown)")
    c.set_defaults(func=_convert)

    pl = sub.add_parser("pull", help="fetch a checkpoint from the Hugging Face Hub into ComfyUI's diffusion_models")
    pl.add_argument("repo_id")
    pl.add_argument("file", nargs="?", default=None, help="file in the repository (default: the svdq-* checkpoint)")
    pl.add_argument("--dir", default=None, help="destination folder (default: ComfyUI's diffusion_models)")
    pl.add_argument("--revision", default=None)
    pl.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    pl.set_defaults(func=_pull)

    d = sub.add_parser("demo", help="generate, quantize and run a small Flux-type model end to end")
    d.add_argument("--out", default="svdq-demo")
    d.add_argument("--rank", type=int, default=32)
    d.add_argument("--fast", action="store_true")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .hub import HubError
    from .quant.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, HubError, FileNotFoundError, IsADirectoryError, ValueError) as exc:
        print(f"svdq {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
