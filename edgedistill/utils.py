"""Small helpers shared across the package: optional imports, hashing, atomic writes, seeding."""
import hashlib
import importlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np

from .runtime.run import sha256_file  # noqa: F401  (one implementation, shared with the target runtime)


def require(module: str, extra: str):
    """Import an optional backend or fail with the exact install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"This feature needs {module!r}: pip install 'edgedistill[{extra}]'") from e


def fingerprint(obj) -> str:
    """A short, stable hash of any JSON-serialisable object (used to key stages and caches)."""
    saved = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(saved).hexdigest()[:16]


def atomic_write_bytes(path, data: bytes):
    """Write via a temporary file and rename, so a kill never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode())


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def atomic_savefig(fig, path, **kwargs):
    """A matplotlib figure written whole or not at all (rendered in memory, then renamed into place)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(obj, path):
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def seed_everything(seed: int):
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*parts) -> int:
    """A seed that depends only on its parts, so per-sample randomness is the same on any rank or resume."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def progress(iterable=None, **kwargs):
    """A tqdm bar that redraws freely on a terminal but only every 30 s in a log file (CI, nohup)."""
    import sys

    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
