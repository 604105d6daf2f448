"""First-block cache for DiTs and UNets, built on ComfyUI's patch and wrapper mechanisms.

DiTs (Flux-type): ComfyUI's block-replacement patches (``patches_replace["dit"]``).

Each step runs the first block and compares its residual with the previous step's. If the relative change is
below the threshold (inside the start/end range of the schedule), the remaining blocks are skipped and their
cached total residual is added instead. Blocks are passed through as identities, so ControlNet additions and any
block patch already installed keep working; patches present before this one are called, not replaced.
UNets: an input-block patch measures the first block's output change; when it is small it stops the forward
(a private exception) and a diffusion-model wrapper returns the last fully computed prediction instead.
State is kept per cond/uncond batch and reset whenever a new sampling run starts (sigma goes up).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("svdq")


class FirstBlockCache:
    def __init__(self, threshold: float, sigma_start: float, sigma_end: float, n_double: int, n_single: int):
        self.threshold = threshold
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.n_double = n_double
        self.n_single = n_single
        self.state: dict = {}
        self.skipped_steps = 0
        self.computed_steps = 0

    @staticmethod
    def _key(topts) -> tuple:
        return tuple(topts.get("cond_or_uncond", []))

    def _begin_step(self, topts, sigma: float | None) -> dict:
        """This batch's state at the start of a step; a fresh one when a new sampling run begins (sigma goes up)."""
        key = self._key(topts)
        st = self.state.get(key)
        if st is None or (sigma is not None and st["sigma"] is not None and sigma > st["sigma"]):
            st = {"prev_r0": None, "residual": None, "skip": False, "sigma": sigma, "first": None}
            self.state[key] = st
        st["sigma"] = sigma
        return st

    def _current(self, topts) -> dict:
        """The state the step's first block set up: later blocks read no tensor (no host-GPU synchronisation per
        block, which kept the host from running ahead: 57 synchronisations per FLUX step)."""
        st = self.state.get(self._key(topts))
        return st if st is not None else self._begin_step(topts, None)

    def _step_values(self, topts, change: torch.Tensor | None, device) -> tuple[float | None, float | None]:
        """(sigma, relative change) on the host with one device-to-host copy: the one synchronisation a step needs
        (whether to skip decides which kernels the host launches next)."""
        sig = topts.get("sigmas")
        vals = []
        if torch.is_tensor(sig):
            vals.append(sig.detach().max().float().to(device))
        if change is not None:
            vals.append(change.detach().float().reshape(()).to(device))
        host = torch.stack(vals).tolist() if vals else []
        sigma = host[0] if torch.is_tensor(sig) else None
        return sigma, (host[-1] if change is not None else None)

    def _relative_change(self, prev: dict | None, r0: torch.Tensor) -> torch.Tensor | None:
        if self.threshold <= 0 or prev is None or prev["prev_r0"] is None or prev["residual"] is None:
            return None
        if prev["prev_r0"].shape != r0.shape:
            return None
        return (r0 - prev["prev_r0"]).abs().mean() / prev["prev_r0"].abs().mean().clamp(min=1e-12)

    def _in_range(self, st) -> bool:
        s = st["sigma"]
        return s is None or (self.sigma_end <= s <= self.sigma_start)

    def first_double(self, prev):
        def patch(args, extra):
            topts = args["transformer_options"]
            img_in = args["img"].clone()  # ComfyUI's blocks update their input in place
            out = prev(args, extra) if prev is not None else extra["original_block"](args)
            r0 = out["img"] - img_in
            before = self.state.get(self._key(topts))
            change = self._relative_change(before, r0)
            sigma, value = self._step_values(topts, change, r0.device)
            st = self._begin_step(topts, sigma)
            skip = value is not None and st is before and self._in_range(st) and value < self.threshold
            st["skip"] = skip
            if not skip:
                st["prev_r0"] = r0  # compare against the last step that was fully computed
            st["first"] = torch.cat((out["txt"], out["img"]), 1)
            if skip:
                self.skipped_steps += 1
            else:
                self.computed_steps += 1
            return out

        return patch

    def passthrough(self, prev, keys):
        def patch(args, extra):
            st = self._current(args["transformer_options"])
            if st["skip"]:
                return {k: args[k] for k in keys}
            return prev(args, extra) if prev is not None else extra["original_block"](args)

        return patch

    def last_single(self, prev):
        def patch(args, extra):
            st = self._current(args["transformer_options"])
            if st["skip"]:
                return {"img": args["img"] + st["residual"]}
            out = prev(args, extra) if prev is not None else extra["original_block"](args)
            if st["first"] is not None and st["first"].shape == out["img"].shape:
                st["residual"] = out["img"] - st["first"]
            return out

        return patch


class _SkipRest(Exception):
    pass


class UNetFirstBlockCache(FirstBlockCache):
    def __init__(self, threshold, sigma_start, sigma_end, probe_block: int):
        super().__init__(threshold, sigma_start, sigma_end, 0, 0)
        self.probe_block = probe_block

    def input_block_patch(self, h, topts):
        if topts.get("block") != ("input", self.probe_block):
            return h
        before = self.state.get(self._key(topts))
        change = self._relative_change(before, h)
        sigma, value = self._step_values(topts, change, h.device)
        st = self._begin_step(topts, sigma)
        if value is not None and st is before and self._in_range(st) and value < self.threshold:
            self.skipped_steps += 1
            raise _SkipRest()
        st["prev_r0"] = h.detach().clone()
        self.computed_steps += 1
        return h

    def wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        try:
            out = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        except _SkipRest:
            return self._current(transformer_options)["residual"].clone()
        self._current(transformer_options)["residual"] = out.detach().clone()
        return out


def _sigma_range(m, start_percent, end_percent):
    ms = m.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))


def apply_first_block_cache(model, threshold: float, start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of a Flux-type DiT or UNet ComfyUI model with the first-block cache installed (threshold 0: off)."""
    dm = model.model.diffusion_model
    n_double = len(getattr(dm, "double_blocks", []))
    n_single = len(getattr(dm, "single_blocks", []))
    is_unet = hasattr(dm, "input_blocks") and hasattr(dm, "output_blocks")
    if not is_unet and (n_double == 0 or n_single == 0):
        raise ValueError(
            f"first-block cache needs a Flux-type DiT (double and single blocks) or a UNet; {type(dm).__name__} is neither"
        )
    m = model.clone()
    if threshold <= 0:
        return m
    if is_unet:
        import comfy.patcher_extension

        s0, s1 = _sigma_range(m, start_percent, end_percent)
        cache = UNetFirstBlockCache(threshold, s0, s1, probe_block=1 if len(dm.input_blocks) > 1 else 0)
        m.set_model_input_block_patch(cache.input_block_patch)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "svdq_first_block_cache", cache.wrapper)
        m.svdq_first_block_cache = cache
        return m
    ms = m.get_model_object("model_sampling")
    cache = FirstBlockCache(threshold, float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent)),
                            n_double, n_single)
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for i in range(n_double):
        prev = existing.get(("double_block", i))
        fn = cache.first_double(prev) if i == 0 else cache.passthrough(prev, ("img", "txt"))
        m.set_model_patch_replace(fn, "dit", "double_block", i)
    for j in range(n_single):
        prev = existing.get(("single_block", j))
        fn = cache.last_single(prev) if j == n_single - 1 else cache.passthrough(prev, ("img",))
        m.set_model_patch_replace(fn, "dit", "single_block", j)
    m.svdq_first_block_cache = cache
    return m
