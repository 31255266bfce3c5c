"""The torch-free target runtime (export/run.py) and the engine builder (export/build_engine.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import make_run

from edgedistill.runtime import preprocess as pp
from edgedistill.runtime import run as rt

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgedistill[onnx]')")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from edgedistill.export import export_run

    run = make_run(tmp_path_factory.mktemp("target"))
    export_run(run, formats=["onnx"], precisions=["fp32", "int8"])
    return run


@pytest.fixture(scope="module")
def device(run_dir, tmp_path_factory):
    """What a user copies to a device: the export/ folder and a bundle, in a folder of their own."""
    folder = tmp_path_factory.mktemp("device")
    shutil.copytree(ROOT / "export", folder / "export", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(run_dir / "export" / "onnx-int8", folder / "onnx-int8")
    shim = folder / "shim"
    shim.mkdir()
    # sitecustomize runs at interpreter start: torch and edgedistill become unimportable.
    hide = "import sys\nsys.modules['torch'] = None\nsys.modules['edgedistill'] = None\n"
    (shim / "sitecustomize.py").write_text(hide)
    return folder


def no_torch_env(device: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(device / "shim")}


def test_shim_really_hides_torch(device):
    done = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env(device), cwd=device,
                          check=False, capture_output=True, text=True)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def test_predict_without_torch_gives_pytorch_top1(run_dir, device):
    from edgedistill.students import LogitsOnly, load_student

    split = json.loads((run_dir / "split.json").read_text())
    paths = [p for p, _ in split["test"][::3]]
    student, saved = load_student(run_dir)
    x = torch.from_numpy(np.stack([rt.preprocess(rt.load_image(p), saved["input"]) for p in paths]))
    with torch.inference_mode():
        expected = [saved["class_names"][i] for i in LogitsOnly(student)(x).argmax(1)]
    done = subprocess.run([sys.executable, "export/run.py", "predict", "onnx-int8", *paths, "--json"],
                          env=no_torch_env(device), cwd=device, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["top1"] for r in results] == expected
    assert all(abs(sum(t["probability"] for t in r["top"]) - 1) < 1e-5 for r in results)  # 3 classes, top-3


def test_bench_and_verify_without_torch(device):
    env = no_torch_env(device)
    done = subprocess.run([sys.executable, "export/run.py", "bench", "onnx-int8", "--batch", "1,4", "--iters", "5",
                           "--warmup", "1", "--json", "rows.json"], env=env, cwd=device, check=False,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads((device / "rows.json").read_text())
    assert [r["batch"] for r in rows] == [1, 4] and all(r["p50_ms"] > 0 for r in rows)
    assert rows[0]["backend"] == "onnxruntime" and rows[0]["precision"] == "int8"
    done = subprocess.run([sys.executable, "export/run.py", "verify", "onnx-int8"], env=env, cwd=device,
                          check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["top1_agreement"] >= 0.97 and result["host"]["cores"] >= 1
    # The export host's own figures on the same reference images travel in the manifest; here they are the same
    # host, so the agreement matches (on another CPU, verify says when it does not).
    assert result["export_host"]["top1_agreement"] == result["top1_agreement"] and result["same_as_export_host"]


def test_verify_says_when_this_host_disagrees_with_the_export_host(device, tmp_path):
    bundle = tmp_path / "onnx-int8"
    shutil.copytree(device / "onnx-int8", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["parity"]["reference_check"]["top1_agreement"] = 0.5  # as if exported on a CPU that rounds otherwise
    manifest["host"]["cpu"] = "Some Other CPU"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run([sys.executable, str(device / "export" / "run.py"), "verify", str(bundle)],
                          env=no_torch_env(device), check=False, capture_output=True, text=True)
    assert done.returncode == 0 and not json.loads(done.stdout)["same_as_export_host"]
    assert "differs from the export host's 0.500 (Some Other CPU)" in done.stderr


def test_altered_bundle_is_refused_on_the_device(device, tmp_path):
    bundle = tmp_path / "onnx-int8"
    shutil.copytree(device / "onnx-int8", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    done = subprocess.run([sys.executable, str(device / "export" / "run.py"), "predict", str(bundle),
                           str(tmp_path / "x.png")], env=no_torch_env(device), check=False, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "model.onnx changed after export" in done.stderr, done.stderr


@pytest.mark.parametrize("tamper", ["outside", "unlisted"])
def test_manifest_pointing_outside_or_at_an_unchecked_file_is_refused(device, tmp_path, tamper):
    # A manifest that sends the runtime to a file outside the bundle, or to one its sha256 table does not cover,
    # would run a model nobody checked: run.py refuses, with one line and exit code 2.
    bundle = tmp_path / "onnx-int8"
    shutil.copytree(device / "onnx-int8", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if tamper == "outside":
        shutil.copy(bundle / "model.onnx", tmp_path / "other.onnx")
        manifest["model_file"] = "../other.onnx"
        manifest["files"]["../other.onnx"] = manifest["files"]["model.onnx"]
        expected = "points outside the bundle"
    else:
        shutil.copy(bundle / "model.onnx", bundle / "other.onnx")
        manifest["model_file"] = "other.onnx"
        expected = "not in the manifest's sha256 table"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    done = subprocess.run([sys.executable, str(device / "export" / "run.py"), "predict", str(bundle),
                           str(tmp_path / "x.png")], env=no_torch_env(device), check=False, capture_output=True,
                          text=True)
    assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_copied_export_folder_runs_from_any_cwd_without_its_folder_on_sys_path(device, tmp_path):
    # -P keeps the script's own folder off sys.path (as -I and some embedding hosts do), and the cwd is elsewhere:
    # run.py still finds preprocess.py beside it. The shim makes torch and edgedistill unimportable.
    Image.new("RGB", (30, 20), "blue").save(tmp_path / "x.png")
    done = subprocess.run([sys.executable, "-P", str(device / "export" / "run.py"), "predict",
                           str(device / "onnx-int8"), "x.png", "--json"],
                          env=no_torch_env(device), cwd=tmp_path, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["top1"] == "blue"


def test_library_preprocessing_is_the_code_in_export_preprocess_py():
    from edgedistill import data
    from edgedistill.export import images

    source = str(ROOT / "export" / "preprocess.py")
    for fn in (data.preprocess, data.resize_normalize, data.center_crop_box, data.to_rgb,
               images.input_pixels, images.normalize, images.load_image, rt.preprocess):
        assert fn.__code__.co_filename == source, fn
    assert data.preprocess is pp.preprocess is rt.preprocess  # one module object, not a second copy


def test_library_imports_the_runtime_from_a_plain_checkout():
    # -S skips the .pth files, so no editable-install finder: only the checkout and site-packages are on sys.path.
    import site

    code = ("import sys; sys.path[:0] = sys.argv[1:]; import edgedistill.data, edgedistill.export.parity; "
            "print(edgedistill.runtime.preprocess.__file__)")
    done = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT), *site.getsitepackages()],
                          cwd=ROOT.parent, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ROOT / "export" / "preprocess.py")


def test_load_bundle_api(run_dir):
    bundle = rt.load_bundle(run_dir / "export" / "onnx-fp32", threads=1)
    assert bundle.class_names == ["red", "green", "blue"] and bundle.name == "onnx-fp32"
    from edgedistill.students import load_student

    _, saved = load_student(run_dir)
    assert {k: bundle.spec[k] for k in saved["input"]} == saved["input"]  # preprocessing recorded exactly
    images = [Image.new("RGB", (64, 40), c) for c in ("red", "green", "blue")]
    direct = bundle.predict(np.stack([rt.preprocess(i, saved["input"]) for i in images]))
    np.testing.assert_array_equal(bundle.predict_images(images), direct)
    assert list(direct.argmax(1)) == [0, 1, 2]
    with pytest.raises(ValueError, match="NCHW"):
        bundle.predict(np.zeros((3, 48, 48), np.float32))


def test_missing_runtime_names_the_install_command(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    bundle = run_dir / "export" / "onnx-fp32"
    manifest = rt.read_manifest(bundle)
    with pytest.raises(ImportError, match="pip install openvino"):
        rt.openvino_runner(bundle, manifest, 0, "")


def test_build_engine_without_tensorrt_says_what_to_install(run_dir, tmp_path):
    if shutil.which("trtexec") or _has("tensorrt"):
        pytest.skip("TensorRT is installed here")
    script, bundle = ROOT / "export" / "build_engine.py", run_dir / "export" / "onnx-fp32"
    done = subprocess.run([sys.executable, str(script), str(bundle), "--out", str(tmp_path / "engine")],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 2
    assert "Neither the tensorrt Python package nor trtexec" in done.stderr and "JetPack" in done.stderr


def test_trtexec_command(tmp_path, monkeypatch):
    """The trtexec path, against a stand-in trtexec that records its arguments (TensorRT can't be installed here)."""
    from edgedistill.runtime import build_engine as be

    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = --help ]; then echo '  --skipInference'; exit 0; fi\n"
                    f"echo \"$@\" > {tmp_path}/args\n"
                    "for a in \"$@\"; do case $a in --saveEngine=*) echo engine > \"${a#--saveEngine=}\";; esac; done\n"
                    "echo '[I] [TensorRT v100300] done'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    facts = be.build_with_trtexec("m.onnx", tmp_path / "m.engine", "fp16", (3, 48, 48), True, 8, tmp_path / "t.cache")
    args = (tmp_path / "args").read_text().split()
    assert "--fp16" in args and f"--timingCacheFile={tmp_path / 't.cache'}" in args and "--skipInference" in args
    assert "--minShapes=input:1x3x48x48" in args and "--maxShapes=input:8x3x48x48" in args
    assert facts["tensorrt"] == "100300"
    assert (tmp_path / "m.engine").read_text() == "engine\n" and not list(tmp_path.glob(".m.engine*")), \
        "the engine lands under its own name only once trtexec finished"
    with pytest.raises(rt.BundleError, match="trtexec cannot calibrate INT8"):
        be.build_with_trtexec("m.onnx", tmp_path / "m.engine", "int8", (3, 48, 48), True, 8, None)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.gpu
def test_tensorrt_engine_matches_pytorch(run_dir, tmp_path):
    if not (_has("tensorrt") and torch.cuda.is_available()):
        pytest.skip("TensorRT engines need the tensorrt package and an NVIDIA GPU; neither can be installed here")
    from edgedistill.runtime.build_engine import build_bundle

    folder = build_bundle(run_dir / "export" / "onnx-fp32", "fp16", out=tmp_path / "tensorrt-fp16")
    assert json.loads((folder / "manifest.json").read_text())["parity"]["passed"]
