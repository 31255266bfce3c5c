"""The parity gate: every artifact runs beside the PyTorch student on held-out images before it is kept.

Top-1 agreement (fraction), cosine and max-abs error against PyTorch's scores go into the manifest, with the
artifact's accuracy on the same images next to FP32's. Below the threshold the export fails loudly
(peers' exported classifiers silently disagreeing with PyTorch is the most reported export bug).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..target.run import compare_scores, load_bundle
from .images import load_pixels, random_pixels, resolve, sample, to_inputs

REFERENCE_IMAGES = 16  # stored in each bundle as reference.npz, so a target can re-check without torch


@dataclass
class ParitySet:
    pixels: np.ndarray          # uint8 [N, H, W, 3]
    x: np.ndarray               # float32 [N, 3, H, W], what the model sees
    labels: np.ndarray | None   # ground truth where the images are labelled
    source: str
    reference: np.ndarray       # PyTorch student's scores [N, K]


def held_out(split: dict) -> tuple[list, str]:
    """The real held-out images: test, else val, else (not held out) train."""
    for key, source in (("test", "split test (real, held out)"), ("val", "split val (real, held out)"),
                        ("train", "split train (real, NOT held out: the run has no test or val split)")):
        if split.get(key):
            return split[key], source
    return [], ""


def parity_set(run_dir: Path, split: dict, spec: dict, n: int, model) -> ParitySet:
    items, source = held_out(split)
    items = sample(items, n, seed=0)
    if items:
        pixels = load_pixels([resolve(p, run_dir) for p, _ in items], spec)
        labels = np.asarray([y for _, y in items])
    else:
        pixels, labels, source = random_pixels(max(n, 32), spec, seed=0), None, "random pixels (no images in split)"
    x = to_inputs(pixels, spec)
    return ParitySet(pixels, x, labels, source, pytorch_scores(model, x))


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
    """Run the bundle in ``folder`` through the target runtime on the parity images; parity and accuracy."""
    bundle = load_bundle(folder, verify=False)
    scores = bundle.predict(job.parity.x)
    parity = compare_scores(job.parity.reference, scores)
    limit = threshold(job.cfg, precision)
    parity.update(source=job.parity.source, threshold=limit, passed=parity["top1_agreement"] >= limit)
    labels = job.parity.labels
    accuracy = {"images": len(scores), "source": job.parity.source, "top1": top1(scores, labels),
                "pytorch_top1": top1(job.parity.reference, labels)}
    return {"parity": parity, "accuracy": accuracy}


def store_reference(folder: Path, parity: ParitySet) -> str:
    """A few parity images and PyTorch's scores on them, for ``run.py verify`` on a device without torch."""
    n = min(REFERENCE_IMAGES, len(parity.pixels))
    np.savez_compressed(folder / "reference.npz", pixels=parity.pixels[:n], scores=parity.reference[:n])
    return "reference.npz"
