"""What the demo runs: the PyTorch student, the exported bundles and the teacher of a run, each loaded on first use.

A folder is either a run (``RUN/student/model.pt``, bundles under ``RUN/export/*/``) or one exported bundle
(``manifest.json``), which then runs alone and needs no torch. Every model answers ``scores(img, names, text)``
with probabilities over ``names``; ``text`` is a [K, D] array of class text embeddings when a CLIP-aligned
model is asked about classes it was not trained on.
"""
import importlib.util
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedistill.runtime.preprocess import preprocess
from edgedistill.runtime.run import MANIFEST, load_bundle, read_manifest, softmax

FORMAT_NAMES = {"onnx": "ONNX", "openvino": "OpenVINO", "tensorrt": "TensorRT"}
PYTORCH = "PyTorch"


@dataclass
class Answer:
    """One model's answer on one image: probabilities over ``names`` and where the time went."""

    names: list
    probs: np.ndarray
    prep_ms: float
    model_ms: float

    def top(self, k: int) -> dict:
        order = np.argsort(-self.probs)[:k]
        return {self.names[i]: float(self.probs[i]) for i in order}

    @property
    def top1(self) -> str:
        return self.names[int(np.argmax(self.probs))]


class Lazy:
    """A model built on first use, once, thread-safely; a failure is remembered so the page can keep saying why."""

    def __init__(self, build):
        self._build, self._lock = build, threading.Lock()
        self._value, self._error = None, None

    def get(self):
        with self._lock:
            if self._value is None and self._error is None:
                try:
                    self._value = self._build()
                except Exception as e:  # weights, runtimes and GPUs fail in many ways; the page shows the sentence
                    self._error = e
            if self._error is not None:
                raise self._error
            return self._value


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t0) * 1e3


class TorchStudent:
    """The run's student in PyTorch; a CLIP-aligned one also scores new class text embeddings."""

    def __init__(self, run_dir: Path):
        import torch

        from edgedistill.students import load_student

        self.torch = torch
        self.model, saved = load_student(run_dir)
        self.spec, self.class_names = saved["input"], list(saved["class_names"])
        self.zero_shot = self.model.zero_shot is not None

    def scores(self, img, names, text=None) -> Answer:
        torch = self.torch
        x, prep_ms = timed(lambda: torch.from_numpy(preprocess(img, self.spec))[None])
        with torch.inference_mode():
            out, model_ms = timed(self.model, x)
            if text is None:
                logits = out["logits"]
            else:  # the same cosine head the student was trained with, over the new classes
                emb = torch.nn.functional.normalize(out["embedding"], dim=-1)
                logits = getattr(self.model.zero_shot, "scale", 100.0) * emb @ torch.from_numpy(text).T
        return Answer(list(names), softmax(logits.float().numpy())[0], prep_ms, model_ms)


class BundleStudent:
    """An exported bundle through the torch-free target runtime; its classes are baked in."""

    def __init__(self, folder: Path):
        self.bundle = load_bundle(folder)
        kind = self.bundle.manifest.get("output", {}).get("kind", "logits")
        if kind not in ("logits", "zero_shot_scores"):
            raise RuntimeError(f"Bundle {folder.name} outputs {kind!r}, not class scores, so it cannot classify")

    def scores(self, img, names, text=None) -> Answer:
        x, prep_ms = timed(lambda: self.bundle.preprocess(img)[None])
        out, model_ms = timed(self.bundle.predict, x)
        return Answer(list(names), softmax(out)[0], prep_ms, model_ms)


class TeacherModel:
    """The run's teacher with its head; a CLIP teacher also embeds class names typed on the page."""

    def __init__(self, run_dir: Path):
        import torch

        from edgedistill.run_folder import load_run_recipe, load_run_teacher

        self.torch = torch
        self.recipe = load_run_recipe(run_dir)
        self.teacher = load_run_teacher(run_dir)
        spec = self.teacher.info.input.to_dict()
        # The probe head was fitted on features of exactly this view (stages.view_crop).
        self.spec = {**spec, "crop_pct": self.recipe.data.crop_pct or spec["crop_pct"]}
        self.class_names = list(self.teacher.class_names)
        self._text_cache, self._text_lock = {}, threading.Lock()

    @property
    def name(self) -> str:
        info = self.teacher.info
        return f"{info.name} {info.arch}".strip()

    @property
    def embeds_text(self) -> bool:
        return hasattr(self.teacher, "class_text_embeddings")

    def text_embeddings(self, names) -> np.ndarray:
        """Normalised [K, D] text embeddings of ``names`` with the run's prompt templates (cached per list)."""
        from edgedistill.stages import class_prompt_names

        key = tuple(names)
        with self._text_lock:
            if key not in self._text_cache:
                r = self.recipe
                emb = self.teacher.class_text_embeddings(class_prompt_names(r, names), r.teacher.templates,
                                                         r.data.superclass)
                self._text_cache = {key: emb.float().numpy()}  # one list at a time is all a page needs
            return self._text_cache[key]

    def scores(self, img, names, text=None) -> Answer:
        torch = self.torch
        x, prep_ms = timed(lambda: torch.from_numpy(preprocess(img, self.spec))[None])
        t0 = time.perf_counter()
        with torch.inference_mode():
            features = self.teacher.encode(x)
            if text is None:
                logits = self.teacher.logits(features)
            else:
                scale = getattr(self.teacher.head, "scale", 100.0)
                logits = scale * torch.nn.functional.normalize(features, dim=-1) @ torch.from_numpy(text).T
        model_ms = (time.perf_counter() - t0) * 1e3
        return Answer(list(names), softmax(logits.float().numpy())[0], prep_ms, model_ms)


@dataclass
class BackendChoice:
    label: str            # what the page shows, e.g. "ONNX fp32"
    lazy: Lazy
    unavailable: str = ""  # why it cannot run here, known before loading (a missing runtime)


def bundle_label(manifest: dict) -> str:
    return f"{FORMAT_NAMES.get(manifest['format'], manifest['format'])} {manifest['precision']}"


def bundle_order(manifest_file: Path) -> tuple:
    """Bundles in the format table's order (ONNX, OpenVINO, TensorRT), then by precision."""
    fmt, order = manifest_file.parent.name.split("-")[0], list(FORMAT_NAMES)
    return (order.index(fmt) if fmt in order else len(order), manifest_file.parent.name)


def runtime_missing(manifest: dict) -> str:
    module = manifest.get("runtime", {}).get("name") or manifest["format"]
    return "" if importlib.util.find_spec(module) else f"needs the {module!r} runtime, which is not installed here"


def parity_failure(manifest: dict) -> str:
    """Why a bundle must not be offered: it failed the export's parity gate (it disagrees with the student)."""
    parity = manifest.get("parity") or {}
    if parity.get("passed") is not False:
        return ""
    return (f"failed its parity check at export (top-1 agreement {parity.get('top1_agreement', 0):.3f} < "
            f"{parity.get('threshold')})")


class DemoModels:
    """What a run folder or a bundle folder offers the page: student backends, the teacher, the classes."""

    def __init__(self, path):
        # 1. Tell a run from a bundle, reading only small files: the page must be up within seconds.
        self.path = Path(path).expanduser().resolve()
        self.is_bundle = (self.path / MANIFEST).is_file()
        if not self.is_bundle and not (self.path / "student" / "model.pt").is_file():
            raise FileNotFoundError(f"{self.path} is neither a run folder (with student/model.pt) nor an exported "
                                    f"bundle (with {MANIFEST})")
        # 2. Classes and whether the student is CLIP-aligned.
        self.metrics, self.recipe = {}, None
        if self.is_bundle:
            manifest = read_manifest(self.path)
            source = manifest.get("source") or {}
            self.name = f"{Path(source.get('run', '')).name or 'run'} · {self.path.name} bundle"
            self.class_names = list(manifest["class_names"])
            self.zero_shot = manifest.get("output", {}).get("kind") == "zero_shot_scores"
            self.student_name = (source.get("student") or {}).get("name", "student")
        else:
            from edgedistill.utils import read_json

            self.recipe = read_run_recipe(self.path)
            self.name = self.recipe.name
            self.class_names = list(read_json(self.path / "split.json")["classes"])
            self.zero_shot = bool(self.recipe.eval.zero_shot)
            self.student_name = self.recipe.student.name
            if (self.path / "metrics.json").is_file():
                self.metrics = read_json(self.path / "metrics.json")
        # 3. Backends, loaded on first use; the teacher only for a run.
        self.backends = self._find_backends()
        run_dir = self.path
        self.teacher = None if self.is_bundle else Lazy(lambda: TeacherModel(run_dir))

    def _find_backends(self) -> dict:
        if self.is_bundle:
            manifest = read_manifest(self.path)
            return {bundle_label(manifest): BackendChoice(bundle_label(manifest), Lazy(lambda: BundleStudent(
                self.path)), runtime_missing(manifest))}
        run_dir = self.path
        choices = {PYTORCH: BackendChoice(PYTORCH, Lazy(lambda: TorchStudent(run_dir)))}
        for file in sorted((self.path / "export").glob(f"*/{MANIFEST}"), key=bundle_order):
            try:
                manifest = read_manifest(file)
                label = bundle_label(manifest)
            except (ValueError, KeyError):  # a bundle being written right now, or not a bundle
                continue
            folder = file.parent
            choices[label] = BackendChoice(label, Lazy(lambda folder=folder: BundleStudent(folder)),
                                           parity_failure(manifest) or runtime_missing(manifest))
        return choices

    @property
    def usable_backends(self) -> list:
        return [label for label, b in self.backends.items() if not b.unavailable]

    @property
    def teacher_name(self) -> str:
        if self.recipe is None:
            return ""
        t = self.recipe.teacher
        return f"{t.name} {t.arch}".strip()

    def warm_up(self):
        """Load the default backend and the teacher in the background so the first click is not the slow one."""
        def load():
            for lazy in [self.backends[self.usable_backends[0]].lazy] if self.usable_backends else []:
                try_get(lazy)
            if self.teacher is not None:
                try_get(self.teacher)
        threading.Thread(target=load, name="demo-warm-up", daemon=True).start()


def read_run_recipe(run_dir: Path):
    """``run_folder.load_run_recipe`` without importing torch (the server starts while the models load)."""
    import yaml

    from edgedistill.recipe import Recipe, build

    return build(Recipe, yaml.safe_load((run_dir / "recipe.yaml").read_text()), "")


def try_get(lazy: Lazy):
    try:
        return lazy.get()
    except Exception:  # remembered by Lazy; the page reports it on the next request
        return None
