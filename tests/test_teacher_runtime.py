"""The teacher's feature pass through ONNX Runtime / OpenVINO: used only after it matches PyTorch on real images."""
import json

import pytest
import torch

from edgedistill import teacher_runtime
from edgedistill.cli import main
from edgedistill.recipe import TeacherCfg
from edgedistill.teacher_runtime import MAX_RELATIVE_ERROR, RuntimeTeacher, feature_teacher, relative_error
from edgedistill.teachers import build_teacher

from conftest import tiny_recipe, write_recipe


def tiny_teacher(seed: int):
    teacher = build_teacher(TeacherCfg(name="tiny-cnn", width=16))  # the tiny teacher always starts from seed 0
    if seed:
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return teacher


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_runtime_teacher_gives_pytorchs_features(tmp_path, runtime):
    pytest.importorskip(runtime)
    teacher, x = tiny_teacher(0), torch.rand(6, 3, 32, 32)
    encoder, record = feature_teacher(teacher, runtime, tmp_path, x[:4], "cpu")
    assert isinstance(encoder, RuntimeTeacher) and record["runtime"] == runtime
    assert record["parity"]["max_relative_error"] <= MAX_RELATIVE_ERROR
    assert relative_error(encoder.encode(x).numpy(), teacher.encode(x).numpy()) <= MAX_RELATIVE_ERROR
    assert len(list(tmp_path.glob("encoder-*.onnx"))) == 1  # exported once, reused by the next call
    feature_teacher(teacher, runtime, tmp_path, x[:4], "cpu")
    assert len(list(tmp_path.glob("encoder-*.onnx"))) == 1


def test_a_mismatching_export_is_refused_and_pytorch_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    teacher, other = tiny_teacher(0), tiny_teacher(1)  # same architecture, other weights
    real_export = teacher_runtime.export_encoder
    monkeypatch.setattr(teacher_runtime, "export_encoder", lambda t, folder, size: real_export(other, folder, size))
    encoder, record = feature_teacher(teacher, "onnxruntime", tmp_path, torch.rand(4, 3, 32, 32), "cpu")
    assert encoder is teacher and record["runtime"] == "pytorch"
    assert record["refused"]["onnxruntime"].startswith("parity: max relative error")


def test_a_missing_runtime_falls_back_to_pytorch_saying_why(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    teacher = tiny_teacher(0)
    encoder, record = feature_teacher(teacher, "openvino", tmp_path, torch.rand(2, 3, 32, 32), "cpu")
    assert encoder is teacher and "pip install" in record["refused"]["openvino"]


def test_the_features_stage_records_which_runtime_ran(tmp_path, image_folder):
    pytest.importorskip("openvino")
    recipe = tiny_recipe(image_folder)
    recipe["teacher"]["runtime"] = "auto"
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "stages" / "features.json").read_text())["summary"]
    assert summary["runtime"]["runtime"] == "openvino"  # auto's first choice on a CPU
    assert summary["runtime"]["parity"]["images"] > 0
