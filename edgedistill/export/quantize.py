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
# the 4, 8 or 12 layers whose quantization moves the scores most (``sensitivity_ranking``) kept in float; then
# the 4 kept float and the rest INT8-aware fine-tuned first (``qat.py``, minutes on a CPU, hence late); or, where
# the backend can, an accuracy-controlled search that reverts the layers that hurt agreement most.
INT8_ATTEMPTS = ({"mode": "full"}, {"mode": "keep_ends_float"}, {"mode": "sensitive_float", "keep": 4},
                 {"mode": "sensitive_float", "keep": 8}, {"mode": "sensitive_float", "keep": 12},
                 {"mode": "sensitive_float", "keep": 4, "finetune": True}, {"mode": "accuracy_control"})
FINETUNE_IMAGES = 1000   # calibration-pool images the INT8-aware fine-tuning trains on
SENSITIVITY_IMAGES = 64


def attempts(precision: str, modes=("full", "keep_ends_float", "sensitive_float")) -> tuple:
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


def finetuned_student(job, keep: int):
    """The student INT8-aware fine-tuned with its ``keep`` most sensitive layers left float; (model, info).

    Trains on calibration-pool images, picks the step that does best on ``validation_set`` (held out from
    training and calibration), never looks at the parity images. ``ExportJob.source_onnx`` caches the result.
    """
    from . import qat
    from .images import to_inputs

    calib, _ = job.calibration()
    val, _ = validation_set(job)
    seen = {v.tobytes() for v in val}
    pixels, _ = calibration_set(job.run_dir, job.split, job.spec, FINETUNE_IMAGES, seed=2)
    train = to_inputs(pixels, job.spec)
    train = train[[i for i, x in enumerate(train) if x.tobytes() not in seen]]
    return qat.finetune(job.model, calib, train, val, float_modules=sensitivity_ranking(job)[:keep],
                        steps=job.cfg.int8_finetune_steps)


def sensitivity_ranking(job) -> list[str]:
    """The student's Conv/Linear layers, the one whose INT8 quantization moves the scores most first.

    Each layer alone gets simulated INT8 (per-channel symmetric int8 weights, per-tensor uint8 input over its
    calibration min/max, what both backends do) while the rest stays float; the ranking is by mean absolute score
    error on held-out calibration-pool images (never the parity images). Computed once per export job.
    On textile-like data with low-variance early channels, a few high-resolution layers dominate the INT8 error.
    """
    import torch

    from .qat import fake_quant_uint8, fake_quant_weight

    if job._sensitivity is not None:
        return job._sensitivity
    model = job.model
    calib, _ = job.calibration()
    x, _ = validation_set(job, n=SENSITIVITY_IMAGES)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    ranges = {}

    def observe(name):
        def hook(_, args):
            lo, hi = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in layers]
    with torch.inference_mode():
        for i in range(0, min(len(calib), 128), 32):
            model(torch.from_numpy(calib[i:i + 32]))
    for h in handles:
        h.remove()
    x = torch.from_numpy(x)
    with torch.inference_mode():
        reference = model(x)
    errors = {}
    for name, module in layers:
        handle = module.register_forward_pre_hook(
            lambda _, args, r=ranges[name]: (fake_quant_uint8(args[0], *r),))
        weight = module.weight.data
        module.weight.data = fake_quant_weight(weight)
        try:
            with torch.inference_mode():
                errors[name] = float((model(x) - reference).abs().mean())
        finally:  # the student is exported after this: it must leave exactly as it came
            module.weight.data = weight
            handle.remove()
    job._sensitivity = sorted(errors, key=errors.get, reverse=True)
    return job._sensitivity


def module_path(node_name: str) -> str:
    """The PyTorch module an exported node came from: ``/student/blocks/blocks.0/blocks.0.1/conv/Conv`` (ONNX; OpenVINO
    adds ``/WithoutBiases``) -> ``student.blocks.0.1.conv``."""
    parts = node_name.strip("/").split("/")
    if parts and parts[-1] == "WithoutBiases":
        parts = parts[:-1]
    path = []
    for part in parts[:-1]:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def sensitive_nodes(job, node_names, keep: int) -> list[str]:
    """Of a backend's quantizable ``node_names``, those that came from the ``keep`` most sensitive student layers."""
    by_module = {}
    for name in node_names:
        by_module.setdefault(module_path(name), []).append(name)
    chosen = [by_module[m] for m in sensitivity_ranking(job) if m in by_module][:keep]
    return sorted(n for names in chosen for n in names)
