"""The GPU's SM clock, board power and throttle reasons while a benchmark row is timed, sampled by ``nvidia-smi``.

Why: on the H100 both bf16 and svdq steps run at the board's 700 W software power cap, where the clock (and so the
step time) depends on the energy a step needs and on how hot the board is (BENCHMARKS.md, session 15: bf16 at
1410-1590 MHz, svdq at 1680-1965 MHz, rounds of the same code 4% apart). A row that records its clocks says whether a
slow round was slow code or a slow clock. Without ``nvidia-smi`` (CPU runs, other vendors) it records nothing.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time

log = logging.getLogger("svdq.bench")
QUERY = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # nvmlClocksThrottleReasonSwPowerCap


def parse_samples(lines: list[str], start: float, end: float) -> list[tuple[float, float, float, int]]:
    """(time, SM MHz, watts, throttle bits) of each ``nvidia-smi`` CSV line (``QUERY``, no header, no units) whose
    timestamp falls in [start, end] (seconds since the epoch, local time as nvidia-smi prints it); lines that do not
    parse (a header, an error message, a value nvidia-smi reports as "[N/A]") are skipped."""
    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            mhz, watts, bits = float(parts[1]), float(parts[2]), int(parts[3], 16)
        except ValueError:
            continue
        if start <= t <= end:
            out.append((t, mhz, watts, bits))
    return out


def summarize(samples: list[tuple[float, float, float, int]]) -> dict:
    """Median and range of the SM clock, median power, and the share of samples throttled by the power cap."""
    if not samples:
        return {}
    mhz = [s[1] for s in samples]
    return {"clock_samples": len(samples), "sm_mhz_median": statistics.median(mhz), "sm_mhz_min": min(mhz),
            "sm_mhz_max": max(mhz), "power_w_median": statistics.median(s[2] for s in samples),
            "power_capped_share": sum(1 for s in samples if s[3] & SW_POWER_CAP) / len(samples)}


class GpuClocks:
    """``with GpuClocks(index) as clocks: …; clocks.begin(); <timed work>; clocks.end()`` then ``clocks.summary()``.

    nvidia-smi samples every ``period_ms`` from the ``with`` (so that its start-up is over before the timed work)
    until ``end``; only samples between ``begin`` and ``end`` count."""

    def __init__(self, index: int = 0, period_ms: int = 100):
        self.index, self.period_ms = index, period_ms
        self.proc = self.file = None
        self.start = self.stop = 0.0
        self.samples: list = []

    def __enter__(self) -> "GpuClocks":
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            self.file = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
            self.proc = subprocess.Popen([exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                          "-lms", str(self.period_ms), "-i", str(self.index)],
                                         stdout=self.file, stderr=subprocess.STDOUT)
        return self

    def begin(self) -> None:
        self.start = time.time()

    def end(self) -> None:
        self.stop = time.time()

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        if not self.stop:
            self.stop = time.time()
        if self.proc.poll() is not None:  # it stopped by itself: a refused query; say so rather than record nothing
            with open(self.file.name) as f:
                log.warning("nvidia-smi exited with %s while sampling clocks: %s", self.proc.returncode,
                            f.read()[-300:].strip())
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.file.close()
        with open(self.file.name) as f:
            self.samples = parse_samples(f.readlines(), self.start, self.stop)
        os.unlink(self.file.name)

    def summary(self) -> dict:
        return summarize(self.samples)
