"""The full-model benchmark (``bench/e2e.py``) on its tiny configuration, on the CPU: every row it builds through
ComfyUI's loaders runs a step and the JSON it writes holds what BENCHMARKS.md reads (no timing is checked here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_bench_tiny_config_runs_every_core_row(tmp_path):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "e2e.py"), "--config", "tiny", "--rows", "bf16,svdq", "--batch", "1",
         "--cap-gb", "0", "--reps", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert set(rows) == {"bf16", "svdq"}
    for row in rows.values():
        assert row["1"]["ms"] > 0 and row["1"]["model_gib"] > 0
    assert res["summary"]["svdq_model_bytes_vs_bf16"] < 0.3  # 4-bit weights, scales and branch against bf16
    assert res["env"]["config"] == "tiny"
