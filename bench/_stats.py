"""How sure a same-run speed ratio is: pooled medians over rounds, with a bootstrap interval.

Why: the full-model step of one row spreads over ±5% from round to round on the H100 (power cap, BENCHMARKS.md
session 16), so one median against another cannot say whether 1.30× is met. Each round of a row is a cluster of
steps timed back to back; the interval resamples whole rounds (a cluster bootstrap), so the round-to-round spread
counts, not just the steps' own. A side with a single round can only resample its steps, which understates the
spread: ``rounds`` in the result says how many each side had.
"""

from __future__ import annotations

import random
import statistics


def _pooled_median(rounds: list[list[float]]) -> float:
    return statistics.median([t for r in rounds for t in r])


def _resample(rounds: list[list[float]], rng: random.Random) -> list[list[float]]:
    if len(rounds) > 1:
        return [rounds[rng.randrange(len(rounds))] for _ in rounds]
    steps = rounds[0]
    return [[steps[rng.randrange(len(steps))] for _ in steps]]


def speedup(slow: list[list[float]], fast: list[list[float]], boots: int = 2000, seed: int = 0,
            level: float = 0.95) -> dict:
    """``median(slow) / median(fast)`` over every step of every round (times in any unit), with a ``level``
    bootstrap interval. ``slow`` / ``fast``: one list of step times per round, e.g. bf16 and svdq."""
    if not slow or not fast or not all(slow) or not all(fast):
        raise ValueError("each side needs at least one round with at least one step")
    rng = random.Random(seed)
    ratios = sorted(_pooled_median(_resample(slow, rng)) / _pooled_median(_resample(fast, rng))
                    for _ in range(boots))
    tail = (1.0 - level) / 2
    return {"ratio": _pooled_median(slow) / _pooled_median(fast),
            "low": ratios[int(tail * (boots - 1))], "high": ratios[int((1.0 - tail) * (boots - 1))],
            "level": level, "rounds": [len(slow), len(fast)],
            "round_medians": [[statistics.median(r) for r in slow], [statistics.median(r) for r in fast]]}


def base_row(label: str) -> str:
    """A row's label without its ``ROUND=k`` setting: the rounds of one row pool under this name."""
    return "+".join(p for p in label.split("+") if not p.startswith("ROUND="))


def with_rounds(rows: list[str], rounds: int) -> list[str]:
    """The rows, then ``rounds - 1`` more rounds of them marked ``+ROUND=k`` (every other one in reverse order, so
    no row always runs right after the same one)."""
    out = list(rows)
    for k in range(2, rounds + 1):
        out += [f"{row}+ROUND={k}" for row in (rows[::-1] if k % 2 == 0 else rows)]
    return out


def busy_and_gaps(intervals: list[tuple[float, float]], top: int = 5) -> dict:
    """How much of a span the GPU was busy, from its kernels' (start, end) times (any unit): the union of the
    intervals, the span from the first start to the last end, the idle time between and its largest gaps. Why: a
    step longer than its kernels' sum waited on the host (a launch queue run dry), not on the GPU."""
    if not intervals:
        raise ValueError("no kernel intervals")
    spans = sorted(intervals)
    busy, gaps = 0.0, []
    cur_start, cur_end = spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_end))
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = cur_end - spans[0][0]
    gaps.sort(key=lambda g: -g[0])
    return {"busy": busy, "span": span, "idle": span - busy, "gaps": len(gaps),
            "largest_gaps": [{"length": g, "at": at - spans[0][0]} for g, at in gaps[:top]]}
