"""Shared fixtures: a tiny real-image folder and tiny recipes. Nothing here touches a model hub."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CLASSES = ("red", "green", "blue")


def make_image_folder(root, per_class: int = 16, size: int = 40, corrupt: bool = True, seed: int = 0):
    """Three classes of noisy images whose dominant colour is the class; one truncated JPEG when ``corrupt``."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 110, size=(size, size, 3))
            arr[..., label] += 110 + rng.integers(0, 35)
            r = rng.integers(4, size // 3)
            cx, cy = rng.integers(r, size - r, size=2)
            arr[cy - r:cy + r, cx - r:cx + r] //= 2
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    if corrupt:
        good = root / "red" / "000.png"
        (root / "red" / "broken.jpg").write_bytes(good.read_bytes()[:60])
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def tiny_recipe(image_folder, teacher: str = "tiny-cnn", **sections) -> dict:
    """A recipe that trains in seconds on CPU; ``sections`` override whole top-level sections."""
    recipe = {
        "name": "tiny",
        "data": {"dataset": "imagefolder", "root": str(image_folder), "test_fraction": 0.25, "image_size": 32,
                 "crop_pct": 1.0, "augment": "light", "views": 2},
        "teacher": {"name": teacher, "head": "linear", "probe_epochs": 20, "probe_lr": 0.01, "width": 32,
                    "runtime": "pytorch"},
        "student": {"name": "test_efficientnet"},
        "loss": {"ce": 0.5, "kd": 0.5},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "device": "cpu"},
    }
    recipe.update(sections)
    return recipe


def write_recipe(path, recipe: dict):
    path.write_text(yaml.safe_dump(recipe))
    return path


def kill_when(cmd: list, ready, env=None, timeout: float = 300, poll: float = 0.01):
    """Start ``cmd`` in a process group of its own and SIGKILL the whole group as soon as ``ready()`` is true.

    Fails the test if the command finished before it could be killed (the window to kill in was missed).
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready():
                break
        except (RuntimeError, EOFError, OSError):  # a file caught mid-write or mid-rename: look again
            pass
        time.sleep(poll)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
