"""Environment switches read by the kernels' per-call and per-launch code, without ``os.environ.get``'s cost.

Why: ``os.environ.get`` of an unset name raises and catches a ``KeyError`` inside ``Mapping.get``, ~0.5 µs a name on
this project's CPU. A layer call read eleven names (the call-plan key alone nine: 5.6 µs), and a compiled 12B step
makes ~300 calls, at batch 1 on a host-bound step. These read ``os.environ``'s own dictionary (CPython's
``os._Environ``: keys and values stored encoded, on every platform), which ``os.environ[...] = ...``, ``del`` and
pytest's ``monkeypatch.setenv`` all update; where ``os.environ`` is not that object (replaced, another Python), they
fall back to ``os.environ.get``.
"""

from __future__ import annotations

import os

_ENVIRON = os.environ
_DATA = getattr(_ENVIRON, "_data", None)
_ENCODE = getattr(_ENVIRON, "encodekey", None)
_DECODE = getattr(_ENVIRON, "decodevalue", None)
_USABLE = isinstance(_DATA, dict) and callable(_ENCODE) and callable(_DECODE)
_KEYS: dict = {}  # a name's encoded key; a tuple of names' keys


def _key(name: str):
    k = _KEYS.get(name)
    if k is None:
        k = _KEYS[name] = _ENCODE(name)
    return k


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``."""
    if _USABLE and os.environ is _ENVIRON:
        v = _DATA.get(_key(name))
        return default if v is None else _DECODE(v)
    return os.environ.get(name, default)


def snapshot(names: tuple[str, ...]) -> tuple:
    """The current values of ``names`` as a hashable key (raw stored values; None where unset): equal exactly when
    every value is, for caches that must not outlive a switch changed mid-run."""
    if _USABLE and os.environ is _ENVIRON:
        keys = _KEYS.get(names)
        if keys is None:
            keys = _KEYS[names] = tuple(map(_key, names))
        return tuple(map(_DATA.get, keys))
    return tuple(map(os.environ.get, names))
