"""``student.interpolation``: the student's resize filter, the same in training, evaluation and the saved student
every export reads its preprocessing from; "" keeps the timm model's own; a name PIL lacks is refused up front."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_recipe, write_recipe
from edgedistill.checks import load_checked
from edgedistill.cli import main
from edgedistill.data import resize_normalize
from edgedistill.recipe import Recipe, RecipeError, build, fingerprinted, load_recipe
from edgedistill.students import student_input_spec


def recipe_with(**student):
    return build(Recipe, {"name": "t", "student": {"name": "tf_efficientnet_lite0", **student}, "loss": {"ce": 1.0},
                          "data": {"image_size": 48}}, "")


def checkerboard(side: int = 64) -> Image.Image:
    """One-pixel black and white squares: detail finer than a pixel of any smaller image."""
    board = (np.indices((side, side)).sum(0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board] * 3, -1))


def test_nearest_keeps_one_pixel_detail_that_the_models_own_bicubic_averages_away():
    own, nearest = student_input_spec(recipe_with()), student_input_spec(recipe_with(interpolation="nearest"))
    assert own.interpolation == "bicubic" and nearest.interpolation == "nearest"
    std, mean = np.array(own.std)[:, None, None], np.array(own.mean)[:, None, None]
    grey, sharp = (resize_normalize(checkerboard(), spec.to_dict()) * std + mean for spec in (own, nearest))
    assert np.all(np.isclose(sharp, 0, atol=1e-5) | np.isclose(sharp, 1, atol=1e-5))  # only black or white pixels
    assert np.isclose(sharp, 0, atol=1e-5).any() and np.isclose(sharp, 1, atol=1e-5).any()
    assert grey.std() < 0.2 < sharp.std()  # bicubic's antialiasing leaves a near-uniform grey


def test_the_trained_student_keeps_the_filter_it_was_trained_with(tmp_path, image_folder):
    recipe = tiny_recipe(image_folder)
    recipe["student"]["interpolation"] = "nearest"
    recipe["train"]["epochs"] = 1
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")]) == 0
    saved = torch.load(tmp_path / "run" / "student" / "model.pt", weights_only=False)
    assert saved["input"]["interpolation"] == "nearest"  # what export, bench and the demo resize with


def test_a_filter_pil_lacks_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(RecipeError, match=r"student.interpolation.*'box'.*nearest"):
        load_checked("quickstart", ["student.interpolation=box"])


def test_the_default_leaves_the_stage_fingerprints_of_older_run_folders_alone():
    assert "interpolation" not in fingerprinted(load_recipe("quickstart-probe").student)
    assert fingerprinted(recipe_with(interpolation="nearest").student)["interpolation"] == "nearest"
