"""Can weight expansion hide behind attention? A same-run probe before building a side-stream prefetch.

    python3 bench/overlap_probe.py [--batch 2]

The expansion pass (4-bit codes × group multipliers → the int8 GEMM operand) runs at copy rate, about 3.5 ms of a
FLUX step, and depends only on the weights, so it could run on a second stream while the main stream is busy with
compute-bound work. Times, as CUDA-graph replays (one graph per case, both streams captured, GPU µs, median):

- attention alone (SDPA, FLUX's single-block shape), the single block's two expansions alone (linear2, next linear1);
- both at once: expansions on a side stream queued before / after the attention, the side stream at normal or
  high priority, or the attention on a high-priority stream (what the prefetcher of commit 36cf822 did; it was
  measured in the full model and dropped, BENCHMARKS.md);
- the same with the linear1 GEMM (ping-pong, persistent) instead of attention: expansions behind a GEMM.

Hidden share = (alone + alone − together) / expansions alone.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import _path  # noqa: F401


def replay_us(capture, reps: int = 30) -> float:
    """Median GPU µs of one replay of a graph holding ``capture()``'s work (both streams joined back)."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        capture()
        capture()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        capture()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from svdq.kernels.gemm_w4a4 import expand_weight
    from svdq.kernels.dispatch import svdq_linear

    from linear import make_layer

    dev = "cuda"
    b, tokens, heads = args.batch, 4608, 24
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {b}")
    q, k, v = (torch.randn(b, heads, tokens, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    lin2 = make_layer(3072, 15360, 32)
    lin1 = make_layer(21504, 3072, 32)
    ws2 = torch.empty(3072, 15360, dtype=torch.int8, device=dev)
    ws1 = torch.empty(21504, 3072, dtype=torch.int8, device=dev)
    x1 = torch.randn(b * tokens, 3072, device=dev, dtype=torch.bfloat16)

    def attn():
        F.scaled_dot_product_attention(q, k, v)

    def gemm():
        svdq_linear(x1, lin1)

    def expand():
        expand_weight(lin2.qweight, lin2.wmult, out=ws2)
        expand_weight(lin1.qweight, lin1.wmult, out=ws1)

    def together(work, first_side: bool, side_priority: int, work_high: bool = False):
        side = torch.cuda.Stream(priority=side_priority)
        high = torch.cuda.Stream(priority=-1)

        def run_work():
            if not work_high:
                return work()
            high.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(high):
                work()

        def cap():
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            if first_side:
                with torch.cuda.stream(side):
                    expand()
                run_work()
            else:
                run_work()  # launched first, so its blocks are queued before the expansion's
                with torch.cuda.stream(side):
                    expand()
            main.wait_stream(side)
            if work_high:
                main.wait_stream(high)
        return cap

    t_e = replay_us(expand)
    print(f"expansions alone (linear2 + linear1 weights): {t_e:.1f} µs")
    for name, work in (("attention", attn), ("linear1 GEMM", gemm)):
        t_w = replay_us(work)
        print(f"{name} alone: {t_w:.1f} µs; serial sum {t_w + t_e:.1f}")
        for first_side in (False, True):
            for prio in (0, -1):
                t = replay_us(together(work, first_side, prio))
                hidden = (t_w + t_e - t) / t_e
                print(f"  {name} + expansions on a side stream ({'side first' if first_side else 'work first'}, "
                      f"side priority {prio}): {t:.1f} µs, hidden {hidden:.0%}")
            t = replay_us(together(work, first_side, 0, work_high=True))
            print(f"  {name} on a high-priority stream, expansions on a normal one "
                  f"({'side first' if first_side else 'work first'}): {t:.1f} µs, hidden {(t_w + t_e - t) / t_e:.0%}")


if __name__ == "__main__":
    main()
