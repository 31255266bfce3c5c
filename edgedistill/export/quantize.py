"""What INT8 post-training quantization shares across backends: the calibration images and the retry ladder.

Calibration images are drawn from the recipe's distillation data (real train images, plus synthetic ones where
the run made them), preprocessed exactly as at evaluation. Each backend quantizes with its own tool (ONNX Runtime
static QDQ in ``onnx.py``, NNCF in ``openvino.py``, TensorRT entropy calibration in ``tensorrt.py``).
"""
from pathlib import Path

import numpy as np

from .images import load_pixels, random_pixels, resolve, sample, synthetic_items

# Tried in order until one passes the parity gate (peers' INT8 top-1 collapses: ultralytics #22644, TensorRT #1834):
# everything in INT8; then the first conv and the class head kept in float (the usual mixed-precision fix); then
# also the depthwise convs (per-tensor activation ranges suit them worst, and they hold little of the compute);
# or, where the backend can, an accuracy-controlled search that reverts the layers that hurt agreement most.
INT8_ATTEMPTS = ({"mode": "full"}, {"mode": "keep_ends_float"}, {"mode": "float_depthwise"},
                 {"mode": "accuracy_control"})


def attempts(precision: str, modes=("full", "keep_ends_float")) -> tuple:
    return tuple(a for a in INT8_ATTEMPTS if a["mode"] in modes) if precision == "int8" else ({},)


def calibration_set(run_dir: Path, split: dict, spec: dict, n: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """uint8 [N, H, W, 3] calibration pixels (``images.to_inputs`` makes inputs) and where they came from."""
    real = [(resolve(p, run_dir), y) for p, y in split.get("train", [])]
    synth = synthetic_items(run_dir)
    items = sample(real + synth, n, seed)
    if not items:
        pixels = random_pixels(max(n, 32), spec, seed)
        return pixels, {"images": len(pixels), "source": "random pixels (no training images)"}
    n_synth = len(set(items) & set(synth))
    info = {"images": len(items), "source": "recipe distillation data", "real_train": len(items) - n_synth,
            "synthetic": n_synth, "seed": seed}
    return load_pixels([p for p, _ in items], spec), info


def validation_set(job, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Calibration-pool images that are not in the calibration set, with the PyTorch student's top-1 on them.

    Accuracy-controlled quantization tunes against these, never against the parity images.
    """
    from .images import to_inputs
    from .parity import pytorch_scores

    pixels, _ = calibration_set(job.run_dir, job.split, job.spec, job.cfg.calibration_images + n, seed=1)
    calib, _ = job.calibration_pixels()
    seen = {p.tobytes() for p in calib}
    fresh = [p for p in pixels if p.tobytes() not in seen][:n] or list(pixels[:n])
    x = to_inputs(np.stack(fresh), job.spec)
    return x, pytorch_scores(job.model, x).argmax(1)
