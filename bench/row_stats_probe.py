"""Can Inductor compute the activation kernel's row maxima inside the kernels that produce a layer's input?

Pass 1 of the activation kernels reads the whole input once more only for each row's max |x̂| (and the low-rank
partials). Under ``torch.compile`` the input of most linears is made by an Inductor kernel (GELU + concatenation in
FLUX's single blocks, the modulated LayerNorm before qkv / MLP, the attention output's re-layout), which could emit
the row maxima as a second output while it writes the input. This probe compiles FLUX's producers with and without
that extra output and reports, per pattern: the compiled time of each (CUDA-graph µs), the kernels each launched
(fused = the same number), whether the maxima equal the activation kernel's own bit for bit, and the activation
kernels' time on the same input for comparison.

    python3 bench/row_stats_probe.py [--batch 1,2]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

import _path  # noqa: F401
from _results import write_json  # noqa: E402


def exact(x: torch.Tensor) -> torch.Tensor:
    """The stored 16-bit values: Inductor elides a fused producer's downcast-upcast pair, a bitcast it cannot."""
    return x.view(torch.int16).view(x.dtype)


def row_max(x: torch.Tensor, inv: torch.Tensor, shift: float = 0.0, unsigned: bool = False) -> torch.Tensor:
    xf = (exact(x).float() + shift) * inv
    return (xf.clamp_min(0.0) if unsigned else xf.abs()).amax(-1)


def single_tail(q, k, v, mlp):
    """FLUX single block: attention, its re-layout, GELU of the MLP half, concatenation (linear2's input)."""
    a = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = a.shape
    a = a.transpose(1, 2).reshape(b, n, h * d)
    return torch.cat((a, F.gelu(mlp, approximate="tanh")), 2)


def modulated_norm(h, scale, shift):
    """The modulated LayerNorm before qkv / linear1 / the MLP."""
    return (1 + scale) * F.layer_norm(h, (h.shape[-1],), eps=1e-6) + shift


def attn_out(q, k, v):
    """The attention output's re-layout (the proj layers' input)."""
    a = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = a.shape
    return a.transpose(1, 2).reshape(b, n, h * d)


def gelu_only(y):
    """fc2's input where fc1 already applied GELU in its epilogue: a standalone reduction."""
    return y


def timed(fn, args, reps: int = 50) -> float:
    """µs per call under a CUDA graph of ``reps`` calls (``pdl_ab.graph_us``)."""
    from pdl_ab import graph_us

    return graph_us(lambda: fn(*args), calls=reps, replays=5)


def kernels(fn, args) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import triton

    from svdq.kernels.act_quant import quantize_activation

    dev = torch.device("cuda")
    bf = torch.bfloat16
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"python {platform.python_version()}")
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        n_img, n_txt, heads = 4096, 512, 24
        L = n_img + n_txt
        q, k, v = (torch.randn(batch, heads, L, 128, device=dev, dtype=bf) for _ in range(3))
        mlp = torch.randn(batch, L, 12288, device=dev, dtype=bf) * 2
        h = torch.randn(batch, L, 3072, device=dev, dtype=bf)
        sc, sh = (torch.randn(batch, 1, 3072, device=dev, dtype=bf) * 0.1 for _ in range(2))
        y12 = F.gelu(torch.randn(batch, n_img, 12288, device=dev, dtype=bf), approximate="tanh")
        cases = [
            ("single-block linear2 input (K=15360)", single_tail, (q, k, v, mlp), 15360),
            ("modulated LayerNorm (K=3072)", modulated_norm, (h, sc, sh), 3072),
            ("attention output (K=3072)", attn_out, (q, k, v), 3072),
            ("fc2 input from a GELU epilogue (K=12288)", gelu_only, (y12,), 12288),
        ]
        for name, f, fargs, kdim in cases:
            inv = torch.reciprocal(torch.rand(kdim, device=dev) * 4 + 0.25)
            down = torch.randn(kdim, 32, device=dev, dtype=bf) * 0.02

            def plain(*a, f=f):
                return f(*a)

            def with_stats(*a, f=f, inv=inv):
                x = f(*a)
                return x, row_max(x, inv)

            def naive(*a, f=f, inv=inv):  # without the bitcast: Inductor may use the unrounded values
                x = f(*a)
                return x, (x.float() * inv).abs().amax(-1)

            cp = torch.compile(plain, dynamic=False)
            cs = torch.compile(with_stats, dynamic=False)
            x, m = cs(*fargs)
            _, m_naive = torch.compile(naive, dynamic=False)(*fargs)
            naive_equal = bool(torch.equal(m, m_naive))
            t_plain = timed(cp, fargs)
            t_stats = timed(cs, fargs)
            k_plain = kernels(cp, fargs)
            k_stats = kernels(cs, fargs)
            x2 = x.reshape(-1, kdim)
            _, scale, _ = quantize_activation(x2, kdim, None, down, inv_smooth=inv)
            mm = m.reshape(-1)  # an IEEE division by a tensor: torch divides by a Python scalar via its reciprocal
            ref_scale = torch.where(mm > 0, mm / torch.full_like(mm, 105.0), torch.ones_like(mm))
            same = bool(torch.equal(scale, ref_scale))
            t_act = timed(lambda: quantize_activation(x2, kdim, None, down, inv_smooth=inv), ())
            row = {"batch": batch, "case": name, "M": x2.shape[0], "K": kdim, "plain_us": t_plain,
                   "with_stats_us": t_stats, "added_us": t_stats - t_plain, "act_kernels_us": t_act,
                   "kernels_plain": k_plain, "kernels_stats": k_stats, "scales_equal": same,
                   "scales_differing": int((scale != ref_scale).sum()),
                   "naive_maxima_equal": naive_equal}
            rows.append(row)
            print(f"b{batch} {name}: M={x2.shape[0]} plain {t_plain:.1f} us, with row maxima {t_stats:.1f} us "
                  f"(+{t_stats - t_plain:.1f}); kernels {len(k_plain)} -> {len(k_stats)}; scales equal: {same} "
                  f"({row['scales_differing']} differ; without the bitcast equal: {naive_equal}); act kernels (both passes, r32) {t_act:.1f} us", flush=True)
            print("   plain:", k_plain)
            print("   stats:", k_stats)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
