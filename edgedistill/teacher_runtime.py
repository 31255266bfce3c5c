"""The teacher's feature pass through a faster runtime (``teacher.runtime``): OpenVINO or ONNX Runtime.

Feature extraction is the slowest step a CPU spends on the teacher. The encoder (image -> features, no head) is
exported to ONNX once into the run folder, opened with the runtime, and checked against PyTorch on a sample of the
run's own images before it is used; an export that does not match, a runtime that is not installed or a graph that
does not convert falls back to PyTorch, and the features stage records which one ran and why.
"""
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .utils import fingerprint

log = logging.getLogger(__name__)
PREFERENCE = {"cpu": ("openvino", "onnxruntime"), "cuda": ("onnxruntime",)}  # what ``auto`` tries, in order
PARITY_IMAGES = 16
MAX_RELATIVE_ERROR = 1e-3  # per image, ||runtime - pytorch|| / ||pytorch||; FP32 runtimes agree to ~1e-6


class Encoder(nn.Module):
    """What is exported: the teacher's image -> features, exactly what ``Teacher.encode`` computes."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x):
        return self.teacher._encode(x).float()


class RuntimeTeacher:
    """Stands in for the teacher where only features are needed (``FeatureCache.fill``)."""

    def __init__(self, teacher, run_batch, runtime: str):
        self.info, self.feature_dim, self.runtime = teacher.info, teacher.feature_dim, runtime
        self._run = run_batch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(np.asarray(self._run(x), dtype=np.float32))

    def to(self, *args, **kwargs):  # the session already sits where it runs
        return self


def feature_teacher(teacher, choice: str, folder: Path, sample: torch.Tensor, device: str):
    """(what to run for features, a record of the choice): the runtime ``choice`` names, or PyTorch.

    Args:
        teacher: the PyTorch teacher (fine-tuned weights already loaded).
        choice: ``teacher.runtime``: auto, pytorch, onnxruntime or openvino.
        folder: where the exported encoder is kept (one file per teacher and input size).
        sample: a batch of the run's own preprocessed images for the parity check.
        device: the run's device.
    """
    if choice == "pytorch":
        return teacher, {"runtime": "pytorch"}
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    names = PREFERENCE[kind] if choice == "auto" else (choice,)
    tried = {}
    with torch.no_grad():
        reference = teacher.to(device).encode(sample.to(device)).cpu().numpy()
    for name in names:
        try:
            run_batch = open_runtime(name, export_encoder(teacher, folder, sample.shape[-1]), kind)
            error = relative_error(run_batch(sample.numpy()), reference)
        except Exception as e:  # noqa: BLE001 - any failure here means: use PyTorch, and say why
            tried[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        if error <= MAX_RELATIVE_ERROR:
            log.info("teacher features through %s (max relative error %.2g on %d images)", name, error, len(sample))
            return RuntimeTeacher(teacher, run_batch, name), {
                "runtime": name, "parity": {"images": len(sample), "max_relative_error": error,
                                            "limit": MAX_RELATIVE_ERROR}, "refused": tried}
        tried[name] = f"parity: max relative error {error:.3g} > {MAX_RELATIVE_ERROR} on {len(sample)} images"
    if tried:
        log.warning("teacher features through PyTorch: %s", "; ".join(f"{k}: {v}" for k, v in tried.items()))
    return teacher, {"runtime": "pytorch", "refused": tried}


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    if out.shape != ref.shape:
        return float("inf")
    return float((np.linalg.norm(out - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)).max())


def export_encoder(teacher, folder: Path, size: int) -> Path:
    """``folder/encoder-<key>.onnx``: exported once per teacher weights and input size, atomically."""
    state = fingerprint([teacher.info.name, teacher.info.arch, size,
                         [(k, float(v.float().sum())) for k, v in teacher.state_dict().items()]])
    path = Path(folder) / f"encoder-{state}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    module = Encoder(teacher).cpu().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, size, size),), str(partial), input_names=["input"],
                          output_names=["features"], dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    partial.replace(path)
    return path


def open_runtime(name: str, onnx_path: Path, kind: str):
    """A function float32 NCHW batch -> features, on the named runtime."""
    from .utils import require

    if name == "openvino":
        ov = require("openvino", "openvino")
        compiled = ov.Core().compile_model(ov.convert_model(str(onnx_path)), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32"})  # never silently bf16
        return lambda x: compiled(x)[0]
    if name == "onnxruntime":
        ort = require("onnxruntime", "onnx")
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if kind == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(onnx_path), providers=[p for p in wanted
                                                                   if p in ort.get_available_providers()])
        return lambda x: session.run(None, {"input": x})[0]
    raise ValueError(f"Unknown teacher runtime {name!r}")
