"""Weights for air-gapped sites: local teacher/student/generator weights, provenance, fetch, pack and unpack.

Tiny random models built in code and saved to a temporary folder stand in for hub weights: an open_clip CLIP with a
tiny config, a timm ``test_efficientnet`` state dict and a tiny Stable Diffusion pipeline folder. No test uses the
network: the runs happen with HF_HUB_OFFLINE=1 and with sockets refusing to connect.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_recipe
from edgedistill import cli
from edgedistill.checks import load_checked
from edgedistill.recipe import RecipeError, StudentCfg, TeacherCfg

CLIP_CFG = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "image_size": 32,
                                            "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random weights as a site would receive them: an open_clip folder and file, a timm file, an SD folder."""
    import open_clip
    import timm
    from safetensors.torch import save_file

    from edgedistill.data import tiny_sd

    w = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=CLIP_CFG["embed_dim"], vision_cfg=open_clip.model.CLIPVisionCfg(
        **CLIP_CFG["vision_cfg"]), text_cfg=open_clip.model.CLIPTextCfg(**CLIP_CFG["text_cfg"]))
    (w / "clip").mkdir()
    (w / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CFG}))
    save_file(clip.state_dict(), w / "clip" / "open_clip_model.safetensors")
    save_file(clip.state_dict(), w / "clip.safetensors")  # the file form: arch names the config
    (w / "tiny-test-clip.json").write_text(json.dumps(CLIP_CFG))
    open_clip.add_model_config(w / "tiny-test-clip.json")
    torch.manual_seed(1)
    save_file(timm.create_model("test_efficientnet", pretrained=False).state_dict(), w / "student.safetensors")
    tiny_sd.text_pipeline().save_pretrained(w / "sd")
    return w


def refuse_network(mp: pytest.MonkeyPatch):
    """Any attempt to open a connection fails; HF_HUB_OFFLINE=1 as on an air-gapped machine."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a test that must run offline")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_network(monkeypatch):
    refuse_network(monkeypatch)


def air_recipe(image_folder, w) -> dict:
    return {"name": "air",
            "data": {"dataset": "imagefolder", "root": str(image_folder), "test_fraction": 0.25, "image_size": 32,
                     "crop_pct": 1.0, "views": 1, "max_per_class": 6},
            "teacher": {"name": "clip", "weights": str(w / "clip"), "head": "zeroshot", "runtime": "pytorch"},
            "student": {"name": "test_efficientnet", "weights": str(w / "student.safetensors")},
            "synthetic": {"generator": "tiny-sd", "weights": str(w / "sd"), "images_per_class": 2, "steps": 2,
                          "batch_size": 6},
            "loss": {"ce": 0.5, "kd": 0.5},
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "device": "cpu"},
            "baseline": False}


@pytest.fixture(scope="module")
def local_run(weights, image_folder, tmp_path_factory):
    """The recipe run once on the local weights, offline, sockets refusing: (recipe path, run folder)."""
    folder = tmp_path_factory.mktemp("local-run")
    recipe = write_recipe(folder / "air.yaml", air_recipe(image_folder, weights))
    with pytest.MonkeyPatch.context() as mp:
        refuse_network(mp)
        assert cli.main(["recipe", "run", str(recipe), "--out", str(folder / "run")]) == 0
    return recipe, folder / "run"


def test_local_weights_are_what_loads(weights, no_network):
    from safetensors.torch import load_file

    from edgedistill.students import create_backbone
    from edgedistill.teachers import build_teacher

    saved = load_file(weights / "clip.safetensors")
    for cfg in (TeacherCfg(name="clip", weights=str(weights / "clip")),
                TeacherCfg(name="clip", arch="tiny-test-clip", weights=str(weights / "clip.safetensors"))):
        state = build_teacher(cfg).model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items()), cfg
    student = load_file(weights / "student.safetensors")
    backbone = create_backbone(StudentCfg(name="test_efficientnet", weights=str(weights / "student.safetensors")))
    assert torch.equal(backbone.state_dict()["conv_stem.weight"], student["conv_stem.weight"])
    assert backbone.num_classes == 0  # the file's classifier is dropped, as timm drops a hub checkpoint's


def test_the_run_records_where_each_weight_came_from(local_run, weights):
    _, run = local_run
    record = json.loads((run / "weights.json").read_text())
    assert set(record) == {"teacher.weights", "student.weights", "synthetic.weights"}
    student = record["student.weights"]
    assert student["source"] == "local" and student["path"] == str((weights / "student.safetensors").resolve())
    assert student["sha256"] == sha256(weights / "student.safetensors")
    sd = record["synthetic.weights"]
    assert sd["kind"] == "folder" and sd["path"] == str((weights / "sd").resolve())
    assert sd["files"]["unet/diffusion_pytorch_model.safetensors"] == sha256(
        weights / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert record["teacher.weights"]["files"]["open_clip_model.safetensors"] == sha256(
        weights / "clip" / "open_clip_model.safetensors")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher"]["weights"] == f"local:{weights / 'clip'}"
    manifest = [json.loads(line) for line in (run / "synth" / "manifest.jsonl").read_text().splitlines()]
    assert {r["model_id"] for r in manifest} == {str(weights / "sd")}


def test_pack_unpack_elsewhere_runs_offline_to_the_same_result(local_run, weights, tmp_path, capsys):
    recipe, first = local_run
    assert cli.main(["weights", "pack", str(recipe), str(tmp_path / "air.tar")]) == 0
    with tarfile.open(tmp_path / "air.tar") as tar:
        meta = json.loads(tar.extractfile("weights.json").read())
    rows = {r["path"]: r for r in meta["files"]}
    assert rows["student/student.safetensors"]["sha256"] == sha256(weights / "student.safetensors")
    assert rows["student/student.safetensors"]["key"] == "student.weights"
    assert rows["synthetic/unet/diffusion_pytorch_model.safetensors"]["key"] == "synthetic.weights"
    assert meta["keys"] == {"teacher.weights": "teacher", "student.weights": "student/student.safetensors",
                            "synthetic.weights": "synthetic"}

    # The air-gapped machine: the original weights are gone, sockets refuse, HF_HUB_OFFLINE is set.
    hidden = weights.with_name(weights.name + "-gone")
    weights.rename(hidden)
    try:
        with pytest.MonkeyPatch.context() as mp:
            refuse_network(mp)
            assert cli.main(["weights", "unpack", str(tmp_path / "air.tar"), str(tmp_path / "site")]) == 0
            unpacked = tmp_path / "site" / "recipe.yaml"
            assert yaml.safe_load(unpacked.read_text())["student"]["weights"] == str(
                tmp_path / "site" / "student" / "student.safetensors")
            assert cli.main(["recipe", "run", str(unpacked), "--out", str(tmp_path / "run")]) == 0
    finally:
        hidden.rename(weights)
    assert "edgedistill recipe run" in capsys.readouterr().out
    again = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert again["student.weights"]["path"].startswith(str(tmp_path / "site"))
    assert again["student.weights"]["sha256"] == sha256(weights / "student.safetensors")
    a = torch.load(first / "student" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "student" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (first, tmp_path / "run"))
    assert ma["student"]["top1"] == mb["student"]["top1"] and ma["teacher"]["top1"] == mb["teacher"]["top1"]


def test_a_damaged_pack_is_refused(local_run, tmp_path, capsys):
    recipe, _ = local_run
    assert cli.main(["weights", "pack", str(recipe), str(tmp_path / "air.tar")]) == 0
    with tarfile.open(tmp_path / "air.tar") as tar:
        member = tar.getmember("student/student.safetensors")
    with open(tmp_path / "air.tar", "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert cli.main(["weights", "unpack", str(tmp_path / "air.tar"), str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "student.weights" in err and not (tmp_path / "site" / "recipe.yaml").exists()


def test_fetch_to_a_folder_copies_the_local_weights_with_their_sha256(local_run, weights, tmp_path):
    recipe, _ = local_run
    assert cli.main(["weights", "fetch", str(recipe), "--to", str(tmp_path / "copy")]) == 0
    meta = json.loads((tmp_path / "copy" / "weights.json").read_text())
    for row in meta["files"]:
        assert sha256(tmp_path / "copy" / row["path"]) == row["sha256"]
    fetched = load_checked(tmp_path / "copy" / "recipe.yaml")
    assert fetched.synthetic.weights == str(tmp_path / "copy" / "synthetic")
    assert sha256(fetched.student.weights) == sha256(weights / "student.safetensors")


@pytest.mark.parametrize("key, value, why", [
    ("teacher.weights", "{w}/missing.safetensors", "does not exist"),
    ("student.weights", "{w}/sd", "is a folder without"),
    ("synthetic.weights", "{w}/student.safetensors", "is not a diffusers pipeline folder"),
    ("teacher.weights", "{w}/sd", "is a folder without open_clip_config.json"),
])
def test_a_wrong_or_missing_path_is_refused_before_any_work(weights, image_folder, tmp_path, capsys, key, value,
                                                            why):
    recipe = write_recipe(tmp_path / "air.yaml", air_recipe(image_folder, weights))
    override = f"{key}={value.format(w=weights)}"
    with pytest.raises(RecipeError, match=f"Recipe key '{key}'.*{why}"):
        load_checked(recipe, [override])
    assert cli.main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run"), override]) == 2
    assert f"'{key}'" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_weights_for_a_teacher_that_loads_none_is_refused(weights, image_folder, tmp_path):
    recipe = write_recipe(tmp_path / "air.yaml", air_recipe(image_folder, weights))
    with pytest.raises(RecipeError, match="'teacher.weights': teacher 'tiny-clip' does not load a weights file"):
        load_checked(recipe, ["teacher.name=tiny-clip"])


@pytest.mark.parametrize("key, file", [("student.weights", "student.safetensors"),
                                       ("teacher.weights", "clip/open_clip_model.safetensors")])
def test_a_corrupt_checkpoint_gives_one_clear_line(weights, image_folder, tmp_path, capsys, key, file):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(weights, broken)
    (broken / file).write_bytes(b"not a checkpoint" * 64)
    recipe = write_recipe(tmp_path / "air.yaml", air_recipe(image_folder, broken))
    assert cli.main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"Recipe key '{key}'" in err and "could not be loaded" in err and str(broken) in err


def test_fetch_and_pack_honour_hf_home_and_hf_hub_offline(tmp_path, image_folder):
    """A hub student cached under HF_HOME packs offline; a teacher absent from that cache is named, nothing more."""
    import timm
    from safetensors.torch import save_file

    snapshot = tmp_path / "hf" / "hub" / "models--timm--test_efficientnet.r160_in1k"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    cached = snapshot / "snapshots" / ("0" * 40) / "model.safetensors"
    save_file(timm.create_model("test_efficientnet", pretrained=False).state_dict(), cached)
    hub = air_recipe(image_folder, tmp_path)
    hub["teacher"] = {"name": "tiny-clip", "head": "zeroshot"}
    hub["student"] = {"name": "test_efficientnet", "pretrained": True}
    del hub["synthetic"]
    write_recipe(tmp_path / "hub.yaml", hub)
    hub["teacher"] = {"name": "clip", "arch": "ViT-B-32", "head": "zeroshot"}
    write_recipe(tmp_path / "clip.yaml", hub)
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported: one fresh process runs both commands.
    script = ("import sys; from edgedistill import cli; print('codes', cli.main(['weights', 'pack', sys.argv[1], "
              "sys.argv[2]]), cli.main(['weights', 'fetch', sys.argv[3]]))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hub.yaml"), str(tmp_path / "hub.tar"),
                           str(tmp_path / "clip.yaml")], capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert "codes 0 2" in done.stdout, done.stderr
    with tarfile.open(tmp_path / "hub.tar") as tar:
        meta = json.loads(tar.extractfile("weights.json").read())
    assert meta["files"] == [{"path": "student/model.safetensors", "key": "student.weights",
                              "sha256": sha256(cached), "bytes": cached.stat().st_size}]
    errors = [line for line in done.stderr.splitlines() if line.startswith("edgedistill: error")]
    assert len(errors) == 1 and "teacher.weights (open_clip:ViT-B-32/datacomp_xl_s13b_b90k)" in errors[0], errors
    assert "HF_HUB_OFFLINE" in errors[0] and "student" not in errors[0]
