"""Figures a reviewer can trust: every stage gives the same weights however it was reached, seeds vary every random
choice, teacher and student see the same view, and the baseline gets the distilled student's budget."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgedistill.cli import main
from edgedistill.data import resize_normalize, view_image
from edgedistill.data.cache import FeatureCache, view_seed
from edgedistill.run_folder import Run
from edgedistill.stages import stage_split
from edgedistill.recipe import Recipe, build
from edgedistill.teachers import build_teacher

from conftest import make_image_folder, tiny_recipe, write_recipe


def run_recipe(tmp_path, recipe: dict, out: Path, *args) -> Path:
    path = write_recipe(tmp_path / f"{out.name}.yaml", recipe)
    assert main(["recipe", "run", str(path), "--out", str(out), *map(str, args)]) == 0
    return out


def weights(run: Path, which: str = "student") -> dict:
    return torch.load(run / which / "model.pt", weights_only=False)["state_dict"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_cache(run: Path, views: bool) -> Path:
    return next(p for p in (run / "cache").iterdir() if p.name.startswith("train-views-" if views else "train-")
                and (views or "views" not in p.name))


def recipe_with(image_folder, views: int = 3, epochs: int = 3, **data) -> dict:
    r = tiny_recipe(image_folder, train={"epochs": epochs, "batch_size": 8, "lr": 0.003, "device": "cpu"})
    r["data"].update(views=views, **data)
    return r


def test_stages_give_the_same_weights_whether_earlier_stages_ran_or_were_reused(tmp_path, image_folder):
    # A: every stage in one process. B: split, features and probe copied from A (reused), then a half-finished
    # feature extraction (what SIGKILL leaves: half the rows marked missing), so training runs in a process whose
    # earlier stages did something else. Both runs must end with bit-identical students and baselines.
    r = recipe_with(image_folder)
    a = run_recipe(tmp_path, r, tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    for name in ("split.json", "cache", "probe"):
        (shutil.copytree if (a / name).is_dir() else shutil.copy)(a / name, b / name)
    (b / "stages").mkdir()
    for name in ("split", "features", "probe"):
        shutil.copy(a / "stages" / f"{name}.json", b / "stages" / f"{name}.json")
    shutil.rmtree(b / "cache" / train_cache(a, views=True).name)  # this seed's augmented views: recomputed...
    partial = tmp_path / "partial"  # ...and the un-augmented cache left half-filled, as a killed extraction does
    shutil.copytree(a / "cache" / train_cache(a, views=False).name, partial)
    done = np.memmap(b / "cache" / train_cache(a, views=False).name / "done.u8", dtype=np.uint8, mode="r+")
    done[len(done) // 3: 2 * len(done) // 3] = 0
    done.flush()
    (b / "stages" / "features.json").unlink()
    run_recipe(tmp_path, r, b)
    assert same_weights(weights(a), weights(b)), "the student depends on what ran before it in the process"
    assert same_weights(weights(a, "baseline"), weights(b, "baseline")), "so does the baseline"
    ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    assert ma["student"]["confusion"] == mb["student"]["confusion"]


def test_same_data_elsewhere_gives_the_same_weights(tmp_path, image_folder):
    # The same images in another folder, run into another run folder: augmented views are drawn from the image's
    # bytes and the seed, never its path, so the student and baseline come out bit-identical.
    moved = shutil.copytree(image_folder, tmp_path / "elsewhere" / "deeper" / "images")
    a = run_recipe(tmp_path, recipe_with(image_folder, epochs=2), tmp_path / "a")
    b = run_recipe(tmp_path, recipe_with(moved, epochs=2), tmp_path / "other" / "b")
    assert same_weights(weights(a), weights(b))
    assert same_weights(weights(a, "baseline"), weights(b, "baseline"))


def test_sweep_points_share_one_baseline_per_seed(tmp_path, image_folder):
    # Two loss presets in one shared folder (what `recipe sweep loss=kd,hard_kd` does): the baseline leaves the
    # losses out, so it is trained once and each point gets that same baseline, equal to a plain run's.
    from edgedistill.checks import load_checked
    from edgedistill.pipeline import run_recipe as run_point

    path = write_recipe(tmp_path / "r.yaml", recipe_with(image_folder, epochs=2))
    shared = tmp_path / "sweep"
    for preset in ("kd", "hard_kd"):
        run_point(load_checked(str(path), [f"loss={preset}"]), shared / "points" / preset, shared_dir=shared)
    assert len(list((shared / "baselines").iterdir())) == 1
    a, b = (weights(shared / "points" / p, "baseline") for p in ("kd", "hard_kd"))
    plain = run_recipe(tmp_path, recipe_with(image_folder, epochs=2), tmp_path / "plain")
    assert same_weights(a, b) and same_weights(a, weights(plain, "baseline"))
    assert not same_weights(weights(shared / "points" / "kd"), weights(shared / "points" / "hard_kd"))
    saved = torch.load(shared / "points" / "hard_kd" / "baseline" / "model.pt", weights_only=False)
    assert saved["recipe"]["loss"]["hard_kd"] == 0.5  # the copy records its own run's recipe


def test_data_workers_give_the_same_weights_as_the_main_process(tmp_path, image_folder):
    # Each epoch picks other fixed views per image; a worker must see the epoch (a persistent worker kept epoch 0's
    # picks forever), so 2 workers train exactly what the main process alone trains.
    r0, r2 = recipe_with(image_folder, views=3, num_workers=0), recipe_with(image_folder, views=3, num_workers=2)
    a = run_recipe(tmp_path, r0, tmp_path / "w0")
    b = run_recipe(tmp_path, r2, tmp_path / "w2")
    assert same_weights(weights(a), weights(b))
    assert same_weights(weights(a, "baseline"), weights(b, "baseline"))


def test_seeds_vary_views_and_initialisation_and_report_t_intervals(tmp_path, image_folder):
    r = recipe_with(image_folder, views=2, epochs=2, val_fraction=0.25)
    r["student"] = {"name": "test_efficientnet"}  # random initialisation: only the seed sets it
    r["export"] = {"formats": ["onnx"], "precision": ["fp32"]}
    run = run_recipe(tmp_path, r, tmp_path / "seeds", "--seeds", "2")
    s0, s1 = weights(run / "seed-0"), weights(run / "seed-1")
    assert not same_weights(s0, s1)
    b0, b1 = weights(run / "seed-0", "baseline"), weights(run / "seed-1", "baseline")
    assert not same_weights(b0, b1)
    # Each seed draws its own augmented views, so the teacher saw other pixels for view 1.
    caches = sorted(p for p in (run / "cache").iterdir() if p.name.startswith("train-views-"))
    assert len(caches) == 2
    f0, f1 = (np.fromfile(c / "features.f32", dtype=np.float32) for c in caches)
    assert not np.allclose(f0, f1)
    metrics = json.loads((run / "metrics.json").read_text())
    per_seed = [json.loads((run / f"seed-{k}" / "stages" / "evaluate-metrics.json").read_text()) for k in (0, 1)]
    for c in metrics["classes"]:  # per-class accuracy is the mean over seeds, not seed 0's
        vals = [m["student"]["per_class"][c] for m in per_seed]
        assert metrics["student"]["per_class"][c] == pytest.approx(sum(vals) / 2)
    t0, t1 = (m["student"]["top1"] for m in per_seed)
    assert metrics["seeds"]["student"]["top1"]["ci95"] == pytest.approx(12.706 * abs(t0 - t1) / 2, abs=1e-6)
    assert "Student-t" in (run / "report.md").read_text()
    # Validation figures, the ones to choose on, are on the validation images and averaged over the seeds too.
    split = json.loads((run / "split.json").read_text())
    assert metrics["validation"]["n"] == len(split["val"]) > 0
    v0, v1 = (m["validation"]["baseline"]["balanced_accuracy"] for m in per_seed)
    assert metrics["validation"]["baseline"]["balanced_accuracy"] == pytest.approx((v0 + v1) / 2)
    assert metrics["seeds"]["validation"]["student"]["top1"]["n"] == 2
    # --seeds works with a recipe that exports: the first seed's student is exported from its own folder.
    assert (run / "seed-0" / "export" / "onnx-fp32" / "manifest.json").exists()


def test_teacher_and_student_see_the_same_view(tmp_path, image_folder):
    # data.crop_pct unset: the tiny teacher's default crop is 1.0, the timm student's 0.875. The teacher's cached
    # feature of an augmented view must be the teacher's feature of exactly the image the student trains on.
    r = recipe_with(image_folder, views=2, epochs=1)
    r["data"].pop("crop_pct")
    run = run_recipe(tmp_path, r, tmp_path / "view")
    saved = torch.load(run / "student" / "model.pt", weights_only=False)
    recipe = build(Recipe, saved["recipe"], "")
    teacher = build_teacher(recipe.teacher).eval()
    split = json.loads((run / "split.json").read_text())
    caches = [open_cache(train_cache(run, views=False)), open_cache(train_cache(run, views=True))]
    for i in (0, 5):
        path = split["train"][i][0]
        for view, cache in enumerate(caches):
            # What the student trains on for this view (DistillSet: the seed-salted view at the student's crop).
            img = view_image(path, recipe.data.augment, view_seed(path, view, recipe.train.seed),
                             saved["input"]["crop_pct"])
            with torch.no_grad():
                f = teacher.encode(torch.from_numpy(resize_normalize(img, teacher.info.input.to_dict()))[None])
            assert torch.allclose(f[0], cache.get([i], [0])[0], atol=1e-4), f"view {view} differs"


def open_cache(folder: Path) -> FeatureCache:
    meta = json.loads((folder / "meta.json").read_text())
    return FeatureCache(folder, json.loads((folder / "keys.json").read_text()), meta["views"], meta["dim"],
                        {k: v for k, v in meta.items() if k not in ("items", "views", "dim")})


def test_baseline_gets_the_distilled_students_budget(tmp_path, image_folder):
    # Synthetic images double the distillation epoch (real:synthetic 1:1); the baseline, on real images only, must
    # still get as many optimiser steps of as many images.
    r = recipe_with(image_folder, views=1, epochs=2)
    r["synthetic"] = {"generator": "tiny-sd", "images_per_class": 12, "size": 32, "steps": 2}
    run = run_recipe(tmp_path, r, tmp_path / "budget")
    rows = {w: [json.loads(x) for x in (run / w / "log.jsonl").read_text().splitlines()]
            for w in ("student", "baseline")}
    n_train = len(json.loads((run / "split.json").read_text())["train"])
    assert [x["steps"] for x in rows["student"]] == [x["steps"] for x in rows["baseline"]]
    assert [x["images"] for x in rows["student"]] == [x["images"] for x in rows["baseline"]]
    assert rows["baseline"][0]["images"] >= 2 * n_train - 8  # more than one pass over the real images


def test_split_key_follows_the_folders_contents(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=6, corrupt=False)
    recipe = build(Recipe, tiny_recipe(root), "")
    first = Run(tmp_path / "run", recipe)
    stage_split(first)
    shutil.copy(root / "red" / "000.png", root / "red" / "added.png")
    second = Run(tmp_path / "run", recipe)
    split = stage_split(second)
    assert second.keys["split"] != first.keys["split"]
    assert any(p.endswith("added.png") for p, _ in split["train"] + split["test"])


def test_eval_every_logs_validation_accuracy_and_cutmix_trains(tmp_path, image_folder):
    r = recipe_with(image_folder, views=1, epochs=2, val_fraction=0.2, cutmix=1.0, augment="crop_flip_jitter")
    r["train"].update(teacher="online", eval_every=1)
    run = run_recipe(tmp_path, r, tmp_path / "val")
    rows = [json.loads(x) for x in (run / "student" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= row["val_top1"] <= 100 for row in rows) and len(rows) == 2
    bad = write_recipe(tmp_path / "bad.yaml", {**r, "data": {**r["data"], "val_fraction": 0.0}})
    assert main(["recipe", "run", str(bad), "--out", str(tmp_path / "bad")]) == 2
