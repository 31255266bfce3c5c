"""Evaluation suite through the pipeline: seeds with confidence intervals, the corruption report, the spurious-cue
probe, the sweep. Expected numbers come from inputs whose outcome is known by construction, not from the formulas
the code itself uses."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgedistill import corruptions
from edgedistill.cli import main

from conftest import tiny_recipe, write_recipe


def grey_out(img, severity, rng):
    """A corruption whose effect is known exactly: severity 1 changes nothing, severity 5 leaves a flat grey image."""
    return Image.new("RGB", img.size, (128, 128, 128)) if severity == 5 else img.copy()


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory, image_folder):
    folder = tmp_path_factory.mktemp("seeds")
    r = tiny_recipe(image_folder, eval={"corruptions": ["gaussian_noise", "grey_out"], "severities": [1, 5],
                                         "corruption_images": 12})
    recipe = write_recipe(folder / "r.yaml", r)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(corruptions.CORRUPTIONS._items, "grey_out", grey_out)
        assert main(["recipe", "run", str(recipe), "--out", str(folder / "run"), "--seeds", "2"]) == 0
    return folder / "run"


def seed_metrics(run, k: int) -> dict:
    return json.loads((run / f"seed-{k}" / "stages" / "evaluate-metrics.json").read_text())


def test_seeds_train_different_students_and_report_their_mean_and_interval(seeded_run):
    metrics = json.loads((seeded_run / "metrics.json").read_text())
    a, b = (seed_metrics(seeded_run, k)["student"]["top1"] for k in (0, 1))
    top1 = metrics["seeds"]["student"]["top1"]
    assert top1["values"] == pytest.approx([a, b]) and top1["n"] == 2
    assert metrics["student"]["top1"] == pytest.approx((a + b) / 2)
    # Two seeds: s = |a - b| / sqrt(2), so the 95% t-interval t(0.975, 1) * s / sqrt(2) is 12.706 * |a - b| / 2.
    assert metrics["student"]["top1_ci95"] == pytest.approx(12.706 * abs(a - b) / 2, rel=1e-3)
    s0, s1 = (torch.load(seeded_run / f"seed-{k}" / "student" / "model.pt", weights_only=False)["state_dict"]
              for k in (0, 1))
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if s0[k].is_floating_point()), "each seed trains its own"
    assert "## Seeds" in (seeded_run / "report.md").read_text()


def test_corruption_report_matches_a_corruption_of_known_effect(seeded_run):
    metrics = json.loads((seeded_run / "metrics.json").read_text())
    rob = metrics["robustness"]
    n_test = metrics["n_test"]
    assert rob["images"] == n_test == 12  # corruption_images covers the whole held-out split: 4 images per class
    seed0 = seed_metrics(seeded_run, 0)
    report = (seeded_run / "report.md").read_text()
    for model in ("teacher", "student"):
        r = rob[model]
        # The clean column is the model's accuracy on those held-out images (up to one image: the report resizes
        # through 224 px first, so a borderline image may flip).
        assert abs(100 * r["clean"] - seed0[model]["top1"]) <= 100 / n_test + 1e-6
        grey = r["per_severity"]["grey_out"]
        assert grey["1"] == r["clean"], "an unchanged image scores its clean accuracy"
        assert grey["5"] == pytest.approx(1 / 3), "identical grey images get one class: 4 of 12 right"
        noise = r["per_corruption"]["gaussian_noise"]
        assert r["mpc"] == pytest.approx((noise + (r["clean"] + 1 / 3) / 2) / 2)
        assert r["rpc"] == pytest.approx(r["mpc"] / r["clean"])
    cells = " | ".join(f"{100 * (rob[m]['clean'] + 1 / 3) / 2:.1f}" for m in ("teacher", "student"))
    assert f"| grey_out | {cells} |" in report and "mPC" in report


def write_noise_folder(root, per_class: int = 16, seed: int = 0):
    """Three classes of pure noise: nothing but a painted cue can tell them apart."""
    rng = np.random.default_rng(seed)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_shuffled_cue_drops_a_cue_reliant_student(tmp_path):
    """On pure noise the class cue is the only signal, so the cued student relies on it: with the cue moved to
    another class it answers that class, below chance."""
    r = tiny_recipe(write_noise_folder(tmp_path / "noise"), baseline=False, eval={"spurious": "patch"},
                    train={"epochs": 10, "batch_size": 8, "lr": 0.003, "device": "cpu"})
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    student = metrics["spurious"]["student"]
    assert student["cue"] >= 0.6 and student["shuffled"] <= 1 / 3, student  # chance is 1/3
    assert student["drop"] >= 0.4, student
    assert set(metrics["gap"]["rows"]) == {"real test", "train (sample)"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Spurious-feature probe" in report and "Synthetic-to-real gap" in report


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


def test_cued_images_follow_the_split_they_depict(tmp_path):
    """Spurious-cue copies are keyed by the image and cue they show: after images are added to the folder (a new
    split), every cued training image is still its own source image with its own class's cue, not a stale copy."""
    from edgedistill.spurious import add_cue

    root = write_noise_folder(tmp_path / "noise")
    r = tiny_recipe(root, baseline=False, eval={"spurious": "patch"},
                    train={"epochs": 1, "batch_size": 8, "lr": 0.003, "device": "cpu"})
    recipe, run = write_recipe(tmp_path / "r.yaml", r), tmp_path / "run"
    assert main(["recipe", "run", str(recipe), "--out", str(run)]) == 0
    rng = np.random.default_rng(1)
    for name in sorted(p.name for p in root.iterdir()):
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"new{i}.png")
    assert main(["recipe", "run", str(recipe), "--out", str(run)]) == 0
    split = json.loads((run / "split.json").read_text())
    cued = json.loads((run / "spurious" / "cache" / "train" / "keys.json").read_text())
    assert len(cued) == len(split["train"])
    for (src, y), path in zip(split["train"], cued):
        with Image.open(src) as a, Image.open(path) as b:
            expected = add_cue(a.convert("RGB"), int(y), len(split["classes"]), kind="patch")
            assert np.array_equal(np.asarray(expected), np.asarray(b.convert("RGB"))), f"{path} is not {src}"
