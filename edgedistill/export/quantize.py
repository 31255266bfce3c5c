"""What INT8 post-training quantization shares across backends: the calibration images and the retry ladder.

Calibration (and fine-tuning) images are drawn only from what the recipe trained on: the real train images when
``data.real_train``, plus the synthetic images curation kept (``synth/kept.json``), less the selection images,
preprocessed exactly as at evaluation. Which attempt of the ladder ships, which fine-tuning step and which layers stay
float are all chosen on the selection split (``ExportJob.selection``), never on the test split. Each backend
quantizes with its own tool (ONNX Runtime static QDQ in ``onnx.py``, NNCF in ``openvino.py``, TensorRT entropy
calibration in ``tensorrt.py``).
"""
import logging

import numpy as np

from .images import load_pixels, random_pixels, sample, stratified_holdout

log = logging.getLogger(__name__)

# Every attempt is built and scored on the selection split, and the best ships (``export.export_one``; peers' INT8
# top-1 collapses: ultralytics #22644, TensorRT #1834): everything in INT8; the first conv and the class head kept
# in float (the usual mixed-precision fix); the 4, 8 or 12 layers whose quantization moves the scores most
# (``sensitivity_ranking``) kept in float; the 4 kept float and the rest INT8-aware fine-tuned first (``qat.py``,
# minutes on a CPU, hence late); and, only when none of those reached the gate and the backend can, an
# accuracy-controlled search that reverts the layers that hurt agreement most.
INT8_ATTEMPTS = ({"mode": "full"}, {"mode": "keep_ends_float"}, {"mode": "sensitive_float", "keep": 4},
                 {"mode": "sensitive_float", "keep": 8}, {"mode": "sensitive_float", "keep": 12},
                 {"mode": "sensitive_float", "keep": 4, "finetune": True}, {"mode": "accuracy_control"})
FINETUNE_IMAGES = 1000   # training-pool images the INT8-aware fine-tuning trains on
SENSITIVITY_IMAGES = 64


def attempts(precision: str, modes=("full", "keep_ends_float", "sensitive_float")) -> tuple:
    return tuple(a for a in INT8_ATTEMPTS if a["mode"] in modes) if precision == "int8" else ({},)


def calibration_set(pools, spec: dict, n: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """uint8 [N, H, W, 3] pixels drawn from the training pool (``images.Pools.training``) and where they came from.

    ``images.to_inputs`` makes model inputs of them.
    """
    items = sample(pools.training, n, seed)
    if not items:
        pixels = random_pixels(max(n, 32), spec, seed)
        log.warning("INT8 calibration uses random pixels: the run has no training images to calibrate on")
        return pixels, {"images": len(pixels), "source": "random pixels (no training images)"}
    synth = {p for p, _ in pools.training[len(pools.training) - pools.training_info["synthetic"]:]}
    n_synth = sum(p in synth for p, _ in items)
    info = {"images": len(items), "source": "recipe training images", "pool": len(pools.training),
            "real_train": len(items) - n_synth, "synthetic": n_synth, "seed": seed,
            "synthetic_source": pools.training_info["synthetic_source"],
            "selection_images_excluded": pools.training_info["selection_images_excluded"]}
    return load_pixels([p for p, _ in items], spec), info


def validation_set(job, n: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` (0: all) stratified selection-split inputs with the PyTorch student's top-1 on them.

    Tuning (layer ranking, NNCF's accuracy control) looks at these, never at the test split nor at calibration
    images; when the selection split has fewer than ``n``, it says so and uses what there is.
    """
    selection = job.selection
    idx = np.arange(len(selection.x))
    if n and n < len(idx):
        labels = selection.labels if selection.labels is not None else np.zeros(len(idx), int)
        idx = np.asarray([i for i, _ in stratified_holdout(list(zip(idx, labels)), n, seed=0)])
    elif n > len(idx):
        log.warning("Only %d selection images (split %s) to tune on, not %d", len(idx), selection.split, n)
    return selection.x[idx], selection.reference[idx].argmax(1)


def finetuned_student(job, keep: int):
    """The student INT8-aware fine-tuned with its ``keep`` most sensitive layers left float; (model, info).

    Trains on training-pool images, picks the step that does best on the selection split (held out from training
    and calibration), never looks at the test split. ``ExportJob.source_onnx`` caches the result.
    """
    from . import qat
    from .images import to_inputs

    calib, _ = job.calibration()
    pixels, _ = calibration_set(job.pools, job.spec, FINETUNE_IMAGES, seed=2)
    model, info = qat.finetune(job.model, calib, to_inputs(pixels, job.spec), job.selection.x,
                               float_modules=sensitivity_ranking(job)[:keep], steps=job.cfg.int8_finetune_steps)
    return model, {**info, "validation_split": job.selection.split}


def sensitivity_ranking(job) -> list[str]:
    """The student's Conv/Linear layers, the one whose INT8 quantization moves the scores most first.

    Each layer alone gets simulated INT8 (per-channel symmetric int8 weights, per-tensor uint8 input over its
    calibration min/max, what both backends do) while the rest stays float; the ranking is by mean absolute score
    error on selection-split images (never the test split). Computed once per export job.
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
    layers = [(n, m) for n, m in layers if n in ranges]  # a layer the scores never run through (a training-only head)
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
