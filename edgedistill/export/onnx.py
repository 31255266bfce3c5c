"""ONNX: ``torch.onnx.export`` of the student (image -> class scores), and ONNX Runtime static QDQ INT8."""
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from ..utils import require
from .quantize import attempts as int8_attempts
from .quantize import sensitive_nodes

log = logging.getLogger(__name__)
INPUT, OUTPUT = "input", "scores"
MIN_OPSET = 17
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# Quantized too, so ONNX Runtime folds a ReLU/ReLU6 into the conv before it and the conv's output is quantized over
# the activation's range ([0, 6]) rather than the pre-activation's (often +-50: a 25x coarser step). On a
# fine-tuned EfficientNet-Lite0 this alone lifts all-INT8 top-1 agreement from 0.83 to 0.91.
FUSED_ACTIVATIONS = ("Relu", "Clip")


def attempts(precision: str) -> tuple:
    """INT8 retry ladder: all INT8; the first conv and the head in float; the most sensitive layers in float."""
    return int8_attempts(precision)


def unavailable() -> str | None:
    try:
        require("onnx", "onnx")
        require("onnxruntime", "onnx")
    except ImportError as e:
        return str(e)
    return None


def export_onnx(model, path: Path, size: int, opset: int, dynamic_batch: bool, simplify: bool) -> Path:
    """Export ``model`` (NCHW float -> scores) to ``path`` and check the graph."""
    import torch

    onnx = require("onnx", "onnx")
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX export needs opset >= {MIN_OPSET} (recipe key 'export.opset' is {opset})")
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"input_names": [INPUT], "output_names": [OUTPUT], "opset_version": opset, "do_constant_folding": True}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter: fast, needs no onnxscript, and handles dynamic_axes; deprecated upstream, so
        # fall back to the torch.export-based one where it is gone.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
        except (TypeError, RuntimeError) as e:
            log.info("TorchScript ONNX exporter unavailable (%s); using the dynamo exporter", e)
            torch.onnx.export(model, (x,), str(path), dynamo=True, **kwargs)
    onnx.checker.check_model(str(path))
    if simplify:
        simplify_graph(path)
    return path


def simplify_graph(path: Path) -> str:
    """Fold constants and drop redundant nodes: onnxslim where installed, else ONNX Runtime's basic level.

    ORT's basic level only rewrites with standard ONNX ops, so the result still runs on any runtime.
    """
    try:
        import onnxslim

        require("onnx", "onnx").save(onnxslim.slim(str(path)), str(path))
        return "onnxslim"
    except ImportError:
        pass
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    tmp = path.with_suffix(".simplified.onnx")
    options.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tmp.replace(path)
    return "onnxruntime basic graph optimizations"


def export_bundle(job, folder: Path, precision: str, mode: str = "full", keep: int = 0) -> dict:
    """Write ``model.onnx`` for ``precision`` into ``folder``; returns the backend's manifest fields."""
    target = folder / "model.onnx"
    info = {"files": ["model.onnx"], "runtime": {"name": "onnxruntime"}, "opset": job.cfg.opset}
    if precision == "fp32":
        shutil.copyfile(job.onnx_fp32(), target)
        return info
    calib, calib_info = job.calibration()
    quantization = quantize_qdq(job.onnx_fp32(), target, calib, mode, job, keep)
    return {**info, "quantization": {**quantization, "calibration": calib_info}}


class _Reader:
    """ONNX Runtime calibration data reader over a float32 NCHW array, one image at a time."""

    def __init__(self, x: np.ndarray):
        self.items = iter(x[:, None])

    def get_next(self):
        item = next(self.items, None)
        return None if item is None else {INPUT: item}


def quantize_qdq(src: Path, dst: Path, calib: np.ndarray, mode: str = "full", job=None, keep: int = 0) -> dict:
    """Static INT8 of the compute-heavy ops: per-channel int8 weights, uint8 activations (min/max), QDQ format.

    Only Conv/MatMul/Gemm (and the activations folded into them) get quantized: Q/DQ pairs around adds cost time
    on CPU and lose agreement without saving compute.
    """
    q = require("onnxruntime.quantization", "onnx")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    exclude = float_nodes(pre, mode, job, keep)
    q.quantize_static(str(pre), str(dst), _Reader(calib), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      op_types_to_quantize=[*QUANTIZED_OPS, *FUSED_ACTIVATIONS], activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8, nodes_to_exclude=exclude,
                      calibrate_method=q.CalibrationMethod.MinMax)
    pre.unlink()
    return {"tool": "onnxruntime.quantization.quantize_static", "mode": mode, "format": "QDQ", "float_layers": keep,
            "weights": "int8 per-channel", "activations": "uint8 per-tensor (min/max)", "float_nodes": exclude}


def float_nodes(path: Path, mode: str, job=None, keep: int = 0) -> list:
    """Nodes kept in float: none; the first and last quantizable ones (stem and class head); or the ones from the
    ``keep`` student layers whose quantization moves the scores most."""
    if mode == "full":
        return []
    graph = require("onnx", "onnx").load(str(path)).graph
    nodes = [n.name for n in graph.node if n.op_type in QUANTIZED_OPS]
    chosen = sensitive_nodes(job, nodes, keep) if mode == "sensitive_float" else sorted(set(nodes[:1] + nodes[-1:]))
    # A float conv's activation stays float too: quantized on its own, it would be over the pre-activation range.
    outputs = {o for n in graph.node if n.name in chosen for o in n.output}
    return sorted({*chosen, *(n.name for n in graph.node if n.op_type in FUSED_ACTIVATIONS and n.input[0] in outputs)})

