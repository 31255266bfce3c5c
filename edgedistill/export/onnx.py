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


def export_bundle(job, folder: Path, precision: str, mode: str = "full", keep: int = 0, finetune: bool = False) -> dict:
    """Write ``model.onnx`` for ``precision`` into ``folder``; returns the backend's manifest fields.

    ``finetune``: quantize the INT8-aware fine-tuned copy of the student instead (``quantize.finetuned_student``).
    """
    target = folder / "model.onnx"
    info = {"files": ["model.onnx"], "runtime": {"name": "onnxruntime"}, "opset": job.cfg.opset}
    if precision == "fp32":
        shutil.copyfile(job.onnx_fp32(), target)
        return info
    calib, calib_info = job.calibration()
    source, tuned = job.source_onnx(finetune, keep)
    quantization = quantize_qdq(source, target, calib, mode, job, keep)
    return {**info, "quantization": {**quantization, "calibration": calib_info, "finetune": tuned}}


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
    on CPU and lose agreement without saving compute. The graph's outputs stay float (``float_outputs``).
    """
    q = require("onnxruntime.quantization", "onnx")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    exclude = float_nodes(pre, mode, job, keep)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))   # the quantizer logs a line per rescaled weight channel at INFO
    try:
        q.quantize_static(str(pre), str(dst), _Reader(calib), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          op_types_to_quantize=[*QUANTIZED_OPS, *FUSED_ACTIVATIONS],
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, nodes_to_exclude=exclude,
                          calibrate_method=q.CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)
    pre.unlink()
    stripped = float_outputs(dst)
    return {"tool": "onnxruntime.quantization.quantize_static", "mode": mode, "format": "QDQ", "float_layers": keep,
            "weights": "int8 per-channel", "activations": "uint8 per-tensor (min/max)", "float_nodes": exclude,
            "float_outputs": stripped}


def float_outputs(path: Path) -> list:
    """Drop the Q/DQ pair ONNX Runtime puts on the graph's outputs, so the class scores come out in float.

    Quantized, the scores would be rounded to 256 levels over their calibration range and clipped to it: a 0.1-logit
    step on a 3-class head, enough to flip or tie the near-margin images, and no faster (the head is tiny).
    """
    onnx = require("onnx", "onnx")
    model = onnx.load(str(path))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    stripped = []
    for output in graph.output:
        dq = producer.get(output.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in producer:
            continue
        source = producer[q.input[0]]
        source.output[list(source.output).index(q.input[0])] = output.name
        graph.node.remove(q)
        graph.node.remove(dq)
        stripped.append(output.name)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    if stripped:
        onnx.save(model, str(path))
    return stripped


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

