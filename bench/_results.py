"""One way for bench scripts to write their JSON results: atomically (temp file + rename), so an interrupted run
(a device call cut at its time limit) leaves the previous file or none, never half of one."""

from __future__ import annotations

import json
import os
import tempfile


def write_json(path: str, obj, **dump_kwargs) -> None:
    """``json.dump(obj)`` into ``path`` by way of a temp file in the same folder; ``indent=1`` unless given."""
    dump_kwargs.setdefault("indent", 1)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, **dump_kwargs)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
