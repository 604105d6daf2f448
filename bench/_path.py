"""Make ``import svdq`` work when a bench script runs from a plain checkout (no ``pip install -e .``)."""

import sys
import tempfile
from pathlib import Path

try:
    import svdq  # noqa: F401
except ImportError:
    root = Path(__file__).resolve().parents[1]
    shim = Path(tempfile.gettempdir()) / f"svdq-path-{abs(hash(str(root)))}"
    shim.mkdir(exist_ok=True)
    link = shim / "svdq"
    if not link.exists():
        link.symlink_to(root, target_is_directory=True)
    sys.path.insert(0, str(shim))
