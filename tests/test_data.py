"""Data: augmentation presets are reproducible, corrupt images are skipped, splits are stratified, and data that
cannot train a classifier fails naming the folder and the class."""
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from edgedistill.data import AUGMENTS, DataError, drop_unreadable, make_split, stratified_split, view_image
from edgedistill.recipe import DataCfg

from conftest import make_image_folder


@pytest.mark.parametrize("name", AUGMENTS.names())
def test_augmentation_is_a_function_of_its_seed(name, image_folder):
    path = str(next((image_folder / "green").glob("*.png")))
    a, b = view_image(path, name, 123, 1.0), view_image(path, name, 123, 1.0)
    assert isinstance(a, Image.Image) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)), "the same seed gives the same view (resume, DDP, cache)"
    if name != "none":
        others = [np.asarray(view_image(path, name, s, 1.0).resize((32, 32))) for s in range(5)]
        assert any(not np.array_equal(others[0], o) for o in others[1:]), "different seeds give different views"


def test_unreadable_images_are_reported_and_skipped(image_folder):
    items = [(str(p), 0) for p in (image_folder / "red").iterdir()]
    kept, skipped = drop_unreadable(items)
    assert [s["path"].endswith("broken.jpg") for s in skipped] == [True]
    assert len(kept) == len(items) - 1


def test_stratified_split_holds_out_each_class():
    items = [(f"{c}-{i}", c) for c in range(3) for i in range(10)]
    keep, held = stratified_split(items, 0.2, seed=0)
    assert sorted(y for _, y in held) == [0, 0, 1, 1, 2, 2]
    assert not set(keep) & set(held) and len(keep) + len(held) == 30
    assert stratified_split(items, 0.2, seed=0) == (keep, held)


def test_split_never_holds_out_a_whole_class():
    items = [("a0", 0), ("a1", 0), ("b0", 1)]  # two images of class 0, one of class 1
    keep, held = stratified_split(items, 0.75, seed=0)
    assert sorted(y for _, y in keep) == [0, 1] and [y for _, y in held] == [0]


@pytest.fixture
def small_folder(tmp_path):
    return make_image_folder(tmp_path / "images", per_class=3, size=16, corrupt=True)


def test_one_class_is_refused_naming_root_and_class(small_folder):
    for name in ("green", "blue"):
        shutil.rmtree(small_folder / name)
    expected = rf"Image folder {re.escape(str(small_folder))} has 1 class \['red'\]; a classifier needs at least two"
    with pytest.raises(DataError, match=expected):
        make_split(DataCfg(root=str(small_folder)))


def test_selecting_one_class_is_refused(small_folder):
    with pytest.raises(DataError, match=r"'data.classes' selects 1 class \['blue'\]"):
        make_split(DataCfg(root=str(small_folder), classes=("blue",)))


def test_class_with_only_unreadable_images_is_named(small_folder):
    for path in (small_folder / "green").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"class 'green' has no readable image \(all 3 fail to decode"):
        make_split(DataCfg(root=str(small_folder)))


def test_empty_class_folder_is_named(small_folder):
    (small_folder / "purple").mkdir()
    with pytest.raises(DataError, match=r"class\(es\) \['purple'\] have no training images"):
        make_split(DataCfg(root=str(small_folder)))


def test_a_single_corrupt_image_is_still_only_skipped(small_folder):
    split = make_split(DataCfg(root=str(small_folder), test_fraction=0.25))
    assert [s["path"].endswith("broken.jpg") for s in split["skipped"]] == [True]
    assert sorted({y for _, y in split["train"]}) == [0, 1, 2]
