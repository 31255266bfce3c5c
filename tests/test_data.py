"""Data: augmentation presets are reproducible, corrupt images are skipped, splits are stratified."""
import numpy as np
import pytest
from PIL import Image

from edgedistill.data import AUGMENTS, drop_unreadable, stratified_split, view_image


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
