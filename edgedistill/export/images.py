"""Images for export: held-out real images for the parity gate, distillation images for INT8 calibration.

Both go through ``edgedistill.target.run.input_pixels``, the one preprocessing implementation, and are kept as the
uint8 pixels it returns, so a reference stored in a bundle reproduces the exact float input on the target.
"""
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..target.run import input_pixels, load_image, normalize

log = logging.getLogger(__name__)


def read_split(run_dir: Path) -> dict:
    path = run_dir / "split.json"
    if not path.is_file():
        log.warning("%s has no split.json: parity and calibration fall back to random pixels", run_dir)
        return {"classes": [], "train": [], "val": [], "test": []}
    return json.loads(path.read_text())


def resolve(path: str, *roots: Path) -> str:
    """A recorded image path as given when it exists, else relative to the first root that has it."""
    if Path(path).exists():
        return path
    for root in roots:
        if (root / path).exists():
            return str(root / path)
    return path


def synthetic_items(run_dir: Path) -> list:
    """(path, label) rows of ``RUN/synth/manifest.jsonl``; the label is -1 where the row gives none."""
    manifest = run_dir / "synth" / "manifest.jsonl"
    if not manifest.is_file():
        return []
    items = []
    for line in manifest.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            path = next((row[k] for k in ("path", "image", "file") if k in row), None)
            if path:
                items.append((resolve(path, manifest.parent, run_dir), int(row.get("label", -1))))
    return items


def sample(items: list, n: int, seed: int) -> list:
    """``n`` items drawn without replacement (all of them when n <= 0 or n >= len), in a seeded order."""
    if n <= 0 or n >= len(items):
        return list(items)
    order = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(order)]


def load_pixels(paths: list, spec: dict, workers: int = 4) -> np.ndarray:
    """uint8 [N, H, W, 3] model-input pixels (crop + resize) of image files."""
    def one(path):
        return input_pixels(load_image(path), spec)

    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(one, paths)))


def random_pixels(n: int, spec: dict, seed: int) -> np.ndarray:
    size = int(spec["size"])
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def to_inputs(pixels: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 pixels -> float32 NCHW model inputs, exactly as the target runtime normalises them."""
    return np.stack([normalize(p, spec) for p in pixels])
