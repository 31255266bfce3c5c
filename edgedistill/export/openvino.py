"""OpenVINO IR (``openvino.convert_model`` from the FP32 ONNX graph), FP16 weights, and NNCF INT8 PTQ."""
from pathlib import Path

import numpy as np

from ..utils import require
from .quantize import attempts as int8_attempts
from .quantize import sensitive_nodes, validation_set

# What the CPU plugin computes in. FP32 bundles pin f32: on CPUs with bf16 (AVX512-BF16, AMX) OpenVINO would
# otherwise silently run an "FP32" model in bf16. FP16 bundles leave the device its own half precision.
INFERENCE_PRECISION = {"fp32": "f32", "fp16": "", "int8": "f32"}
QUANTIZED_OPS = ("Convolution", "GroupConvolution", "MatMul")


def attempts(precision: str) -> tuple:
    """INT8 retry ladder: all INT8; the first conv and the head in float; the most sensitive layers in float; then
    NNCF's accuracy control."""
    return int8_attempts(precision, modes=("full", "keep_ends_float", "sensitive_float", "accuracy_control"))


def unavailable() -> str | None:
    try:
        require("openvino", "openvino")
    except ImportError as e:
        return str(e)
    return None


def export_bundle(job, folder: Path, precision: str, mode: str = "full", keep: int = 0, finetune: bool = False) -> dict:
    """Write ``model.xml``/``model.bin`` for ``precision`` into ``folder``; returns the manifest fields.

    ``finetune``: quantize the INT8-aware fine-tuned copy of the student instead (``quantize.finetuned_student``).
    """
    ov = require("openvino", "openvino")
    source, tuned = job.source_onnx(finetune and precision == "int8", keep)
    model = ov.convert_model(str(source))
    info = {"files": ["model.xml", "model.bin"], "opset": job.cfg.opset,
            "runtime": {"name": "openvino", "inference_precision": INFERENCE_PRECISION[precision]}}
    if precision == "int8":
        calib, calib_info = job.calibration()
        model, quantization = quantize_nncf(model, calib, mode, job, keep)
        info["quantization"] = {**quantization, "calibration": calib_info, "finetune": tuned}
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=precision == "fp16")
    return info


def quantize_nncf(model, calib, mode: str, job, keep: int = 0):
    """NNCF post-training quantization; transformer graphs get NNCF's transformer scheme (SmoothQuant, mixed)."""
    nncf = require("nncf", "openvino")
    transformer = any(op.get_type_name() == "Softmax" for op in model.get_ops())
    kwargs = {"subset_size": len(calib), "model_type": nncf.ModelType.TRANSFORMER if transformer else None}
    nodes = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in QUANTIZED_OPS]
    floats = []
    if mode == "keep_ends_float" and nodes:
        floats = sorted({nodes[0], nodes[-1]})
    elif mode == "sensitive_float":
        floats = sensitive_nodes(job, nodes, keep)
    if floats:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=floats)
    data = nncf.Dataset(list(calib[:, None]))
    info = {"tool": f"nncf {nncf.__version__}", "mode": mode, "model_type": "transformer" if transformer else "default",
            "float_layers": keep, "float_nodes": floats}
    if mode == "accuracy_control":
        return accuracy_controlled(nncf, model, data, kwargs, job), info
    return nncf.quantize(model, data, **kwargs), info


def accuracy_controlled(nncf, model, data, kwargs, job):
    """NNCF reverts to float the layers that most hurt top-1 agreement with PyTorch on selection-split images
    (never the test split, so the gate stays an honest test)."""
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    x, ref_top1 = validation_set(job, n=100)

    def agreement(compiled, items):
        return float(np.mean([compiled(item)[0].argmax(1)[0] == ref for item, ref in zip(items, ref_top1)]))

    return nncf.quantize_with_accuracy_control(
        model, data, nncf.Dataset(list(x[:, None])), agreement, max_drop=0.005, drop_type=nncf.DropType.ABSOLUTE,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=5,
                                                                                 ranking_subset_size=50), **kwargs)
