"""P4's linear probe of the student (eval.student_probe): trained on real and on synthetic images, scored on the test
split, its learning rate chosen on the validation split (or a hold-out of its own training images), never on test."""
import json

import torch

from edgedistill import student_probe
from edgedistill.cli import main
from edgedistill.recipe import EvalCfg

from conftest import tiny_recipe, write_recipe


def clusters(n_per_class: int, seed: int, dim: int = 16, classes: int = 3):
    """Features drawn around one centre per class: a linear probe separates them by construction."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.eye(classes, dim)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


def test_a_probe_learns_what_the_features_hold_and_not_what_they_do_not():
    cfg = EvalCfg(student_probe=True, student_probe_epochs=100, student_probe_lr=(0.05,))
    x, y = clusters(20, seed=0)
    test = clusters(10, seed=1)
    good = student_probe.probe(x, y, None, test, ["a", "b", "c"], cfg, seed=0)
    assert good["top1"] == 100.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert student_probe.probe(x, shuffled, None, test, ["a", "b", "c"], cfg, seed=0)["top1"] < 70.0


def test_the_learning_rate_is_chosen_on_val_and_the_test_split_is_scored_once(monkeypatch):
    x, y = clusters(20, seed=0)
    val, test = clusters(5, seed=2), clusters(7, seed=3)
    scored = []
    real = student_probe.classification_metrics
    monkeypatch.setattr(student_probe, "classification_metrics",
                        lambda logits, labels, classes: scored.append(len(labels)) or real(logits, labels, classes))
    cfg = EvalCfg(student_probe=True, student_probe_epochs=30, student_probe_lr=(1e-4, 0.05, 0.5))
    out = student_probe.probe(x, y, val, test, ["a", "b", "c"], cfg, seed=0)
    assert scored == [15, 15, 15, 21], "each learning rate scored on val (15 images), then test (21) once"
    assert out["selection"]["split"] == "val" and set(out["selection"]["top1_by_lr"]) == {"0.0001", "0.05", "0.5"}
    by_lr = out["selection"]["top1_by_lr"]
    assert by_lr[str(out["lr"])] == max(by_lr.values())


def run_probe(tmp_path, image_folder, **sections):
    r = tiny_recipe(image_folder, **sections)
    r["eval"] = {"student_probe": True, "student_probe_epochs": 50}
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run")]) == 0
    return (json.loads((tmp_path / "run" / "metrics.json").read_text())["student_probe"],
            (tmp_path / "run" / "report.md").read_text())


def test_a_run_without_synthetic_images_probes_real_images_and_says_so(tmp_path, image_folder):
    r = tiny_recipe(image_folder)
    probe, report = run_probe(tmp_path, image_folder, data={**r["data"], "val_fraction": 0.2})
    assert 0 <= probe["real"] <= 100 and probe["synthetic"] is None
    assert "no synthetic images" in probe["note"] and "no synthetic images" in report
    assert probe["probes"]["real"]["selection"]["split"] == "val"
    assert "## Linear probe of the student (P4)" in report and "| real training images (labelled) |" in report


class MeanColour(torch.nn.Module):
    """A stand-in student whose penultimate features are each image's mean colour: the conftest images' class."""

    def forward(self, x):
        return {"features": x.mean((2, 3)), "logits": torch.zeros(len(x), 3)}


def test_real_and_synthetic_probes_each_learn_from_their_own_images(image_folder):
    """Real images carry their colour class; the "synthetic" ones are the same images with shuffled labels, so only
    a probe trained on the real ones can score: which images trained which probe shows in the two figures."""
    from types import SimpleNamespace

    from edgedistill.data import make_split
    from edgedistill.recipe import DataCfg, Recipe, TrainCfg
    from edgedistill.teachers.base import InputSpec

    split = make_split(DataCfg(root=str(image_folder), test_fraction=0.25))
    split["labelled"] = list(range(len(split["train"])))
    rng = torch.Generator().manual_seed(0)
    shuffled = [split["train"][i][1] for i in torch.randperm(len(split["train"]), generator=rng)]
    synth = {"items": [(p, -1) for p, _ in split["train"]], "labels": shuffled}
    recipe = Recipe(eval=EvalCfg(student_probe=True, student_probe_epochs=200, student_probe_lr=(0.05,),
                                 synthetic_holdout=0.0), train=TrainCfg(batch_size=16, device="cpu"))
    saved = {"input": InputSpec(size=16, crop_pct=1.0).to_dict()}
    out = student_probe.evaluate_student_probe(SimpleNamespace(recipe=recipe, device="cpu"), split, synth,
                                               MeanColour(), saved)
    assert out["real"] == 100.0 and out["synthetic"] < 70.0 and "note" not in out
    assert out["probes"]["synthetic"]["images"] == len(split["train"]) == out["probes"]["real"]["images"]
    assert "| synthetic images |" in out["markdown"] and out["feature_dim"] == 3
