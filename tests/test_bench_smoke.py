"""The full-model benchmark (``bench/e2e.py``) on its tiny configuration, on the CPU: every row it builds through
ComfyUI's loaders runs a step and the JSON it writes holds what BENCHMARKS.md reads (no timing is checked here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_bench_tiny_config_runs_every_core_row(tmp_path):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "e2e.py"), "--config", "tiny", "--rows", "bf16,svdq", "--batch", "1",
         "--cap-gb", "0", "--reps", "2", "--rounds", "2", "--host-profile", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert set(rows) == {"bf16", "svdq", "bf16+ROUND=2", "svdq+ROUND=2"}  # --rounds 2
    for row in rows.values():
        assert row["1"]["ms"] > 0 and row["1"]["model_gib"] > 0
        assert len(row["1"]["step_ms"]) == len(row["1"]["host_ms"]) == 2  # --reps 2
        assert all(0 < h <= t for h, t in zip(row["1"]["host_ms"], row["1"]["step_ms"]))  # queued before it finished
    for name, row in rows.items():  # --host-profile: the step's host time by part of the stack
        hp = row["1"]["host_profile"]
        assert abs(sum(hp["own_ms_by_group"].values()) - hp["total_ms"]) < 1e-6 and hp["top"]
        assert ("svdq" in hp["own_ms_by_group"]) == name.startswith("svdq")  # ComfyUI's files are not ours
    pooled = res["pooled"]["svdq_vs_bf16"]["1"]
    assert pooled["rounds"] == [2, 2] and pooled["low"] <= pooled["high"]
    steps = sorted(t for row in ("bf16", "bf16+ROUND=2") for t in rows[row]["1"]["step_ms"])
    svdq = sorted(t for row in ("svdq", "svdq+ROUND=2") for t in rows[row]["1"]["step_ms"])
    assert abs(pooled["ratio"] - (steps[1] + steps[2]) / (svdq[1] + svdq[2])) < 1e-9  # medians of the 4 steps
    assert res["summary"]["svdq_model_bytes_vs_bf16"] < 0.3  # 4-bit weights, scales and branch against bf16
    assert res["env"]["config"] == "tiny"


def test_e2e_bench_compiled_row_is_the_compile_node(tmp_path):
    """A ``*_compile`` row compiles per block through the SVDQ Compile Model node's code; with ``aot_eager`` (no code
    generation, eager numerics) its output is the eager row's."""
    out = tmp_path / "e2e.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "e2e.py"), "--config", "tiny", "--rows", "svdq,svdq_compile", "--batch", "1",
         "--cap-gb", "0", "--reps", "1", "--compile-backend", "aot_eager", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert "error" not in rows["svdq_compile"], rows["svdq_compile"]
    assert rows["svdq_compile"]["1"]["out_rel_diff_vs_svdq"] < 1e-5
    assert "first step (compiling)" in proc.stdout


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


def test_pooled_speedup_interval_and_rounds():
    """``bench/_stats.py``: the pooled ratio is the ratio of medians over every step of every round; its bootstrap
    interval resamples whole rounds (so a round-to-round spread widens it) and holds the true ratio of clearly
    separated rows; a single round resamples its steps; rows pool by name without their ROUND setting, and extra
    rounds alternate their order."""
    import random

    sys.path.insert(0, str(ROOT / "bench"))
    from _stats import base_row, speedup, with_rounds

    rng = random.Random(1)
    bf16 = [[270 + rng.gauss(0, 2) for _ in range(7)] for _ in range(4)]
    svdq = [[207 + rng.gauss(0, 2) for _ in range(7)] for _ in range(4)]
    got = speedup(bf16, svdq)
    assert got["rounds"] == [4, 4] and got["low"] < got["ratio"] < got["high"]
    assert 1.28 < got["low"] and got["high"] < 1.33
    drift = [[t + 12 * k for t in r] for k, r in enumerate(svdq)]  # rounds drifting apart: a wider interval
    wide = speedup(bf16, drift)
    assert wide["high"] - wide["low"] > 3 * (got["high"] - got["low"])
    same = speedup(bf16, bf16)
    assert same["ratio"] == 1.0 and same["low"] <= 1.0 <= same["high"]
    one = speedup([[270.0, 272.0, 268.0]], [[207.0, 209.0, 205.0]])
    assert one["rounds"] == [1, 1] and one["ratio"] == 270.0 / 207.0 and one["low"] <= one["high"]
    with pytest.raises(ValueError, match="at least one"):
        speedup([], svdq)
    assert base_row("svdq_compile+SVDQ_BRANCH=turn+ROUND=3") == "svdq_compile+SVDQ_BRANCH=turn"
    assert base_row("bf16_compile+ROUND=2") == "bf16_compile" and base_row("svdq") == "svdq"
    assert with_rounds(["a", "b"], 3) == ["a", "b", "b+ROUND=2", "a+ROUND=2", "a+ROUND=3", "b+ROUND=3"]
    assert with_rounds(["a"], 1) == ["a"]


def test_gpu_busy_and_idle_gaps():
    """``bench/_stats.busy_and_gaps``: overlapping and nested kernels count once, the idle time is the span less
    the union, and the largest gaps come first with where they start."""
    sys.path.insert(0, str(ROOT / "bench"))
    from _stats import busy_and_gaps

    got = busy_and_gaps([(10, 20), (15, 30), (16, 18), (40, 45), (100, 101), (30, 32)])
    assert got["busy"] == 22 + 5 + 1 and got["span"] == 91 and got["idle"] == 91 - 28
    assert got["gaps"] == 2
    assert got["largest_gaps"] == [{"length": 55, "at": 35}, {"length": 8, "at": 22}]
    assert busy_and_gaps([(0, 5)])["idle"] == 0
    with pytest.raises(ValueError, match="no kernel"):
        busy_and_gaps([])


def test_e2e_link_projection_replaces_the_measured_copy_time():
    """The capped bf16 step projected onto another host link: at the link rate the step's copies ran at here it is
    the measured step; slower links add the same bytes' longer transfer, nothing else."""
    sys.path.insert(0, str(ROOT / "bench"))
    import e2e

    capped = {"ms": 246.4, "htod_ms": 157.7, "offloaded_gib": 8.03}
    here = capped["offloaded_gib"] * 2**30 / (capped["htod_ms"] / 1e3) / 1e9  # GB/s the copies ran at
    proj = e2e.link_projection(capped, [here, 25.0, 12.0])
    assert proj[f"{here:g}"] == pytest.approx(capped["ms"], rel=1e-4)
    assert proj["25"] == pytest.approx(246.4 - 157.7 + 8.03 * 2**30 / 25e9 * 1e3)
    assert proj["12"] > proj["25"] > capped["ms"]


def test_register_operand_probe_finds_writes_to_in_flight_operands():
    """``bench/gluon_register_operand_probe.py``'s SASS reading: the registers the loop's last IGMMA group reads as A
    (four from each named one), and the loop's instructions that write any of them; none where the loop leaves them
    alone, nothing where there is no loop."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gluon_register_operand_probe import overwritten_operands

    def sass(body):
        return "\n".join(f"        /*{addr:04x}*/                   {ins} ;" for addr, ins in body)

    loop = [(0x10, "LDG.E.U16 R153, desc[UR12][R20.64]"), (0x20, "IMAD R40, R41, R42, RZ"),
            (0x30, "WARPGROUP.ARRIVE"), (0x40, "IGMMA.64x128x32.S8.S8 R88, R152, gdesc[UR32], R88"),
            (0x50, "IGMMA.64x128x32.S8.S8 R24, R160, gdesc[UR8], R24, gsb0"),
            (0x60, "WARPGROUP.DEPBAR.LE gsb0, 0x1"), (0x70, "@P0 BRA 0x10")]
    regs, writers = overwritten_operands(sass(loop))
    assert regs == ["R152", "R153", "R154", "R155", "R160", "R161", "R162", "R163"]
    assert len(writers) == 1 and "R153" in writers[0]
    safe = [(a, "LDG.E.U16 R30, desc[UR12][R20.64]") if a == 0x10 else (a, ins) for a, ins in loop]
    assert overwritten_operands(sass(safe)) == (regs, [])
    assert overwritten_operands(sass(loop[:-1])) == ([], [])
