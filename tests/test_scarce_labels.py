"""Scarce labels with an unlabelled pool, the fine-tuned teacher, and metrics that do not hide a class (issue #13)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgedistill import distill as distill_module
from edgedistill import finetune as finetune_module
from edgedistill.cli import main
from edgedistill.data import labelled_subset
from edgedistill.evaluate import balanced_accuracy, classification_metrics, macro_f1
from edgedistill.recipe import LossCfg
from edgedistill.objective import loss_terms

from conftest import kill_when, make_image_folder, tiny_recipe, write_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_balanced_accuracy_and_macro_f1_match_hand_computed_values():
    # 10 images: class 0 has 6 (5 right), class 1 has 3 (1 right, 2 called class 0), class 2 has 1 (right).
    m = np.array([[5, 1, 0], [2, 1, 0], [0, 0, 1]])
    assert balanced_accuracy(m) == pytest.approx(100 * (5 / 6 + 1 / 3 + 1) / 3)
    f1 = [2 * 5 / (2 * 5 + 2 + 1), 2 * 1 / (2 * 1 + 1 + 2), 2 * 1 / (2 * 1 + 0 + 0)]
    assert macro_f1(m) == pytest.approx(100 * sum(f1) / 3)
    # Through classification_metrics: top-1 70% hides that class 1 is mostly missed; top-k only with > k classes.
    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    pred = torch.tensor([0] * 5 + [1] + [0, 0, 1] + [2])
    out = classification_metrics(torch.nn.functional.one_hot(pred, 3).float(), labels, ["a", "b", "c"], top_k=5)
    assert out["top1"] == pytest.approx(70.0) and out["balanced_accuracy"] == pytest.approx(balanced_accuracy(m))
    assert out["per_class"]["b"] == pytest.approx(100 / 3) and "top5" not in out


def test_labelled_subset_is_stratified_seeded_and_all_by_default():
    train = [(f"{c}/{i}.png", c) for c in range(3) for i in range(10 + 5 * c)]
    picked = labelled_subset(train, 4, seed=0)
    assert [sum(train[i][1] == c for i in picked) for c in range(3)] == [4, 4, 4]
    assert picked == labelled_subset(train, 4, seed=0) and picked != labelled_subset(train, 4, seed=1)
    assert labelled_subset(train, 0, seed=0) == list(range(len(train)))
    assert len(labelled_subset(train, 12, seed=0)) == 10 + 12 + 12  # a class smaller than N keeps all it has


def test_unlabelled_images_never_reach_the_cross_entropy_term():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labels = torch.tensor([0, 1, -1])  # the third image is unlabelled and wildly "wrong" for any label
    terms = loss_terms({"logits": logits}, None, logits, labels, LossCfg(ce=1.0, kd=1.0), 2.0, 0.0)
    expected = torch.nn.functional.cross_entropy(logits[:2], labels[:2])
    assert torch.allclose(terms["ce"], expected) and "kd" in terms


@pytest.fixture(scope="module")
def scarce_run(tmp_path_factory, image_folder):
    """A tiny run with 4 labels per class, a folder of unlabelled images and a fine-tuned teacher."""
    root = tmp_path_factory.mktemp("scarce")
    pool = root / "pool"
    pool.mkdir()
    for i, path in enumerate(sorted(make_image_folder(root / "pool-src", per_class=4, corrupt=False, seed=5)
                                    .rglob("*.png"))):
        shutil.copy(path, pool / f"u{i}.png")
    recipe = tiny_recipe(image_folder, train={"epochs": 2, "batch_size": 8, "lr": 0.003, "device": "cpu"})
    recipe["data"].update(labels_per_class=4, unlabelled_root=str(pool))
    recipe["teacher"].update(mode="finetune", finetune_epochs=3, finetune_batch_size=4, finetune_lr=0.003)
    seen = {}
    real_set = distill_module.DistillSet

    def spy(items, *args, **kwargs):  # what each training stage was given to train on
        seen.setdefault("items", []).append([tuple(it) for it in items])
        return real_set(items, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(distill_module, "DistillSet", spy)
    mp.setattr(finetune_module, "DistillSet", spy)
    try:
        assert main(["recipe", "run", str(write_recipe(root / "r.yaml", recipe)), "--out", str(root / "run")]) == 0
    finally:
        mp.undo()
    return root / "run", pool, seen["items"]


def test_labelled_split_is_disjoint_from_the_pool_and_each_model_says_what_it_used(scarce_run):
    run, pool, _ = scarce_run
    split = json.loads((run / "split.json").read_text())
    labels = [split["train"][i][1] for i in split["labelled"]]
    assert sorted(labels) == sorted([0, 1, 2] * 4)
    pool_paths = {p for p, _ in split["unlabelled"]}
    assert pool_paths == {str(p) for p in pool.glob("*.png")}
    assert not pool_paths & {p for p, _ in split["train"] + split["val"] + split["test"]}
    metrics = json.loads((run / "metrics.json").read_text())
    n_unlabelled = len(split["train"]) - 12 + len(pool_paths)
    assert metrics["student"]["images"] == {"labelled": 12, "unlabelled": n_unlabelled, "synthetic": 0}
    assert metrics["baseline"]["images"] == {"labelled": 12, "unlabelled": 0}
    assert metrics["teacher"]["images"] == {"labelled": 12, "unlabelled": 0}
    for model in ("teacher", "student", "baseline"):
        assert {"balanced_accuracy", "macro_f1", "per_class"} <= set(metrics[model])


def test_the_baseline_never_sees_an_unlabelled_image_and_the_student_sees_them_without_labels(scarce_run):
    run, pool, items = scarce_run
    split = json.loads((run / "split.json").read_text())
    labelled = {tuple(split["train"][i]) for i in split["labelled"]}
    teacher_items, student_items, baseline_items = items  # finetune, distill, baseline (in the order they ran)
    assert set(teacher_items) == labelled and set(baseline_items) == labelled
    unlabelled = [it for it in student_items if it[1] == -1]
    assert {tuple(it) for it in student_items if it[1] >= 0} == labelled
    assert {p for p, _ in split["unlabelled"]} <= {p for p, _ in unlabelled}


def test_the_fine_tuned_teacher_is_the_one_every_later_stage_uses(scarce_run):
    run, _, _ = scarce_run
    from edgedistill.run_folder import load_run_teacher

    tuned = torch.load(run / "teacher" / "model.pt", weights_only=True)
    teacher = load_run_teacher(run)
    assert all(torch.equal(tuned[k], v) for k, v in teacher.state_dict().items() if k in tuned)
    log = [json.loads(x) for x in (run / "teacher" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    # The fine-tuned encoder differs from the pretrained (here: randomly initialised) one it started from.
    from edgedistill.recipe import load_recipe
    from edgedistill.teachers import build_teacher

    fresh = build_teacher(load_recipe(run / "recipe.yaml").teacher).state_dict()
    assert any(not torch.equal(fresh[k], tuned[k]) for k in tuned if tuned[k].is_floating_point())


def test_finetune_needs_a_trainable_head(capsys, image_folder, tmp_path):
    recipe = tiny_recipe(image_folder, teacher="tiny-clip")
    recipe["teacher"].update(mode="finetune", head="zeroshot")
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "o")]) == 2
    assert "teacher.mode" in capsys.readouterr().err


def test_a_killed_teacher_fine_tune_resumes_to_the_same_teacher(tmp_path, image_folder):
    r = tiny_recipe(image_folder, train={"epochs": 1, "batch_size": 8, "lr": 0.003, "device": "cpu"}, baseline=False)
    r["data"].update(labels_per_class=8)
    r["teacher"].update(mode="finetune", finetune_epochs=60, finetune_batch_size=2, finetune_lr=0.001)
    recipe = write_recipe(tmp_path / "r.yaml", r)
    cmd = [sys.executable, "-m", "edgedistill", "recipe", "run", str(recipe), "--out"]
    subprocess.run(cmd + [str(tmp_path / "straight")], env=ENV, check=True, capture_output=True)

    killed = tmp_path / "killed"
    ckpt = killed / "teacher" / "checkpoint.pt"
    kill_when(cmd + [str(killed)], lambda: ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= 2,
              env=ENV)
    assert not (killed / "teacher" / "model.pt").exists(), "killed after the fine-tune finished"

    resumed = subprocess.run(cmd + [str(killed)], env=ENV, check=True, capture_output=True, text=True)
    assert "fine-tune teacher: resuming from the checkpoint" in resumed.stderr
    a = torch.load(tmp_path / "straight" / "teacher" / "model.pt", weights_only=True)
    b = torch.load(killed / "teacher" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed fine-tune ends with another teacher"
