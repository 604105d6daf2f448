"""Shape-keyed autotuning with a persistent on-disk cache, so the first image is not slowed by tuning.

Triton's own autotuner re-benchmarks in every new process. This one stores the winning config per (GPU, kernel,
shape bucket) in ``~/.cache/svdq/autotune.json`` (or ``$SVDQ_CACHE``), written atomically. During CUDA-graph
capture, under the Triton interpreter, or with ``SVDQ_AUTOTUNE=0`` it uses the cached or default config
without benchmarking.

Where the user's cache has no entry, ``tuned_configs.json`` beside this file (winners measured on our own GPUs
for FLUX-size layers, same keys) is used before tuning, so the first image on an H100 or H200 is not slowed by
tuning at all; a shipped config this install cannot run (another Triton, no Gluon) is ignored and the shape tuned.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path

import torch
import triton

from .settings import getenv

log = logging.getLogger("svdq")
_lock = threading.Lock()
_cache: dict | None = None


def cache_file() -> Path:
    base = os.environ.get("SVDQ_CACHE")
    return Path(base) / "autotune.json" if base else Path.home() / ".cache" / "svdq" / "autotune.json"


def _load() -> dict:
    global _cache
    if _cache is None:
        try:
            _cache = json.loads(cache_file().read_text())
        except (OSError, json.JSONDecodeError):
            _cache = {}
    return _cache


def _save() -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(_cache, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break inference
        log.debug("svdq: cannot write autotune cache %s: %s", path, exc)


_shipped_cache: dict | None = None
_tuners: "weakref.WeakSet" = weakref.WeakSet()  # every TunedKernel, for reload_tuned_configs


def shipped() -> dict:
    """The pre-tuned configs that ship with the package (empty when the file is missing or unreadable), or those of
    ``$SVDQ_TUNED_CONFIGS`` (a site's own pre-tuned file; same-run A/B of two tunings in ``bench/``)."""
    global _shipped_cache
    if _shipped_cache is None:
        path = os.environ.get("SVDQ_TUNED_CONFIGS") or Path(__file__).with_name("tuned_configs.json")
        try:
            _shipped_cache = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            if os.environ.get("SVDQ_TUNED_CONFIGS"):
                log.warning("svdq: cannot read SVDQ_TUNED_CONFIGS=%s (%s); tuning shapes as they come", path, exc)
            _shipped_cache = {}
    return _shipped_cache


def reload_tuned_configs() -> None:
    """Forget the pre-tuned file and every tuner's remembered choices, so the next calls read
    ``$SVDQ_TUNED_CONFIGS`` (or the shipped file) again: a same-run A/B of two tunings (``bench/config_ab.py``).
    Call plans are keyed by that variable (``dispatch._ENV``), so they are re-recorded too."""
    global _shipped_cache
    _shipped_cache = None
    for tuner in list(_tuners):
        tuner._fast.clear()


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(int(m), 1)), 16384)


def interpreting() -> bool:
    return getenv("TRITON_INTERPRET", "0") == "1"



_PROPS: dict = {}


def _props(device: torch.device):
    if device.index not in _PROPS:
        _PROPS[device.index] = torch.cuda.get_device_properties(device)
    return _PROPS[device.index]


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (1 elsewhere), cached: persistent grids are sized by it."""
    return _props(device).multi_processor_count if device.type == "cuda" else 1


def capability_major(device: torch.device) -> int:
    """The CUDA compute capability's major number (0 elsewhere), cached."""
    return _props(device).major if device.type == "cuda" else 0


def fp32_dots(*tensors) -> bool:
    """Use fp32 dots: for fp32 data, and under the interpreter (which mishandles 16-bit float dots)."""
    if interpreting():
        return True
    return any(t is not None and t.dtype == torch.float32 for t in tensors)


class TunedKernel:
    """Picks one of ``configs`` per shape bucket for a GEMM-style launch (tuned once, cached on disk); subclasses
    say how a config is launched. By convention ``args[8:11]`` are M, N, Kp."""

    def __init__(self, name: str, configs: list):
        self.name = name
        self.configs = configs
        self._fast: dict = {}
        _tuners.add(self)

    @staticmethod
    def _cfg_dict(cfg) -> dict:
        return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    def _launch(self, cfg: dict, args: tuple, flags: dict, m: int, n: int) -> None:
        raise NotImplementedError

    def __call__(self, args: tuple, flags: dict, config: dict | None = None):
        m_, n_, kp_ = args[8], args[9], args[10]
        if config is not None:
            return self._launch(config, args, flags, m_, n_)
        if interpreting() or not torch.cuda.is_available():
            return self._launch(self._cfg_dict(self.configs[-1]), args, flags, m_, n_)
        fast_key = (args[0].device.index, m_bucket(m_), n_, kp_, tuple(flags.items()))
        cfg = self._fast.get(fast_key)  # hot path: no string building, no file access
        if cfg is None:
            cfg = self._lookup_or_tune(args, flags, m_, n_, kp_)
            if cfg is None:  # capturing a graph or tuning disabled: the first default that fits, not remembered
                return self._launch_default(args, flags, m_, n_)
            self._fast[fast_key] = cfg
        return self._launch(cfg, args, flags, m_, n_)

    def _launch_default(self, args, flags, m, n):
        """The first config in ``_default_order``, or the next where a larger one does not fit this GPU's shared
        memory (a wide low-rank branch makes the epilogue bigger)."""
        configs = self._default_order(self._candidates(args, flags) or self.configs, args)
        for i, c in enumerate(configs):
            try:
                return self._launch(self._cfg_dict(c), args, flags, m, n)
            except Exception as exc:
                if "out of resource" not in str(exc).lower() or i == len(configs) - 1:
                    raise

    def _lookup_or_tune(self, args, flags, m_, n_, kp_):
        dev = torch.cuda.get_device_name(args[0].device)
        key = "|".join([dev, self.name, str(m_bucket(m_)), str(n_), str(kp_)] + [f"{k}={flags[k]}" for k in sorted(flags)])
        cache = _load()
        cfg = cache.get(key)
        if cfg is None:
            pre = shipped().get(key)
            if pre is not None and any(self._cfg_dict(c) == pre for c in self._candidates(args, flags)):
                return pre
            if os.environ.get("SVDQ_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
                return None
            cfg = self._tune(args, flags, m_, n_)
            with _lock:
                cache[key] = cfg
                _save()
        return cfg

    def _tuning_args(self, args: tuple, flags: dict) -> tuple[tuple, dict]:
        """What the candidates are timed on (a subclass may swap in scratch outputs)."""
        return args, flags

    def _tune(self, args, flags, m, n) -> dict:
        from .launch import not_recorded

        with not_recorded():
            return self._tune_all(*self._tuning_args(args, flags), m, n)

    def _default_order(self, configs: list, args: tuple) -> list:
        """The order untuned calls try configs in (a subclass may put a shape's usual winner first)."""
        return configs

    def _candidates(self, args: tuple, flags: dict) -> list:
        """The configs that may run this call (a subclass may drop those a kernel cannot take)."""
        return self.configs

    def _tune_all(self, args, flags, m, n) -> dict:
        best = None
        for c in self._candidates(args, flags):
            cd = self._cfg_dict(c)
            try:
                t = triton.testing.do_bench(lambda: self._launch(cd, args, flags, m, n), warmup=5, rep=20, return_mode="median")
            except Exception as exc:  # e.g. out of shared memory for this config on this GPU
                # a tile too big for this GPU (a wide low-rank branch grows the epilogue) is an expected skip
                level = logging.DEBUG if "out of resource" in str(exc).lower() else logging.WARNING
                log.log(level, "svdq: kernel config %s failed: %s", cd, str(exc)[-2000:])
                continue
            if best is None or t < best[0]:
                best = (t, cd)
        if best is None:
            raise RuntimeError(f"svdq: no kernel configuration of {self.name} runs on this GPU")
        log.info("svdq: tuned %s for M~%d N=%d: %s (%.1f us)", self.name, m, n, best[1]["kwargs"], best[0] * 1e3)
        return best[1]
