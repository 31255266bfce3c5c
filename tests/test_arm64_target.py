"""export/run.py on a Jetson-class CPU (aarch64), proven under qemu-user emulation on this x86 host.

An arm64 Debian root with the aarch64 wheels of numpy, pillow and onnxruntime (tests/make_arm64_root.sh, no torch,
no edgedistill) runs ``run.py predict`` and ``verify`` on a tiny ONNX FP32 bundle: the scores must match the x86
run's within the bundle's own parity gate. Opt-in, as it needs root and the network once:

    EDGEDISTILL_ARM64=1 python -m pytest tests/test_arm64_target.py

The first run builds the root (a minute or more, 450 MB, in $EDGEDISTILL_ARM64_ROOT or
~/.cache/edgedistill/arm64-root; needs root, debootstrap, qemu-user-static, a Debian mirror and PyPI).
"""
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_export import make_run

from edgedistill.runtime.run import compare_scores

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgedistill[onnx]')")
REPO = Path(__file__).resolve().parents[1]
QEMU = "qemu-aarch64-static"
MIRROR = os.environ.get("MIRROR", "http://deb.debian.org/debian")
HOW = ("EDGEDISTILL_ARM64=1 python -m pytest tests/test_arm64_target.py (its first run builds an arm64 Debian root: "
       "as root, with debootstrap and qemu-user-static, apt-get install debootstrap qemu-user-static)")
EM_AARCH64 = 183  # e_machine of an aarch64 ELF file


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15).close()
        return True
    except OSError:
        return False


def build_root(root: Path):
    """Build the arm64 root with tests/make_arm64_root.sh, or skip saying what is missing."""
    missing = [t for t in ("debootstrap", "dpkg-deb", QEMU) if not shutil.which(t)]
    if missing:
        pytest.skip(f"the arm64 root needs {', '.join(missing)}: apt-get install debootstrap qemu-user-static")
    if os.geteuid() != 0:
        pytest.skip(f"building the arm64 root needs root (debootstrap); run once: sudo tests/make_arm64_root.sh {root}")
    for url in (f"{MIRROR}/dists/bookworm/Release", "https://pypi.org/simple/onnxruntime/"):
        if not reachable(url):
            pytest.skip(f"building the arm64 root needs {url}, which is unreachable from here")
    done = subprocess.run(["bash", str(REPO / "tests" / "make_arm64_root.sh"), str(root)], capture_output=True,
                          text=True, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def arm64(tmp_path_factory) -> dict:
    """The emulated interpreter's command line, environment and the root's facts (Debian, wheel versions)."""
    if os.environ.get("EDGEDISTILL_ARM64") != "1":
        pytest.skip(f"aarch64 emulation is opt-in: {HOW}")
    root = Path(os.environ.get("EDGEDISTILL_ARM64_ROOT", Path.home() / ".cache" / "edgedistill" / "arm64-root"))
    if not (root / ".edgedistill-root.json").is_file():
        build_root(root)
    if not shutil.which(QEMU):
        pytest.skip(f"{QEMU} is not installed: apt-get install qemu-user-static")
    facts = json.loads((root / ".edgedistill-root.json").read_text())
    # A bare environment: nothing of this host's Python (PYTHONPATH, a venv) may reach the emulated one.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path_factory.mktemp("home")), "QEMU_CPU": facts["qemu_cpu"],
           "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8"}
    return {"python": [QEMU, "-L", str(root), str(root / "usr" / "bin" / "python3")], "env": env, "root": root,
            "facts": facts}


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> Path:
    """What a user copies to the Jetson: export/, an ONNX FP32 bundle and some images, in a folder of their own."""
    from edgedistill.export import export_run

    run = make_run(tmp_path_factory.mktemp("arm64"))
    export_run(run, formats=["onnx"], precisions=["fp32"])
    folder = tmp_path_factory.mktemp("jetson")
    shutil.copytree(REPO / "export", folder / "export", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(run / "export" / "onnx-fp32", folder / "onnx-fp32")
    for i, (path, _) in enumerate(json.loads((run / "split.json").read_text())["test"]):
        (folder / "images").mkdir(exist_ok=True)
        shutil.copy(path, folder / "images" / f"{i:02d}-{Path(path).parent.name}.png")
    return folder


def run_py(python: list, device: Path, *args, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run([*python, "export/run.py", *args], cwd=device, env=env, capture_output=True, text=True,
                          check=False, timeout=1200)
    assert done.returncode == 0, done.stderr
    return done


def predict_scores(python: list, device: Path, env=None) -> np.ndarray:
    """``run.py predict --json`` on every image: the class probabilities [N, K] in the bundle's class order."""
    classes = json.loads((device / "onnx-fp32" / "manifest.json").read_text())["class_names"]
    images = sorted(str(p.relative_to(device)) for p in (device / "images").iterdir())
    out = json.loads(run_py(python, device, "predict", "onnx-fp32", *images, "--json", "--top-k", str(len(classes)),
                            env=env).stdout)
    assert [r["image"] for r in out] == images
    return np.array([[{t["class"]: t["probability"] for t in r["top"]}[c] for c in classes] for r in out])


def test_the_emulated_interpreter_is_aarch64_with_aarch64_wheels(arm64):
    probe = ("import json, platform, sys, numpy, PIL, onnxruntime; print(json.dumps({'machine': platform.machine(), "
             "'executable': sys.executable, 'ort': onnxruntime.__file__, 'has_torch': 'torch' in sys.modules}))")
    done = subprocess.run([*arm64["python"], "-c", probe], env=arm64["env"], capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["machine"] == "aarch64" and not facts["has_torch"]
    ort_so = next(Path(facts["ort"]).parent.glob("capi/onnxruntime_pybind11_state*.so"))
    for binary in (Path(facts["executable"]), ort_so):  # really arm64 code, from the root, not this host's
        assert binary.resolve().is_relative_to(arm64["root"].resolve()), binary
        with open(binary, "rb") as f:
            assert int.from_bytes(f.read(20)[18:20], "little") == EM_AARCH64, binary


def test_predict_and_verify_on_aarch64_match_x86(arm64, device):
    manifest = json.loads((device / "onnx-fp32" / "manifest.json").read_text())
    gate = manifest["parity"]["threshold"]
    # 1. predict: the same images through the same bundle, on this host and on the emulated aarch64 CPU.
    x86 = predict_scores([sys.executable], device)
    arm = predict_scores(arm64["python"], device, env=arm64["env"])
    # Log-probabilities are the logits less their log-sum-exp: in logit units, where saturated probabilities still
    # show a difference. FP32 on both hosts: NEON and AVX kernels may differ by rounding only.
    parity = compare_scores(np.log(x86), np.log(arm))
    assert parity["top1_agreement"] >= gate, parity
    assert parity["max_abs_error"] < 1e-4, parity
    # 2. verify: the reference images stored at export pass the bundle's own gate on aarch64 too.
    on_x86 = json.loads(run_py([sys.executable], device, "verify", "onnx-fp32").stdout)
    on_arm = json.loads(run_py(arm64["python"], device, "verify", "onnx-fp32", env=arm64["env"]).stdout)
    host = on_arm["host"]
    assert host["machine"] == "aarch64" and "NEON" in host["isa"] and not {"AVX2", "AVX-512"} & set(host["isa"])
    assert on_arm["top1_agreement"] >= gate and on_arm["same_as_export_host"]
    assert abs(on_arm["max_abs_error"] - on_x86["max_abs_error"]) < 1e-4
    print(json.dumps({"root": arm64["facts"], "images": len(x86), "max_logprob_diff": parity["max_abs_error"],
                      "verify_arm": {k: on_arm[k] for k in ("top1_agreement", "max_abs_error", "cosine_min")},
                      "verify_x86_max_abs_error": on_x86["max_abs_error"], "arm_host": host}, indent=1))
