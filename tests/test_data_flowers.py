"""Flowers-102 through torchvision: the training set is torchvision's train and val splits together (P1), and the
classes carry the flower names this package ships (torchvision's Flowers102 has none)."""
import numpy as np
from PIL import Image

from edgedistill.data import make_split
from edgedistill.recipe import DataCfg

# Per split, (file, label): two classes, like torchvision's 10 train + 10 val + the rest as test, in miniature.
SPLITS = {"train": [("tr0", 0), ("tr1", 0), ("tr2", 1), ("tr3", 1)],
          "val": [("va0", 0), ("va1", 1), ("va2", 1)],
          "test": [("te0", 0), ("te1", 1)]}


def test_flowers102_trains_on_train_and_val_and_tests_on_test(tmp_path, monkeypatch):
    import torchvision.datasets

    for name, _ in sum(SPLITS.values(), []):
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / f"{name}.jpg")
    requested = []

    class FakeFlowers102:  # torchvision's attributes, no download
        def __init__(self, root, split="train", download=False, **kwargs):
            requested.append(split)
            self._image_files = [tmp_path / f"{name}.jpg" for name, _ in SPLITS[split]]
            self._labels = [label for _, label in SPLITS[split]]

    monkeypatch.setattr(torchvision.datasets, "Flowers102", FakeFlowers102)
    split = make_split(DataCfg(dataset="flowers-102", root=str(tmp_path / "cache")))

    def names(items):
        return sorted((p.rsplit("/", 1)[-1][:-4], y) for p, y in items)

    assert sorted(requested) == ["test", "train", "val"]
    assert names(split["train"]) == sorted(SPLITS["train"] + SPLITS["val"])
    assert names(split["test"]) == sorted(SPLITS["test"])
    assert split["classes"] == ["pink primrose", "hard-leaved pocket orchid"], "the shipped names, in label order"
