"""Streaming calibration: per-channel activation statistics and a bounded input sample per layer.

Forward pre-hooks see each selected linear's input, update running statistics (per-channel absmax, minimum,
Hessian-free) on the input's device, and keep a bounded random subset of rows on the CPU in bfloat16. Memory is
O(layers × max_rows × K) however long calibration runs, so a 12B model never holds its activations at once.
Layers whose inputs are the very same tensor (q/k/v reading one normalised input) are recorded as a group, so
they can share one smoothing vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerStats:
    in_features: int
    absmax: torch.Tensor | None = None
    minimum: float = float("inf")
    tokens: int = 0
    calls: int = 0
    samples: list = field(default_factory=list)
    sample_rows: int = 0

    def sample(self) -> torch.Tensor:
        if not self.samples:
            return torch.zeros(0, self.in_features)
        return torch.cat(self.samples, dim=0)


class Calibrator:
    """Context manager that hooks the given linears. ``rows_per_call`` rows are sampled from every call."""

    def __init__(self, modules: dict[str, nn.Module], max_rows: int = 256, rows_per_call: int = 32, seed: int = 0):
        self.modules = modules
        self.max_rows = max_rows
        self.rows_per_call = rows_per_call
        self.stats = {n: LayerStats(getattr(m, "in_features", 0)) for n, m in modules.items()}
        self._handles: list = []
        self._gen = torch.Generator().manual_seed(seed)
        self._last: tuple[torch.Tensor, str] | None = None
        self.shared_input: dict[str, str] = {}  # layer -> first layer seen reading the same tensor

    def _hook(self, name: str):
        def pre_hook(module, args):
            if not args or not torch.is_tensor(args[0]):
                return None
            x = args[0].detach()
            st = self.stats[name]
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[1] != st.in_features:
                return None
            # Holding the last input alive means its memory cannot be reused, so pointer equality is identity.
            last = self._last
            if last is not None and last[0].data_ptr() == x.data_ptr() and last[0].shape == x.shape:
                if st.calls == 0:
                    self.shared_input[name] = self.shared_input.get(last[1], last[1])
            else:
                self._last = (x, name)
            x2f = x2.float()
            if not torch.isfinite(x2f).all():
                raise FloatingPointError(f"calibration: the input of layer {name!r} contains NaN/Inf")
            amax = x2f.abs().amax(dim=0)
            st.absmax = amax if st.absmax is None else torch.maximum(st.absmax, amax)
            st.minimum = min(st.minimum, float(x2f.min()))
            st.tokens += x2.shape[0]
            st.calls += 1
            take = min(self.rows_per_call, x2.shape[0])
            idx = torch.randperm(x2.shape[0], generator=self._gen)[:take].to(x2.device)
            st.samples.append(x2[idx].to("cpu", torch.bfloat16))
            st.sample_rows += take
            if st.sample_rows > 2 * self.max_rows:  # thin the reservoir back to max_rows, uniformly
                allrows = torch.cat(st.samples, 0)
                keep = torch.randperm(allrows.shape[0], generator=self._gen)[: self.max_rows]
                st.samples = [allrows[keep]]
                st.sample_rows = self.max_rows
            return None

        return pre_hook

    def __enter__(self) -> "Calibrator":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def groups(self) -> list[list[str]]:
        """Layers sharing one input tensor (each group shares a smoothing vector); singletons included."""
        out: dict[str, list[str]] = {}
        for name in self.modules:
            root = self.shared_input.get(name, name)
            out.setdefault(root, []).append(name)
        return list(out.values())

    def samples(self, name: str) -> torch.Tensor:
        st = self.stats[name]
        s = st.sample()
        if s.shape[0] > self.max_rows:
            s = s[torch.randperm(s.shape[0], generator=self._gen)[: self.max_rows]]
        return s
