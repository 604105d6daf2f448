"""Fetch published SVDQuant checkpoints from the Hugging Face Hub into ComfyUI's ``diffusion_models`` folder.

Downloads go through ``huggingface_hub`` (its cache: resumable, progress bars, ``HF_HUB_OFFLINE``, the user's
token from ``HF_TOKEN`` or ``huggingface-cli login``); the file is then placed in the models folder as a hard link
(or a symbolic link, or a copy, whichever the filesystem allows), atomically.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("svdq")

_CANDIDATE = re.compile(r"(^|/)svdq-(int4|fp4)_r(\d+)-.*\.safetensors$")


class HubError(RuntimeError):
    """A fetch that cannot be done; the message says why and what to do."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def list_repo_files(repo_id: str, revision: str | None = None, token: str | None = None) -> list[str]:
    """Files of a Hub repository; offline, the files of its cached snapshot."""
    import huggingface_hub

    if _offline():
        try:
            snap = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
        except Exception as exc:
            raise HubError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set ({exc})") from exc
        root = Path(snap)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    try:
        return sorted(huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision, token=token))
    except Exception as exc:
        raise HubError(f"{repo_id}: cannot list the repository ({exc}). Check the name, your network and, for "
                       "gated or private repositories, your token (HF_TOKEN or `huggingface-cli login`).") from exc


def choose_file(files: list[str], repo_id: str) -> str:
    """The checkpoint to take when none is named: the only svdq-* file, else INT4 (runs everywhere) at the
    smallest rank. Errors list the candidates."""
    cands = [(f, m.group(2), int(m.group(3))) for f in files if (m := _CANDIDATE.search(f))]
    if not cands:
        st = [f for f in files if f.endswith(".safetensors")]
        raise HubError(f"{repo_id}: no svdq-{{int4|fp4}}_r*-*.safetensors checkpoint in the repository; "
                       f"name the file explicitly (safetensors files: {st[:10]})")
    if len(cands) == 1:
        return cands[0][0]
    cands.sort(key=lambda c: (c[1] != "int4", c[2], c[0]))
    chosen = cands[0][0]
    log.info("svdq: %s has %d checkpoints (%s); taking %s — name a file to choose another", repo_id, len(cands),
             ", ".join(c[0] for c in cands), chosen)
    return chosen


def _place(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` atomically: hard link, else symbolic link, else copy (temp file + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=str(dest.parent))
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            try:
                os.symlink(src.resolve(), tmp)
            except OSError:
                shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def pull(repo_id: str, filename: str | None = None, dest_dir: str | os.PathLike | None = None,
         revision: str | None = None, token: str | None = None) -> Path:
    """Fetch ``filename`` (or the best svdq-* checkpoint) of ``repo_id`` into ``dest_dir`` (default: ComfyUI's
    diffusion_models folder). Returns the local path. Already present files are not fetched again."""
    import huggingface_hub

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or ""):
        raise HubError(f"{repo_id!r} is not a Hugging Face repository id (expected OWNER/NAME)")
    if filename is None:
        filename = choose_file(list_repo_files(repo_id, revision, token), repo_id)
    dest_dir = Path(dest_dir) if dest_dir is not None else default_models_dir()
    dest = dest_dir / Path(filename).name
    try:
        cached = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, token=token,
                                                 local_files_only=_offline())
    except Exception as exc:
        hint = (" HF_HUB_OFFLINE is set and the file is not in the local cache; unset it to download."
                if _offline() else " Check the file name, your network and, for gated repositories, your token.")
        raise HubError(f"{repo_id}/{filename}: cannot fetch ({type(exc).__name__}: {exc}).{hint}") from exc
    cached = Path(cached).resolve()  # the blob, not the snapshot symlink
    if dest.exists() and os.path.samefile(dest, cached):
        return dest
    _place(cached, dest)
    log.info("svdq: %s/%s -> %s", repo_id, filename, dest)
    return dest


def default_models_dir() -> Path:
    """ComfyUI's first existing diffusion_models folder when ComfyUI is importable, else ./models/diffusion_models."""
    try:
        import folder_paths

        paths = folder_paths.get_folder_paths("diffusion_models")
        existing = [p for p in paths if os.path.isdir(p)]
        return Path(existing[0] if existing else paths[0])
    except Exception:
        return Path("models") / "diffusion_models"
