"""Datasets fetched by name: torchvision classification datasets in their real on-disk layout (DTD's files, MNIST's
arrays), Hugging Face datasets (save_to_disk and a local parquet folder), the shipped Flowers-102 names, the checks
on the names and hf keys, and the offline failure: one sentence naming every missing download, exit code 2."""
import struct
from dataclasses import replace

import numpy as np
import pytest
import yaml
from PIL import Image

from edgedistill.checks import load_checked
from edgedistill.cli import main
from edgedistill.data import DataError, make_split
from edgedistill.data.torchvision_sets import flowers102_classes
from edgedistill.recipe import DataCfg, RecipeError

from conftest import tiny_recipe, write_recipe

DTD_CLASSES = ("banded", "dotted", "zigzagged")


def make_dtd(root, per_split=(("train", 2), ("val", 1), ("test", 2))):
    """torchvision's DTD layout: ROOT/dtd/dtd/images/<class>/<file> and labels/<split>1.txt ("class/file" lines)."""
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    for split, n in per_split:
        lines = []
        for label, c in enumerate(DTD_CLASSES):
            (data / "images" / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = f"{c}_{split}_{i:04d}.jpg"
                Image.fromarray(np.full((24, 24, 3), 40 + 80 * label, np.uint8)).save(data / "images" / c / name)
                lines.append(f"{c}/{name}")
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return root


def make_mnist(root, train=(0, 1, 0, 1, 0, 1), test=(0, 1, 1, 0)):
    """torchvision's MNIST raw files (IDX format, big-endian header); image i of a split is filled with 50+100y+i."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, labels in (("train", train), ("t10k", test)):
        images = np.stack([np.full((28, 28), 50 + 100 * y + i, np.uint8) for i, y in enumerate(labels)])
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + struct.pack(">III", len(labels), 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + struct.pack(">I", len(labels)) + bytes(labels))
    return root


def names(items):
    return sorted((p.rsplit("/", 1)[-1], y) for p, y in items)


def test_torchvision_dtd_trains_on_train_and_val_tests_on_test_with_its_class_names(tmp_path):
    split = make_split(DataCfg(dataset="torchvision/DTD", root=str(make_dtd(tmp_path / "tv"))))
    assert split["classes"] == list(DTD_CLASSES)
    expected = {s: sorted((f"{c}_{s}_{i:04d}.jpg", y) for y, c in enumerate(DTD_CLASSES) for i in range(n))
                for s, n in (("train", 2), ("val", 1), ("test", 2))}
    assert names(split["train"]) == sorted(expected["train"] + expected["val"])
    assert names(split["test"]) == expected["test"]
    assert all("/dtd/dtd/images/" in p for p, _ in split["train"]), "file-backed datasets are read where they are"


def test_torchvision_mnist_arrays_become_png_files_once(tmp_path):
    root = make_mnist(tmp_path / "tv")
    cfg = DataCfg(dataset="torchvision/MNIST", root=str(root), classes=("0 - zero", "1 - one"))
    split = make_split(cfg)
    assert split["classes"] == ["0 - zero", "1 - one"]
    assert [y for _, y in split["train"]] == [0, 1, 0, 1, 0, 1] and [y for _, y in split["test"]] == [0, 1, 1, 0]
    for i, (path, y) in enumerate(split["train"]):
        assert np.asarray(Image.open(path)).max() == 50 + 100 * y + i, "the file holds the dataset's own pixels"
    files = sorted((root / "edgedistill-images").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in files]
    assert len(files) == 10 and make_split(cfg) == split
    assert [p.stat().st_mtime_ns for p in files] == stamps, "a second split reuses the written files"


def test_flowers102_names_ship_with_the_package():
    flowers = flowers102_classes()
    assert len(flowers) == len(set(flowers)) == 102
    assert flowers[0] == "pink primrose" and flowers[40] == "barbeton daisy" and flowers[101] == "blackberry lily"


def hf_dataset(n: int):
    datasets = pytest.importorskip("datasets", reason="hf/<id> datasets need the optional 'datasets' package")
    images = [Image.fromarray(np.full((12, 12, 3), 30 + 70 * (i % 3) + i, np.uint8)) for i in range(n)]
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["cat", "dog", "fox"]),
                                  "note": datasets.Value("string")})
    return datasets.Dataset.from_dict({"picture": images, "kind": [i % 3 for i in range(n)],
                                       "note": [f"n{i}" for i in range(n)]}, features=features)


def test_hf_dataset_saved_to_disk_gives_its_splits_and_classlabel_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": hf_dataset(9), "test": hf_dataset(6)}).save_to_disk(str(tmp_path / "saved"))
    split = make_split(DataCfg(dataset=f"hf/{tmp_path / 'saved'}", root=str(tmp_path / "cache")))
    assert split["classes"] == ["cat", "dog", "fox"]
    assert sorted(y for _, y in split["train"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(split["test"]) == 6
    for path, y in split["train"]:
        i = int(path.rsplit("/", 1)[-1][:7])
        assert y == i % 3 and np.asarray(Image.open(path))[0, 0, 0] == 30 + 70 * (i % 3) + i
    assert all(p.startswith(str(tmp_path / "cache" / "edgedistill-images")) for p, _ in split["train"])


def test_hf_local_parquet_with_named_columns_and_no_test_split(tmp_path):
    (tmp_path / "pq" / "data").mkdir(parents=True)
    hf_dataset(12).to_parquet(str(tmp_path / "pq" / "data" / "train-00000.parquet"))
    cfg = DataCfg(dataset=f"hf/{tmp_path / 'pq'}", root=str(tmp_path / "cache"), hf_test_split="",
                  hf_image_column="picture", hf_label_column="kind", test_fraction=0.25)
    split = make_split(cfg)
    assert split["classes"] == ["cat", "dog", "fox"]
    assert sorted(y for _, y in split["test"]) == [0, 1, 2] and len(split["train"]) == 9, "test_fraction held out"
    with pytest.raises(DataError, match="Recipe key 'data.hf_label_column' is 'kinds'.*'kind'"):
        make_split(replace(cfg, hf_label_column="kinds"))
    with pytest.raises(DataError, match=r"Recipe key 'data.hf_split' is 'validation'.*\['train'\]"):
        make_split(replace(cfg, hf_split="validation"))


@pytest.mark.parametrize("overrides, key", [
    (["data.dataset=torchvision/dtd"], "Did you mean \\['torchvision/DTD'\\]"),
    (["data.dataset=torchvision/CocoDetection"], "not a torchvision classification dataset"),
    (["data.hf_split=validation"], "Recipe key 'data.hf_split' applies only to Hugging Face datasets"),
    (["data.dataset=hf/"], "Recipe key 'data.dataset' is 'hf/' without a dataset id"),
    (["data.dataset=hf/a/b", "data.hf_test_split=train"], "Recipe key 'data.hf_test_split' is 'train'"),
    (["data.dataset=flowers102"], "Recipe key 'data.dataset': Unknown dataset 'flowers102'.*torchvision/<Class>"),
])
def test_dataset_names_and_hf_keys_are_checked_before_any_work(overrides, key):
    if any(o.startswith("data.dataset=hf/a") for o in overrides):
        pytest.importorskip("datasets")
    with pytest.raises(RecipeError, match=key):
        load_checked("quickstart", overrides)


def offline_recipe(tmp_path, image_folder, **teacher):
    r = tiny_recipe(image_folder)
    r["data"] = {**r["data"], "dataset": "torchvision/DTD", "root": str(tmp_path / "empty")}
    r["teacher"] = {**r["teacher"], **teacher}
    return write_recipe(tmp_path / "r.yaml", r)


def test_offline_torchvision_dataset_fails_after_validation_in_one_sentence(tmp_path, image_folder, capsys,
                                                                             monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = offline_recipe(tmp_path, image_folder)
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run"), "train.epoch=2"]) == 2
    assert "Unknown recipe key 'train.epoch'" in capsys.readouterr().err, "validation comes first"
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("edgedistill: error: Recipe key 'data.dataset' needs the torchvision dataset 'DTD': it "
                          f"downloads on first use with internet and is cached under {tmp_path / 'empty'} (data.root) "
                          "(loading failed: not there, and HF_HUB_OFFLINE is set")
    assert not (tmp_path / "run" / "split.json").exists(), "nothing ran past the preflight"


def test_offline_message_names_the_dataset_and_every_missing_weight(tmp_path, image_folder, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty hub cache
    recipe = offline_recipe(tmp_path, image_folder, name="timm", arch="resnet18", pretrained="a1_in1k")
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the torchvision dataset 'DTD'" in err and "'resnet18.a1_in1k'" in err


def test_a_run_on_a_torchvision_dataset_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # on disk already: nothing to download
    root = make_dtd(tmp_path / "tv", per_split=(("train", 4), ("val", 2), ("test", 3)))
    r = tiny_recipe(tmp_path)
    r["data"] = {**r["data"], "dataset": "torchvision/DTD", "root": str(root), "views": 1}
    r["train"] = {**r["train"], "epochs": 1}
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run")]) == 0
    metrics = yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["classes"] == list(DTD_CLASSES) and metrics["n_test"] == 9
