"""``train.log: [tensorboard]``: scalars beside log.jsonl, read back with TensorBoard's own reader."""
import json
import sys

import pytest

from edgedistill.cli import main
from edgedistill.recipe import RecipeError, TrainCfg, fingerprinted, load_recipe, to_plain

from conftest import tiny_recipe, write_recipe
from test_cli import fails


def scalars(folder) -> dict:
    """Tag -> [(step, value)] from the event files in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_writes_the_log_rows_as_scalars(tmp_path, image_folder):
    pytest.importorskip("tensorboard", reason="needs tensorboard (pip install tensorboard)")
    recipe = tiny_recipe(image_folder, train={"epochs": 2, "batch_size": 8, "lr": 0.003, "device": "cpu",
                                              "log": ["tensorboard"], "eval_every": 1})
    recipe["data"]["val_fraction"] = 0.2
    assert main(["recipe", "run", str(write_recipe(tmp_path / "tiny.yaml", recipe)), "--out", str(tmp_path / "run")]) \
        == 0
    for stage, terms in (("student", {"ce", "kd"}), ("baseline", {"ce"})):
        assert list((tmp_path / "run" / stage / "tb").glob("events.out.tfevents.*")), stage
        found = scalars(tmp_path / "run" / stage / "tb")
        assert set(found) == {"loss/total", "train/lr", "train/images_per_s", "train/epoch_seconds", "val/top1",
                              *(f"loss/{t}" for t in terms)}, stage
        rows = [json.loads(line) for line in (tmp_path / "run" / stage / "log.jsonl").read_text().splitlines()]
        for tag, key in (("loss/total", "loss"), ("val/top1", "val_top1"), ("train/lr", "lr")):
            assert found[tag] == [(r["epoch"], pytest.approx(r[key], rel=1e-6, abs=1e-9)) for r in rows], tag


def test_the_logger_leaves_every_stage_fingerprint_alone():
    on = TrainCfg(log=("tensorboard",))
    assert fingerprinted(on) == fingerprinted(TrainCfg()) == {k: v for k, v in to_plain(on).items() if k != "log"}
    assert to_plain(on)["log"] == ["tensorboard"]  # still in the resolved recipe.yaml


def test_an_unknown_logger_names_the_key():
    with pytest.raises(RecipeError, match=r"'train.log'.*'tensorbord'.*Did you mean 'tensorboard'"):
        load_recipe("quickstart", ["train.log=[tensorbord]"])
    assert load_recipe("quickstart", ["train.log=tensorboard"]).train.log == ("tensorboard",)


def test_missing_tensorboard_fails_before_any_work(tmp_path, image_folder, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it raises ImportError
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(image_folder, train={"log": ["tensorboard"],
                                                                                   "device": "cpu"}))
    line = fails(capsys, "recipe", "run", recipe, "--out", tmp_path / "run")
    assert "'train.log'" in line and line.endswith("pip install tensorboard")
    assert not (tmp_path / "run").exists()
