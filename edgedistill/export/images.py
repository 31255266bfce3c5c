"""Images for export, in three disjoint pools: the test split for the parity gate (measured once per bundle), a
selection split that chooses between INT8 attempts, and the training images INT8 calibration and fine-tuning use.

All go through ``input_pixels`` of ``export/preprocess.py``, the one preprocessing implementation, and are kept as
the uint8 pixels it returns, so a reference stored in a bundle reproduces the exact float input on the target.
"""
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.preprocess import input_pixels, load_image, normalize

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


def kept_synthetic_items(run_dir: Path, recipe: dict) -> tuple[list, str]:
    """(path, label) of the synthetic images curation kept (``RUN/synth/kept.json``), and a note for the manifest.

    Only the kept ones: curation drops the generated images that are near-copies of held-out images, and
    ``synth/manifest.jsonl`` still lists those. A recipe without a synthetic section has none.
    """
    if not recipe.get("synthetic"):
        return [], "the recipe has no synthetic section"
    path = run_dir / "synth" / "kept.json"
    if not path.is_file():
        log.warning("%s is missing: INT8 calibration and fine-tuning use no synthetic images", path)
        return [], f"{path} is missing, so no synthetic images were used"
    rows = json.loads(path.read_text()).get("items", [])
    return [(resolve(p, path.parent, run_dir), int(y)) for p, y in rows], "curated (synth/kept.json)"


def stratified_holdout(items: list, n: int, seed: int) -> list:
    """``n`` of ``items``, each label in proportion to its share, the same ``n`` on every call (seeded).

    Labels take turns in a seeded order, so small ``n`` still covers every class.
    """
    rng = np.random.default_rng(seed)
    by_label = {}
    for i in rng.permutation(len(items)):
        by_label.setdefault(items[i][1], []).append(int(i))
    # Interleave each label's shuffled indices at evenly spaced fractions: the first n are stratified.
    keyed = sorted((k / len(idx), label, i) for label, idx in by_label.items() for k, i in enumerate(idx))
    chosen = sorted(i for _, _, i in keyed[:max(n, 0)])
    return [items[i] for i in chosen]


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


@dataclass
class Pools:
    """Which images an export job uses for what; ``image_pools`` checks that no image is in two of them."""

    parity: list        # (path, label): the held-out split every bundle is measured on, once
    parity_split: str   # "test", or "val" for a run without a test split, or "" (random pixels)
    parity_split_images: int   # the whole split's size: ``parity`` is all of it unless export.parity_images caps it
    selection: list     # chooses between INT8 attempts, fine-tuning steps and the layers kept float
    selection_info: dict
    training: list      # INT8 calibration and fine-tuning draw from these only
    training_info: dict


def image_pools(run_dir: Path, split: dict, recipe: dict, cfg) -> Pools:
    """The parity, selection and training pools of a run (see ``Pools``), asserted disjoint.

    Args:
        run_dir: the run folder (image paths in split.json and synth/kept.json resolve against it).
        split: the run's split.json.
        recipe: the run's resolved recipe as a dict (``data.real_train``, ``synthetic``).
        cfg: the ExportCfg (``selection_images``, ``parity_images``).
    """
    # 1. Parity: the whole test split (a run without one falls back to val; it is then not used for selection).
    parity_split = "test" if split.get("test") else ("val" if split.get("val") else "")
    held_out = [(resolve(p, run_dir), y) for p, y in split.get(parity_split, [])]
    parity = held_out[:cfg.parity_images] if cfg.parity_images > 0 else held_out
    # 2. Selection: the val split, else a fixed stratified hold-back from train that training then never sees.
    train = [(resolve(p, run_dir), y) for p, y in split.get("train", [])]
    if split.get("val") and parity_split != "val":
        selection = [(resolve(p, run_dir), y) for p, y in split["val"]]
        selection_info = {"split": "val", "images": len(selection), "source": "split val (real, held out)"}
    else:
        selection, selection_info = train_holdout(train, cfg.selection_images)
    # 3. Training: what the recipe trained on (real train images if data.real_train, kept synthetic ones), minus
    #    the selection images.
    real = train if (recipe.get("data") or {}).get("real_train", True) else []
    synth, synth_note = kept_synthetic_items(run_dir, recipe)
    held = {key(p) for p, _ in selection}
    training = [item for item in real + synth if key(item[0]) not in held]
    training_info = {"real_train": len(training) - len(synth), "synthetic": len(synth), "synthetic_source": synth_note,
                     "selection_images_excluded": len(real) + len(synth) - len(training)}
    check_disjoint(held_out, selection, training)
    return Pools(parity, parity_split, len(held_out), selection, selection_info, training, training_info)


def train_holdout(train: list, n: int) -> tuple[list, dict]:
    """``n`` train images held back for selection (at most half of train, so calibration keeps the rest)."""
    got = min(n, len(train) // 2)
    info = {"split": "train-holdout", "images": got, "requested": n, "seed": 0,
            "source": "stratified hold-back from split train (real; excluded from calibration and fine-tuning)"}
    if got < n:
        info["note"] = f"split train has {len(train)} images: {got} held back (at most half), not the {n} asked"
        log.warning("INT8 selection: %s", info["note"])
    return stratified_holdout(train, got, seed=0), info


def key(path: str) -> str:
    return str(Path(path).resolve())


def check_disjoint(parity: list, selection: list, training: list):
    """No image in two pools: choosing on the test split, or testing on training images, would flatter the figures."""
    p, s, t = ({key(path) for path, _ in pool} for pool in (parity, selection, training))
    for a, b, what in ((p, s, "selection images are also parity images"),
                       (s, t, "selection images are also calibration/fine-tuning images"),
                       (p, t, "parity images are also calibration/fine-tuning images")):
        if a & b:   # raised, not ``assert``ed, so that ``python -O`` cannot skip it
            raise AssertionError(f"{len(a & b)} {what}, e.g. {sorted(a & b)[:2]}")
