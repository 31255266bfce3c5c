"""TensorRT engines. The build itself lives in ``export/build_engine.py`` so a Jetson runs the same code without
edgedistill or torch; this module only decides whether this host can build one and hands it the job's inputs.
"""
import importlib.util
import shutil
from pathlib import Path

ATTEMPTS = ({},)
JETSON_HINT = ("to build on a Jetson or other NVIDIA device, copy RUN/export/onnx-fp32 (export it with "
               "--formats onnx --precision fp32), RUN/export/calibration.npz for INT8, and the export/ folder there, "
               "then run `python export/build_engine.py onnx-fp32 --precision fp16` (see export/README.md)")


def attempts(precision: str) -> tuple:
    return ATTEMPTS


def nvidia_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def unavailable() -> str | None:
    """None when this host can build engines, else the one sentence saying why not and what to do instead."""
    tool = importlib.util.find_spec("tensorrt") is not None or shutil.which("trtexec") is not None
    gpu = nvidia_gpu()
    if tool and gpu:
        return None
    missing = " and ".join(m for m, ok in (("neither the tensorrt package nor trtexec", tool),
                                           ("no NVIDIA GPU", gpu)) if not ok)
    return f"TensorRT export skipped: this host has {missing}; {JETSON_HINT}."


def export_bundle(job, folder: Path, precision: str) -> dict:
    """Build ``model.engine`` for ``precision`` from the job's FP32 ONNX graph, on this host's GPU."""
    from ..runtime.build_engine import build_engine

    size = int(job.spec["size"])
    calib, calib_info = job.calibration() if precision == "int8" else (None, None)
    facts = build_engine(job.onnx_fp32(), folder / "model.engine", precision, (3, size, size), calib,
                         dynamic=job.cfg.dynamic_batch, timing_cache=job.out_root / "tensorrt-timing.cache")
    info = {"files": ["model.engine"], "runtime": {"name": "tensorrt", **facts}, "opset": job.cfg.opset}
    if precision == "int8":
        info["quantization"] = {"tool": "TensorRT IInt8EntropyCalibrator2", "calibration": calib_info}
    return info
