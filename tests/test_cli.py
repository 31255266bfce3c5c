"""The command line's boundary cases: each is one line on stderr and exit code 2, never a traceback.

An unexpected error is one line naming its type (exit 1), with the traceback only under ``-v``.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgedistill.cli import main

from conftest import make_image_folder, tiny_recipe, write_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def fails(capsys, *argv, code: int = 2) -> str:
    """Run ``edgedistill ARGV``; assert it exits with ``code`` and says one line; return that line."""
    result = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert result == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgedistill: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def bundle_run(tmp_path_factory):
    """A tiny trained run folder with an onnx-fp32 bundle (a few seconds on CPU)."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgedistill[onnx]')")
    from test_export import make_run

    from edgedistill.export import export_run

    run = make_run(tmp_path_factory.mktemp("cli"))
    export_run(run, formats=["onnx"], precisions=["fp32"])
    return run


def run_recipe_on(tmp_path, images, *overrides) -> list:
    """argv for ``recipe run`` of the tiny recipe on ``images`` into tmp_path/run."""
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(images))
    return ["recipe", "run", recipe, "--out", tmp_path / "run", *overrides]


def no_model_work(run: Path) -> bool:
    """No stage of the run finished: nothing after the split (teacher features, training) ran."""
    return not list((run / "stages").glob("*.json")) if run.exists() else True


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: tiny\ndata: {root: images\ntrain:\n  epochs: 2\n")  # the flow mapping is never closed
    done = subprocess.run([sys.executable, "-m", "edgedistill", "recipe", "show", str(bad)], env=ENV,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml" in lines[0], done.stderr
    assert "line" in lines[0] and "column" in lines[0], lines[0]


@pytest.mark.parametrize("verb", [["recipe", "run"], ["recipe", "sweep"], ["synth"]])
@pytest.mark.parametrize("inside", [False, True], ids=["file", "below-a-file"])
def test_out_that_is_a_file_fails_before_any_work(capsys, tmp_path, verb, inside):
    taken = tmp_path / "results.txt"
    taken.write_text("not a folder")
    out = taken / "run" if inside else taken
    line = fails(capsys, *verb, "quickstart", "--out", out)
    assert str(out) in line and ("is a file, not a folder" if inside else "exists and is not a folder") in line
    assert taken.read_text() == "not a folder"


def test_image_folder_with_one_class_names_root_and_class(capsys, tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    for name in ("green", "blue"):
        shutil.rmtree(images / name)
    line = fails(capsys, *run_recipe_on(tmp_path, images))
    assert str(images) in line and "['red']" in line and "at least two" in line
    assert no_model_work(tmp_path / "run")


def test_class_of_only_corrupt_images_is_named(capsys, tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    for path in (images / "blue").iterdir():
        path.write_bytes(b"\xff\xd8\xff\xe0 truncated")  # a JPEG header and nothing else
    line = fails(capsys, *run_recipe_on(tmp_path, images))
    assert "class 'blue' has no readable image" in line and "'red'" not in line
    assert no_model_work(tmp_path / "run")


def test_empty_class_folder_is_named(capsys, tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    (images / "purple").mkdir()
    line = fails(capsys, *run_recipe_on(tmp_path, images))
    assert "'purple'" in line and "no training images" in line
    assert no_model_work(tmp_path / "run")


def test_tampered_bundle_is_refused(capsys, tmp_path, bundle_run):
    bundle = tmp_path / "onnx-fp32"
    shutil.copytree(bundle_run / "export" / "onnx-fp32", bundle)
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")
    line = fails(capsys, "bench", bundle, "--iters", 1, "--warmup", 0)
    assert "model.onnx changed after export" in line


def test_missing_optional_backend_names_the_install(capsys, monkeypatch, bundle_run):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails as if it were not installed
    line = fails(capsys, "export", bundle_run, "--formats", "openvino")
    assert "pip install 'edgedistill[openvino]'" in line
    assert not (bundle_run / "export" / "openvino-fp32").exists()


class _RunsCode:
    """Unpickling this runs code: what a hostile run folder could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("payload", ["pickled code", "garbage"])
def test_run_folder_with_pickled_code_or_a_damaged_file_is_refused(capsys, tmp_path, bundle_run, payload):
    sent = tmp_path / "sent"
    shutil.copytree(bundle_run, sent, ignore=shutil.ignore_patterns("export"))
    marker = tmp_path / "pwned"
    if payload == "garbage":
        (sent / "student" / "model.pt").write_bytes(b"not a checkpoint")
    else:
        saved = torch.load(sent / "student" / "model.pt", weights_only=True)
        torch.save({**saved, "extra": _RunsCode(marker)}, sent / "student" / "model.pt")
    line = fails(capsys, "bench", sent, "--iters", 1, "--warmup", 0)
    expected = "it carries pickled code" if payload == "pickled code" else "is damaged or was not written by"
    assert expected in line and "weights_only" not in line and "add_safe_globals" not in line
    assert not marker.exists(), "loading the run folder ran its code"


def test_negative_learning_rate_names_the_key(capsys, tmp_path, image_folder):
    line = fails(capsys, *run_recipe_on(tmp_path, image_folder, "train.lr=-1"))
    assert "train.lr" in line
    assert not (tmp_path / "run").exists()


def boom():
    raise RuntimeError("something broke\ninside")


def test_unexpected_error_is_one_line_and_traceback_only_with_verbose(capsys, monkeypatch):
    monkeypatch.setattr("edgedistill.recipe.builtin_recipes", boom)
    line = fails(capsys, "recipe", "list", code=1)
    assert line == "edgedistill: error: RuntimeError: something broke inside (run with -v for the traceback)"
    assert main(["-v", "recipe", "list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in boom" in err
    assert err.strip().splitlines()[-1] == "edgedistill: error: RuntimeError: something broke inside"


def test_interrupt_says_how_to_resume(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("edgedistill.pipeline.run_recipe", interrupted)
    assert main(["recipe", "run", "quickstart", "--out", str(tmp_path / "run")]) == 130
    out, err = capsys.readouterr()
    assert err.strip() == "edgedistill: interrupted; re-run the same command to resume" and "Traceback" not in out
