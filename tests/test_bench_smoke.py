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
        assert len(row["1"]["step_ms"]) == len(row["1"]["host_ms"]) == 1  # --reps 1
        assert 0 < row["1"]["host_ms"][0] <= row["1"]["step_ms"][0]  # queued before it finished
    assert res["summary"]["svdq_model_bytes_vs_bf16"] < 0.3  # 4-bit weights, scales and branch against bf16
    assert res["env"]["config"] == "tiny"


def test_config_ab_tiny_alternates_both_files(tmp_path):
    """``bench/config_ab.py`` on the tiny model (CPU): both pre-tuned files are timed in every round, in alternating
    order, and a file that is not JSON is refused before the model is built."""
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text((ROOT / "kernels" / "tuned_configs.json").read_text())
    b.write_text("{}")
    out = tmp_path / "ab.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "bench" / "config_ab.py"), "--config", "tiny", "--rounds", "2", "--batch", "1"]
    proc = subprocess.run(cmd + ["--a", str(a), "--b", str(b), "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["raw"]["eager_b1"]["a"]) == 2 and len(res["raw"]["eager_b1"]["b"]) == 2
    assert all(t > 0 for t in res["raw"]["eager_b1"]["a"] + res["raw"]["eager_b1"]["b"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run(cmd + ["--a", str(a), "--b", str(bad)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "JSONDecodeError" in proc.stderr


def test_config_ab_tiny_switches_settings(tmp_path):
    """A variant given as NAME=VALUE settings is switched like a file: both timed in every round."""
    out = tmp_path / "ab.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "bench" / "config_ab.py"), "--config", "tiny", "--rounds", "2", "--batch", "1",
           "--a", "SVDQ_PACKED_MAX_M=0", "--b", "SVDQ_PACKED_MAX_M=1024,SVDQ_GEMM=auto", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["raw"]["eager_b1"]["a"]) == 2 and len(res["raw"]["eager_b1"]["b"]) == 2
    assert res["env"]["b"] == "SVDQ_PACKED_MAX_M=1024,SVDQ_GEMM=auto"


def test_gpu_clock_samples_parse_and_summarize():
    """nvidia-smi's CSV lines (``bench/_gpu_clocks.py``): only samples inside the timed window count, lines that do not
    parse are skipped, and the summary gives the clock's median and range, the median power and the share of
    samples throttled by the software power cap (bit 0x4)."""
    import datetime

    sys.path.insert(0, str(ROOT / "bench"))
    from _gpu_clocks import parse_samples, summarize

    def stamp(sec):
        return datetime.datetime.fromtimestamp(1_800_000_000 + sec).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]

    lines = [f"{stamp(0)}, 1980, 120.5, 0x0000000000000000",  # before the window
             f"{stamp(1)}, 1590, 693.9, 0x0000000000000004",
             "timestamp, clocks.current.sm [MHz], power.draw [W], clocks_event_reasons.active",
             f"{stamp(1.5)}, [N/A], 700.1, 0x4",
             f"{stamp(2)}, 1470, 701.2, 0x0000000000000004",
             f"{stamp(2.5)}, 1935, 648.2, 0x0000000000000000",
             f"{stamp(9)}, 1980, 121.0, 0x0000000000000000"]  # after it
    samples = parse_samples(lines, 1_800_000_000 + 0.5, 1_800_000_000 + 3)
    assert [s[1] for s in samples] == [1590, 1470, 1935]
    got = summarize(samples)
    assert got["clock_samples"] == 3 and got["sm_mhz_median"] == 1590 and got["sm_mhz_min"] == 1470
    assert got["sm_mhz_max"] == 1935 and got["power_w_median"] == 693.9
    assert abs(got["power_capped_share"] - 2 / 3) < 1e-9
    assert summarize([]) == {}
