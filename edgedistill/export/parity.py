"""The parity gate: every bundle runs beside the PyTorch student on the whole held-out test split, once.

Top-1 agreement (fraction), cosine and max-abs error against PyTorch's scores go into the manifest, with the
artifact's accuracy on the same images next to FP32's. Below the threshold the export fails loudly
(peers' exported classifiers silently disagreeing with PyTorch is the most reported export bug).

Choosing between INT8 attempts happens before, on a separate selection split (``selection_agreement``); the test
split is measured only for the attempt already chosen, so its figures are not selected for.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.run import compare_scores, load_bundle
from .images import load_pixels, random_pixels, to_inputs

log = logging.getLogger(__name__)
REFERENCE_IMAGES = 16  # stored in each bundle as reference.npz, so a target can re-check without torch


@dataclass
class ParitySet:
    """Preprocessed images with the PyTorch student's scores on them: the parity (test) or the selection set."""

    pixels: np.ndarray          # uint8 [N, H, W, 3]
    x: np.ndarray               # float32 [N, 3, H, W], what the model sees
    labels: np.ndarray | None   # ground truth where the images are labelled
    source: str
    reference: np.ndarray       # PyTorch student's scores [N, K]
    split: str = ""             # "test", "val", "train-holdout", or "random" (pixels: the run has no images)


def image_set(run_dir: Path, items: list, split: str, source: str, spec: dict, model, seed: int = 0) -> ParitySet:
    """``items`` ((path, label), paths already resolved) loaded and scored by ``model``; random pixels if none."""
    if items:
        pixels = load_pixels([p for p, _ in items], spec)
        labels = np.asarray([y for _, y in items])
    else:
        log.warning("The run has no %s images: random pixels stand in, so the figures on them mean little",
                    split or "held-out")
        pixels, labels = random_pixels(32, spec, seed=seed), None
        split, source = "random", "random pixels (the run has no images for this)"
    x = to_inputs(pixels, spec)
    return ParitySet(pixels, x, labels, source, pytorch_scores(model, x), split)


def pytorch_scores(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch])).float().numpy()
                               for i in range(0, len(x), batch)])


def threshold(cfg, precision: str) -> float:
    return cfg.min_agreement_int8 if precision == "int8" else cfg.min_agreement


def top1(scores: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((scores.argmax(1) == labels).mean())


def evaluate_artifact(job, folder: Path, precision: str) -> dict:
    """The parity gate: run the bundle in ``folder`` on the whole test split, once; parity and accuracy.

    Call it only for the attempt already chosen on the selection split: its result decides pass or fail.
    """
    held_out = job.parity
    scores = load_bundle(folder, verify=False).predict(held_out.x)
    parity = compare_scores(held_out.reference, scores)
    limit = threshold(job.cfg, precision)
    parity.update(split=held_out.split, split_images=job.pools.parity_split_images, source=held_out.source,
                  threshold=limit, passed=parity["top1_agreement"] >= limit)
    labels = held_out.labels
    accuracy = {"split": held_out.split, "images": len(scores), "source": held_out.source,
                "top1": top1(scores, labels), "pytorch_top1": top1(held_out.reference, labels)}
    return {"parity": parity, "accuracy": accuracy}


def selection_agreement(job, folder: Path) -> dict:
    """Top-1 agreement (and cosine) of the bundle in ``folder`` with PyTorch on the selection split."""
    scores = load_bundle(folder, verify=False).predict(job.selection.x)
    return compare_scores(job.selection.reference, scores)


def store_reference(folder: Path, parity: ParitySet) -> str:
    """A few parity images and PyTorch's scores on them, for ``run.py verify`` on a device without torch."""
    n = min(REFERENCE_IMAGES, len(parity.pixels))
    np.savez_compressed(folder / "reference.npz", pixels=parity.pixels[:n], scores=parity.reference[:n])
    return "reference.npz"
