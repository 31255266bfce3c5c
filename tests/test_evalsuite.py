"""Evaluation suite through the pipeline: seeds with confidence intervals, the corruption report, the sweep."""
import json

import pytest

from edgedistill.cli import main

from conftest import tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory, image_folder):
    folder = tmp_path_factory.mktemp("seeds")
    r = tiny_recipe(image_folder, eval={"corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5],
                                         "corruption_images": 12})
    recipe = write_recipe(folder / "r.yaml", r)
    assert main(["recipe", "run", str(recipe), "--out", str(folder / "run"), "--seeds", "2"]) == 0
    return folder / "run"


def test_seeds_report_mean_and_ci_per_metric(seeded_run):
    metrics = json.loads((seeded_run / "metrics.json").read_text())
    top1 = metrics["seeds"]["student"]["top1"]
    assert top1["n"] == 2 and len(top1["values"]) == 2
    assert top1["mean"] == pytest.approx(sum(top1["values"]) / 2)
    assert metrics["student"]["top1_ci95"] == top1["ci95"]
    assert (seeded_run / "seed-0" / "student" / "model.pt").exists()
    assert (seeded_run / "seed-1" / "student" / "model.pt").exists()
    report = (seeded_run / "report.md").read_text()
    assert "## Seeds" in report and "± CI95" in report


def test_corruption_report_in_metrics_and_report(seeded_run):
    metrics = json.loads((seeded_run / "metrics.json").read_text())
    rob = metrics["robustness"]
    for model in ("teacher", "student"):
        assert set(rob[model]["per_corruption"]) == {"gaussian_noise", "contrast"}
        assert rob[model]["rpc"] == pytest.approx(rob[model]["mpc"] / rob[model]["clean"])
    assert "mPC" in (seeded_run / "report.md").read_text()


def test_sweep_reuses_shared_stages_and_writes_pareto(tmp_path, image_folder, caplog):
    caplog.set_level("INFO")
    r = tiny_recipe(image_folder, baseline=False, train={"epochs": 1, "batch_size": 8, "lr": 0.003, "device": "cpu"})
    recipe = write_recipe(tmp_path / "r.yaml", r)
    assert main(["recipe", "sweep", str(recipe), "student.name=test_efficientnet,test_resnet",
                 "--out", str(tmp_path / "sweep")]) == 0
    messages = [rec.message for rec in caplog.records]
    assert sum("stage features  running" in m for m in messages) == 1
    assert sum("stage features  reused" in m for m in messages) == 1
    assert (tmp_path / "sweep" / "sweep.md").exists() and (tmp_path / "sweep" / "pareto.png").exists()


def test_spurious_probe_and_gap_sections(tmp_path, image_folder):
    r = tiny_recipe(image_folder, baseline=False, eval={"spurious": "patch"},
                    train={"epochs": 4, "batch_size": 8, "lr": 0.003, "device": "cpu"})
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    sp = metrics["spurious"]
    for model in ("teacher", "student"):
        assert sp[model]["drop"] == pytest.approx(sp[model]["cue"] - sp[model]["shuffled"])
    assert len(list((tmp_path / "run" / "spurious" / "shuffled").glob("*.png"))) == metrics["n_test"]
    assert set(metrics["gap"]["rows"]) == {"real test", "train (sample)"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Spurious-feature probe" in report and "Synthetic-to-real gap" in report
