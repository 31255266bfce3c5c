"""``data.student_augment`` (Noisy Student): the student's image gets a fresh label-keeping augmentation each epoch
on top of the view the teacher's target was computed on; the teacher's target, and so its cache, stay that view's.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_recipe, write_recipe
from edgedistill.checks import load_checked
from edgedistill.cli import main
from edgedistill.data import resize_normalize, view_image
from edgedistill.data.cache import view_seed
from edgedistill.recipe import RecipeError
from edgedistill.train import DistillSet

SPEC = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 1.0}
DIHEDRAL = [(k, f) for k in range(4) for f in (False, True)]


@pytest.fixture
def items(image_folder):
    paths = sorted(p for p in image_folder.rglob("*.png"))[:6]
    return [(str(p), k % 3) for k, p in enumerate(paths)]


def dihedral_views(img: Image.Image) -> list[torch.Tensor]:
    """The student's image under each of the 8 flips and right-angle turns."""
    outs = []
    for k, flip in DIHEDRAL:
        t = img.rotate(90 * k, expand=True)
        outs.append(torch.from_numpy(resize_normalize(t.transpose(Image.FLIP_LEFT_RIGHT) if flip else t, SPEC)))
    return outs


def which_turn(x: torch.Tensor, img: Image.Image) -> int:
    matches = [j for j, v in enumerate(dihedral_views(img)) if torch.equal(x, v)]
    assert matches, "the student's image is not a flip or turn of the view the teacher saw"
    return matches[0]


@pytest.mark.parametrize("views", [1, 2])
def test_student_gets_fresh_turns_of_the_cached_view_the_teacher_saw(items, views):
    ds = DistillSet(items, SPEC, None, "flip_rotate", views, 1.0, seed=0, online=False, student_augment="flip_rotate")
    turns = {}
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i, (path, _) in enumerate(items):
            s, t, label, idx, view = ds[i]
            assert t.numel() == 0 and idx == i and 0 <= view < views  # the target is a cached view's
            base = view_image(path, "flip_rotate", view_seed(path, view, 0), 1.0)
            turns.setdefault(i, set()).add((view, which_turn(s, base)))
            assert torch.equal(ds[i][0], s)  # a function of (seed, epoch, item): a resumed run draws it again
    assert all(len(t) > 2 for t in turns.values())  # fresh each epoch, not one fixed extra view


def test_without_it_the_student_sees_exactly_the_cached_view(items):
    ds = DistillSet(items, SPEC, None, "flip_rotate", 1, 1.0, seed=0, online=False)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i, (path, _) in enumerate(items):
            assert torch.equal(ds[i][0], torch.from_numpy(resize_normalize(view_image(path, "none", None, 1.0), SPEC)))


def test_online_teacher_sees_the_view_before_the_students_noise(items):
    ds = DistillSet(items, SPEC, SPEC, "none", 1, 1.0, seed=3, online=True, student_augment="flip_rotate")
    differ = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i, (path, _) in enumerate(items):
            s, t, *_ = ds[i]
            clean = view_image(path, "none", None, 1.0)
            assert torch.equal(t, torch.from_numpy(resize_normalize(clean, SPEC)))  # the teacher: un-noised
            differ += which_turn(s, clean) != 0
    assert differ > 0


def test_a_bad_student_augment_is_refused_naming_the_key(tmp_path, image_folder):
    recipe = tiny_recipe(image_folder)
    recipe["data"]["student_augment"] = "flip_rotat"
    with pytest.raises(RecipeError, match=r"data\.student_augment.*flip_rotate"):
        load_checked(str(write_recipe(tmp_path / "r.yaml", recipe)))


def test_the_student_and_the_baseline_train_on_the_noised_images(tmp_path, image_folder):
    def weights(out, **data):
        recipe = tiny_recipe(image_folder, baseline=True)
        recipe["data"].update(views=1, **data)
        recipe["train"]["epochs"] = 1
        assert main(["recipe", "run", str(write_recipe(tmp_path / f"{out}.yaml", recipe)),
                     "--out", str(tmp_path / out)]) == 0
        return {m: torch.load(tmp_path / out / m / "model.pt", weights_only=False)["state_dict"]
                for m in ("student", "baseline")}

    plain, noised = weights("plain"), weights("noised", student_augment="flip_rotate")
    for m in ("student", "baseline"):
        assert any(not torch.equal(plain[m][k], noised[m][k]) for k in plain[m]), f"{m} ignored student_augment"
    recipe_used = json.loads((tmp_path / "noised" / "metrics.json").read_text())
    assert recipe_used["student"]["top1"] >= 0
