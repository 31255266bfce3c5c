"""End to end through `cli.main`, stage reuse, kill-and-resume, and DDP on CPU."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgedistill.cli import main

from conftest import kill_when, tiny_recipe, write_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args):
    return main(["recipe", "run", *map(str, args)])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_folder):
    folder = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(folder / "tiny.yaml", tiny_recipe(image_folder, train={"epochs": 3, "batch_size": 8,
                                                                                   "lr": 0.003, "device": "cpu"}))
    assert run_cli(recipe, "--out", folder / "run") == 0
    return recipe, folder / "run"


def test_end_to_end_writes_metrics_and_report(finished_run):
    _, run = finished_run
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("teacher", "student", "baseline"):
        assert 0 <= metrics[name]["top1"] <= 100
        assert metrics[name]["n"] == metrics["n_test"] > 0
    assert metrics["teacher"]["gflops"] > 0 and metrics["student"]["gflops"] > 0
    # The teacher's parameters are what it runs: its backbone and the probe head, not the timm model's own classifier.
    from edgedistill.recipe import Recipe, build
    from edgedistill.teachers import build_teacher, load_head

    import yaml

    teacher = build_teacher(build(Recipe, yaml.safe_load((run / "recipe.yaml").read_text()), "").teacher)
    head = load_head(run / "probe" / "head.pt")
    classifier = sum(p.numel() for p in teacher.model.get_classifier().parameters())
    expected = sum(p.numel() for p in teacher.parameters()) - classifier + sum(p.numel() for p in head.parameters())
    assert classifier > 0 and metrics["teacher"]["params_m"] == pytest.approx(expected / 1e6)
    assert "agreement_with_teacher" in metrics["student"]
    report = (run / "report.md").read_text()
    assert "| student |" in report and "confusion-student.png" in report
    assert (run / "confusion-student.png").stat().st_size > 1000
    split = json.loads((run / "split.json").read_text())
    assert [s["path"].endswith("broken.jpg") for s in split["skipped"]] == [True], "the corrupt image is reported"
    assert (run / "recipe.yaml").exists() and (run / "student" / "model.pt").exists()


def test_rerun_reuses_every_stage_and_changes_nothing(finished_run, caplog):
    recipe, run = finished_run
    before = (run / "metrics.json").read_text()
    caplog.set_level("INFO")
    t0 = time.perf_counter()
    assert run_cli(recipe, "--out", run) == 0
    assert time.perf_counter() - t0 < 30
    reused = [r.message for r in caplog.records if "reused" in r.message]
    assert len(reused) == 7, reused  # split, features, probe, views, distill, baseline, evaluate
    after, before = json.loads((run / "metrics.json").read_text()), json.loads(before)
    strip = lambda m: {k: v for k, v in m.items() if k != "timings"}  # noqa: E731
    assert strip(after) == strip(before)
    # The stage times measured when the stages ran are kept, not overwritten with "reused" and a 0 s total.
    assert after["timings"]["stages_seconds"] == before["timings"]["stages_seconds"]
    assert after["timings"]["total_seconds"] == before["timings"]["total_seconds"] > 0
    assert len(after["timings"]["reused"]) == 7
    assert f"| total | {before['timings']['total_seconds']} |" in (run / "report.md").read_text()


def test_changed_setting_reruns_only_what_depends_on_it(finished_run, caplog):
    recipe, run = finished_run
    caplog.set_level("INFO")
    assert run_cli(recipe, "--out", run, "loss.temperature=4.0") == 0
    messages = " ".join(r.message for r in caplog.records)
    for stage in ("split", "features", "probe", "baseline"):
        assert f"stage {stage:<9} reused" in messages
    assert "stage distill   running" in messages


def test_a_new_code_version_recomputes_that_stage_and_what_follows(finished_run, caplog, monkeypatch):
    # A run folder made by older code is never silently reused: every stage's key carries its code version.
    from edgedistill import run_folder

    recipe, run = finished_run
    monkeypatch.setitem(run_folder.STAGE_VERSIONS, "features", run_folder.STAGE_VERSIONS["features"] + 1)
    caplog.set_level("INFO")
    assert run_cli(recipe, "--out", run) == 0
    messages = " ".join(r.message for r in caplog.records)
    assert "stage split     reused" in messages
    for stage in ("features", "probe", "distill", "baseline", "evaluate"):
        assert f"stage {stage:<9} running" in messages, stage


def test_typo_override_fails_fast_naming_the_key(capsys):
    t0 = time.perf_counter()
    assert main(["recipe", "run", "quickstart", "train.epoch=3"]) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert "train.epoch" in err and "train.epochs" in err


def test_offline_hub_recipe_fails_with_one_sentence(tmp_path, capsys, image_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = tiny_recipe(image_folder, teacher="dinov2")
    r["teacher"].update(arch="vit_small_patch14_dinov2.lvd142m")
    code = main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "download on first use" in err and "Traceback" not in err


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, image_folder, workers):
    # Ten short epochs and a cheap readiness check (the log is written right after each checkpoint): on a busy
    # machine the kill still lands mid-training, never after the last epoch.
    epochs = 10
    r = tiny_recipe(image_folder, train={"epochs": epochs, "batch_size": 8, "lr": 0.003, "device": "cpu"},
                    baseline=False)
    r["data"].update(num_workers=workers, views=3)
    recipe = write_recipe(tmp_path / "r.yaml", r)
    cmd = [sys.executable, "-m", "edgedistill", "recipe", "run", str(recipe), "--out"]
    straight = tmp_path / "straight"
    subprocess.run(cmd + [str(straight)], env=ENV, check=True, capture_output=True)

    killed = tmp_path / "killed"
    ckpt, log_file = killed / "student" / "checkpoint.pt", killed / "student" / "log.jsonl"
    kill_when(cmd + [str(killed)], lambda: log_file.exists() and len(log_file.read_text().splitlines()) >= 2,
              env=ENV, poll=0.01)
    epoch_at_kill = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= epoch_at_kill < epochs - 1 and not (killed / "student" / "model.pt").exists()

    resumed = subprocess.run(cmd + [str(killed)], env=ENV, check=True, capture_output=True, text=True)
    assert "resuming from the checkpoint" in resumed.stderr
    a, b = metrics_of(straight)["student"], metrics_of(killed)["student"]
    assert a["top1"] == b["top1"] and a["confusion"] == b["confusion"]
    sa = torch.load(straight / "student" / "model.pt", weights_only=False)["state_dict"]
    sb = torch.load(killed / "student" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "the resumed run ends with other weights"
    logged = (killed / "student" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in logged] == list(range(1, epochs + 1)), "the log has each epoch once"


def test_kill_during_the_feature_stage_and_resume_matches_uninterrupted_run(tmp_path):
    # SIGKILL while the teacher-feature cache is half written (2 data workers): the re-run computes only what is
    # missing and ends with the same weights, bit for bit, as a run that was never interrupted.
    from conftest import make_image_folder

    images = make_image_folder(tmp_path / "images", per_class=60, corrupt=False)
    r = tiny_recipe(images, train={"epochs": 2, "batch_size": 8, "lr": 0.003, "device": "cpu"}, baseline=False)
    r["data"].update(num_workers=2, views=1)
    r["teacher"]["batch_size"] = 2  # many small blocks: a wide window in which to kill
    recipe = write_recipe(tmp_path / "r.yaml", r)
    cmd = [sys.executable, "-m", "edgedistill", "recipe", "run", str(recipe), "--out"]
    straight = tmp_path / "straight"
    subprocess.run(cmd + [str(straight)], env=ENV, check=True, capture_output=True)

    killed = tmp_path / "killed"

    def half_written(flags: Path) -> bool:
        done = np.fromfile(flags, dtype=np.uint8)
        return 0 < done.sum() < done.size

    kill_when(cmd + [str(killed)],  # the train cache is filled after the "eval" one
              lambda: any(half_written(f) for f in (killed / "cache").glob("train-*/done.u8")), env=ENV, poll=0.002)
    assert not (killed / "stages" / "features.json").exists(), "killed after the feature stage, not during it"

    subprocess.run(cmd + [str(killed)], env=ENV, check=True, capture_output=True, text=True)
    sa = torch.load(straight / "student" / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(killed / "student" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "the resumed run ends with other weights"
    for model in ("teacher", "student"):
        assert metrics_of(straight)[model]["confusion"] == metrics_of(killed)[model]["confusion"], model


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, image_folder):
    # LayerNorm (not BatchNorm) student: per-rank batch statistics cannot differ.
    r = tiny_recipe(image_folder, student={"name": "test_vit", "model_kwargs": {"img_size": 32}}, baseline=False,
                    train={"epochs": 2, "batch_size": 8, "lr": 0.001, "device": "cpu"})
    recipe = write_recipe(tmp_path / "r.yaml", r)
    one, two = tmp_path / "one", tmp_path / "two"
    base = [sys.executable, "-m", "edgedistill", "recipe", "run", str(recipe), "--out"]
    subprocess.run(base + [str(one)], env=ENV, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                "-m", "edgedistill", "recipe", "run", str(recipe), "--out", str(two)]
    proc = subprocess.run(torchrun, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sa = torch.load(one / "student" / "model.pt", weights_only=False)["state_dict"]
    sb = torch.load(two / "student" / "model.pt", weights_only=False)["state_dict"]
    # The two runs differ only in the order of float additions (DDP averages two half-batch gradients); AdamW divides
    # each update by its gradient's running RMS, which lifts those rounding differences to ~1e-4 in a few weights.
    # A real DDP bug (ranks on the same or wrong half-batches) moves the loss itself, checked below at 1e-4.
    assert all(torch.allclose(sa[k], sb[k], atol=5e-4, rtol=1e-3) for k in sa)
    la = [json.loads(x)["loss"] for x in (one / "student" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (two / "student" / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


def test_online_teacher_with_mixup_trains(tmp_path, image_folder):
    r = tiny_recipe(image_folder, baseline=False, train={"epochs": 1, "batch_size": 8, "lr": 0.003, "device": "cpu",
                                                         "teacher": "online"})
    r["data"].update(mixup=0.2, augment="crop_flip_jitter")
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run")]) == 0
    row = json.loads((tmp_path / "run" / "student" / "log.jsonl").read_text().splitlines()[-1])
    assert row["kd"] > 0 and row["ce"] > 0


class _RunsCode:
    """Unpickling this runs code: what a hostile run folder could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_run_folder_carrying_pickled_code_is_refused(finished_run, tmp_path):
    # Opening a run folder someone sent you must never run their code: heads, students and checkpoints are read
    # with weights_only=True, so a pickled callable is refused instead of executed.
    import pickle
    import shutil

    from edgedistill.run_folder import load_run_teacher
    from edgedistill.students import load_student

    _, run = finished_run
    copy = tmp_path / "sent"
    shutil.copytree(run, copy)
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": _RunsCode(marker)}, copy / "probe" / "head.pt")
    saved = torch.load(copy / "student" / "model.pt", weights_only=True)
    torch.save({**saved, "extra": _RunsCode(marker)}, copy / "student" / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_run_teacher(copy)
    with pytest.raises(pickle.UnpicklingError):
        load_student(copy)
    assert not marker.exists(), "unpickling ran the folder's code"
    assert load_student(run)[1]["class_names"]  # the untouched folder still loads
