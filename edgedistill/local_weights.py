"""Local weights: what ``teacher.weights``, ``student.weights`` and ``synthetic.weights`` may name, their sha256, and
one line when they fail to load.

The teachers, students and generators import this when a recipe names a local file or folder instead of hub weights;
``weights.py`` (fetch, pack, unpack, provenance) sits above them. Nothing here touches the network.
"""
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

from .recipe import RecipeError
from .utils import sha256_file

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# What a key may name, by the kind of weights the teacher, student or generator loads.
KINDS = {
    "open_clip": "an open_clip checkpoint file (.safetensors/.pth/.pt/.bin) of teacher.arch, or a folder holding "
                 "open_clip_config.json and its weights",
    "timm": "a timm state dict file (.safetensors/.pth/.pt/.bin)",
    "diffusers": "a diffusers pipeline folder (model_index.json and its component folders)",
}
_DIGESTS: dict = {}  # (path, size, mtime_ns) -> sha256, so one process hashes each file once


def check_path(key: str, path: str, kind: str):
    """``path`` exists and is of ``kind`` (a key of ``KINDS``); else a RecipeError naming ``key``. Nothing is loaded."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"Recipe key {key!r}: {path} does not exist; it must be {KINDS[kind]}")
    marker = {"open_clip": "open_clip_config.json", "diffusers": "model_index.json"}.get(kind)
    if p.is_dir():
        if marker is None or not (p / marker).is_file():
            raise RecipeError(f"Recipe key {key!r}: {path} is a folder without {marker or 'a loader'}; it must be "
                              f"{KINDS[kind]}")
    elif kind == "diffusers" or p.suffix not in WEIGHT_FILE_SUFFIXES:
        raise RecipeError(f"Recipe key {key!r}: {path} is not {KINDS[kind]}")


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def files_of(path) -> list[str]:
    """The files a weights path stands for, relative to it ('' for a single file), sorted."""
    p = Path(path)
    if p.is_file():
        return [""]
    return sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())


def describe(path) -> dict:
    """Where a local weights file or folder is and what it holds: absolute path, sha256, bytes (and, for a folder,
    each file's sha256; the folder's sha256 is that of its sorted ``name sha256`` lines)."""
    p = Path(path).resolve()
    rel = files_of(p)
    if rel == [""]:
        return {"path": str(p), "kind": "file", "sha256": file_sha256(p), "bytes": p.stat().st_size}
    files = {r: file_sha256(p / r) for r in rel}
    listing = "".join(f"{r} {h}\n" for r, h in files.items())
    return {"path": str(p), "kind": "folder", "sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "bytes": sum((p / r).stat().st_size for r in rel), "files": files}


def weights_id(path: str) -> str:
    """The sha256 of a local weights path, for the teacher-feature fingerprint: replaced teacher weights at the same
    path recompute the features."""
    return describe(path)["sha256"]


@contextmanager
def loading(key: str, path: str, what: str):
    """Any failure to load ``path`` inside becomes one WeightsUnavailable line naming ``key`` (an ImportError for a
    missing backend passes through with its install hint)."""
    from .teachers.base import WeightsUnavailable

    try:
        yield
    except ImportError:
        raise
    except Exception as e:  # loaders fail in many types (SafetensorError, RuntimeError, KeyError ...): one line
        first = " ".join(str(e).split())[:200]
        raise WeightsUnavailable(f"Recipe key {key!r}: {path} could not be loaded as {what} "
                                 f"({type(e).__name__}: {first})") from e


def offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (read as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> str:
    """Where hub weights are cached on this machine: huggingface_hub's cache, which HF_HOME / HF_HUB_CACHE move."""
    try:
        from huggingface_hub import constants

        return f"{constants.HF_HUB_CACHE} (HF_HOME)"
    except ImportError:
        return "~/.cache/huggingface/hub (HF_HOME)"
